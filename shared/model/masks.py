"""Block-diffusion attention masks and training layouts (docs/design.md sections 2 and 3).

Every layout here is described per token by two integers:

* ``position``: absolute position from the first prompt token (a noisy copy repeats the clean positions);
  the block of a token is ``position // block_size`` (blocks are aligned to the prompt start);
* ``copy``: 0 for the clean sequence, r > 0 for noisy copy r.

One rule then gives every mask we need (True = may attend):

* clean -> clean: key block <= query block (block-causal, bidirectional inside a block);
* noisy -> clean: key block < query block (the clean prefix before the noisy block);
* noisy -> noisy: same copy and same block (the noisy block itself, bidirectionally);
* clean -> noisy: never.

With ``copy`` all 0 this is the inference mask; ``[clean | noisy]`` is the per-round layout; ``[clean | copy 1 |
... | copy R]`` the packed layout; ``[noisy | clean]`` SDAR's SFT layout. Padding keys are never attended; a padding
query attends only to itself so that SDPA rows stay finite (a fully masked row gives NaN, and NaN values poison later
layers even under a zero weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def allowed(q_pos: Tensor, q_copy: Tensor, k_pos: Tensor, k_copy: Tensor, block_size: int) -> Tensor:
    """Elementwise attention rule on broadcastable tensors (also the FlexAttention mask_mod body)."""
    qb, kb = q_pos // block_size, k_pos // block_size
    q_clean, k_clean = q_copy == 0, k_copy == 0
    clean_clean = q_clean & k_clean & (kb <= qb)
    noisy_clean = ~q_clean & k_clean & (kb < qb)
    noisy_noisy = ~q_clean & (q_copy == k_copy) & (kb == qb)
    return clean_clean | noisy_clean | noisy_noisy


def attention_mask(
    q_pos: Tensor,
    q_copy: Tensor,
    k_pos: Tensor,
    k_copy: Tensor,
    block_size: int,
    k_valid: Tensor | None = None,
) -> Tensor:
    """Rectangular boolean mask, e.g. a decoding block against the KV cache plus itself.

    Args:
        q_pos, q_copy: (N, Q) positions and copy ids of the queries.
        k_pos, k_copy: (N, K) positions and copy ids of the keys.
        k_valid: (N, K) False for padding keys.

    Returns:
        (N, Q, K) bool.
    """
    m = allowed(q_pos[:, :, None], q_copy[:, :, None], k_pos[:, None, :], k_copy[:, None, :], block_size)
    if k_valid is not None:
        m = m & k_valid[:, None, :]
    return m


def square_mask(positions: Tensor, copies: Tensor, block_size: int, valid: Tensor | None = None) -> Tensor:
    """Boolean self-attention mask of one packed layout.

    Args:
        positions, copies: (N, L) or (L,).
        valid: same shape, False for padding.

    Returns:
        (N, L, L) bool, or (L, L) for unbatched input. Padding queries attend to themselves only.
    """
    unbatched = positions.dim() == 1
    if unbatched:
        positions, copies = positions[None], copies[None]
        valid = None if valid is None else valid[None]
    m = attention_mask(positions, copies, positions, copies, block_size, valid)
    if valid is not None:
        eye = torch.eye(positions.shape[1], dtype=torch.bool, device=positions.device)
        m = torch.where(valid[:, :, None], m, eye[None])
    return m[0] if unbatched else m


def block_causal_mask(seq_len: int, block_size: int, offset: int = 0) -> Tensor:
    """(L, L) inference mask for a sequence starting at absolute position ``offset``."""
    pos = torch.arange(offset, offset + seq_len)
    return square_mask(pos, torch.zeros_like(pos), block_size)


def to_additive(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Bool (N, Q, K) -> additive (N, 1, Q, K): 0 where allowed, the dtype's minimum elsewhere."""
    neg = torch.finfo(dtype).min
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.full((), neg, dtype=dtype, device=mask.device))[:, None]


@dataclass
class Layout:
    """One training sequence: token ids with the positions and copy ids that define its mask. All (L,)."""

    input_ids: Tensor
    position_ids: Tensor
    copy_ids: Tensor

    def bool_mask(self, block_size: int) -> Tensor:
        """(L, L) bool."""
        return square_mask(self.position_ids, self.copy_ids, block_size)

    def additive_mask(self, block_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """(1, 1, L, L) additive."""
        return to_additive(self.bool_mask(block_size)[None], dtype)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def generation_start(prompt_len: int, block_size: int) -> int:
    """First position of the first generation block (the prompt tail shares that block)."""
    return (prompt_len // block_size) * block_size


def _copy_positions(total_len: int, prompt_len: int, block_size: int, blocks: Tensor | None) -> Tensor:
    """Positions a noisy copy holds: every generation block, or only ``blocks`` (absolute block indices)."""
    pos = torch.arange(generation_start(prompt_len, block_size), total_len)
    if blocks is None:
        return pos
    return pos[torch.isin(pos // block_size, blocks)]


def packed_layout(
    clean_ids: Tensor,
    noisy_copies: list[Tensor],
    prompt_len: int,
    block_size: int,
    blocks: list[Tensor] | None = None,
) -> Layout:
    """``[prompt + clean response | copy 1 | ... | copy R]``: all rounds of a trajectory in one sequence.

    Args:
        clean_ids: (T,) prompt + response + tail.
        noisy_copies: R tensors of shape (T,), the state of each round.
        blocks: optional R tensors of absolute block indices; copy r keeps only those blocks (a block with
            nothing to train in round r need not be there, since noisy blocks see only the clean prefix and
            themselves).
    """
    total = int(clean_ids.shape[0])
    ids, pos, copy = [clean_ids], [torch.arange(total)], [torch.zeros(total, dtype=torch.long)]
    for r, noisy in enumerate(noisy_copies, start=1):
        p = _copy_positions(total, prompt_len, block_size, None if blocks is None else blocks[r - 1])
        ids.append(noisy[p])
        pos.append(p)
        copy.append(torch.full_like(p, r))
    return Layout(torch.cat(ids), torch.cat(pos), torch.cat(copy))


def flex_block_mask(positions: Tensor, copies: Tensor, block_size: int, valid: Tensor | None = None):
    """FlexAttention ``BlockMask`` with the same rule as :func:`square_mask` (used on CUDA).

    Args:
        positions, copies: (N, L) on the target device.
        valid: (N, L), False for padding.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    n, seq_len = positions.shape
    if valid is None:
        valid = torch.ones_like(positions, dtype=torch.bool)

    def mask_mod(b, h, q, kv):
        rule = allowed(positions[b, q], copies[b, q], positions[b, kv], copies[b, kv], block_size)
        return torch.where(valid[b, q], rule & valid[b, kv], q == kv)

    return create_block_mask(mask_mod, B=n, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=positions.device)
