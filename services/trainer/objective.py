"""The GTPO objective as pure tensor functions (design.md section 3; reference sections 4.4, 5.5, 6 and 11).

Everything here works on the flat list of a batch's *target tokens*: the T tokens that some round of some
response unmasked. Padding and non-target positions never reach these functions, so no mask is needed.

Normalisation is expressed as per-token weights ``w`` with ``loss = sum_t w_t * l_t``. The weights come from
global counts over the whole optimizer batch, so each data-parallel rank can compute its own part and the parts
add up to the same loss however the responses are split across ranks (see ``token_weights``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor


class LossConfig(BaseModel):
    """Knobs of ``gtpo_loss``; the defaults are DiPO's clip and an on-policy, KL-free update."""

    model_config = ConfigDict(extra="forbid")

    eps_low: float = Field(0.2, ge=0.0, lt=1.0, description="lower clip: the ratio is clipped below at 1 - eps_low")
    eps_high: float = Field(
        0.28, ge=0.0, description="upper clip: the ratio is clipped above at 1 + eps_high (DAPO clip-higher)"
    )
    advantage: Literal["zscore", "mean"] = Field(
        "zscore", description="group z-score of the reward (GRPO) or mean-centred only (Dr.GRPO, nanochat)"
    )
    floor_correct: bool = Field(
        False,
        description="never give a correct response (accuracy reward 1) a negative advantage: a speed or length "
        "reward then ranks correct answers by pulling the better ones up, not by pushing a correct one down",
    )
    norm: Literal["token", "step", "length"] = Field(
        "token",
        description="token: mean over all target tokens; step: per-round mean summed over rounds (DiPO); "
        "length: per-response sum / max response length (TraceRL)",
    )
    beta: float = Field(0.0, ge=0.0, description="weight of the k3 KL to a frozen reference policy; 0 = off")
    tis_cap: float | None = Field(
        None, gt=0.0, description="truncated importance sampling cap against engine log-probs; None = off"
    )
    log_ratio_clamp: float = Field(
        10.0, gt=0.0, description="clamp of log(pi / pi_old) before exp, so one stale token cannot overflow"
    )


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


def _ratio(logp: Tensor, old_logp: Tensor, log_ratio_clamp: float) -> Tensor:
    # Clamping the log-ratio (not the ratio) keeps exp finite for a token whose probability moved a lot.
    return torch.exp(torch.clamp(logp - old_logp, -log_ratio_clamp, log_ratio_clamp))


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    eps_low: float,
    eps_high: float,
    log_ratio_clamp: float = 10.0,
) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate with an asymmetric clip range [1 - eps_low, 1 + eps_high].

    Args:
        logp: (T,) log-probs of the target tokens under the current policy (carries the gradient).
        old_logp: (T,) log-probs under the policy that sampled them (no gradient expected).
        adv: (T,) advantage of each token's response.
        eps_low, eps_high: clip range of the ratio.
        log_ratio_clamp: |log ratio| is clamped to this before exp.

    Returns:
        obj: (T,) min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A), to be maximised.
        clipped: (T,) bool, True where the clipped branch is the smaller one (those tokens get no gradient).
    """
    ratio = _ratio(logp, old_logp, log_ratio_clamp)
    unclipped = ratio * adv
    clipped_value = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    clipped = clipped_value < unclipped
    # torch.where instead of torch.minimum: minimum splits the gradient between tied branches, where is explicit.
    return torch.where(clipped, clipped_value, unclipped), clipped


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref) from samples of pi: unbiased, >= 0, and 0 when equal.

    Args:
        logp: (T,) log-probs under the current policy (the tokens were sampled from it).
        ref_logp: (T,) log-probs of the same tokens under the frozen reference.

    Returns:
        (T,) exp(ref - logp) - (ref - logp) - 1.
    """
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1.0


