"""The GTPO objective as pure tensor functions (docs/design.md section 3; reference sections 4.4, 5.5, 6 and 11).

Everything here works on the flat list of a batch's *target tokens*: the T tokens that some round of some
response unmasked. Padding and non-target positions never reach these functions, so no mask is needed.

Normalisation is expressed as per-token weights ``w`` with ``loss = sum_t w_t * l_t``. The weights come from
global counts over the whole optimizer batch, so each data-parallel rank can compute its own part and the parts
add up to the same loss however the responses are split across ranks (see ``token_weights``).

Three policies per token (docs/design.md section 7): pi_behav, the engine's distribution when it unmasked the token
(``Rollout.logprobs``); pi_prox, the trainer's weights at the start of the step's first update (the clip anchor,
no gradient); pi_theta, the weights being trained. The standard objective assumes pi_behav = pi_prox (on-policy,
engine == trainer); the decoupled one (AReaL) corrects for the difference with a truncated importance weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from services.trainer.config import LossConfig


def group_advantages(rewards: Tensor, mode: str = "zscore", eps: float = 1e-6) -> Tensor:
    """Per-response advantage from the rewards of its group (the responses to the same prompt).

    ``zscore`` divides by the *unbiased* std (``torch.std`` default, as TRL's GRPO does); GTPO-Trainer's
    ``z_score_normalize`` uses the population std, which scales every advantage by sqrt((n-1)/n).

    Args:
        rewards: (G, n) total reward of each of the n responses of each of the G groups.
        mode: "zscore" ((r - mean) / (std + eps)) or "mean" (r - mean).
        eps: keeps a zero-variance group finite (its numerator is 0, so its advantages are 0).

    Returns:
        (G, n) float advantages. A group with n == 1 gets 0: it has no baseline to compare against.
    """
    if mode not in ("zscore", "mean"):
        raise ValueError(f"mode must be 'zscore' or 'mean', got {mode!r}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (G, n), got shape {tuple(rewards.shape)}")
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    if rewards.shape[1] < 2:
        # torch.std of one sample is NaN; a lone response carries no relative signal anyway.
        return torch.zeros_like(rewards)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if mode == "mean":
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def component_advantages(
    components: Tensor, weights: Tensor, mode: str = "zscore", eps: float = 1e-6, atol: float = 1e-9
) -> Tensor:
    """Per-component normalisation (LightningRL): each reward component is normalised within its group on its
    own, then the weighted normalised components are summed into the advantage.

    ``A[g, i] = sum_c weights[c] * group_advantages(components[:, :, c], mode)[g, i]``, except that a component
    whose values in a group are all equal (within ``atol``) contributes exactly 0 there. Under ``total`` a rare,
    wide-ranged component (a speed reward on a mostly-wrong model) can swamp or be swamped by the others; here
    each component that varies in a group moves the advantage by about its weight, whatever its scale.

    Args:
        components: (G, n, C) *raw* (unweighted) reward components, as ``ScoreResult.components`` carries them.
        weights: (C,) the reward weights, in the same component order.
        mode: "zscore" or "mean", as ``group_advantages``.
        eps: as ``group_advantages``.
        atol: a component whose max - min in a group is at most this contributes 0 to that group.

    Returns:
        (G, n) advantages, in the dtype of ``components`` (at least float32). n == 1 gives 0.

    >>> c = torch.tensor([[[1.0, 1.0], [1.0, 0.5], [0.0, 0.0], [0.0, 0.5]]])  # (1, 4, 2): accuracy, speed
    >>> component_advantages(c, torch.tensor([1.0, 1.0]), "mean").tolist()  # [.5, .5, -.5, -.5] + [.5, 0, -.5, 0]
    [[1.0, 0.5, -1.0, -0.5]]
    """
    if components.dim() != 3 or weights.shape != components.shape[2:]:
        raise ValueError(
            f"components must be (G, n, C) and weights (C,), got {tuple(components.shape)} and {tuple(weights.shape)}"
        )
    components = components if components.is_floating_point() else components.float()
    g, n, c = components.shape
    flat = components.permute(0, 2, 1).reshape(g * c, n)  # one row per (group, component)
    adv = group_advantages(flat, mode, eps)
    varies = (flat.amax(dim=1, keepdim=True) - flat.amin(dim=1, keepdim=True)) > atol if n else flat.new_zeros(0)
    # exactly 0, not the rounding error of (x - mean) / eps, for a component that is constant in the group
    adv = torch.where(varies, adv, torch.zeros_like(adv)).reshape(g, c, n)
    return torch.einsum("gcn,c->gn", adv, weights.to(adv.dtype))


def floor_correct(adv: Tensor, correct: Tensor) -> Tensor:
    """Advantages with those of correct responses clamped at 0 from below.

    In an all-correct group a secondary reward (speed, length) alone sets the z-score, so the slower half of
    the correct answers gets a negative advantage, which lowers the probability of their (right) tokens in the
    contexts they were unmasked in. Clamping keeps the ranking's pull on the better answers and drops that push.

    Args:
        adv: (G, n) group advantages.
        correct: (G, n) bool, the response's final answer is right.

    Returns:
        (G, n) advantages; wrong responses' are unchanged.

    >>> floor_correct(torch.tensor([[1.0, -1.0, -0.5]]), torch.tensor([[True, True, False]])).tolist()
    [[1.0, 0.0, -0.5]]
    """
    if adv.shape != correct.shape:
        raise ValueError(f"correct must match the advantages' shape {tuple(adv.shape)}, got {tuple(correct.shape)}")
    return torch.where(correct, adv.clamp(min=0.0), adv)


def _ratio(logp: Tensor, prox_logp: Tensor, log_ratio_clamp: float) -> Tensor:
    # Clamping the log-ratio (not the ratio) keeps exp finite for a token whose probability moved a lot.
    return torch.exp(torch.clamp(logp - prox_logp, -log_ratio_clamp, log_ratio_clamp))


def clipped_surrogate(
    logp: Tensor,
    prox_logp: Tensor,
    adv: Tensor,
    eps_low: float,
    eps_high: float,
    log_ratio_clamp: float = 10.0,
) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate with an asymmetric clip range [1 - eps_low, 1 + eps_high].

    Args:
        logp: (T,) log-probs of the target tokens under pi_theta (carries the gradient).
        prox_logp: (T,) log-probs under pi_prox, the clip anchor (no gradient expected).
        adv: (T,) advantage of each token's response.
        eps_low, eps_high: clip range of the ratio.
        log_ratio_clamp: |log ratio| is clamped to this before exp.

    Returns:
        obj: (T,) min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A), to be maximised.
        clipped: (T,) bool, True where the clipped branch is the smaller one (those tokens get no gradient).
    """
    ratio = _ratio(logp, prox_logp, log_ratio_clamp)
    unclipped = ratio * adv
    clipped_value = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    clipped = clipped_value < unclipped
    # torch.where instead of torch.minimum: minimum splits the gradient between tied branches, where is explicit.
    return torch.where(clipped, clipped_value, unclipped), clipped


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref) from samples of pi: unbiased, >= 0, and 0 when equal.

    Args:
        logp: (T,) log-probs under the policy the tokens were sampled from.
        ref_logp: (T,) log-probs of the same tokens under the other policy.

    Returns:
        (T,) exp(ref - logp) - (ref - logp) - 1.
    """
    log_ratio = ref_logp - logp
    # expm1: for the 1e-6 gaps of two equal policies, exp(x) - 1 - x would be all rounding error
    return torch.expm1(log_ratio) - log_ratio


def importance_weights(prox_logp: Tensor, behav_logp: Tensor, cap: float) -> Tensor:
    """Truncated importance weights min(pi_prox / pi_behav, cap) of the decoupled objective.

    The tokens were sampled by pi_behav (older weights, or the engine's precision and settings), not by pi_prox;
    the weight makes the gradient unbiased again and the cap bounds its variance (TIS).

    Args:
        prox_logp: (T,) log-probs under the trainer's pi_prox.
        behav_logp: (T,) log-probs the engine reported when it sampled each token.
        cap: upper bound of a weight.

    Returns:
        (T,) weights, detached: a weight is a constant of the objective.
    """
    # exp may overflow to inf for a huge gap; min with cap still gives cap.
    return torch.clamp(torch.exp(prox_logp.detach() - behav_logp.detach()), max=cap)


def token_weights(
    response_index: Tensor,
    round_index: Tensor,
    mode: str,
    *,
    n_responses: int,
    n_tokens: int,
    max_len: int,
    block_size: int | None = None,
) -> Tensor:
    """Normalisation of the loss as per-token weights, so that loss = sum_t w_t * l_t.

    The counts are GLOBAL (over the whole optimizer batch, all ranks and micro-batches). A response never
    spans ranks, so its per-round counts are local and exact. Each rank sums its own w * l and the sum of the
    parts equals the unsplit loss, whatever the split; local means averaged over ranks would not.

    * token:  w = 1 / n_tokens (mean over all target tokens; the default).
    * step:   w = 1 / (targets of the token's (response, round) * n_responses): per response, the SUM over its
      rounds that have targets of the mean over that round's targets, then the mean over responses. A response
      decoded in more rounds weighs more; a round with no target (tail tokens only) adds nothing.
    * dipo:   ``step`` / block_size, DiPO exactly: DiPO divides every response's sum of round means by the block
      size B whatever its number of rounds. The two differ by the constant 1 / B, which an optimizer mostly
      absorbs, but not the gradient clip (``max_grad_norm``), Adam's eps, nor a term outside this weight (NLL).
    * length: w = 1 / (n_responses * max_len) (TraceRL: per-response sum / max response length, then mean).

    Args:
        response_index: (T,) long, the response each target token belongs to (unique within the batch).
        round_index: (T,) long, the token's round within its response.
        mode: "token", "step" or "length".
        n_responses: responses in the optimizer batch.
        n_tokens: target tokens in the optimizer batch.
        max_len: the longest response of the optimizer batch, in tokens.
        block_size: B, required by ``dipo``.

    Returns:
        (T,) float32 weights on the device of response_index.

    >>> resp, rnd = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 1, 0])  # rounds of 2, 1 and 1 targets
    >>> token_weights(resp, rnd, "step", n_responses=2, n_tokens=4, max_len=3).tolist()
    [0.25, 0.25, 0.5, 0.5]
    >>> token_weights(resp, rnd, "dipo", n_responses=2, n_tokens=4, max_len=3, block_size=4).tolist()
    [0.0625, 0.0625, 0.125, 0.125]
    """
    _check_counts(response_index, round_index, n_responses, n_tokens, max_len)
    t = response_index.shape[0]
    device = response_index.device
    if mode == "token":
        return torch.full((t,), 1.0 / n_tokens, device=device)
    if mode == "length":
        return torch.full((t,), 1.0 / (n_responses * max_len), device=device)
    if mode in ("step", "dipo"):
        if mode == "dipo" and (block_size is None or block_size < 1):
            raise ValueError(f"norm dipo divides by the block size: need block_size >= 1, got {block_size}")
        if t == 0:
            return torch.zeros(0, device=device)
        pairs = torch.stack([response_index, round_index], dim=1)
        _, inverse, counts = torch.unique(pairs, dim=0, return_inverse=True, return_counts=True)
        per_response = n_responses * (block_size if mode == "dipo" else 1)
        return 1.0 / (counts[inverse].float() * per_response)
    raise ValueError(f"mode must be 'token', 'step', 'dipo' or 'length', got {mode!r}")


def _check_counts(response_index: Tensor, round_index: Tensor, n_responses: int, n_tokens: int, max_len: int) -> None:
    """Raise ValueError for counts `token_weights` cannot normalise by, or indices of different shapes."""
    for name, value in (("n_responses", n_responses), ("n_tokens", n_tokens), ("max_len", max_len)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if response_index.dim() != 1 or response_index.shape != round_index.shape:
        raise ValueError(
            f"response_index and round_index must be (T,) of the same shape, got "
            f"{tuple(response_index.shape)} and {tuple(round_index.shape)}"
        )
    if response_index.shape[0] > n_tokens:
        raise ValueError(
            f"n_tokens ({n_tokens}) is the global count and cannot be below the {response_index.shape[0]} tokens "
            "given here"
        )


def correct_nll(logp: Tensor, correct: Tensor, n_correct_tokens: int) -> Tensor:
    """LightningRL's token-level NLL on correct samples: -sum of the target log-probs of correct responses over
    the update's correct target tokens (a global count, like ``token_weights``', so the ranks' parts add up).

    Args:
        logp: (T,) log-probs under pi_theta (carries the gradient).
        correct: (T,) bool, the token's response is correct.
        n_correct_tokens: correct target tokens in the whole optimizer update (0: the term is 0).

    Returns:
        scalar tensor (the caller multiplies it by ``LossConfig.nll_coef``).

    >>> correct_nll(torch.tensor([-1.0, -2.0, -4.0]), torch.tensor([True, False, True]), 4).item()  # (1 + 4) / 4
    1.25
    """
    if correct.shape != logp.shape:
        raise ValueError(f"correct must have the shape of logp {tuple(logp.shape)}, got {tuple(correct.shape)}")
    if n_correct_tokens < 0 or int(correct.sum()) > n_correct_tokens:
        raise ValueError(f"n_correct_tokens ({n_correct_tokens}) is the global count, below this shard's")
    if n_correct_tokens == 0:
        return logp.sum() * 0.0  # keeps the graph (every rank's backward touches the same parameters)
    return -(torch.where(correct, logp, torch.zeros_like(logp))).sum() / n_correct_tokens


def gtpo_loss(
    logp: Tensor,
    prox_logp: Tensor,
    adv: Tensor,
    weights: Tensor,
    cfg: LossConfig,
    *,
    ref_logp: Tensor | None = None,
    behav_logp: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The GTPO loss of one shard of target tokens: sum_t w_t * (-obj_t * iw_t + beta * kl_t).

    obj is the clipped surrogate of pi_theta / pi_prox. iw is 1 for the standard objective and
    min(pi_prox / pi_behav, tis_cap) for the decoupled one. On-policy (``prox_logp = logp.detach()``) the ratio
    is 1 and the gradient is -sum_t w_t * iw_t * A_t * grad logp_t.

    Args:
        logp: (T,) log-probs under pi_theta (carries the gradient).
        prox_logp: (T,) log-probs under pi_prox.
        adv: (T,) advantage of each token's response.
        weights: (T,) normalisation weights from ``token_weights``.
        cfg: objective, clip range, KL weight, cap.
        ref_logp: (T,) reference log-probs; required when cfg.beta > 0.
        behav_logp: (T,) the engine's log-probs (pi_behav); required by, and only allowed with, the decoupled
            objective.

    Returns:
        loss: scalar tensor.
        metrics: python floats over this shard's tokens (plain means, not weighted): loss, clip_frac,
        ratio_mean, kl (0 when off), iw_mean (1 when standard), adv_mean, tokens; and counts:
        outside_kept_tokens (-inf under pi_theta or pi_prox: dropped from the loss, ratio 1 and not clipped in the
        means) and ref_outside_kept_tokens (-inf under the reference only: its KL term dropped).
    """
    _check_loss_inputs(logp, prox_logp, adv, weights, cfg, ref_logp, behav_logp)
    # At least fp32: the ratio of two bf16 log-probs is too coarse for a clip range of 0.2.
    dtype = torch.promote_types(logp.dtype, torch.float32)
    logp, prox_logp, adv, weights = (x.to(dtype) for x in (logp, prox_logp, adv, weights))
    # Outside the kept set (docs/sampling.md): a token that top-k / top-p under pi_theta or pi_prox drops has
    # log-prob -inf there. Its exact contribution to the gradient is 0 (pi_prox / pi_behav = 0, or ratio 0 with
    # either branch of the clip flat), so it is dropped from the loss; its log-probs are swapped for 0 first, so
    # no inf or NaN reaches the graph. It still counts in the normalisation (the weights were fixed before).
    outside = ~(torch.isfinite(logp) & torch.isfinite(prox_logp))
    safe_logp, safe_prox = (torch.where(outside, torch.zeros_like(x), x) for x in (logp, prox_logp))
    obj, clipped = clipped_surrogate(safe_logp, safe_prox, adv, cfg.eps_low, cfg.eps_high, cfg.log_ratio_clamp)
    per_token = -obj
    iw = None
    if behav_logp is not None:
        iw = importance_weights(prox_logp, behav_logp.to(dtype), cfg.tis_cap)  # exactly 0 where pi_prox drops it
        per_token = per_token * iw
    kl, ref_outside = _kl_term(safe_logp, ref_logp, outside) if cfg.beta > 0 else (None, torch.zeros_like(outside))
    if kl is not None:
        per_token = per_token + cfg.beta * kl
    per_token = torch.where(outside, torch.zeros_like(per_token), per_token)
    clipped = clipped & ~outside
    loss = (weights * per_token).sum()
    with torch.no_grad():
        ratio = _ratio(safe_logp, safe_prox, cfg.log_ratio_clamp)
        metrics = _loss_metrics(loss, clipped, ratio, kl, iw, adv, outside, ref_outside)
    return loss, metrics


