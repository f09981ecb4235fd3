"""The code reward against hostile programs, on every sandbox backend this machine can run, and real-format problems.

Each hostile program attacks something (time, processes, memory, the filesystem outside its directory, the
environment of the service, the network and Redis, its parent, the verdict itself) and, where the attack does not
raise, then defines a *correct* function: a sandbox that let the attack through would score it 1. Every one must
come back `timeout`, `error` or 0; afterwards nothing outside the sandbox has changed, no sandboxed process is left,
Redis holds no key the programs tried to set, and the service's secret is in no result and no log line. One batch
per backend goes through the pool at once (parallel), with short per-test limits.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from fastapi.testclient import TestClient

from services.reward.code import CodeRunner
from services.reward.sandbox import BASE_UID, available
from shared.code_data import code_rows
from shared.contracts.code_tests import CodeTests, StdioCase
from shared.contracts.wire import ScoreStatus
from shared.data import read_jsonl

BACKENDS = [b for b in ("bwrap", "unshare") if available(b)]
BACKEND = BACKENDS[0] if BACKENDS else "insecure"
"""Where no namespace can be made, the scoring tests still run (without isolation); the hostile ones do not."""
SECRET = "gtpo-secret-" + secrets.token_hex(8)
WORKERS = 4
SANDBOX_UIDS = range(BASE_UID, BASE_UID + WORKERS)
UNIT_S = 0.5
DATA = Path(__file__).parent / "data" / "code"
CORRECT_F = "\ndef f(x):\n    return x + 1\n"
F_TESTS = CodeTests(asserts=["assert f(1) == 2", "assert f(5) == 6"]).dumps()
IO_TESTS = CodeTests(cases=[StdioCase(input="1\n", output="2\n")]).dumps()


def hostile(sentinel: Path, redis_host: str, redis_port: int, key: str) -> dict[str, tuple[str, str, str]]:
    """name -> (program, tests, expected: `fail` = anything but a positive ok score; `timeout` = that status;
    `pass` = 1, for the two controls)."""
    me = os.getpid()
    resp = f"*3\\r\\n$3\\r\\nSET\\r\\n${len(key)}\\r\\n{key}\\r\\n$1\\r\\n1\\r\\n"
    fake = json.dumps({"nonce": "0" * 32, "passed": [True] * 8, "outputs": ["2\n"] * 8})
    programs = {
        "infinite_loop": "while True:\n    pass\n",
        "loop_in_call": "def f(x):\n    while True:\n        pass\n",
        "loop_ignoring_alarm": "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass\n",
        "sleep_alarm_blocked": "import signal, time\nsignal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])\n"
        "time.sleep(100)\n",
        "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
        "fork_bomb_persistent": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "thread_bomb": "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(100,)).start()\n",
        "alloc_10gb": "x = bytearray(10 * 1024 ** 3)\n" + CORRECT_F,
        "alloc_gradual": "xs = []\nwhile True:\n    xs.append(bytearray(64 * 1024 ** 2))\n",
        "write_outside": f"open({str(sentinel / 'evil.txt')!r}, 'w').write('x')\n" + CORRECT_F,
        "delete_outside": f"import os\nos.remove({str(sentinel / 'keep.txt')!r})\n" + CORRECT_F,
        "write_usr": "open('/usr/gtpo-evil', 'w').write('x')\n" + CORRECT_F,
        "chdir_root_write": "import os\nos.chdir('/')\nopen('gtpo-evil', 'w').write('x')\n" + CORRECT_F,
        "symlink_escape": "import os\nos.symlink('/', 'up')\nopen('up/etc/shadow').read()\n" + CORRECT_F,
        "read_self_environ": "raise Exception(open('/proc/self/environ').read())\n",
        "read_parent_environ": "import os\nraise Exception(open(f'/proc/{os.getppid()}/environ').read())\n",
        "read_service_environ": f"raise Exception(open('/proc/{me}/environ').read())\n",
        "scan_all_environ": "import glob\nxs = []\nfor p in glob.glob('/proc/*/environ'):\n    try:\n"
        "        xs.append(open(p).read())\n    except OSError:\n        pass\nraise Exception(repr(xs))\n",
        "os_environ": "import os\nraise Exception(repr(dict(os.environ)))\n",
        "redis_socket": f"import socket\ns = socket.create_connection(({redis_host!r}, {redis_port}), timeout=1)\n"
        f"s.sendall(b'{resp}')\ns.recv(16)\n" + CORRECT_F,
        "internet": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n" + CORRECT_F,
        "dns": "import socket\nsocket.getaddrinfo('example.com', 80)\n" + CORRECT_F,
        "print_1gb": "import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * 1024 ** 2)\n" + CORRECT_F,
        "stderr_1gb": "import sys\nfor _ in range(1024):\n    sys.stderr.write('x' * 1024 ** 2)\n" + CORRECT_F,
        "fill_disk": "with open('big', 'wb') as f:\n    for _ in range(1024):\n        f.write(b'x' * 1024 ** 2)\n"
        + CORRECT_F,
        # the service survives these (this test goes on); the program's own verdict is then whatever it earned
        "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nraise SystemExit(1)\n",
        "kill_everything": "import os, signal\nos.kill(-1, signal.SIGKILL)\nraise SystemExit(1)\n",
        "kill_service_pid": f"import os, signal\nos.kill({me}, signal.SIGKILL)\n" + CORRECT_F,
        "setuid_root": "import os\nos.setuid(0)\n" + CORRECT_F,
        "sys_exit_0": "import sys\nsys.exit(0)\n",
        "os_exit_0": "import os\nos._exit(0)\n",
        "exit_in_call": "def f(x):\n    import os\n    os._exit(0)\n",
        "fake_marker_stdout": f"print({fake!r})\nprint('PASS')\nprint('ALL TESTS PASSED')\nimport os\nos._exit(0)\n",
        "fake_report_all_fds": "import os, sys\nn = sys.stdin.read().strip()\n"
        f"for fd in range(3, 64):\n    try:\n        os.write(fd, {fake!r}.replace('0' * 32, n or '0' * 32).encode())\n"
        "    except OSError:\n        pass\nos._exit(0)\n",
        "read_spec": "import json\nT = json.load(open('spec.json'))\n" + CORRECT_F,
        "always_equal": "class A:\n    def __eq__(self, o):\n        return True\ndef f(x):\n    return A()\n",
        "int_subclass": "class I(int):\n    def __eq__(self, o):\n        return True\ndef f(x):\n    return I(0)\n",
        "atexit_exit": "import atexit, os\natexit.register(lambda: os._exit(0))\ndef f(x):\n    return 0\n",
        "segfault": "import ctypes\nctypes.string_at(0)\n" + CORRECT_F,
        "many_files": "fs = [open('/dev/null') for _ in range(100000)]\n" + CORRECT_F,
        "daemon_survivor": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
        "raise SystemExit(1)\n",
    }
    out = {name: (code, F_TESTS, "fail") for name, code in programs.items()}
    out["control_correct"] = (CORRECT_F, F_TESTS, "pass")  # the harness works on this backend: attacks can fail
    out["control_correct_stdio"] = ("print(int(input()) + 1)\n", IO_TESTS, "pass")
    for name in ("loop_ignoring_alarm", "sleep_alarm_blocked"):
        out[name] = (programs[name], F_TESTS, "timeout")
    out["patch_builtins"] = ("import builtins\nbuiltins.abs = lambda x: 0\ndef f(x):\n    return 100\n",
                             CodeTests(asserts=["assert abs(f(1) - 2) < 0.5"]).dumps(), "fail")  # fmt: skip
    out["stdio_print_1gb"] = ("import sys\nwhile True:\n    sys.stdout.write('2\\n' * 65536)\n", IO_TESTS, "fail")
    out["stdio_loop"] = ("while True:\n    pass\n", IO_TESTS, "fail")
    out["stdio_fork_bomb"] = ("import os\nwhile True:\n    os.fork()\n", IO_TESTS, "fail")
    return out


def fenced(code: str) -> str:
    return f"Here is my solution:\n```python\n{code}```\n"


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def sentinel() -> Path:
    # world-writable and outside every tmpfs the sandboxes mount: a bare subprocess of any uid could change it
    base = Path("/run") if os.access("/run", os.W_OK) else Path("/var/lib")
    path = base / f"gtpo-sentinel-{secrets.token_hex(4)}"
    path.mkdir(mode=0o777)
    path.chmod(0o777)
    (path / "keep.txt").write_text("keep")
    yield path
    for p in path.iterdir():
        p.unlink()
    path.rmdir()


@pytest.fixture(scope="module", params=BACKENDS)
def hostile_run(request, sentinel, redis_url):
    """(backend, programs, verdicts, log lines, redis key) for the whole hostile batch on one backend."""
    url = urlparse(redis_url)
    key = f"gtpo-hostile-{secrets.token_hex(4)}"
    programs = hostile(sentinel, url.hostname or "127.0.0.1", url.port or 6379, key)
    capture, root = Capture(), logging.getLogger()
    root.addHandler(capture)
    old = root.level
    root.setLevel(logging.DEBUG)
    os.environ["GTPO_TEST_SECRET"] = SECRET
    runner = CodeRunner(request.param, workers=WORKERS, unit_s=UNIT_S)
    try:
        verdicts = runner.run_many([(code, tests) for code, tests, _ in programs.values()])
    finally:
        runner.close()
        del os.environ["GTPO_TEST_SECRET"]
        root.removeHandler(capture)
        root.setLevel(old)
    return request.param, programs, dict(zip(programs, verdicts, strict=True)), capture.lines, key


def test_at_least_thirty_hostile_programs(sentinel):
    assert len(hostile(sentinel, "127.0.0.1", 6379, "k")) - 2 >= 30


def test_every_hostile_program_is_scored_as_a_failure(hostile_run):
    backend, programs, verdicts, _, _ = hostile_run
    wrong = {}
    for name, (_, _, expected) in programs.items():
        v = verdicts[name]
        passed = v.status == ScoreStatus.ok and (v.score or 0.0) > 0.0
        if passed != (expected == "pass") or (expected == "timeout" and v.status != ScoreStatus.timeout):
            wrong[name] = (v.status.value, v.score, v.detail)
    assert not wrong, f"{backend}: {wrong}"


def test_the_secret_is_in_no_result_and_no_log(hostile_run):
    backend, _, verdicts, lines, _ = hostile_run
    text = json.dumps([v.__dict__ for v in verdicts.values()], default=str) + "\n".join(lines)
    assert SECRET not in text
    assert os.environ.get("REDIS_URL", "\0") not in text
    # the program that dumps its environment did run, and saw only the sandbox's own
    assert "PATH=/usr/local/bin:/usr/bin:/bin" in (verdicts["read_self_environ"].detail or "")


def test_nothing_outside_changed_and_nothing_is_left_running(hostile_run, sentinel, redis_url):
    backend, _, _, _, key = hostile_run
    assert sorted(p.name for p in sentinel.iterdir()) == ["keep.txt"]
    assert (sentinel / "keep.txt").read_text() == "keep"
    assert not Path("/usr/gtpo-evil").exists() and not Path("/gtpo-evil").exists()
    import redis

    assert redis.Redis.from_url(redis_url).get(key) is None
    if os.geteuid() == 0:
        # a namespace's processes are reaped by the kernel just after its init dies: give them a moment
        for _ in range(50):
            left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _uid(p) in SANDBOX_UIDS]
            if not left:
                break
            time.sleep(0.1)
        assert not left, f"{backend}: sandboxed processes outlived their runs: {[_cmdline(p) for p in left]}"


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()[:100]
    except OSError:
        return b"(gone)"


def _uid(proc: Path) -> int | None:
    try:
        return proc.stat().st_uid
    except OSError:
        return None


def test_the_sentinel_is_reachable_without_a_sandbox(sentinel):
    """The control: the sentinel really is writable by any uid, so the isolation test above can fail."""
    mode = sentinel.stat().st_mode
    assert mode & stat.S_IWOTH and mode & stat.S_IXOTH


# --------------------------------------------------------------------------- real-format problems


FORMATS = {"humaneval": ("good", "bad"), "mbpp": ("code", "bad"), "livecodebench": ("good", "bad")}


def reference_items(fmt: str) -> list[tuple[str, str, str, float]]:
    """(id, response, tests, expected score) for each problem's correct and wrong solution, the tests read through
    the data layer's column mapping for `fmt` from real-format rows (tests/data/code/<fmt>.jsonl)."""
    good_col, bad_col = FORMATS[fmt]
    raw = read_jsonl(DATA / f"{fmt}.jsonl")
    items = []
    for row, mapped in zip(raw, code_rows(raw, fmt, fmt), strict=True):
        name = f"{fmt}:{row.get('task_id', row.get('question_id'))}"
        tests = mapped["ground_truth_answer"]
        items += [
            (f"{name}:good", fenced(row[good_col]), tests, 1.0),
            (f"{name}:bad", fenced(row[bad_col]), tests, 0.0),
        ]
    return items


