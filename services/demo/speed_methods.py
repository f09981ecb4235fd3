"""The demo's speed methods (`gtpo demo --speed --speed-method ...`): plain data, so the CLI can name them in its
help without importing the demo."""

from __future__ import annotations

from typing import NamedTuple


class SpeedMethod(NamedTuple):
    """How one speed arm is trained: its label, the speed reward next to accuracy (None: accuracy alone), whether
    correct answers keep a non-negative advantage (`loss.floor_correct`) and `loss.reward_norm`."""

    label: str
    speed_reward: str | None
    floor_correct: bool = False
    reward_norm: str = "total"


SPEED_METHODS: dict[str, SpeedMethod] = {
    "spread": SpeedMethod("GTPO + spread", None),
    "dirl": SpeedMethod("DiRL speed", "speed"),
    "dirl_floor": SpeedMethod("DiRL speed + floor", "speed", floor_correct=True),
    "gated": SpeedMethod("gated speed", "speed_gated"),
    "per_component": SpeedMethod("DiRL speed, per-comp", "speed", reward_norm="per_component"),
    "gated_pc": SpeedMethod("gated speed, per-comp", "speed_gated", reward_norm="per_component"),
    "gated_floor": SpeedMethod("gated speed + floor", "speed_gated", floor_correct=True),
}
"""`--speed-method` choices, each trained with the threshold spread: accuracy alone (`spread`); accuracy + DiRL's
`speed` reward, normalised as a total (`dirl`), with correct answers' advantages floored at 0 (`dirl_floor`, the
arm of the README's block-8 result) or normalised per component (`per_component`); accuracy + `speed_gated`, as a
total (`gated`), with the floor (`gated_floor`: a slow correct answer is never pushed down) or per component
(`gated_pc`)."""

DEFAULT_SPEED_METHOD = "gated_floor"
"""The method `--speed` runs unless told otherwise: over 3 seeds at 60 RL steps the fastest within 2 points on block
size 4 (no collapse), and on block size 8 with `threshold_spread=0.1` +41-48% tokens per step, within 2 points on
4 of 5 seeds (README, "Speed methods"; docs/speed.md)."""
