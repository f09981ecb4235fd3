"""Children started with die_with_parent stop when their parent is SIGKILLed (a real process tree)."""

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")

PARENT = """
import subprocess, sys, time
from shared.process import die_with_parent
kw = {"preexec_fn": die_with_parent} if sys.argv[1] == "guarded" else {}
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True, **kw)
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead for our purpose
        return f.read().split(")")[-1].split()[0] != "Z"


def _orphan_after_parent_killed(mode: str, wait_s: float) -> tuple[int, bool]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + wait_s
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    return child, alive


def test_child_stops_when_the_parent_is_killed():
    _, alive = _orphan_after_parent_killed("guarded", 10.0)
    assert not alive


def test_without_it_the_child_outlives_its_parent():
    """The control: the same tree without the guard leaves an orphan, so the test above can fail."""
    _, alive = _orphan_after_parent_killed("plain", 1.0)
    assert alive
