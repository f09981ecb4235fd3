"""Answer checks that hang or crash, for the verifier pool's fault tests (`VerifierPool(check=with_faults)`).

A module of its own, importable by the spawned workers (they inherit the parent's `sys.path`), so that production
code carries no test sentinels: the worker runs whatever module-level check it is given.
"""

import os
import signal
import time

from services.reward.verify import Verdict, check_pair

HANG = "gtpo-test:hang"
"""Answer on which `with_faults` blocks SIGALRM and sleeps: a C-level hang the soft deadline cannot stop."""
CRASH = "gtpo-test:crash"
"""Answer on which `with_faults` exits the worker at once: a crash."""


def hang() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # like a C call: the soft deadline is deaf
    time.sleep(3600)


def with_faults(answer: str, reference: str) -> Verdict:
    """`check_pair`, except that an answer starting with `HANG` hangs and one equal to `CRASH` crashes.

    A prefix, so that one request can hold several distinct hanging pairs (identical pairs are checked once).
    """
    if answer.startswith(HANG):
        hang()
    if answer == CRASH:
        os._exit(3)
    return check_pair(answer, reference)
