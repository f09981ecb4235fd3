"""From a rollout's trajectory to training sequences (docs/design.md section 3).

A rollout gives token ids and, per token, the denoising step that unmasked it. Per block, sort the block's distinct
steps; round r of the block is its r-th step (or its r-th group of ``shrink`` steps). The targets of round r are
the block's response tokens with that step; its state has every position with step >= that step masked and the
earlier ones clean. Blocks are aligned to absolute positions from the first prompt token, as in the engines; the
prompt tail in the first block is given (never masked); the tail after the cut is placed as sampled, never
trained. Token ids are the engine's: nothing is re-tokenised.

Rounds of different blocks are independent given the clean prefix, so round r of every block shares one noisy copy.
Copies never see each other, and the clean sequence never sees a copy, so the R copies of a response may be split
over forwards of at most c copies each (``copies_per_forward``), each forward carrying the clean sequence again: the
log-probs and the summed gradients are those of one forward, at a fraction of its activation memory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from shared.contracts.wire import Rollout
from shared.model.masks import Layout, generation_start, packed_layout
from shared.model.sampling import settings_tensors


@dataclass
class Round:
    """One noisy copy. All (T,) over the clean sequence prompt + response + tail."""

    masked: Tensor  # bool: <|MASK|> in this copy
    targets: Tensor  # bool: trained in this copy (response tokens only)
    blocks: Tensor  # long (k,): absolute blocks present in the packed copy (those with targets)


@dataclass
class Trajectory:
    """One response ready for layout: the clean sequence and its rounds."""

    clean_ids: Tensor  # (T,) long
    prompt_len: int
    response_len: int
    block_size: int
    rounds: list[Round]
    # the sampling settings the response was drawn with: the trainer's log-probs use the same transform
    # (shared.model.sampling); SFT keeps the defaults, plain log_softmax
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def target_count(self) -> int:
        return int(sum(int(r.targets.sum()) for r in self.rounds))


def block_rounds(steps: list[int], shrink: int = 1) -> list[tuple[int, set[int]]]:
    """Rounds of one block: (first step of the round, the steps it trains), in order.

    >>> block_rounds([3, 1, 2, 2])
    [(1, {1}), (2, {2}), (3, {3})]
    >>> block_rounds([3, 1, 2, 4], shrink=2)
    [(1, {1, 2}), (3, {3, 4})]
    """
    if shrink < 1:
        raise ValueError(f"shrink: must be >= 1, got {shrink}")
    uniq = sorted(set(steps))
    return [(uniq[i], set(uniq[i : i + shrink])) for i in range(0, len(uniq), shrink)]


def trajectory_rounds(prompt_len: int, steps: list[int], response_len: int, block_size: int, shrink: int = 1):
    """Rounds of a whole response.

    Args:
        prompt_len: P.
        steps: (G,) steps of every generated position, response then tail (G = response + tail).
        response_len: how many of them are the response (targets); the rest is the tail.

    Returns:
        list of Round over the T = P + G positions, copy r holding round r of every block that has one with
        at least one target.
    """
    total = prompt_len + len(steps)
    step_t = torch.zeros(total, dtype=torch.long)
    step_t[prompt_len:] = torch.tensor(steps, dtype=torch.long)
    is_response = torch.zeros(total, dtype=torch.bool)
    is_response[prompt_len : prompt_len + response_len] = True
    generated = torch.zeros(total, dtype=torch.bool)
    generated[prompt_len:] = True
    per_copy: dict[int, list[tuple[int, int, set[int]]]] = {}
    first_block = generation_start(prompt_len, block_size) // block_size
    for blk in range(first_block, (total + block_size - 1) // block_size):
        lo, hi = blk * block_size, min((blk + 1) * block_size, total)
        block_steps = [int(s) for s, g in zip(step_t[lo:hi], generated[lo:hi], strict=True) if g]
        for r, (start, trained) in enumerate(block_rounds(block_steps, shrink)):
            per_copy.setdefault(r, []).append((blk, start, trained))
    rounds = []
    for r in sorted(per_copy):
        masked = torch.zeros(total, dtype=torch.bool)
        targets = torch.zeros(total, dtype=torch.bool)
        blocks = []
        for blk, start, trained in per_copy[r]:
            lo, hi = blk * block_size, min((blk + 1) * block_size, total)
            sl = slice(lo, hi)
            tgt = generated[sl] & is_response[sl] & torch.isin(step_t[sl], torch.tensor(sorted(trained)))
            if not bool(tgt.any()):
                continue  # this round only unmasked tail tokens: nothing to train
            masked[sl] = generated[sl] & (step_t[sl] >= start)
            targets[sl] = tgt
            blocks.append(blk)
        if blocks:
            rounds.append(Round(masked, targets, torch.tensor(blocks, dtype=torch.long)))
    return rounds


def rollout_trajectory(rollout: Rollout, shrink: int = 1) -> Trajectory:
    """The training view of a rollout (its own token ids, block size and step map)."""
    b = rollout.params.block_size
    assert b is not None  # Rollout validation guarantees it
    clean = torch.tensor(rollout.prompt_ids + rollout.token_ids + rollout.tail_ids, dtype=torch.long)
    steps = rollout.step_map + rollout.tail_steps
    rounds = trajectory_rounds(len(rollout.prompt_ids), steps, len(rollout.token_ids), b, shrink)
    p = rollout.params
    return Trajectory(
        clean, len(rollout.prompt_ids), len(rollout.token_ids), b, rounds, p.temperature, p.top_k, p.top_p
    )


@dataclass
class TrainBatch:
    """Padded training rows and where their targets are.

    Rows are (N, L); targets are gathered from the flattened (N * L) hidden states at ``target_index``.
    ``response_index`` / ``round_index`` / ``token_index`` say which response, round and response position
    each target is, so results can be compared across layouts. ``temperature`` / ``top_k`` / ``top_p`` are each
    target's response's sampling settings (``shared.model.sampling.sampling_log_probs`` takes them per row).
    """

    input_ids: Tensor  # (N, L) long
    position_ids: Tensor  # (N, L) long
    copy_ids: Tensor  # (N, L) long
    valid: Tensor  # (N, L) bool
    target_index: Tensor  # (T,) long into N * L
    labels: Tensor  # (T,) long
    response_index: Tensor  # (T,) long
    round_index: Tensor  # (T,) long
    token_index: Tensor  # (T,) long: position within the response
    block_size: int
    temperature: Tensor  # (T,) float32
    top_k: Tensor  # (T,) long
    top_p: Tensor  # (T,) float32

    def to(self, device: torch.device | str) -> TrainBatch:
        moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.__dict__.items()}
        return TrainBatch(**moved)

    def pad_to(self, multiple: int) -> TrainBatch:
        """The same batch with L rounded up to a multiple (padding is invalid; targets re-indexed)."""
        n, length = self.input_ids.shape
        new = -(-length // multiple) * multiple
        if new == length:
            return self
        pad = lambda t, v: torch.nn.functional.pad(t, (0, new - length), value=v)  # noqa: E731
        row, col = self.target_index // length, self.target_index % length
        return dataclasses.replace(
            self, input_ids=pad(self.input_ids, 0), position_ids=pad(self.position_ids, 0),
            copy_ids=pad(self.copy_ids, 0), valid=pad(self.valid, False), target_index=row * new + col,
        )  # fmt: skip

    def canonical_order(self) -> Tensor:
        """Permutation sorting targets by (response, position): the same order for every layout."""
        key = self.response_index * (int(self.token_index.max()) + 1 if len(self.token_index) else 1)
        return torch.argsort(key + self.token_index, stable=True)


def forward_rounds(n_rounds: int, copies_per_forward: int | None) -> list[range]:
    """The rounds each forward holds: consecutive groups of at most ``copies_per_forward`` (None: all in one).

    >>> forward_rounds(5, 2)
    [range(0, 2), range(2, 4), range(4, 5)]
    >>> forward_rounds(3, None)
    [range(0, 3)]
    """
    if copies_per_forward is not None and copies_per_forward < 1:
        raise ValueError(f"copies_per_forward: must be >= 1, got {copies_per_forward}")
    c = copies_per_forward or max(1, n_rounds)
    return [range(i, min(i + c, n_rounds)) for i in range(0, max(1, n_rounds), c)]


def packed_rows(traj: Trajectory, mask_id: int, rounds: range | None = None) -> list[tuple[Layout, list[int]]]:
    """The packed row of one trajectory over ``rounds`` only (None: all rounds), with the global round index of
    each of its copies; no row when a selection holds none of its rounds."""
    chosen = [r for r in (range(len(traj.rounds)) if rounds is None else rounds) if r < len(traj.rounds)]
    if not chosen and rounds is not None:
        return []  # a later forward this trajectory has no round for (without a selection: its clean row)
    noisy = [noisy_copy(traj, r, mask_id) for r in chosen]
    blocks = [traj.rounds[r].blocks for r in chosen]
    return [(packed_layout(traj.clean_ids, noisy, traj.prompt_len, traj.block_size, blocks), chosen)]


def noisy_copy(traj: Trajectory, r: int, mask_id: int) -> Tensor:
    """(T,) the sequence in the state of round `r`: masked where not yet unmasked."""
    return torch.where(traj.rounds[r].masked, torch.full_like(traj.clean_ids, mask_id), traj.clean_ids)


def build_batch(
    trajectories: list[Trajectory], mask_id: int, pad_id: int = 0, rounds: range | None = None
) -> TrainBatch:
    """Lay out trajectories as padded packed rows, one per response.

    ``rounds`` keeps only those rounds of every trajectory (one forward of ``copies_per_forward``; see
    :func:`forward_rounds`): a packed row is then ``[clean | the copies of those rounds]``, ``round_index`` stays
    the round's index in its trajectory and ``response_index`` the trajectory's position in ``trajectories``, so
    the forwards of one micro-batch together hold every target once. A trajectory with none of those rounds gives
    no row; with no row at all the batch has zero rows.
    """
    return assemble_batch(trajectories, [packed_rows(t, mask_id, rounds) for t in trajectories], pad_id)


def assemble_batch(
    trajectories: list[Trajectory], rows_of: list[list[tuple[Layout, list[int]]]], pad_id: int = 0
) -> TrainBatch:
    """The padded batch of every trajectory's rows (`rows_of[i]`: trajectory i's (layout, round of each copy))."""
    if len({t.block_size for t in trajectories}) > 1:
        raise ValueError("trajectories: one batch needs one block size")
    rows, tgt_rows = [], []
    for resp, (traj, own) in enumerate(zip(trajectories, rows_of, strict=True)):
        for lay, round_ids in own:
            rows.append(lay)
            tgt_rows.append(_targets(traj, lay, round_ids, resp))
    return _pad(trajectories, rows, tgt_rows, pad_id)


def _targets(traj: Trajectory, lay: Layout, round_ids: list[int], resp: int) -> list[tuple[int, ...]]:
    """(index in the row, target id, response, round, token index) of each target of one row."""
    tgt = []
    for copy_no, r in enumerate(round_ids, start=1):
        # the targets of round r sit in copy `copy_no` at their clean positions
        in_copy = (lay.copy_ids == copy_no) & traj.rounds[r].targets[lay.position_ids]
        for idx in in_copy.nonzero().squeeze(1).tolist():
            pos = int(lay.position_ids[idx])
            tgt.append((idx, int(traj.clean_ids[pos]), resp, r, pos - traj.prompt_len))
    return tgt


def _pad(trajectories: list[Trajectory], rows: list[Layout], tgt_rows: list[list[tuple]], pad_id: int) -> TrainBatch:
    width = max((len(lay) for lay in rows), default=0)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    copies = torch.zeros((n, width), dtype=torch.long)
    valid = torch.zeros((n, width), dtype=torch.bool)
    flat = []
    for i, lay in enumerate(rows):
        k = len(lay)
        ids[i, :k], pos[i, :k], copies[i, :k], valid[i, :k] = lay.input_ids, lay.position_ids, lay.copy_ids, True
        flat += [(i * width + idx, *rest) for idx, *rest in tgt_rows[i]]
    cols = list(zip(*flat, strict=True)) if flat else [[]] * 5
    t = [torch.tensor(c, dtype=torch.long) for c in cols]
    block = trajectories[0].block_size if trajectories else 1
    settings = settings_tensors([tr.temperature for tr in trajectories], [tr.top_k for tr in trajectories],
                                [tr.top_p for tr in trajectories])  # fmt: skip
    per_target = [x[t[2]] for x in settings]
    return TrainBatch(ids, pos, copies, valid, t[0], t[1], t[2], t[3], t[4], block, *per_target)