def _kl_term(safe_logp: Tensor, ref_logp: Tensor, outside: Tensor) -> tuple[Tensor, Tensor]:
    """(T,) k3 KL to the reference, and (T,) where only the reference's kept set drops the token: a token whose
    KL term would be infinite, dropped (its term 0) rather than an infinite loss."""
    ref_logp = ref_logp.to(safe_logp.dtype)
    ref_outside = ~torch.isfinite(ref_logp) & ~outside
    return k3_kl(safe_logp, torch.where(outside | ref_outside, safe_logp.detach(), ref_logp)), ref_outside


def _check_loss_inputs(logp, prox_logp, adv, weights, cfg: LossConfig, ref_logp, behav_logp) -> None:
    """Raise ValueError unless every input of `gtpo_loss` has logp's shape and the objective's inputs are given."""
    shape = logp.shape
    named_inputs = (("prox_logp", prox_logp), ("adv", adv), ("weights", weights), ("ref_logp", ref_logp),
                    ("behav_logp", behav_logp))  # fmt: skip
    for name, x in named_inputs:
        if x is not None and x.shape != shape:
            raise ValueError(f"{name} must have the shape of logp {tuple(shape)}, got {tuple(x.shape)}")
    if cfg.beta > 0 and ref_logp is None:
        raise ValueError(f"ref_logp is required when beta > 0 (beta={cfg.beta})")
    if (cfg.objective == "decoupled") != (behav_logp is not None):
        raise ValueError(
            f"behav_logp: the decoupled objective needs it and only it uses it (objective={cfg.objective})"
        )


