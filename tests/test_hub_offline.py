"""`data: hf:...` with a hub that does not answer: one line naming the dataset, at once, not half a minute of logged
retries (a real process; the hub endpoint is a closed port on 127.0.0.1)."""

import os
import socket
import subprocess
import sys

import pytest

from tests.procs import REPO

pytest.importorskip("datasets")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_hub_fails_in_one_line_naming_the_dataset(tmp_path):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"),
           "COLUMNS": "400"}  # fmt: skip
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    res = subprocess.run([sys.executable, "-m", "services", "eval", "hf:org/absent", "--model", str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    out = (res.stdout + res.stderr).strip()
    assert res.returncode == 2, out
    assert len(out.splitlines()) == 1, out  # no retry lines from the hub client
    assert out.startswith("gtpo eval: data: hf:org/absent: the hub ") and f"{endpoint} is unreachable" in out, out
    assert "org/absent" in out and "Traceback" not in out
