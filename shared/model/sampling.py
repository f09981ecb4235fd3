"""The sampling transform: the one definition of "the policy that sampled a token" (docs/sampling.md).

The rollout engines sample from it and record each token's log-prob under it; the trainer computes pi_theta,
pi_prox and the reference under it, with each sample's own settings, so the objective trains the distribution
that generated the data at any temperature, top-k and top-p. Both sides call :func:`sampling_log_probs` on the
same logits with the same float32 settings, so they agree to the rounding of the logits themselves.
"""

from __future__ import annotations

import torch
from torch import Tensor

from shared.contracts.wire import MIN_TEMPERATURE

__all__ = ["MIN_TEMPERATURE", "is_filtered", "sampling_log_probs", "settings_tensors"]


def _per_row(x: Tensor, like: Tensor) -> Tensor:
    """(N,) settings viewed as (N, 1, ..., 1) against (N, ..., V) logits."""
    return x.reshape(-1, *([1] * (like.dim() - 1)))


def is_filtered(top_k: Tensor, top_p: Tensor) -> bool:
    """Whether any row truncates the vocabulary (top-k > 0 or top-p < 1); one host sync."""
    return bool(((top_k > 0) | (top_p < 1)).any())


def sampling_log_probs(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Log-probs of the sampling distribution: logits / T, then top-k, then top-p, renormalised over what is kept.

    * top-k keeps every token whose scaled logit is at least the k-th largest (ties with it are kept, so the kept
      set is a function of the values alone, never of a sort order).
    * top-p then keeps the smallest prefix of the top-k set, by descending probability, whose mass reaches
      top_p: a token is dropped when the mass before it already does. The most likely token is always kept, so
      top_p 0 (a tiny positive top-p that rounds to 0 in float32) keeps it alone.

    Each row has its own settings, so one batch may mix them; rows at the defaults (T 1, top-k 0, top-p 1) get
    exactly ``log_softmax(logits.float())``. The result for a row never depends on the other rows.

    Args:
        logits: (N, ..., V) float, any dtype (computed in float32); the engine passes (R, B, V), the trainer (T, V).
        temperature: (N,) float32, >= MIN_TEMPERATURE (greedy rows are the caller's business).
        top_k: (N,) int, 0 = off.
        top_p: (N,) float32 in [0, 1], 1 = off.

    Returns:
        (N, ..., V) float32 log-probs; tokens outside the kept set are -inf.

    >>> lp = sampling_log_probs(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([1.0]), torch.tensor([2]),
    ...                         torch.tensor([1.0]))
    >>> [round(x, 4) for x in lp.exp()[0].tolist()]  # e^2 / (e^2 + e), e / (e^2 + e), 0
    [0.7311, 0.2689, 0.0]
    """
    scaled = logits.float() / _per_row(temperature, logits)
    if not is_filtered(top_k, top_p):
        return scaled.log_softmax(-1)
    vocab = scaled.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    kth_index = _per_row(k - 1, scaled).expand(*scaled.shape[:-1], 1)
    if bool((top_p >= 1).all()):
        # top-k alone needs the k largest only, not a sort of the whole vocabulary
        top = scaled.topk(int(k.max()), dim=-1).values
        kth = top.gather(-1, kth_index)
        return scaled.masked_fill(scaled < kth, float("-inf")).log_softmax(-1)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    kth = sorted_logits.gather(-1, kth_index)
    drop = sorted_logits < kth
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    p = _per_row(top_p, scaled)
    before = probs.cumsum(-1) - probs
    drop = drop | ((before >= p) & (p < 1))
    drop[..., 0] = False
    dropped = torch.empty_like(drop).scatter_(-1, order, drop)
    # renormalised in the vocabulary's order, as the top-k-only path: a row's values never depend on the path taken
    return scaled.masked_fill(dropped, float("-inf")).log_softmax(-1)


def settings_tensors(
    temperature: list[float], top_k: list[int], top_p: list[float], device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row settings as the tensors :func:`sampling_log_probs` takes (float32, int64, float32): the engine and
    the trainer build them alike, so both divide by the same float32 temperature."""
    return (
        torch.tensor(temperature, dtype=torch.float32, device=device),
        torch.tensor(top_k, dtype=torch.long, device=device),
        torch.tensor(top_p, dtype=torch.float32, device=device),
    )
