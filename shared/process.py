"""Process plumbing shared by the launchers: children that do not outlive their parent, a subreaper, free ports."""

from __future__ import annotations

import ctypes
import signal
import socket
import sys

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    """`prctl(option, value)` on Linux; False elsewhere or when the call is unavailable or refused."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def set_parent_death_signal(sig: int) -> bool:
    """Linux: this process gets `sig` when its parent (the thread that forked it) ends, even by SIGKILL.

    Returns whether it was set (False on other systems, which have no such call).
    """
    return _prctl(_PR_SET_PDEATHSIG, int(sig))


def die_with_parent() -> None:
    """`preexec_fn` for subprocess.Popen: on Linux the child gets SIGTERM when its parent dies, even by SIGKILL.

    Workers run in their own session (so a terminal's Ctrl-C reaches only the launcher, which stops them in
    order); without this a killed launcher would leave them, and an embedded Redis, running with no owner.
    Elsewhere it does nothing.
    """
    set_parent_death_signal(signal.SIGTERM)


def become_subreaper() -> bool:
    """Linux: orphaned descendants are re-parented to this process, so it can wait for all of them.

    Returns whether it was set (False on other systems).
    """
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def free_port(taken: set[int] | None = None) -> int:
    """A TCP port nothing listens on at 127.0.0.1 right now and that is not in `taken` (added to it).

    The caller's processes bind later, so the OS may hand the same port out twice: `taken` keeps the ports one
    caller has already given out apart, and a server that still finds its port in use should retry on another.
    """
    taken = taken if taken is not None else set()
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port
