"""The `code` reward's checker: run a response's program against its item's tests in the sandbox, in a pool.

`check_program` is one item: extract nothing here (the scorer does), build the harness's spec, run it in a fresh
sandbox, and read the verdict. The verdict is believed only from the harness's report on its private descriptor
carrying the run's random nonce; stdin/stdout outputs are compared here, outside the sandbox. Outcomes:

* `ok` with `score` = fraction of tests passed (or all-or-nothing): the harness reported; a program that crashed,
  exited early (`sys.exit`, `os._exit`), was killed by a limit or wrote junk to the report pipe gets `ok` with 0
  and a detail saying so (it failed its tests; the model wrote it);
* `timeout`: the whole run passed its wall clock (the harness's own per-test alarms were defeated), or the
  request's deadline passed first;
* `error`: the tests could not be read, or the sandbox could not run (never a silent 0).

`CodeRunner` runs items on `workers` threads, each waiting on its own sandbox process (the processes do the
work; the threads only wait), each slot with its own host uid so that one run's process limit cannot starve another.
"""

from __future__ import annotations

import json
import queue
import secrets
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path

from services.reward.sandbox import REPORT_FD, Limits, RunResult, Sandbox, pick_backend
from shared.contracts.code_tests import CodeTests, load_tests, outputs_match
from shared.contracts.wire import ScoreStatus

HARNESS = (Path(__file__).parent / "code_harness.py").read_text()
SLACK_S = 2.0
"""Wall-clock allowance per run on top of its tests' own time: interpreter start-up and the sandbox's set-up."""
DETAIL_CHARS = 300
STARTED = b"S"
"""The harness's first byte on the report pipe, before any program runs."""


@dataclass(frozen=True)
class CodeVerdict:
    """One item's result: `score` in [0, 1] when `status == ok`, else None; `detail` says why when not 1."""

    status: ScoreStatus
    score: float | None
    passed: int = 0
    total: int = 0
    detail: str | None = None
    elapsed_s: float = 0.0


def program_for(program: str, tests: CodeTests) -> str:
    """The code the harness runs: the program alone when it defines the entry point, else the prompt + program
    (a completion of HumanEval's signature); the prompt's imports go first either way."""
    if tests.entry_point is None or tests.cases:
        return program
    if f"def {tests.entry_point}" in program:
        imports = [ln for ln in tests.prompt.splitlines() if ln.startswith(("import ", "from "))]
        return "\n".join([*imports, program])
    return tests.prompt + program


def spec_for(program: str, tests: CodeTests, unit_s: float, out_cap: int) -> dict[str, object]:
    """What `code_harness.py` reads from `spec.json`."""
    if tests.cases:
        return {"mode": "stdio", "program": program, "inputs": [c.input for c in tests.cases], "unit_s": unit_s,
                "out_cap": out_cap}  # fmt: skip
    units = list(tests.asserts)
    if tests.test:
        units.append(f"{tests.test}\ncheck({tests.entry_point})")
    # MBPP's harness runs the setup code, then the program, in one namespace (its constants are the program's)
    code = f"{tests.setup}\n{program_for(program, tests)}" if tests.setup else program_for(program, tests)
    return {"mode": "functions", "program": code, "tests": units, "units": len(units),
            "unit_s": unit_s}  # fmt: skip


def _describe_failure(run: RunResult) -> str:
    tail = run.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
    if run.overflow:
        return "the program wrote more output than allowed: killed"
    return f"no verdict from the harness (exit code {run.returncode}): {tail[0]}"[:DETAIL_CHARS]


def read_verdict(run: RunResult, nonce: str, tests: CodeTests, all_or_nothing: bool) -> CodeVerdict:
    """The verdict of one finished run (see the module's docstring for what each outcome means)."""
    started, body = run.report[:1] == STARTED, run.report[1:]
    if not started and not run.timed_out:
        tail = run.stderr.decode("utf-8", "replace").strip()[-200:]
        return CodeVerdict(ScoreStatus.error, None, 0, tests.units,
                           f"the sandbox did not start the harness (exit code {run.returncode}): {tail}")  # fmt: skip
    if run.timed_out:
        return CodeVerdict(ScoreStatus.timeout, None, 0, tests.units, "the run passed its wall-clock limit: killed",
                           run.elapsed_s)  # fmt: skip
    try:
        report = json.loads(body) if not run.overflow else None
    except ValueError:
        report = None
    if not isinstance(report, dict) or report.get("nonce") != nonce:
        detail = _describe_failure(run) if not body else "the report channel was written by the program"
        return CodeVerdict(ScoreStatus.ok, 0.0, 0, tests.units, detail, run.elapsed_s)
    if tests.cases:
        outs = report.get("outputs") or []
        passed = [i < len(outs) and outputs_match(str(outs[i]), c.output) for i, c in enumerate(tests.cases)]
    else:
        passed = [v is True for v in report.get("passed") or []][: tests.units]
    n = sum(passed)
    score = float(n == tests.units) if all_or_nothing else n / tests.units
    why = None if n == tests.units else (report.get("why") or f"{tests.units - n} of {tests.units} tests failed")
    return CodeVerdict(ScoreStatus.ok, score, n, tests.units, str(why)[:DETAIL_CHARS] if why else None, run.elapsed_s)


