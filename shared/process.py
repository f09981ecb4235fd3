"""Child processes that do not outlive the process that started them."""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """`preexec_fn` for subprocess.Popen: on Linux the child gets SIGTERM when its parent dies, even by SIGKILL.

    Workers run in their own session (so a terminal's Ctrl-C reaches only the launcher, which stops them in
    order); without this a killed launcher would leave them, and an embedded Redis, running with no owner.
    Elsewhere it does nothing.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
