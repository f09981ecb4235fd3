"""Reward functions: one signature, one registry (anchors_style R10; gtpo_tracerl.md section 4.3).

Every reward is a pure function `fn(item, correct) -> float`:

* `item` is the wire `ScoreItem` (response text, token count, denoising steps, block size, budget);
* `correct` is the accuracy verdict of the item's final `\\boxed{}` answer against its reference
  (True / False), or None when there is no reference or it was not computed.

A reward that cannot be computed from what it was given (no verdict, no budget, no step count) raises
`ValueError` naming the missing input; the scorer reports that item as `error` instead of a silent 0.
`NEEDS_VERDICT` lists the rewards that read `correct`, so the scorer only asks the verifier pool for
verdicts when some weighted reward needs them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from shared.answers import BOXED as _BOXED
from shared.answers import extract_last_boxed
from shared.contracts.wire import ScoreItem

RewardFn = Callable[[ScoreItem, bool | None], float]


# --------------------------------------------------------------------------- helpers


def _braces_balanced(text: str) -> bool:
    """True when every unescaped `{` in `text` is closed by a later unescaped `}` and vice versa."""
    depth, i = 0, 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        depth += (c == "{") - (c == "}")
        if depth < 0:
            return False
        i += 1
    return depth == 0


def is_truncated(item: ScoreItem) -> bool:
    """The response hit the generation budget (`finish_reason == "length"`).

    Without a finish reason, `token_count >= max_new_tokens` counts as truncated (the reference's rule).
    A response that stopped on its stop token exactly at the budget is not truncated.
    """
    if item.finish_reason is not None:
        return item.finish_reason == "length"
    return item.max_new_tokens is not None and item.token_count >= item.max_new_tokens


def cosfn(t: float, T: float, a: float, b: float) -> float:
    """Kimi's cosine schedule: `b` at t = 0, falling (or rising) smoothly to `a` at t = T.

    `cosfn(t, T, a, b) = b - (b - a) * (1 - cos(pi * t / T)) / 2`; T = 0 gives `b`.
    """
    if T <= 0:
        return b
    return b - (b - a) * (1.0 - math.cos(math.pi * t / T)) / 2.0


def _need_verdict(name: str, correct: bool | None) -> bool:
    if correct is None:
        raise ValueError(f"{name} needs the accuracy verdict: the item has no reference answer")
    return correct


def _need_budget(name: str, item: ScoreItem) -> int:
    if item.max_new_tokens is None:
        raise ValueError(f"{name} needs max_new_tokens (the generation budget)")
    return item.max_new_tokens


def _speed_u(item: ScoreItem) -> tuple[float, int]:
    """DiRL's normalised speed `u = clip(token_count / steps - 1, 0, B - 1)` and `T = B - 1`."""
    if item.steps < 1 or item.token_count < 1:
        raise ValueError(f"speed rewards need token_count >= 1 and steps >= 1, got {item.token_count} / {item.steps}")
    T = item.block_size - 1
    return min(max(item.token_count / item.steps - 1.0, 0.0), float(T)), T


# --------------------------------------------------------------------------- rewards


def accuracy(item: ScoreItem, correct: bool | None) -> float:
    """1.0 for a correct final answer, else 0.0; a truncated response (budget hit) is 0.0 whatever it says.

    >>> accuracy(ScoreItem(id="a", response=r"\\boxed{2}"), True)
    1.0
    >>> accuracy(ScoreItem(id="a", response=r"\\boxed{2}", finish_reason="length"), True)
    0.0
    """
    ok = _need_verdict("accuracy", correct)
    return 0.0 if is_truncated(item) else float(ok)


def format_reward(item: ScoreItem, correct: bool | None) -> float:
    """1.0 when the response has exactly one `\\boxed` answer, non-empty and closed, and every `{` of the
    whole response is balanced (escaped `\\{` `\\}` ignored); else 0.0.

    This replaces the reference's `<think>...</think>` format check, which does not fit chat models that
    answer without think tags; several boxes, an empty box or broken LaTeX all fail it.

    >>> format_reward(ScoreItem(id="a", response=r"x = \\frac{1}{2}, so \\boxed{\\frac{1}{2}}"), None)
    1.0
    >>> format_reward(ScoreItem(id="a", response=r"\\boxed{1} \\boxed{2}"), None)
    0.0
    """
    text = item.response
    if text.count(_BOXED) != 1:
        return 0.0
    answer = extract_last_boxed(text)
    return float(bool(answer and answer.strip()) and _braces_balanced(text))


def boxed(item: ScoreItem, correct: bool | None) -> float:
    """0.1 when a non-empty final `\\boxed` answer can be extracted, else 0.0.

    >>> boxed(ScoreItem(id="a", response=r"\\boxed{7}"), None), boxed(ScoreItem(id="a", response=r"\\boxed{}"), None)
    (0.1, 0.0)
    """
    answer = extract_last_boxed(item.response)
    return 0.1 if answer is not None and answer.strip() else 0.0


def cosine(item: ScoreItem, correct: bool | None) -> float:
    """Kimi k1.5 length-aware reward with `T = max_new_tokens` and `t = token_count`.

    Correct: 1.0 at length 0 falling to 0.5 at T; wrong: -0.5 at length 0 rising to 0.0 at T (short
    wrong answers are punished most). A truncated response gets -0.5.

    >>> item = ScoreItem(id="a", response="", token_count=0, max_new_tokens=100, finish_reason="stop")
    >>> cosine(item, True), cosine(item, False)
    (1.0, -0.5)
    """
    ok = _need_verdict("cosine", correct)
    T = _need_budget("cosine", item)
    if is_truncated(item) or item.token_count >= T:
        return -0.5
    a, b = (0.5, 1.0) if ok else (0.0, -0.5)
    return cosfn(item.token_count, T, a, b)


def soft_overlong(item: ScoreItem, correct: bool | None) -> float:
    """DAPO's soft overlong penalty with `Lmax = max_new_tokens` and `Lcache = max(Lmax // 2, 1)`.

    0 up to `Lmax - Lcache` tokens, then falling linearly to -1 at `Lmax`; clamped to [-1, 0] (DAPO gives
    -1 past `Lmax`; `Lcache >= 1` keeps a budget of 1 token well-defined).

    >>> [soft_overlong(ScoreItem(id="a", response="", token_count=n, max_new_tokens=100), None) for n in (10, 75, 100)]
    [0.0, -0.5, -1.0]
    """
    lmax = _need_budget("soft_overlong", item)
    lcache = max(lmax // 2, 1)
    return max(min(-(item.token_count - (lmax - lcache)) / lcache, 0.0), -1.0)


def repetition(item: ScoreItem, correct: bool | None) -> float:
    """`-(1 - unique / total)` over whitespace-split 3-grams; 0.0 for fewer than 3 words.

    >>> repetition(ScoreItem(id="a", response="a b a b a b"), None)  # 4 trigrams, 2 unique
    -0.5
    """
    words = item.response.split()
    grams = list(zip(words, words[1:], words[2:], strict=False))  # shorter tails end the 3-grams
    if not grams:
        return 0.0
    return -(1.0 - len(set(grams)) / len(grams))


def speed(item: ScoreItem, correct: bool | None) -> float:
    """DiRL speed reward: tokens per denoising step `s = token_count / steps` in [1, B], `u = s - 1`, T = B - 1.

    Correct: 0.5 (one token per step) rising to 1.0 (a whole block per step); wrong: 0.0 falling to -0.5,
    so fast wrong answers are punished.

    >>> fast = ScoreItem(id="a", response="", token_count=8, steps=2, block_size=4)
    >>> speed(fast, True), speed(fast, False)
    (1.0, -0.5)
    """
    ok = _need_verdict("speed", correct)
    u, T = _speed_u(item)
    return cosfn(u, T, 1.0, 0.5) if ok else cosfn(u, T, -0.5, 0.0)


def speed_penalty(item: ScoreItem, correct: bool | None) -> float:
    """DiRL speed penalty: correct is always 0.5; wrong is 0.0 (slow) falling to -0.5 (fast), as `speed`.

    >>> slow = ScoreItem(id="a", response="", token_count=8, steps=8, block_size=4)
    >>> speed_penalty(slow, True), speed_penalty(slow, False)
    (0.5, 0.0)
    """
    ok = _need_verdict("speed_penalty", correct)
    u, T = _speed_u(item)
    return 0.5 if ok else cosfn(u, T, -0.5, 0.0)


def speed_gated(item: ScoreItem, correct: bool | None) -> float:
    """Speed for a correct answer only: `speed`'s correct branch rescaled to [0, 1] (0 at one token per step,
    1.0 at a whole block per step, the same cosine in `u / T`); 0.0 for a wrong or truncated answer, however fast.

    DiRL's `speed` scores a wrong answer 0 when slow and down to -0.5 when fast, so on a mostly-wrong model it
    favours slow wrong answers; here a wrong answer's speed carries no signal at all. The gate is `accuracy`'s
    (a truncated response is not correct), read from the same verdict of the same scoring call.

    >>> fast = ScoreItem(id="a", response="", token_count=8, steps=2, block_size=4)
    >>> slow = ScoreItem(id="a", response="", token_count=8, steps=8, block_size=4)
    >>> speed_gated(fast, True), speed_gated(slow, True), speed_gated(fast, False)
    (1.0, 0.0, 0.0)
    """
    ok = accuracy(item, _need_verdict("speed_gated", correct))
    u, T = _speed_u(item)  # also for a wrong answer: a step count that cannot be read is an error, not a 0
    return cosfn(u, T, 1.0, 0.0) if ok else 0.0


def code(item: ScoreItem, passed: float | None) -> float:
    """The fraction of the item's tests its program passed (or 1 / 0 all-or-nothing): the sandboxed run's verdict
    (`services.reward.code`), handed in by the scorer in place of the accuracy verdict.

    >>> code(ScoreItem(id="a", response=""), 0.5)
    0.5
    """
    if passed is None:
        raise ValueError("code needs the program's test verdict: the item has no code tests in its reference")
    return float(passed)


REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy,
    "format": format_reward,
    "boxed": boxed,
    "cosine": cosine,
    "soft_overlong": soft_overlong,
    "repetition": repetition,
    "speed": speed,
    "speed_penalty": speed_penalty,
    "speed_gated": speed_gated,
    "code": code,  # type: ignore[dict-item]  # reads the code verdict's fraction, not the accuracy verdict
}

NEEDS_VERDICT: frozenset[str] = frozenset({"accuracy", "cosine", "speed", "speed_penalty", "speed_gated"})
NEEDS_CODE: frozenset[str] = frozenset({"code"})
"""Rewards that read the sandboxed run's fraction of tests passed instead of the accuracy verdict."""