def _loss_metrics(loss, clipped, ratio, kl, iw, adv, outside, ref_outside) -> dict[str, float]:
    """`gtpo_loss`'s metrics over a shard's (T,) tokens as python floats (plain means, counts as floats)."""
    n = adv.shape[0]
    if n == 0:
        # A rank may get a shard with no targets; its metrics must still be finite.
        metrics = {"loss": 0.0, "clip_frac": 0.0, "ratio_mean": 1.0, "kl": 0.0, "iw_mean": 1.0, "adv_mean": 0.0,
                   "outside_kept_tokens": 0.0, "ref_outside_kept_tokens": 0.0}  # fmt: skip
    else:
        named = {
            "loss": loss.detach(),
            "clip_frac": clipped.float().mean(),
            "ratio_mean": ratio.mean(),
            "kl": kl.mean() if kl is not None else loss.new_zeros(()),
            "iw_mean": iw.mean() if iw is not None else loss.new_ones(()),
            "adv_mean": adv.mean(),
            "outside_kept_tokens": outside.sum().to(adv.dtype),
            "ref_outside_kept_tokens": ref_outside.sum().to(adv.dtype),
        }
        values = torch.stack(list(named.values())).tolist()  # one device sync for all metrics
        metrics = dict(zip(named, values, strict=True))
    metrics["tokens"] = float(n)
    return metrics


