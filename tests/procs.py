"""Process helpers for the tests: the supervision tests (tests/test_launch.py, tests/test_process.py) and whole
`gtpo up` runs (tests/test_services_e2e.py, tests/test_tracking.py)."""

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def start_supervisor(child: str) -> subprocess.Popen:
    """`gtpo launch`'s supervisor (run_supervised) running `python -c child`, in a process of its own."""
    supervisor = (
        "import sys; from services.trainer.launch import run_supervised; "
        f"sys.exit(run_supervised([sys.executable, '-c', {child!r}]))"
    )
    return subprocess.Popen([sys.executable, "-c", supervisor], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def wait_until(done: Callable[[], bool], proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """Poll `done` until it holds; fails if `proc` exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead for our purpose
        return f.read().split(")")[-1].split()[0] != "Z"


def outlives(pid: int, wait_s: float) -> bool:
    """Whether `pid` is still alive after up to `wait_s`; a survivor is SIGKILLed so no test leaves it behind."""
    deadline = time.monotonic() + wait_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    survived = alive(pid)
    if survived:
        os.kill(pid, signal.SIGKILL)
    return survived


def run_gtpo_up(cfg, redis_url: str, timeout_s: float = 300) -> None:
    """Write `cfg` (an RLConfig) next to its run and run `gtpo up` on it to the end; fails with the tails of its
    output and of every service log unless it exits 0."""
    from shared.config.loader import dump_config

    cfg_file = cfg.output_dir.parent / "run.yaml"
    cfg_file.write_text(dump_config(cfg))
    env = {**os.environ, "REDIS_URL": redis_url, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "services", "up", "--config", str(cfg_file)], env=env,
                         timeout=timeout_s, capture_output=True, text=True)  # fmt: skip
    logs = "\n".join(p.read_text()[-2000:] for p in (cfg.output_dir / "logs").glob("*.log"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:] + logs


def serve_app(app, port: int = 0, wait_s: float = 60.0):
    """An ASGI `app` served by uvicorn on 127.0.0.1 (`port` 0: a free one) in a daemon thread, once it listens.

    Returns:
        (the uvicorn server, its thread, the base URL).
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + wait_s
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