def check_program(
    sandbox: Sandbox, program: str, reference: str, *, unit_s: float, all_or_nothing: bool = False, slot: int = 0
) -> CodeVerdict:
    """Run `program` against the tests in `reference` (a `CodeTests` JSON object) in a fresh sandbox."""
    try:
        tests = load_tests(reference)
    except ValueError as e:
        return CodeVerdict(ScoreStatus.error, None, detail=f"the item's tests cannot be read: {e}"[:DETAIL_CHARS])
    nonce = secrets.token_hex(16)
    spec = spec_for(program, tests, unit_s, sandbox.limits.output_bytes)
    try:
        # the harness is passed as -c: under the unshare backend the run's directory has no path (a tmpfs hides it)
        run = sandbox.run(["-I", "-c", HARNESS, REPORT_FD], {"spec.json": json.dumps(spec)}, stdin=nonce, slot=slot)
    except OSError as e:
        return CodeVerdict(ScoreStatus.error, None, detail=f"the sandbox could not run: {e}"[:DETAIL_CHARS])
    return read_verdict(run, nonce, tests, all_or_nothing)


class CodeRunner:
    """Runs `check_program` for many items at once on `workers` sandboxes; `run_many` is thread-safe.

    Args:
        backend: the sandbox backend (`auto`: bubblewrap, else unshare; `insecure` only by name).
        workers: concurrent sandboxes.
        unit_s: time for one test (an assert, a `check`, a stdin case); a run's wall clock is
            `unit_s * tests + SLACK_S`.
        limits: memory, processes, files, output (their `wall_s` is replaced per run).

    Raises:
        SandboxUnavailable: no isolating backend runs here and `insecure` was not asked for.
    """

    def __init__(self, backend: str = "auto", workers: int = 4, unit_s: float = 2.0, *,
                 limits: Limits = Limits(), all_or_nothing: bool = False) -> None:  # fmt: skip
        self.backend = pick_backend(backend)
        self.unit_s, self.limits, self.all_or_nothing = unit_s, limits, all_or_nothing
        self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(workers):
            self._slots.put(i)
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="code-sandbox")
        self._closed = threading.Event()

    def _one(self, program: str, reference: str, deadline: float | None) -> CodeVerdict:
        if deadline is not None and time.monotonic() >= deadline:
            return CodeVerdict(ScoreStatus.timeout, None, detail="the request deadline passed before the run started")
        units = max(_units(reference), 1)
        wall = self.unit_s * units + SLACK_S
        sandbox = Sandbox(self.backend, Limits(**{**self.limits.__dict__, "wall_s": wall,
                                                  "cpu_s": max(self.limits.cpu_s, int(wall) + 1)}))  # fmt: skip
        slot = self._slots.get()
        try:
            return check_program(sandbox, program, reference, unit_s=self.unit_s,
                                 all_or_nothing=self.all_or_nothing, slot=slot)  # fmt: skip
        finally:
            self._slots.put(slot)

    def run_many(self, jobs: list[tuple[str, str]], deadline: float | None = None) -> list[CodeVerdict]:
        """`(program, reference)` pairs -> one verdict each, in order; past `deadline` (monotonic) -> `timeout`."""
        futures: list[Future[CodeVerdict]] = [self._executor.submit(self._one, p, r, deadline) for p, r in jobs]
        wait_futures(futures, timeout=None if deadline is None else max(deadline - time.monotonic(), 0.0))
        late = CodeVerdict(ScoreStatus.timeout, None, detail="the request deadline passed while the run was going on")
        return [f.result() if f.done() else late for f in futures]

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _units(reference: str) -> int:
    try:
        return load_tests(reference).units
    except ValueError:
        return 1
