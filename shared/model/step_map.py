"""What a rollout's step map says about decoding speed: denoising forwards and tokens per forward (one definition
for the engines' responses, the reward service's speed reward, the trainer's metrics and `gtpo eval`)."""

from __future__ import annotations

from collections.abc import Sequence


def denoising_steps(step_map: Sequence[int]) -> int:
    """Forwards that unmasked at least one response token: the distinct values of the step map (DiRL's speed
    denominator). The tail after a stop is not counted.

    >>> denoising_steps([1, 1, 2, 3, 3, 3])
    3
    """
    return len(set(step_map))


def tokens_per_step(token_count: int, step_map: Sequence[int]) -> float:
    """Response tokens per denoising forward (1.0 for one token a step; higher is faster).

    >>> tokens_per_step(6, [1, 1, 2, 3, 3, 3])
    2.0
    """
    return token_count / max(1, denoising_steps(step_map))
