"""Code benchmarks for `gtpo eval`: presets (HumanEval, MBPP, LiveCodeBench) and the RL code sets, and pass@k.

A preset names a hub dataset and its code format (`shared.code_data`); `services.eval.evaluate.load_rows` reads it
through the data layer like the maths presets (network and `datasets` needed the first time, the local cache after).
Samples are scored by the reward service's `code` reward in the sandbox: a sample is correct when every test passes.
The eval card's avg@k is then the unbiased pass@1 and its pass@k is pass@n (n = samples per question);
`pass_at_k` gives the unbiased estimate for any k <= n (Chen et al. 2021, the HumanEval paper).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

CODE_PRESETS: dict[str, tuple[str, str]] = {
    # name: (hub source after "hf:", as org/name[:config][:split], the code format)
    "HumanEval": ("openai/openai_humaneval::test", "humaneval"),
    "MBPP": ("google-research-datasets/mbpp:full:test", "mbpp"),
    "LiveCodeBench": ("Gen-Verse/LiveCodeBench::test", "trace"),
    # RL training sets in the format the TraceRL / GTPO repositories use (test_method, test_list / test_input ...)
    "PrimeIntellect": ("Gen-Verse/PrimeIntellect::train", "trace"),
    "PrimeIntellect-verifiable": ("PrimeIntellect/verifiable-coding-problems::train", "primeintellect"),
}
"""Each is (source, code format); `load_rows` prefixes `hf:`."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: `1 - C(n - c, k) / C(n, k)`.

    >>> pass_at_k(10, 0, 1), pass_at_k(10, 10, 5), round(pass_at_k(4, 1, 2), 4)
    (0.0, 1.0, 0.5)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    # the product form of C(n-c, k) / C(n, k): no huge binomials
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over questions, each with its own samples' correctness.

    >>> mean_pass_at_k([[True, False], [False, False]], 1)
    0.25
    """
    if not correct:
        raise ValueError("mean_pass_at_k: no questions")
    return math.fsum(pass_at_k(len(s), sum(s), k) for s in correct) / len(correct)
