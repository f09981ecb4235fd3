"""The numbers an evaluation reports beyond plain means: bootstrap intervals over questions (one run, or two runs
paired question by question) and AUP, accuracy under parallelism (docs/evaluation.md gives the sources).

Pure functions over floats, no torch: the eval cards and `gtpo eval --compare` share them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

BOOTSTRAP_RESAMPLES = 2000
"""Resamples per interval: the percentile ends move by well under a point of accuracy past this."""
BOOTSTRAP_SEED = 0
"""Fixed, so the same per-question results always print the same interval."""
CONFIDENCE = 0.95

AUP_ALPHA = 3.0
"""AUP's penalty for accuracy below the best: W(y) = min(exp(-alpha (1 - y / y_max)), 1) (d3LLM's default)."""
AUP_DROP = 5.0
"""AUP keeps only the points within this many accuracy points of the lowest-parallelism point (d3LLM's default)."""


def mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs) if xs else 0.0


def percentile(sorted_xs: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of sorted values, linear between order statistics (numpy's default).

    >>> percentile([0.0, 1.0, 2.0, 3.0], 0.5)
    1.5
    """
    if not sorted_xs:
        return 0.0
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def bootstrap_ci(
    per_question: Sequence[float],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over questions.

    Questions are the unit resampled (with replacement, as many as there are): the k samples of one question are
    not independent draws of the benchmark, so resampling samples would understate the spread.

    Args:
        per_question: one value per question (its accuracy over its k samples, 0..1).
    Returns:
        (low, high); (0, 0) for no questions.
    """
    n = len(per_question)
    if n == 0:
        return 0.0, 0.0
    rng = random.Random(seed)
    means = sorted(mean([per_question[rng.randrange(n)] for _ in range(n)]) for _ in range(resamples))
    tail = (1.0 - confidence) / 2
    return percentile(means, tail), percentile(means, 1.0 - tail)


def paired_bootstrap_ci(
    a: Sequence[float],
    b: Sequence[float],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float, float]:
    """The difference of means b - a over the same questions, with its paired bootstrap interval.

    Each resample draws questions and takes both runs' values of the same questions, so the spread between questions
    (which both runs share) cancels: two runs a constant 0.1 apart get the interval (0.1, 0.1), however hard the
    questions vary.

    Args:
        a, b: one value per question, in the same question order.
    Returns:
        (difference, low, high).
    Raises:
        ValueError: the runs hold different numbers of questions.
    """
    if len(a) != len(b):
        raise ValueError(f"paired bootstrap: the runs hold {len(a)} and {len(b)} questions")
    diff = [y - x for x, y in zip(a, b, strict=True)]
    low, high = bootstrap_ci(diff, resamples=resamples, confidence=confidence, seed=seed)
    return mean(diff), low, high


def aup_weight(y: float, y_max: float, alpha: float = AUP_ALPHA) -> float:
    """W(y) = min(exp(-alpha (1 - y / y_max)), 1): 1 at the best accuracy, e^-alpha at 0.

    >>> round(aup_weight(45.0, 90.0, 2.0), 6) == round(math.exp(-1.0), 6)
    True
    """
    if y_max <= 0:
        return 1.0
    return min(math.exp(-alpha * (1.0 - y / y_max)), 1.0)


def aup(
    points: Sequence[tuple[float, float]],
    *,
    y_max: float | None = None,
    alpha: float = AUP_ALPHA,
    drop: float = AUP_DROP,
) -> float:
    """Accuracy under parallelism: the weighted area under the accuracy-parallelism curve.

    With the points sorted by parallelism rho (tokens per forward) and accuracy y in percent, after dropping points
    more than `drop` below the first point's accuracy,

        AUP = rho_1 y_1 + sum_{i >= 2} (rho_i - rho_{i-1}) (W(y_i) y_i + W(y_{i-1}) y_{i-1}) / 2.

    One point is rho * y (LightningRL's single greedy operating point: TPF x accuracy).

    Args:
        points: (tokens per forward > 0, accuracy in percent 0..100) pairs.
        y_max: the best accuracy compared against; None = the best among `points`.
    Raises:
        ValueError: no points, or a parallelism <= 0.
    """
    if not points:
        raise ValueError("aup: needs at least one (tokens per forward, accuracy) point")
    if any(r <= 0 for r, _ in points):
        raise ValueError("aup: tokens per forward must be > 0")
    pts = sorted(points)
    kept = [(r, y) for r, y in pts if y >= pts[0][1] - drop]
    best = max(y for _, y in kept) if y_max is None else y_max
    total = kept[0][0] * kept[0][1]
    for (r0, y0), (r1, y1) in zip(kept, kept[1:], strict=False):
        total += (r1 - r0) * (aup_weight(y1, best, alpha) * y1 + aup_weight(y0, best, alpha) * y0) / 2
    return total
