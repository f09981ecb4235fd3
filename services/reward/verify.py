"""Answer checking with math-verify in a killable process pool (docs/design.md section 4; anchors_rl_systems.md 4.5).

Why processes, and why our own pool:

* math-verify's own timeouts use `signal.alarm` (whole seconds, per parse and per compared pair), which
  raises `ValueError` outside the main thread and cannot interrupt a long C call. With its default
  `raise_on_error=False` a timeout becomes `[]` / `False` plus a log line: a silent 0.
* So every verification runs in a worker process (the "spawn" context: a fresh interpreter, nothing
  inherited from a threaded parent) in that process's main thread, under two deadlines:
  - a **soft** deadline at `SOFT_FRACTION * timeout_s` (`setitimer`, fractions of a second) that raises
    inside sympy and leaves the worker warm, and
  - a **hard** deadline at `timeout_s`, enforced by the parent: a worker still busy is SIGKILLed and
    replaced. Either way the item's status is `timeout`, never a 0.
* An exception gives `error` with its message; a worker that dies (segfault, OOM) gives `error` and is
  replaced. Nothing is retried, so one pathological answer costs at most `timeout_s` of one worker.
* A caller may also give a **request deadline** (`verify_many(pairs, deadline=...)`): whatever is not answered
  by then comes back as `timeout` at once, and a job still queued then is never started. A job already
  running goes on until its own hard deadline (killing a warm worker costs more than letting it finish).

Inputs are capped before anything is parsed (`check_size`): an answer or reference longer than
`MAX_CHARS` characters or with brackets nested deeper than `MAX_NESTING` is `error: too large` at once.
Each worker also caps its address space (`memory_mb`, RLIMIT_AS) as defence in depth: an allocation
blow-up becomes `MemoryError` (`error`) instead of an OOM kill of the node. (Towers like `10^{10^{10}}` do
not get that far: sympy evaluates them lazily and the soft deadline stops them.) A worker dies with the
pool's thread (`PR_SET_PDEATHSIG`), so no hung worker outlives its parent, even after a SIGKILL.

Messages between the parent and a worker are JSON bytes (no pickle on the job path). As with any
spawn-based code, a script that builds a pool must do so under `if __name__ == "__main__":` (spawn
re-imports the main module in each worker), and the main module must be a file (`python - <<EOF` cannot
start workers: the pool then reports itself unhealthy).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import pickle
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_ready_objects
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any

from shared.contracts.wire import ScoreStatus
from shared.process import set_parent_death_signal

log = logging.getLogger(__name__)

MAX_CHARS = 1_000
"""Answers and references longer than this are `error: too large` (MATH answers are far shorter)."""
MAX_NESTING = 50
"""Bracket nesting (`{`, `(`, `[` together) deeper than this is `error: too large`."""
SOFT_FRACTION = 0.8
"""The worker interrupts itself at this fraction of `timeout_s`; the parent kills it at `timeout_s`."""
START_TIMEOUT_S = 60.0
"""A worker that has not imported math-verify and warmed up by then is killed and started again."""
MAX_START_FAILURES = 3
"""A slot whose worker failed to start this many times in a row makes the pool unhealthy."""
DETAIL_CHARS = 300


@dataclass(frozen=True)
class Verdict:
    """The result of checking one answer against one reference.

    `correct` is None unless `status == "ok"`; `detail` says why when it is not (or why an ok answer is
    wrong: unparseable); `elapsed_s` is the wall time from dispatch to result (0 for capped inputs).
    """

    status: ScoreStatus
    correct: bool | None
    detail: str | None = None
    elapsed_s: float = 0.0


# --------------------------------------------------------------------------- checking (any process)


def nesting_depth(text: str) -> int:
    """Deepest nesting of `{`, `(`, `[` (closed by any of `}`, `)`, `]`, so `[1, 2)` counts as 1).

    >>> nesting_depth(r"\\frac{1}{\\sqrt{(2)}}")
    3
    """
    depth = best = 0
    for c in text:
        if c in "{([":
            depth += 1
            best = max(best, depth)
        elif c in "})]":
            depth = max(depth - 1, 0)
    return best


def check_size(answer: str, reference: str) -> Verdict | None:
    """`error: too large` for inputs past the caps (`MAX_CHARS`, `MAX_NESTING`), else None.

    >>> check_size("1" * 1001, "1").detail
    'too large: the answer has 1001 characters (cap 1000)'
    """
    for name, text in (("answer", answer), ("reference", reference)):
        if len(text) > MAX_CHARS:
            return Verdict(
                ScoreStatus.error, None, f"too large: the {name} has {len(text)} characters (cap {MAX_CHARS})"
            )
        if (depth := nesting_depth(text)) > MAX_NESTING:
            return Verdict(ScoreStatus.error, None, f"too large: the {name} nests {depth} deep (cap {MAX_NESTING})")
    return None


def as_boxed(reference: str) -> str:
    """The reference as math-verify should read it: wrapped in `\\boxed{}` unless it already has one."""
    return reference if "boxed" in reference else "\\boxed{" + reference + "}"


def check_pair(answer: str, reference: str) -> Verdict:
    """math-verify on `\\boxed{answer}` against the reference, with no time limit of its own.

    The reference is math-verify's `gold` (the first argument: `verify` is not symmetric), the answer its
    `target`. Its own signal timeouts are off (`None`) and `raise_on_error=True`, so failures raise
    instead of turning into `False`; the caller bounds the time.

    Args:
        answer: the model's final answer (the content of its last `\\boxed{}`).
        reference: the ground truth, boxed or not.
    """
    from math_verify import parse, verify

    gold = parse(as_boxed(reference), parsing_timeout=None, raise_on_error=True)
    if not gold:
        return Verdict(ScoreStatus.error, None, "the reference could not be parsed")
    pred = parse("\\boxed{" + answer + "}", parsing_timeout=None, raise_on_error=True)
    if not pred:
        return Verdict(ScoreStatus.ok, False, "the answer could not be parsed")
    return Verdict(ScoreStatus.ok, bool(verify(gold, pred, timeout_seconds=None, raise_on_error=True)))


CheckFn = Callable[[str, str], Verdict]
"""`check(answer, reference) -> Verdict` with no time limit of its own: what a worker runs for each job (`check_pair`
by default). A module-level function, so that a spawned worker imports it by name."""


class _SoftDeadline(BaseException):
    """Raised by SIGALRM inside a job. A BaseException, so math-verify's `except Exception` cannot eat it."""


