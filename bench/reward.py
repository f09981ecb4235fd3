"""Answer-checking throughput: the VerifierPool (2 and 4 workers) against in-line math-verify, in one process.

    python bench/reward.py [--pairs 200] [--repeats 3] [--timeout-s 5]
    python bench/reward.py --code [--items 72] [--repeats 2]

`--code` measures the `code` reward instead: programs/s through the CodeRunner with 1 worker (in-line) and with
`--workers` sandboxes, on each sandbox backend this machine runs and on the bare subprocess (`insecure`: the same
limits, no namespaces), over the right and wrong reference solutions of tests/data/code (HumanEval, MBPP and
LiveCodeBench formats), so the table shows the pool's gain and the sandbox's cost.

Each repeat draws a fresh set of ~200 realistic (answer, reference) pairs (integers, fractions, decimals,
radicals, polynomials, intervals, tuples; about a third wrong), so neither math-verify's parse cache nor a
worker's warm cache sees a pair twice; every method checks the same sets. Pools are started and warmed before
timing (start-up is reported separately). The table shows verifications/s (median of the repeats) and the
ratio against in-line checking measured in this run.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/queue.py shadows the stdlib `queue` (used by multiprocessing and the pool) when bench/ is first on
# sys.path, as it is for `python bench/reward.py`; spawned workers inherit sys.path, so drop it first.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable

from services.reward.verify import Verdict, VerifierPool, verify_inline


def pair_set(seed: int, n: int) -> list[tuple[str, str]]:
    """`n` distinct realistic (answer, reference) pairs; about a third are wrong."""
    rng = random.Random(seed)
    kinds: list[Callable[[random.Random, bool], tuple[str, str]]] = [
        _integer,
        _fraction,
        _decimal,
        _radical,
        _polynomial,
        _interval,
        _tuple,
        _pi_multiple,
    ]
    pairs: dict[tuple[str, str], None] = {}
    while len(pairs) < n:
        pairs[rng.choice(kinds)(rng, rng.random() < 0.35)] = None
    return list(pairs)


def _integer(rng: random.Random, wrong: bool) -> tuple[str, str]:
    k = rng.randint(-999, 99_999)
    return str(k + wrong * rng.choice([-1, 1, 10])), str(k)


def _fraction(rng: random.Random, wrong: bool) -> tuple[str, str]:
    p, q = rng.randint(1, 99), rng.randint(2, 99)
    ans = rng.choice([f"\\frac{{{p}}}{{{q}}}", f"\\dfrac{{{p}}}{{{q}}}", f"{p}/{q}"])
    return ans, f"\\frac{{{p + wrong}}}{{{q}}}"


def _decimal(rng: random.Random, wrong: bool) -> tuple[str, str]:
    q = rng.choice([2, 4, 5, 8, 10, 20, 25])
    p = rng.randint(1, 5 * q)
    return f"{(p + wrong) / q:g}", f"\\frac{{{p}}}{{{q}}}"


def _radical(rng: random.Random, wrong: bool) -> tuple[str, str]:
    a, b = rng.randint(2, 9), rng.choice([2, 3, 5, 6, 7])
    return f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{a * a * b + wrong}}}"


def _polynomial(rng: random.Random, wrong: bool) -> tuple[str, str]:
    r, s = rng.randint(-9, 9), rng.randint(-9, 9)
    expanded = f"x^2 {-(r + s):+d}x {r * s + wrong:+d}"
    return expanded, f"(x {-r:+d})(x {-s:+d})"


def _interval(rng: random.Random, wrong: bool) -> tuple[str, str]:
    a = rng.randint(-20, 20)
    b = a + rng.randint(1, 20)
    return f"({a}, {b}]", f"({a},{b}]" if not wrong else f"[{a},{b})"


def _tuple(rng: random.Random, wrong: bool) -> tuple[str, str]:
    a, b = rng.randint(-50, 50), rng.randint(-50, 50)
    return f"({a}, {b})", f"({a},{b + wrong})"


def _pi_multiple(rng: random.Random, wrong: bool) -> tuple[str, str]:
    p, q = rng.randint(1, 11), rng.choice([2, 3, 4, 6, 12])
    return f"\\frac{{{p}\\pi}}{{{q}}}", f"\\frac{{{p + wrong}}}{{{q}}}\\pi"


def check_inline(pairs: list[tuple[str, str]], timeout_s: float) -> list[Verdict]:
    return [verify_inline(a, r, timeout_s=timeout_s) for a, r in pairs]


def timed(fn: Callable[[], list[Verdict]]) -> tuple[float, list[Verdict]]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def code_jobs(n: int) -> list[tuple[str, str]]:
    """`n` (program, tests) jobs cycling over the reference problems' right and wrong solutions."""
    from shared.code_data import code_rows
    from shared.contracts.code_tests import extract_program
    from shared.data import read_jsonl

    data = Path(__file__).resolve().parents[1] / "tests" / "data" / "code"
    jobs = []
    for fmt, good in (("humaneval", "good"), ("mbpp", "code"), ("livecodebench", "good")):
        raw = read_jsonl(data / f"{fmt}.jsonl")
        for row, mapped in zip(raw, code_rows(raw, fmt, fmt), strict=True):  # type: ignore[arg-type]
            for col in (good, "bad"):
                program = extract_program(f"```python\n{row[col]}```")
                jobs.append((program or "", mapped["ground_truth_answer"]))
    return [jobs[i % len(jobs)] for i in range(n)]


