"""Score a batch: extract answers, check them through the pool (one batch), weigh the reward components.

An item's `status` is its accuracy check's (`ok` / `timeout` / `error`), or `error` when a requested reward
could not be computed (no reference, no budget, no step count). Any non-ok item has `total == 0.0`, and
its `detail` says why: the trainer can drop it or count it, but never mistakes it for a wrong answer.
`item_from_rollout` is what every caller (the reward worker, `gtpo eval`) scores a rollout as.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

from services.reward.code import CodeVerdict
from services.reward.rewards import NEEDS_CODE, NEEDS_VERDICT, REWARDS, extract_last_boxed, is_truncated
from services.reward.verify import Verdict
from shared.contracts.code_tests import extract_program, is_code_reference
from shared.contracts.wire import Rollout, ScoreItem, ScoreResult, ScoreStatus
from shared.model.step_map import denoising_steps

MAX_WEIGHT = 1e6
"""|weight| above this is refused: every component is within [-1, 1], so totals stay finite."""


class Verifier(Protocol):
    """What scoring needs from a VerifierPool (a fake in tests would do too)."""

    def verify_many(self, pairs: list[tuple[str, str]], deadline: float | None = None) -> list[Verdict]: ...


class CodeChecker(Protocol):
    """What scoring needs from a CodeRunner."""

    def run_many(self, jobs: list[tuple[str, str]], deadline: float | None = None) -> list[CodeVerdict]: ...


def check_programs(
    items: Sequence[ScoreItem], runner: CodeChecker | None, deadline: float | None = None, block: str = "last"
) -> list[CodeVerdict | None]:
    """One code verdict per item: None without code tests; 0 without a fenced program; else the sandbox's.

    Every program goes to the runner in one `run_many` call, so the sandboxes run in parallel.
    """
    verdicts: list[CodeVerdict | None] = [None] * len(items)
    jobs: list[tuple[str, str]] = []
    where: list[int] = []
    for i, item in enumerate(items):
        if not is_code_reference(item.reference):
            continue
        if runner is None:
            verdicts[i] = CodeVerdict(ScoreStatus.error, None, detail="this service has no code sandbox (see its log)")
            continue
        program = extract_program(item.response, block)
        if program is None or not program.strip():
            verdicts[i] = CodeVerdict(ScoreStatus.ok, 0.0, detail="no fenced code block in the response")
            continue
        jobs.append((program, item.reference))  # type: ignore[arg-type]  # is_code_reference: not None
        where.append(i)
    for i, verdict in zip(where, runner.run_many(jobs, deadline=deadline) if jobs else [], strict=True):  # type: ignore[union-attr]
        verdicts[i] = verdict
    return verdicts


def item_from_rollout(item_id: str, rollout: Rollout, reference: str | None) -> ScoreItem:
    """What the reward functions see of a rollout: its text, length, denoising steps, block size and budget.

    Raises:
        pydantic.ValidationError: the id or the reference is over the contract's limits.
    """
    return ScoreItem(
        id=item_id,
        response=rollout.text,
        reference=reference,
        token_count=len(rollout.token_ids),
        steps=denoising_steps(rollout.step_map),
        block_size=rollout.params.block_size or 4,  # a Rollout always records it; 4 only satisfies the type
        max_new_tokens=rollout.params.max_new_tokens,
        finish_reason=rollout.finish_reason,
    )


def check_weights(weights: Mapping[str, float]) -> None:
    """Raise ValueError naming every unknown reward or unusable weight.

    >>> check_weights({"accuracy": 1.0, "lenght": 0.5})
    Traceback (most recent call last):
    ...
    ValueError: weights: unknown reward 'lenght'; known: accuracy, boxed, code, cosine, format, repetition, soft_overlong, speed, speed_gated, speed_penalty
    """
    if not weights:
        raise ValueError("weights: name at least one reward")
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        names = ", ".join(repr(n) for n in unknown)
        plural = "s" if len(unknown) > 1 else ""
        raise ValueError(f"weights: unknown reward{plural} {names}; known: {', '.join(sorted(REWARDS))}")
    bad = {n: w for n, w in weights.items() if not (math.isfinite(w) and abs(w) <= MAX_WEIGHT)}
    if bad:
        raise ValueError(f"weights: must be finite with |w| <= {MAX_WEIGHT:g}, got {bad}")


def check_answers(items: Sequence[ScoreItem], pool: Verifier, deadline: float | None = None) -> list[Verdict | None]:
    """One verdict per item: None without a reference; wrong without a final `\\boxed{}`; else the pool's.

    Every checkable item goes to the pool in one `verify_many` call, so the workers run them in parallel;
    those not answered by `deadline` (a `time.monotonic()` instant) are `timeout`.
    """
    verdicts: list[Verdict | None] = [None] * len(items)
    pairs: list[tuple[str, str]] = []
    where: list[int] = []
    for i, item in enumerate(items):
        if item.reference is None:
            continue
        answer = extract_last_boxed(item.response)
        if answer is None:
            verdicts[i] = Verdict(ScoreStatus.ok, False, "no final \\boxed{} answer")
            continue
        pairs.append((answer, item.reference))
        where.append(i)
    for i, verdict in zip(where, pool.verify_many(pairs, deadline=deadline) if pairs else [], strict=True):
        verdicts[i] = verdict
    return verdicts


def score_item(
    item: ScoreItem,
    verdict: Verdict | None,
    weights: Mapping[str, float],
    *,
    zero_truncated: bool = False,
    code: CodeVerdict | None = None,
) -> ScoreResult:
    """Every weighted component of one item, their weighted sum, and the item's status.

    Args:
        verdict: the item's accuracy check, or None (no reference, or no requested reward needs it).
        weights: reward name -> weight; the names are known (`check_weights`).
        zero_truncated: DiRL's rule: a response that hit the token limit (`is_truncated`) scores 0 in every
            component, so its total is 0 whatever the weights (a speed reward included); its status stays ok.
        code: the item's sandboxed run (None: no code tests, or no requested reward reads it).
    """
    correct = verdict.correct if verdict is not None else None
    passed = code.score if code is not None else None
    components: dict[str, float] = {}
    problems: list[str] = []
    for name in weights:
        try:
            components[name] = 0.0 if zero_truncated and is_truncated(item) else REWARDS[name](item, passed if name in NEEDS_CODE else correct)
        except ValueError as e:  # a missing input: reported, never scored as 0
            problems.append(f"{name}: {e}")
    if verdict is not None and verdict.status != ScoreStatus.ok:
        status, detail = verdict.status, f"accuracy check: {verdict.detail}"
    elif code is not None and code.status != ScoreStatus.ok:
        status, detail = code.status, f"code check: {code.detail}"
    elif problems:
        status, detail = ScoreStatus.error, "; ".join(problems)
    else:
        status, detail = ScoreStatus.ok, None
    total = math.fsum(weights[n] * v for n, v in components.items()) if status == ScoreStatus.ok else 0.0
    return ScoreResult(id=item.id, total=total, components=components, status=status, detail=detail)


def score_items(
    items: Sequence[ScoreItem],
    weights: Mapping[str, float],
    pool: Verifier,
    *,
    deadline: float | None = None,
    zero_truncated: bool = False,
    code: CodeChecker | None = None,
    code_block: str = "last",
) -> list[ScoreResult]:
    """Score a batch (the body of `POST /v1/score`).

    Args:
        items: the responses to score.
        weights: reward name -> weight.
        pool: answer checker; only called when a weighted reward needs the accuracy verdict.
        deadline: a `time.monotonic()` instant: an accuracy check not done by then makes its item `timeout`.
        zero_truncated: as `score_item`.
        code: the sandbox runner; only called when a weighted reward reads the code verdict (None: those items
            are `error`).
        code_block: which fenced block is the program (`extract_program`).

    Raises:
        ValueError: an unknown reward name or an unusable weight (the HTTP layer answers 422).
    """
    check_weights(weights)
    needs_verdict = not NEEDS_VERDICT.isdisjoint(weights)
    verdicts = check_answers(items, pool, deadline) if needs_verdict else [None] * len(items)
    runs = check_programs(items, code, deadline, code_block) if not NEEDS_CODE.isdisjoint(weights) else None
    return [score_item(item, verdict, weights, zero_truncated=zero_truncated, code=runs[i] if runs else None)
            for i, (item, verdict) in enumerate(zip(items, verdicts, strict=True))]  # fmt: skip