def _raise_soft_deadline(signum: int, frame: Any) -> None:
    raise _SoftDeadline


@contextlib.contextmanager
def _soft_deadline(seconds: float | None) -> Iterator[None]:
    """Interrupt the block after `seconds` (main thread only; None = no limit)."""
    if seconds is None:
        yield
        return
    previous = signal.signal(signal.SIGALRM, _raise_soft_deadline)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _describe(err: BaseException) -> str:
    # str() of a sympy-laden exception can be huge; it runs under the deadline, so it cannot hang us
    return f"{type(err).__name__}: {err}"[:DETAIL_CHARS]


def _run_job(check: CheckFn, answer: str, reference: str, soft_s: float | None) -> Verdict:
    """`check` under a soft deadline; every outcome is a Verdict."""
    try:
        with _soft_deadline(soft_s):
            try:
                return check(answer, reference)
            except Exception as e:  # MemoryError and RecursionError included
                return Verdict(ScoreStatus.error, None, _describe(e))
    except _SoftDeadline:
        return Verdict(ScoreStatus.timeout, None, f"interrupted at the soft deadline ({soft_s:.2f} s)")


def verify_inline(answer: str, reference: str, timeout_s: float | None = None) -> Verdict:
    """Check one pair in this process (no pool): the benchmark baseline and tests.

    Args:
        timeout_s: a SIGALRM soft deadline; main thread only (raises ValueError elsewhere), and it cannot
            stop a hang inside C code. None = no limit at all. The pool has neither restriction.

    >>> verify_inline(r"\\frac{1}{2}", "0.5").correct
    True
    """
    t0 = time.perf_counter()
    early = check_size(answer, reference)
    if early is not None:
        return early
    return replace(_run_job(check_pair, answer, reference, timeout_s), elapsed_s=time.perf_counter() - t0)


# --------------------------------------------------------------------------- worker process


def _limit_memory(memory_mb: int) -> None:
    if memory_mb > 0:
        import resource

        limit = memory_mb * 1024 * 1024
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def check_importable(check: CheckFn) -> None:
    """Raise ValueError unless a spawned worker can import `check` by name (a lambda or a nested function cannot)."""
    try:
        pickle.dumps(check)  # functions pickle by reference: this is the lookup the worker will do
    except Exception as e:
        raise ValueError(f"check: must be a module-level function, got {check!r} ({type(e).__name__}: {e})") from e


_WARM_UP = [("\\frac{1}{2}", "0.5"), ("x^2+2x+1", "(x+1)^2"), ("(1, 2]", "[1, 2)")]