def code_bench(items: int, repeats: int, workers: int) -> None:
    from services.reward.code import CodeRunner
    from services.reward.sandbox import available

    jobs = code_jobs(items)
    backends = [b for b in ("bwrap", "unshare") if available(b)] + ["insecure"]
    rows = []
    for backend in backends:
        for n in (1, workers):
            runner = CodeRunner(backend, workers=n, unit_s=2.0)
            try:
                runs = [timed(lambda r=runner: r.run_many(jobs)) for _ in range(repeats)]
            finally:
                runner.close()
            rows.append((backend, n, statistics.median(t for t, _ in runs), runs[0][1]))
    base = next(t for b, n, t, _ in rows if b == "insecure" and n == 1)
    print(f"\n{items} programs x {repeats} repeats, {os.cpu_count()} CPUs\n")
    print("| sandbox | workers | programs/s | passed / not ok | x bare in-line |")
    print("|---|---:|---:|---:|---:|")
    for backend, n, t, verdicts in rows:
        passed = sum(v.score == 1.0 for v in verdicts)
        not_ok = sum(v.status != "ok" for v in verdicts)
        name = "bare subprocess (insecure)" if backend == "insecure" else backend
        print(f"| {name} | {n} | {items / t:.1f} | {passed} / {not_ok} | {base / t:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout-s", type=float, default=5.0)
    ap.add_argument("--code", action="store_true", help="benchmark the code reward instead")
    ap.add_argument("--items", type=int, default=72, help="--code: programs per repeat")
    ap.add_argument("--workers", type=int, default=4, help="--code: sandboxes in the pool")
    args = ap.parse_args()
    if args.code:
        code_bench(args.items, args.repeats, args.workers)
        return

    sets = [pair_set(seed, args.pairs) for seed in range(args.repeats)]
    check_inline(pair_set(10_000, 20), args.timeout_s)  # import and warm math-verify in this process
    pools: dict[int, VerifierPool] = {}
    startup: dict[int, float] = {}
    for n in (2, 4):
        t0 = time.perf_counter()
        pools[n] = VerifierPool(workers=n, timeout_s=args.timeout_s)
        assert pools[n].wait_ready(120), "workers did not start"
        startup[n] = time.perf_counter() - t0
    try:
        rows = [("in-line (main thread)", 1, [timed(lambda s=s: check_inline(s, args.timeout_s)) for s in sets])]
        for n, pool in pools.items():
            rows.append(
                (
                    f"VerifierPool (warm, start-up {startup[n]:.2f} s)",
                    n,
                    [timed(lambda s=s, p=pool: p.verify_many(s)) for s in sets],
                )
            )
    finally:
        for pool in pools.values():
            pool.close()

    reference = [(v.status, v.correct) for _, out in rows[0][2] for v in out]
    base = statistics.median(t for t, _ in rows[0][2])
    print(f"\n{args.pairs} pairs x {args.repeats} fresh sets, {os.cpu_count()} CPUs, timeout {args.timeout_s} s\n")
    print("| method | workers | verifications/s | wrong / not ok | x in-line |")
    print("|---|---:|---:|---:|---:|")
    for name, workers, runs in rows:
        verdicts = [v for _, out in runs for v in out]
        assert [(v.status, v.correct) for v in verdicts] == reference, f"{name} disagrees with in-line checking"
        med = statistics.median(t for t, _ in runs)
        wrong = sum(v.correct is False for v in verdicts) // args.repeats
        not_ok = sum(v.status != "ok" for v in verdicts) // args.repeats
        print(f"| {name} | {workers} | {args.pairs / med:.0f} | {wrong} / {not_ok} | {base / med:.2f} |")


if __name__ == "__main__":  # required: pool workers are spawned, and spawn re-imports the main module
    main()