@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_solutions_are_scored_item_by_item(fmt):
    from services.reward.scoring import check_programs
    from shared.contracts.wire import ScoreItem

    items = reference_items(fmt)
    assert len(items) >= 24
    runner = CodeRunner(BACKEND, workers=WORKERS, unit_s=2.0, all_or_nothing=True)
    try:
        got = check_programs([ScoreItem(id=i, response=r, reference=t) for i, r, t, _ in items], runner)
    finally:
        runner.close()
    wrong = {i: (v.status.value, v.score, v.detail) for (i, _, _, want), v in zip(items, got, strict=True)
             if v is None or v.status != ScoreStatus.ok or v.score != want}  # fmt: skip
    assert not wrong


def test_fraction_passed_counts_each_test():
    runner = CodeRunner(BACKEND, workers=2, unit_s=2.0)
    try:
        half = CodeTests(asserts=["assert g(1) == 1", "assert g(2) == 4", "assert g(3) == 9", "assert g(0) == 1"])
        io = CodeTests(cases=[StdioCase(input="2\n", output="4\n"), StdioCase(input="3\n", output="6\n")])
        v1, v2 = runner.run_many([("def g(x):\n    return x * x\n", half.dumps()),
                                  ("print(int(input()) * 2)\n", io.dumps())])  # fmt: skip
    finally:
        runner.close()
    assert (v1.status, v1.score, v1.passed, v1.total) == (ScoreStatus.ok, 0.75, 3, 4)
    assert (v2.status, v2.score, v2.passed, v2.total) == (ScoreStatus.ok, 1.0, 2, 2)