def _worker_main(conn: Connection, memory_mb: int, check: CheckFn) -> None:
    """A worker: warm up once, then answer `{"id", "answer", "reference", "soft_s"}` jobs until EOF."""
    set_parent_death_signal(signal.SIGKILL)  # no orphaned hung workers when the pool's owner dies
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent shuts us down
    _limit_memory(memory_mb)
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled": we own the timeouts
    # import math_verify, sympy and the LaTeX parser, and run simplify once, before taking work: the first
    # polynomial comparison in a fresh process costs ~0.2 s, which a short deadline would count against an answer
    for answer, reference in _WARM_UP:
        check(answer, reference)
    try:
        conn.send_bytes(b'{"ready": true}')
    except OSError:  # the pool closed while this worker was warming up (a short eval): nothing to do
        return
    while True:
        try:
            job = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the parent is gone
        v = _run_job(check, job["answer"], job["reference"], job["soft_s"])
        reply = {"id": job["id"], "status": v.status, "correct": v.correct, "detail": v.detail}
        try:
            conn.send_bytes(json.dumps(reply).encode())  # ensure_ascii: lone surrogates travel as \udcxx
        except OSError:
            return  # the parent is gone


# --------------------------------------------------------------------------- the pool (parent side)


@dataclass
class _Job:
    answer: str
    reference: str
    future: Future[Verdict] = field(default_factory=Future)
    id: int = -1
    started: float = 0.0
    deadline: float = 0.0


@dataclass
class _Slot:
    """One worker position; its process is replaced when it is killed or dies."""

    proc: BaseProcess | None = None
    conn: Connection | None = None
    ready: bool = False
    job: _Job | None = None
    started: float = 0.0
    failures: int = 0
    next_start: float = 0.0
    generation: int = 0


def _resolve(job: _Job, verdict: Verdict) -> None:
    """Settle `job` unless it is settled already: the pool thread and a caller at its deadline may race."""
    with contextlib.suppress(InvalidStateError):
        job.future.set_result(verdict)


def _past_deadline(job: _Job) -> Verdict:
    # `started` is written by the pool thread; a stale read only changes the wording
    started = job.started
    where = "running" if started else "queued (never started)"
    elapsed = time.monotonic() - started if started else 0.0
    return Verdict(ScoreStatus.timeout, None, f"the request deadline passed while the check was {where}", elapsed)


