"""The per-round training layout (one forward per round, as TraceRL and DiRL train): the independent oracle the
packed layout must agree with (log-probs, gradients, whole trainer updates). Kept here, not as a trainer option:
it computes nothing the packed layout does not, only more slowly.

Do not optimise this file: its worth is that every row is the plainest layout of one round.
"""

from __future__ import annotations

from torch import Tensor

from services.trainer.learner.trajectory import TrainBatch, Trajectory, assemble_batch, noisy_copy
from shared.model.masks import Layout, packed_layout


def per_round_layout(clean_ids: Tensor, noisy_ids: Tensor, prompt_len: int, block_size: int) -> Layout:
    """``[prompt + clean response | noisy copy]``: the layout of one round.

    Args:
        clean_ids: (T,) prompt + response + tail, the sequence the engine finished with.
        noisy_ids: (T,) the same sequence in the state of one round (masked where not yet unmasked).
        prompt_len: P; the noisy copy starts at the block holding position P.
    """
    return packed_layout(clean_ids, [noisy_ids], prompt_len, block_size)


def per_round_rows(traj: Trajectory, mask_id: int, rounds: range | None = None) -> list[tuple[Layout, list[int]]]:
    """One row per round of `traj` (over `rounds` only; None: all), with that round's index."""
    chosen = [r for r in (range(len(traj.rounds)) if rounds is None else rounds) if r < len(traj.rounds)]
    lay = [per_round_layout(traj.clean_ids, noisy_copy(traj, r, mask_id), traj.prompt_len, traj.block_size)
           for r in chosen]  # fmt: skip
    return [(x, [r]) for x, r in zip(lay, chosen, strict=True)]


def per_round_batch(trajectories: list[Trajectory], mask_id: int, pad_id: int = 0, rounds=None) -> TrainBatch:
    """`services.trainer.learner.trajectory.build_batch` with one row per (response, round) instead of one per response."""
    return assemble_batch(trajectories, [per_round_rows(t, mask_id, rounds) for t in trajectories], pad_id)