# --------------------------------------------------------------------------- through the service


@pytest.mark.skipif(not BACKENDS, reason="no namespace sandbox can run on this machine")
def test_the_service_keeps_answering_while_it_scores_hostile_programs():
    from services.reward.app import create_app
    from services.reward.settings import RewardSettings

    settings = RewardSettings(workers=1, code_workers=2, code_unit_s=UNIT_S, weights={"code": 1.0}, sandbox=BACKEND)
    items = [
        {"id": "bomb", "response": fenced("import os\nwhile True:\n    os.fork()\n"), "reference": F_TESTS},
        {
            "id": "loop",
            "response": fenced("import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass\n"),
            "reference": F_TESTS,
        },  # fmt: skip
        {"id": "good", "response": fenced(CORRECT_F), "reference": F_TESTS},
        {"id": "no_code", "response": "f = lambda x: x + 1", "reference": F_TESTS},
        {"id": "maths", "response": "\\boxed{2}", "reference": "2"},
    ]
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/score", json={"items": items})
        assert r.status_code == 200
        res = {x["id"]: x for x in r.json()["results"]}
        assert res["bomb"]["status"] == "ok" and res["bomb"]["total"] == 0.0
        assert res["loop"]["status"] == "timeout" and res["loop"]["total"] == 0.0
        assert res["good"]["status"] == "ok" and res["good"]["total"] == 1.0
        assert res["no_code"]["status"] == "ok" and res["no_code"]["total"] == 0.0
        assert res["maths"]["status"] == "error" and "code tests" in res["maths"]["detail"]  # never a silent 0
        assert client.get("/health").status_code == 200
        again = client.post("/v1/score", json={"items": [items[2]]}).json()["results"][0]
        assert again["total"] == 1.0


