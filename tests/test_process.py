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


CHOSEN_SIGNAL = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", '''
import pathlib, signal, sys, time
from shared.process import set_parent_death_signal
def stop(signum, frame):
    pathlib.Path(sys.argv[1]).write_text(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGUSR1, stop)
assert set_parent_death_signal(signal.SIGUSR1)
print("armed", flush=True)
time.sleep(120)
''', sys.argv[1]], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "armed"
print(child.pid, flush=True)
time.sleep(120)
"""


def test_set_parent_death_signal_delivers_the_chosen_signal(tmp_path):
    """What the reward service's check workers need (SIGKILL there): the child arms it itself, after the fork."""
    marker = tmp_path / "got"
    parent = subprocess.Popen([sys.executable, "-c", CHOSEN_SIGNAL, str(marker)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert not outlives(child, 10.0)
    assert marker.read_text() == "SIGUSR1"


SUBREAPER = """
import os, subprocess, sys, time
from shared.process import become_subreaper
assert become_subreaper()
middle = subprocess.Popen([sys.executable, "-c",
    "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print(p.pid)"],
    stdout=subprocess.PIPE, text=True)
grandchild = int(middle.stdout.readline())
middle.wait()
time.sleep(0.2)
with open(f"/proc/{grandchild}/stat") as f:
    ppid = int(f.read().split(")")[-1].split()[1])
os.kill(grandchild, 9)
os.waitpid(grandchild, 0)  # only a parent can reap it
print(ppid == os.getpid(), flush=True)
"""


def test_become_subreaper_adopts_orphaned_grandchildren():
    out = subprocess.run([sys.executable, "-c", SUBREAPER], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_free_port_is_bindable_and_never_handed_out_twice():
    import socket

    from shared.process import free_port

    taken: set[int] = set()
    ports = [free_port(taken) for _ in range(20)]
    assert len(set(ports)) == 20 and taken == set(ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))  # free when handed out