class VerifierPool:
    """N warm math-verify worker processes with a hard wall-clock limit per answer.

    One background thread owns the workers: it hands queued jobs to idle workers, reads results, kills a
    worker past its deadline and starts its replacement. `verify_many` may be called from any number of
    threads at once; identical pairs in one call are checked once.

    Args:
        workers: worker processes (each holds ~70 MB and one CPU while busy).
        timeout_s: hard wall-clock limit per answer; the worker interrupts itself at `SOFT_FRACTION` of it.
        memory_mb: address-space cap per worker (RLIMIT_AS); 0 = none.
        check: what a worker runs for each pair (a module-level function, see `CheckFn`).
    """

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, *, memory_mb: int = 1024, check: CheckFn = check_pair):
        if workers < 1:
            raise ValueError(f"workers: must be >= 1, got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: must be > 0, got {timeout_s}")
        check_importable(check)
        self.timeout_s = timeout_s
        self._soft_s = timeout_s * SOFT_FRACTION
        self._memory_mb = memory_mb
        self._check = check
        self._ctx = mp.get_context("spawn")
        self._slots = [_Slot() for _ in range(workers)]
        self._inbox: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._pending: deque[_Job] = deque()
        self._ids = itertools.count()
        self._stats = {"restarts": 0, "kills": 0, "deaths": 0, "start_failures": 0}
        self._closed = False
        self._lock = threading.Lock()  # guards _closed and the wake pipe against close()
        self._closing = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name="verifier-pool", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- public API

    def verify_many(self, pairs: list[tuple[str, str]], deadline: float | None = None) -> list[Verdict]:
        """Check `(answer, reference)` pairs; one Verdict each, in order, each within ~`timeout_s` of its start.

        Args:
            pairs: `(answer, reference)`.
            deadline: a `time.monotonic()` instant; a pair not answered by then is `timeout` (and is never
                started if it was still queued). None = wait for every answer.

        Raises:
            RuntimeError: the pool is closed.
        """
        verdicts: list[Verdict | None] = [None] * len(pairs)
        jobs: dict[tuple[str, str], _Job] = {}
        waiting: list[tuple[int, _Job]] = []
        for i, (answer, reference) in enumerate(pairs):
            early = check_size(answer, reference)
            if early is not None:
                verdicts[i] = early
                continue
            job = jobs.setdefault((answer, reference), _Job(answer, reference))
            waiting.append((i, job))
        self._submit(list(jobs.values()))
        self._await(list(jobs.values()), deadline)
        for i, job in waiting:
            verdicts[i] = job.future.result()
        assert all(v is not None for v in verdicts)
        return verdicts  # type: ignore[return-value]

    def healthy(self) -> bool:
        """The pool can make progress: open, its thread alive, and no worker slot failing to start."""
        return (
            not self._closed and self._thread.is_alive() and all(s.failures < MAX_START_FAILURES for s in self._slots)
        )

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> bool:
        """Block until every worker has warmed up (True) or `timeout_s` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(s.ready for s in self._slots):
                return True
            if not self.healthy():
                return False
            time.sleep(0.02)
        return all(s.ready for s in self._slots)

    def stats(self) -> dict[str, int]:
        """Counters: `restarts` (replacement workers started), `kills` (hard timeouts), `deaths`
        (crashed workers), `start_failures`; gauges: `workers`, `ready_workers`, `busy_workers`."""
        return {
            **self._stats,
            "workers": len(self._slots),
            "ready_workers": sum(s.ready for s in self._slots),
            "busy_workers": sum(s.job is not None for s in self._slots),
        }

    def close(self) -> None:
        """Fail queued jobs with `error`, stop the workers (SIGKILL after 1 s) and the thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._closing.set()
            self._wake()
        self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ----------------------------------------------------------------- callers' side

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe already wakes the thread
            os.write(self._wake_w, b"x")

    def _submit(self, jobs: list[_Job]) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the verifier pool is closed")
            for job in jobs:
                self._inbox.put(job)
            self._wake()

    def _await(self, jobs: list[_Job], deadline: float | None) -> None:
        """Wait for every job; at `deadline`, or if the pool thread died, settle the rest instead of waiting on.

        The caller settles them itself, on its own clock, so the deadline holds however busy the pool thread is.
        """
        waiting = {j.future: j for j in jobs}
        pending = set(waiting)
        while pending:
            left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            _, pending = wait_futures(pending, timeout=max(left, 0.0))
            if not pending:
                return
            if deadline is not None and time.monotonic() >= deadline:
                for f in pending:
                    _resolve(waiting[f], _past_deadline(waiting[f]))
                return
            if not self._thread.is_alive():
                for f in pending:
                    _resolve(waiting[f], Verdict(ScoreStatus.error, None, "the verifier pool stopped"))
                return

    # ----------------------------------------------------------------- the pool thread

    def _run(self) -> None:
        try:
            while not self._closing.is_set():
                self._step()
        except Exception:
            log.exception("verifier pool thread failed")
        finally:
            self._shutdown()

    def _step(self) -> None:
        now = time.monotonic()
        self._start_missing(now)
        while True:
            try:
                self._pending.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        self._dispatch(now)
        conns = {s.conn: s for s in self._slots if s.conn is not None}
        for obj in wait_ready_objects([self._wake_r, *conns], self._next_timeout(now)):
            if obj == self._wake_r:
                os.read(self._wake_r, 4096)
            else:
                self._receive(conns[obj])  # type: ignore[index]
        self._expire(time.monotonic())
        if all(s.failures >= MAX_START_FAILURES for s in self._slots):
            self._fail_pending("no verifier worker could start")

    def _start_missing(self, now: float) -> None:
        for slot in self._slots:
            if slot.proc is None and now >= slot.next_start:
                self._start(slot, now)

    def _start(self, slot: _Slot, now: float) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main, args=(child, self._memory_mb, self._check), name="verifier-worker", daemon=True
        )
        try:
            proc.start()
        except Exception:
            log.exception("could not start a verifier worker")
            parent.close()
            self._start_failed(slot, now)
            return
        finally:
            child.close()  # the worker holds its end; ours must close so that its death reads as EOF
        if slot.generation > 0:
            self._stats["restarts"] += 1
        slot.proc, slot.conn, slot.ready, slot.started = proc, parent, False, now
        slot.generation += 1

    def _start_failed(self, slot: _Slot, now: float) -> None:
        slot.failures += 1
        self._stats["start_failures"] += 1
        slot.next_start = now + min(30.0, 0.5 * 2**slot.failures)  # back off: no fork storm

    def _dispatch(self, now: float) -> None:
        for slot in self._slots:
            while slot.ready and slot.job is None and self._pending:
                job = self._pending.popleft()
                if job.future.done():
                    continue  # its caller's deadline passed: nobody waits for it, so it never runs
                job.id, job.started, job.deadline = next(self._ids), now, now + self.timeout_s
                msg = {"id": job.id, "answer": job.answer, "reference": job.reference, "soft_s": self._soft_s}
                try:
                    slot.conn.send_bytes(json.dumps(msg).encode())  # type: ignore[union-attr]
                except OSError:
                    self._pending.appendleft(job)  # it never ran: give it to the next worker
                    self._retire(slot, None, died=True)
                    break
                slot.job = job

    def _next_timeout(self, now: float) -> float:
        times = [1.0]
        for s in self._slots:
            if s.job is not None:
                times.append(s.job.deadline - now)
            elif s.proc is not None and not s.ready:
                times.append(s.started + START_TIMEOUT_S - now)
            elif s.proc is None:
                times.append(s.next_start - now)
        return max(min(times), 0.0)

    def _receive(self, slot: _Slot) -> None:
        try:
            msg = json.loads(slot.conn.recv_bytes())  # type: ignore[union-attr]
        except (EOFError, OSError):
            if slot.proc is not None:
                slot.proc.join(timeout=1.0)  # reap it, for the exit code
            code = slot.proc.exitcode if slot.proc is not None else None
            self._retire(
                slot, Verdict(ScoreStatus.error, None, f"the verifier worker died (exit code {code})"), died=True
            )
            return
        if msg.get("ready"):
            slot.ready, slot.failures = True, 0
            return
        job, slot.job = slot.job, None
        if job is None or msg.get("id") != job.id:
            log.warning("verifier worker answered a job it was not given: %r", msg.get("id"))
            return
        try:
            status = ScoreStatus(msg.get("status"))
        except ValueError:
            status = ScoreStatus.error
        _resolve(job, Verdict(status, msg.get("correct"), msg.get("detail"), time.monotonic() - job.started))

    def _expire(self, now: float) -> None:
        for slot in self._slots:
            if slot.job is not None and now >= slot.job.deadline:
                log.warning("verifier worker passed the %.2f s hard limit: killed", self.timeout_s)
                self._stats["kills"] += 1
                detail = f"killed at the hard limit ({self.timeout_s:.2f} s)"
                self._retire(slot, Verdict(ScoreStatus.timeout, None, detail))
            elif slot.proc is not None and not slot.ready and now >= slot.started + START_TIMEOUT_S:
                log.warning("verifier worker did not start within %.0f s: killed", START_TIMEOUT_S)
                self._retire(slot, None)

    def _retire(self, slot: _Slot, verdict: Verdict | None, died: bool = False) -> None:
        """SIGKILL the slot's worker, then settle its job with `verdict`; the next step starts a replacement.

        The job is settled last, so a caller that wakes up on it already sees the slot empty (not ready).
        """
        job = slot.job
        if died:
            self._stats["deaths"] += 1
        if not slot.ready:
            self._start_failed(slot, time.monotonic())
        if slot.proc is not None:
            slot.proc.kill()
            slot.proc.join(timeout=5.0)
        if slot.conn is not None:
            slot.conn.close()
        slot.proc, slot.conn, slot.ready, slot.job = None, None, False, None
        if job is not None and verdict is not None:
            _resolve(job, replace(verdict, elapsed_s=time.monotonic() - job.started))

    def _fail_pending(self, detail: str) -> None:
        while self._pending:
            _resolve(self._pending.popleft(), Verdict(ScoreStatus.error, None, detail))

    def _shutdown(self) -> None:
        """Runs on the pool thread as it ends: settle every job, stop every worker."""
        while True:
            try:
                self._pending.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        self._fail_pending("the verifier pool closed")
        for slot in self._slots:
            if slot.job is not None:
                _resolve(slot.job, Verdict(ScoreStatus.error, None, "the verifier pool closed"))
                slot.job = None
            if slot.conn is not None:
                slot.conn.close()  # an idle worker reads EOF and exits
        deadline = time.monotonic() + 1.0
        for slot in self._slots:
            if slot.proc is not None:
                slot.proc.join(timeout=max(deadline - time.monotonic(), 0.0))
                if slot.proc.is_alive():
                    slot.proc.kill()
                    slot.proc.join(timeout=5.0)
            slot.proc, slot.conn, slot.ready = None, None, False