def test_tasks_of_uid_counts_this_process_threads():
    import threading

    from services.reward.sandbox import tasks_of_uid

    stop = threading.Event()
    extra = [threading.Thread(target=stop.wait) for _ in range(3)]
    for t in extra:
        t.start()
    try:
        assert tasks_of_uid(os.getuid()) >= threading.active_count() >= 4
    finally:
        stop.set()
        for t in extra:
            t.join()


def test_a_sandbox_that_never_started_the_harness_is_an_error_not_a_zero():
    from services.reward.code import read_verdict
    from services.reward.sandbox import RunResult

    tests = CodeTests(asserts=["assert f(1) == 2"])
    failed = RunResult(127, b"", b"prlimit: failed to execute python3", b"", False, False, 0.01)
    v = read_verdict(failed, "n" * 32, tests, all_or_nothing=False)
    assert (v.status, v.score) == (ScoreStatus.error, None) and "did not start the harness" in v.detail
    exited = RunResult(0, b"", b"", b"S", False, False, 0.01)  # started, then the program ended it: it failed
    assert read_verdict(exited, "n" * 32, tests, all_or_nothing=False).score == 0.0
    forged = RunResult(0, b"", b"", b'S{"nonce": "x", "passed": [true]}', False, False, 0.01)
    assert read_verdict(forged, "n" * 32, tests, all_or_nothing=False).score == 0.0
    honest = RunResult(0, b"", b"", b'S{"nonce": "' + b"n" * 32 + b'", "passed": [true]}', False, False, 0.01)
    assert read_verdict(honest, "n" * 32, tests, all_or_nothing=False).score == 1.0