# --- behaviour diagnostics: how far the sampling policy was from pi_prox ------------------------------------------

BEHAVIOUR_SUMS = ("tokens", "gap_sum", "kl_k3_sum", "iw_sum", "iw_truncated")
BEHAVIOUR_MAXES = ("gap_max", "iw_max")


def behaviour_sums(prox_logp: Tensor, behav_logp: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """One shard's part of the step's behaviour diagnostics, in float64 (gaps of 1e-6 must stay visible).

    With d = log pi_prox - log pi_behav per target token and the raw weight w = exp(d):

    Args:
        prox_logp: (T,) the trainer's log-probs on the first pass (pi_prox).
        behav_logp: (T,) the engine's (pi_behav).
        cap: the truncation of w (``LossConfig.tis_cap``).

    Returns:
        sums: (5,) float64 in ``BEHAVIOUR_SUMS`` order: T, sum |d|, sum k3 (exp(d) - 1 - d: the tokens are
            samples of pi_behav, so this estimates KL(pi_behav || pi_prox)), sum min(w, cap), count of w > cap.
            Add them over shards and ranks.
        maxes: (2,) float64 in ``BEHAVIOUR_MAXES`` order: max |d|, max w (before truncation); 0 for an empty
            shard. Take the max over shards and ranks.
    """
    if prox_logp.shape != behav_logp.shape or prox_logp.dim() != 1:
        raise ValueError(f"need two (T,) log-probs, got {tuple(prox_logp.shape)} and {tuple(behav_logp.shape)}")
    d = prox_logp.detach().double() - behav_logp.detach().double()
    if d.numel() == 0:
        return d.new_zeros(len(BEHAVIOUR_SUMS)), d.new_zeros(len(BEHAVIOUR_MAXES))
    w = torch.exp(d)
    sums = torch.stack([d.new_tensor(float(d.numel())), d.abs().sum(), (torch.expm1(d) - d).sum(),
                        w.clamp(max=cap).sum(), (w > cap).sum().double()])  # fmt: skip
    return sums, torch.stack([d.abs().max(), w.max()])


def behaviour_metrics(sums: Tensor, maxes: Tensor, *, weighted: bool) -> dict[str, float]:
    """The step's behaviour metrics from the summed ``behaviour_sums`` of all its shards (per target token).

    Returns:
        logprob_gap_mean / logprob_gap_max: mean / max |log pi_prox - log pi_behav| (engine vs trainer);
        behav_kl_k3: the k3 estimate of KL(pi_behav || pi_prox); and with ``weighted`` (the decoupled objective)
        iw_mean (mean applied weight min(w, cap)), iw_max (max raw w) and iw_truncated_frac (share of w > cap).
    """
    s = dict(zip(BEHAVIOUR_SUMS, sums.tolist(), strict=True))
    m = dict(zip(BEHAVIOUR_MAXES, maxes.tolist(), strict=True))
    n = max(s["tokens"], 1.0)
    out = {"logprob_gap_mean": s["gap_sum"] / n, "logprob_gap_max": m["gap_max"], "behav_kl_k3": s["kl_k3_sum"] / n}
    if weighted:
        out |= {"iw_mean": s["iw_sum"] / n, "iw_max": m["iw_max"], "iw_truncated_frac": s["iw_truncated"] / n}
    return out


def staleness(versions: Sequence[Sequence[int]], current: int) -> tuple[float, int]:
    """Mean and max over samples of current - the policy version that generated the sample.

    Args:
        versions: per group, each sample's ``Rollout.policy_version``.
        current: the trainer's policy version.

    Raises:
        ValueError: a sample claims a version newer than the trainer's (the two disagree on what was published).

    >>> staleness([[3, 2], [1]], 3)
    (1.0, 2)
    """
    flat = [v for g in versions for v in g]
    for g, group in enumerate(versions):
        for i, v in enumerate(group):
            if v > current:
                raise ValueError(f"Rollout.policy_version: group {g} sample {i} has v{v}, newer than the trainer's "
                                 f"v{current}")  # fmt: skip
    return _mean_max([current - v for v in flat])


def token_staleness(versions: Sequence[Sequence[int]], current: int) -> tuple[float, int]:
    """Mean and max over response tokens of current - the policy version that sampled the token.

    With in-flight updates (`rollout.swap_at_block`) one response spans versions (`Rollout.versions()`), so its
    tokens are fresher than its `policy_version` (the oldest, which the staleness bound applies to).

    Args:
        versions: per sample, the version of each of its response tokens.
        current: the trainer's policy version.

    >>> token_staleness([[2, 2, 3, 3], [3]], 3)
    (0.4, 1)
    """
    return _mean_max([current - v for sample in versions for v in sample])


def _mean_max(lags: list[int]) -> tuple[float, int]:
    """Mean and max of version lags; (0.0, 0) for none."""
    return (sum(lags) / len(lags), max(lags)) if lags else (0.0, 0)


def identical_groups(token_ids: Sequence[Sequence[Sequence[int]]]) -> list[int]:
    """Indices of the groups of >= 2 samples whose token ids are all the same.

    At temperature 1 that is all but impossible for a response of more than a few tokens; a decoder that
    ignores the temperature or the per-sample seed produces exactly this.

    >>> identical_groups([[[1, 2], [1, 2]], [[1, 2], [1, 3]], [[5]]])
    [0]
    """
    return [g for g, group in enumerate(token_ids) if len(group) >= 2 and all(t == group[0] for t in group[1:])]


@dataclass
class GroupFilterStats:
    """What ``filter_groups`` did to one batch of groups.

    Attributes:
        groups: groups seen.
        kept: groups with reward variance.
        dropped_all_same: groups of >= 2 responses whose rewards are all equal (all solved, all failed, ...).
        dropped_too_small: groups with fewer than 2 responses (no baseline, advantage 0).
        same_values: the common reward of each all-same group, so the caller can tell "all solved" from
            "all failed" on its own reward scale.
    """

    groups: int
    kept: int
    dropped_all_same: int
    dropped_too_small: int
    same_values: list[float]

    @property
    def dropped(self) -> int:
        return self.groups - self.kept


def filter_groups(rewards: list[list[float]], atol: float = 1e-9) -> tuple[list[bool], GroupFilterStats]:
    """DAPO dynamic sampling: drop the groups whose rewards have zero variance.

    Such a group gets advantage 0 for every response, so it adds no gradient but still dilutes the
    normalisation; the caller oversamples to refill the batch.

    Args:
        rewards: per group, the rewards of its responses.
        atol: rewards within atol of each other count as equal.

    Returns:
        keep: one flag per group.
        stats: counts for logging.
    """
    for g, group in enumerate(rewards):
        # A NaN reward would pass the variance test and poison the advantages of its whole group.
        if not all(math.isfinite(r) for r in group):
            raise ValueError(f"rewards[{g}] has a non-finite reward: {group}")
    return _filter_by(rewards, lambda group: max(group) - min(group) > atol, lambda group: float(group[0]))


def _filter_by(groups: Sequence, varies, same_value) -> tuple[list[bool], GroupFilterStats]:
    """The loop both dynamic-sampling rules share: a group of fewer than 2 responses is dropped, and so is one whose
    `varies(group)` is false (an all-same group, logged with `same_value(group)`)."""
    keep: list[bool] = []
    all_same = too_small = 0
    same_values: list[float] = []
    for group in groups:
        if len(group) < 2:
            too_small += 1
            keep.append(False)
        elif varies(group):
            keep.append(True)
        else:
            all_same += 1
            same_values.append(same_value(group))
            keep.append(False)
    stats = GroupFilterStats(groups=len(groups), kept=sum(keep), dropped_all_same=all_same,
                             dropped_too_small=too_small, same_values=same_values)  # fmt: skip
    return keep, stats


def filter_component_groups(
    components: list[list[list[float]]], weights: Sequence[float], atol: float = 1e-9
) -> tuple[list[bool], GroupFilterStats]:
    """Dynamic sampling under ``reward_norm: per_component``: drop a group only if no weighted component varies.

    The rule is the same as ``filter_groups``'s, "drop a group exactly when all its advantages are 0", applied to
    ``component_advantages``: a group whose totals agree can still carry signal when its components do not (two
    weighted components that cancel), and a component of weight 0 varying alone carries none.

    Args:
        components: per group, per response, the raw components in the order of ``weights``.
        weights: (C,) the reward weights.
        atol: as ``filter_groups``.

    Returns:
        keep, stats as ``filter_groups``; ``same_values`` are the weighted totals of the dropped all-same groups.

    >>> all_right_speeds_differ, all_wrong = [[1.0, 0.2], [1.0, 0.7]], [[0.0, 0.0], [0.0, 0.0]]
    >>> filter_component_groups([all_right_speeds_differ, all_wrong], [1.0, 0.5])[0]
    [True, False]
    >>> filter_component_groups([all_right_speeds_differ], [1.0, 0.0])[0]  # only a weight-0 component varies
    [False]
    """
    for g, group in enumerate(components):
        if any(len(r) != len(weights) for r in group):
            raise ValueError(f"components[{g}]: need {len(weights)} components per response, like the weights")
        if not all(math.isfinite(v) for r in group for v in r):
            raise ValueError(f"components[{g}] has a non-finite component: {group}")
    weighted = [c for c, w in enumerate(weights) if w != 0]

    def varies(group) -> bool:
        return any(max(r[c] for r in group) - min(r[c] for r in group) > atol for c in weighted)

    def total(group) -> float:
        return math.fsum(w * v for w, v in zip(weights, group[0], strict=True))

    return _filter_by(components, varies, total)


def component_table(
    rewards: Sequence[Sequence[float]],
    components: Sequence[Sequence[Mapping[str, float]]] | None,
    weights: Mapping[str, float] | None,
    rtol: float = 1e-6,
) -> tuple[list[str], list[list[list[float]]]]:
    """The raw components of every response as (G, n, C) lists, in a fixed order of the reward names, after
    checking that they are the ones the totals were scored from.

    ``ScoreResult.components`` are *raw* (unweighted) rewards and ``total = sum_c w_c * component_c``; a total
    that is not that sum means the reward service weighs with other weights than the trainer was given, and
    per-component advantages would silently use the wrong ones.

    Args:
        rewards: per group, each response's total.
        components: per group, each response's components (name -> raw value).
        weights: reward name -> weight (``RLConfig.reward_weights``).
        rtol: relative tolerance of the total check.

    Returns:
        names: the reward names, sorted; the C axis of the table.
        table: per group, per response, the components in ``names`` order.

    Raises:
        ValueError: components missing, not grouped like the rewards, other names than the weights', or totals
            that are not their weighted sum.

    >>> component_table([[1.5, 0.0]], [[{"accuracy": 1.0, "speed": 0.5}, {"accuracy": 0.0, "speed": 0.0}]],
    ...                 {"speed": 1.0, "accuracy": 1.0})
    (['accuracy', 'speed'], [[[1.0, 0.5], [0.0, 0.0]]])
    """
    if components is None or weights is None:
        raise ValueError("loss.reward_norm=per_component: needs every response's reward components and the weights")
    if [len(c) for c in components] != [len(r) for r in rewards]:
        raise ValueError("components: need one component set per rollout, grouped like the rewards")
    names = sorted(weights)
    table: list[list[list[float]]] = []
    for g, (group, totals) in enumerate(zip(components, rewards, strict=True)):
        rows = []
        for i, (comp, total) in enumerate(zip(group, totals, strict=True)):
            if set(comp) != set(names):
                raise ValueError(f"components[{g}][{i}]: scored with {sorted(comp)}, but reward_weights name {names}")
            row = [float(comp[n]) for n in names]
            expected = math.fsum(weights[n] * v for n, v in zip(names, row, strict=True))
            if abs(expected - total) > rtol * max(1.0, abs(total)):
                raise ValueError(f"components[{g}][{i}]: the total {total} is not the reward_weights' sum {expected} "
                                 f"of {comp}: the reward service weighs with other weights than {dict(weights)}")  # fmt: skip
            rows.append(row)
        table.append(rows)
    return names, table
