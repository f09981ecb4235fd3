"""Children started with die_with_parent stop when their parent is SIGKILLed (a real process tree)."""

import signal
import subprocess
import sys

import pytest
from procs import outlives, start_supervisor, wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")

PARENT = """
import subprocess, sys, time
from shared.process import die_with_parent
kw = {"preexec_fn": die_with_parent} if sys.argv[1] == "guarded" else {}
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True, **kw)
print(child.pid, flush=True)
time.sleep(120)
"""


def _orphan_after_parent_killed(mode: str, wait_s: float) -> bool:
    """Whether the child of a SIGKILLed parent outlives it by `wait_s`."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    return outlives(child, wait_s)


def test_child_stops_when_the_parent_is_killed():
    assert not _orphan_after_parent_killed("guarded", 10.0)


def test_without_it_the_child_outlives_its_parent():
    """The control: the same tree without the guard leaves an orphan, so the test above can fail."""
    assert _orphan_after_parent_killed("plain", 1.0)


def test_sigkilled_launch_supervisor_leaves_no_child(tmp_path):
    """`gtpo launch`'s supervisor (run_supervised) cannot forward SIGKILL, so its child must learn of the death
    itself; the unguarded control is the test above."""
    pid_file = tmp_path / "child.pid"
    child = f"import os, pathlib, time; pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); time.sleep(120)"
    proc = start_supervisor(child)
    wait_until(lambda: pid_file.exists() and bool(pid_file.read_text()), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert not outlives(int(pid_file.read_text()), 10.0)