NON_ROOT_PROBE = """
import sys, os
sys.path.insert(0, sys.argv[1])
from services.reward.sandbox import REPORT_FD, Limits, Sandbox, available
program = "import socket, sys, os\\nos.write(int(sys.argv[1]), b'up')\\n" \\
    "print(socket.socket().connect_ex(('127.0.0.1', 6379)) != 0)\\n" \\
    "try:\\n    open(sys.argv[2] + '/evil', 'w')\\n    print(False)\\nexcept OSError:\\n    print(True)\\n"
for b in ("bwrap", "unshare"):
    if available(b):
        r = Sandbox(b, Limits(wall_s=5)).run(["-I", "-c", program, REPORT_FD, sys.argv[2]], {})
        print(b, r.report.decode(), r.stdout.decode().split())
"""


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3").exists(), reason="needs root to become a user")
def test_a_non_root_service_gets_the_same_isolation(sentinel):
    """The service as an ordinary user (no uid drop: a user namespace instead): no network, nothing written outside."""
    import subprocess

    repo = str(Path(__file__).resolve().parents[1])
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
                            NON_ROOT_PROBE, repo, str(sentinel)], capture_output=True, text=True, timeout=60,
                           env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"})  # fmt: skip
    if "No module named" in probe.stderr or "Permission denied" in probe.stderr:
        pytest.skip(f"the worktree is not readable by an ordinary user: {probe.stderr[-200:]}")
    lines = probe.stdout.split("\n")
    ran = [line for line in lines if line.startswith(("bwrap", "unshare"))]
    assert ran, probe.stderr[-500:]
    for line in ran:
        assert line.endswith("up ['True', 'True']"), line
    assert sorted(p.name for p in sentinel.iterdir()) == ["keep.txt"]
