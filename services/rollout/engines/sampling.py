"""Pure per-step decoding maths shared by every torch decoding path: sampling, confidence, unmask selection.

The sampling distribution itself is :func:`shared.model.sampling.sampling_log_probs`, the trainer's too.

Shapes: R rows (sequences being decoded), B positions in the current block, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from shared.contracts.wire import Strategy
from shared.model.sampling import MIN_TEMPERATURE, sampling_log_probs

__all__ = ["MIN_TEMPERATURE"]  # re-exported: the engines' greedy rule is the shared one

_MASK64 = (1 << 64) - 1


def derive_seed(seed: int, sample_index: int) -> int:
    """Seed of sample j of a request: j == 0 keeps the request seed, so ``seed=rollout.seed, n=1`` reproduces it.

    Other samples get a splitmix64 mix of (seed, j), so seeds of neighbouring requests do not overlap.
    """
    if sample_index == 0:
        return seed
    z = (seed + 0x9E3779B97F4A7C15 * (sample_index + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 62) - 1)


def block_uniforms(generator: torch.Generator, block_size: int) -> Tensor:
    """(B, B) uniforms for one block: row s feeds denoising step s (a block takes at most B steps).

    Drawn once per block from the sample's own generator, so the stream never depends on the batch.
    """
    return torch.rand((block_size, block_size), generator=generator)


def sample_block(
    logits: Tensor, uniforms: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Sample a token at every block position by inverse CDF on the caller's uniforms.

    The uniforms come from per-request generators, so a request's draws do not depend on its batch.
    Confidence follows LMDeploy: p(token) under softmax(logits / T), before top-k / top-p. A temperature below
    :data:`MIN_TEMPERATURE` (0 included) is greedy: argmax, confidence under softmax(logits), log-prob 0.

    Args:
        logits: (R, B, V).  uniforms: (R, B) in [0, 1).  temperature, top_k, top_p: (R,).

    Returns:
        tokens (R, B) long, confidence (R, B) float, logprob (R, B) float (under the sampling distribution).
    """
    greedy = temperature < MIN_TEMPERATURE
    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature)
    logp = sampling_log_probs(logits, safe_t, top_k, top_p)
    cdf = logp.exp().cumsum(-1)
    u = (uniforms * cdf[..., -1]).unsqueeze(-1)
    sampled = torch.searchsorted(cdf, u).squeeze(-1).clamp(max=logits.shape[-1] - 1)
    tokens = torch.where(greedy[:, None], logits.argmax(-1), sampled)
    conf = (logits.float() / safe_t[:, None, None]).softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    lp = logp.gather(-1, tokens[..., None]).squeeze(-1)
    lp = torch.where(greedy[:, None], torch.zeros_like(lp), lp)
    return tokens, conf, lp


def strategy_codes(strategies: list[Strategy], device: torch.device | str = "cpu") -> Tensor:
    """(R,) integer code of each row's strategy, the form :func:`select_unmask` takes."""
    return torch.tensor([_STRATEGY_CODE[s] for s in strategies], device=device)


def select_unmask(confidence: Tensor, masked: Tensor, strategy: Tensor, threshold: Tensor, per_step: Tensor) -> Tensor:
    """Which masked positions this forward unmasks; at least one per row that has a masked position.

    Ties go to the left-most position, so the choice is deterministic.

    Args:
        confidence: (R, B).  masked: (R, B) bool.  strategy: (R,) codes from :func:`strategy_codes`.
        threshold: (R,) dynamic threshold.  per_step: (R,) positions per step for static / sequential.

    Returns:
        (R, B) bool, a subset of ``masked``.
    """
    conf = confidence.masked_fill(~masked, float("-inf"))
    order = torch.argsort(-conf, dim=-1, stable=True)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(conf.shape[-1], device=conf.device).expand_as(order)
    )
    best = masked & (rank == 0)
    dynamic = best | (masked & (confidence >= threshold[:, None]))
    static = masked & (rank < per_step[:, None])
    sequential = masked & (masked.long().cumsum(-1) <= per_step[:, None])
    kind = strategy[:, None]
    return torch.where(kind == 0, dynamic, torch.where(kind == 1, static, sequential))


_STRATEGY_CODE = {Strategy.low_confidence_dynamic: 0, Strategy.low_confidence_static: 1, Strategy.sequential: 2}


def cut_response(tokens: list[int], max_new_tokens: int, stop_token_ids: list[int]) -> tuple[int, str]:
    """Where the response ends among the generated positions, and why.

    Args:
        tokens: every generated position so far (whole blocks, prompt tail excluded).

    Returns:
        (length, finish_reason): the first stop token within ``max_new_tokens`` ends it (kept);
        otherwise ``max_new_tokens`` does, if reached; otherwise (len(tokens), "") = not finished.
    """
    stops = set(stop_token_ids)
    for i, t in enumerate(tokens[:max_new_tokens]):
        if t in stops:
            return i + 1, "stop"
    if len(tokens) >= max_new_tokens:
        return max_new_tokens, "length"
    return len(tokens), ""