def tis_weights(old_logp: Tensor, engine_logp: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling weights for tokens sampled by a different engine, precision or settings.

    The rollout engine's distribution (fp16, top-k, EOS bans, ...) is not the trainer's pi_old; reweighting
    by pi_old / pi_engine makes the gradient unbiased again, and the cap bounds its variance.

    Args:
        old_logp: (T,) log-probs under the trainer's pi_old.
        engine_logp: (T,) log-probs the engine reported when it sampled each token.
        cap: upper bound of a weight.

    Returns:
        (T,) min(exp(old_logp - engine_logp), cap), detached: a weight is a constant of the objective.
    """
    # exp may overflow to inf for a huge gap; min with cap still gives cap.
    return torch.clamp(torch.exp(old_logp.detach() - engine_logp.detach()), max=cap)


def token_weights(
    response_index: Tensor,
    round_index: Tensor,
    mode: str,
    *,
    n_responses: int,
    n_tokens: int,
    max_len: int,
) -> Tensor:
    """Normalisation of the loss as per-token weights, so that loss = sum_t w_t * l_t.

    The counts are GLOBAL (over the whole optimizer batch, all ranks and micro-batches). A response never
    spans ranks, so its per-round counts are local and exact. Each rank sums its own w * l and the sum of the
    parts equals the unsplit loss, whatever the split; local means averaged over ranks would not.

    * token:  w = 1 / n_tokens (mean over all target tokens; the default).
    * step:   w = 1 / (targets of the token's (response, round) * n_responses) (DiPO as coded: per
      response, the sum over rounds of the mean over that round's targets, then the mean over responses).
    * length: w = 1 / (n_responses * max_len) (TraceRL: per-response sum / max response length, then mean).

    Args:
        response_index: (T,) long, the response each target token belongs to (unique within the batch).
        round_index: (T,) long, the token's round within its response.
        mode: "token", "step" or "length".
        n_responses: responses in the optimizer batch.
        n_tokens: target tokens in the optimizer batch.
        max_len: the longest response of the optimizer batch, in tokens.

    Returns:
        (T,) float32 weights on the device of response_index.
    """
    for name, value in (("n_responses", n_responses), ("n_tokens", n_tokens), ("max_len", max_len)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if response_index.dim() != 1 or response_index.shape != round_index.shape:
        raise ValueError(
            f"response_index and round_index must be (T,) of the same shape, got "
            f"{tuple(response_index.shape)} and {tuple(round_index.shape)}"
        )
    t = response_index.shape[0]
    if t > n_tokens:
        raise ValueError(f"n_tokens ({n_tokens}) is the global count and cannot be below the {t} tokens given here")
    device = response_index.device
    if mode == "token":
        return torch.full((t,), 1.0 / n_tokens, device=device)
    if mode == "length":
        return torch.full((t,), 1.0 / (n_responses * max_len), device=device)
    if mode == "step":
        if t == 0:
            return torch.zeros(0, device=device)
        pairs = torch.stack([response_index, round_index], dim=1)
        _, inverse, counts = torch.unique(pairs, dim=0, return_inverse=True, return_counts=True)
        return 1.0 / (counts[inverse].float() * n_responses)
    raise ValueError(f"mode must be 'token', 'step' or 'length', got {mode!r}")


def gtpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    weights: Tensor,
    cfg: LossConfig,
    *,
    ref_logp: Tensor | None = None,
    engine_logp: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The GTPO loss of one shard of target tokens: sum_t w_t * (-obj_t * tis_t + beta * kl_t).

    On-policy (``old_logp = logp.detach()``) the ratio is 1 and the gradient is -sum_t w_t * A_t * grad logp_t.

    Args:
        logp: (T,) current log-probs (carries the gradient).
        old_logp: (T,) log-probs under the sampling policy pi_old.
        adv: (T,) advantage of each token's response.
        weights: (T,) normalisation weights from ``token_weights``.
        cfg: clip range, KL weight, TIS cap.
        ref_logp: (T,) reference log-probs; required when cfg.beta > 0.
        engine_logp: (T,) engine log-probs; TIS is applied when this and cfg.tis_cap are both given.

    Returns:
        loss: scalar tensor.
        metrics: python floats over this shard's tokens (plain means, not weighted): loss, clip_frac,
        ratio_mean, kl (0 when off), tis_mean (1 when off), adv_mean, tokens.
    """
    shape = logp.shape
    for name, x in (("old_logp", old_logp), ("adv", adv), ("weights", weights), ("ref_logp", ref_logp)):
        if x is not None and x.shape != shape:
            raise ValueError(f"{name} must have the shape of logp {tuple(shape)}, got {tuple(x.shape)}")
    if engine_logp is not None and engine_logp.shape != shape:
        raise ValueError(f"engine_logp must have the shape of logp {tuple(shape)}, got {tuple(engine_logp.shape)}")
    if cfg.beta > 0 and ref_logp is None:
        raise ValueError(f"ref_logp is required when beta > 0 (beta={cfg.beta})")

    # At least fp32: the ratio of two bf16 log-probs is too coarse for a clip range of 0.2.
    dtype = torch.promote_types(logp.dtype, torch.float32)
    logp, old_logp, adv, weights = (x.to(dtype) for x in (logp, old_logp, adv, weights))
    obj, clipped = clipped_surrogate(logp, old_logp, adv, cfg.eps_low, cfg.eps_high, cfg.log_ratio_clamp)
    per_token = -obj
    tis = None
    if cfg.tis_cap is not None and engine_logp is not None:
        tis = tis_weights(old_logp, engine_logp.to(dtype), cfg.tis_cap)
        per_token = per_token * tis
    kl = None
    if cfg.beta > 0:
        kl = k3_kl(logp, ref_logp.to(dtype))
        per_token = per_token + cfg.beta * kl
    loss = (weights * per_token).sum()

    with torch.no_grad():
        n = logp.shape[0]
        if n == 0:
            # A rank may get a shard with no targets; its metrics must still be finite.
            metrics = {"loss": 0.0, "clip_frac": 0.0, "ratio_mean": 1.0, "kl": 0.0, "tis_mean": 1.0, "adv_mean": 0.0}
        else:
            named = {
                "loss": loss.detach(),
                "clip_frac": clipped.float().mean(),
                "ratio_mean": _ratio(logp, old_logp, cfg.log_ratio_clamp).mean(),
                "kl": kl.mean() if kl is not None else loss.new_zeros(()),
                "tis_mean": tis.mean() if tis is not None else loss.new_ones(()),
                "adv_mean": adv.mean(),
            }
            values = torch.stack(list(named.values())).tolist()  # one device sync for all metrics
            metrics = dict(zip(named, values, strict=True))
        metrics["tokens"] = float(n)
    return loss, metrics


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
    keep: list[bool] = []
    all_same = too_small = 0
    same_values: list[float] = []
    for g, group in enumerate(rewards):
        # A NaN reward would pass the variance test and poison the advantages of its whole group.
        if not all(math.isfinite(r) for r in group):
            raise ValueError(f"rewards[{g}] has a non-finite reward: {group}")
        if len(group) < 2:
            too_small += 1
            keep.append(False)
        elif max(group) - min(group) <= atol:
            all_same += 1
            same_values.append(float(group[0]))
            keep.append(False)
        else:
            keep.append(True)
    stats = GroupFilterStats(
        groups=len(rewards),
        kept=sum(keep),
        dropped_all_same=all_same,
        dropped_too_small=too_small,
        same_values=same_values,
    )
    return keep, stats
