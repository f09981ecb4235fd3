"""The approximate log-prob estimators other diffusion-LM RL methods use, as baselines in the GTPO trainer.

GTPO (and TraceRL) train each response token in the state it was unmasked in (``trajectory.rollout_trajectory``).
The methods below ignore the trajectory and estimate ``log pi(o_k | prompt)`` from randomly masked copies of the
finished response instead. Each is expressed as a :class:`Trajectory` whose rounds are those copies, so the
trainer's layout, forward, clipped surrogate, normalisation and optimizer are shared by every arm: only the
log-prob estimator differs (``LossConfig.estimator``):

* ``gtpo``: the exact trajectory, rounds = denoising steps (``TrainerConfig.shrink`` = 1; a shrink > 1 is allowed
  for older configs, ``tracerl_shrink`` says it explicitly).
* ``tracerl_shrink``: TraceRL's step merging, every ``shrink`` (>= 2) consecutive steps of a block one round.
* ``random_mask``: d1 / diffu-GRPO (Zhao et al. 2025). ONE noisy copy per response: every generated position
  (response and the tail after the cut) is masked, and every prompt token is masked independently with
  probability ``LossConfig.prompt_mask`` (d1: 0.15) in the clean sequence and the copy alike. The per-token
  log-prob estimate is ``log p(o_k | masked prompt, fully masked response)``. On a block-diffusion model each
  block of the copy sees the clean earlier blocks (the model's own conditional); "fully masked" is per block.
* ``coupled``: coupled-GRPO (DiffuCoder, Gong et al. 2025, as its released ``coupled_grpo.py`` computes it).
  One mask ratio t ~ U(0.2, 0.8) per response; each generated position is masked in copy M with probability t
  and in the complementary copy M' exactly when it is not in M, so every response token is evaluated once in a
  partially masked context; a third copy masks the whole response. The estimate is
  ``1/2 * (log p_full(o_k) + w_k * log p_pair(o_k))`` with ``w_k = 1/t`` if o_k is masked in M (predicted in M)
  and ``1/(1-t)`` if in M' (the mask-ratio weighting of the paper's ELBO-style estimate).

The ratio pi_theta / pi_prox of every baseline is of these estimates; the random draws come from a generator
seeded by (seed, step), identical on every rank and on a resumed run, and are fixed for the whole step so the
proximal policy and every update see the same masks (d1 / DiffuCoder fix them per iteration the same way).
Normalisation stays ``LossConfig.norm`` for every arm: each baseline has one estimate per response token,
counted in round 0, so ``norm: step`` is d1 / DiffuCoder's per-response mean and ``token`` the token mean.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from services.trainer.learner.trajectory import Round, TrainBatch, Trajectory, rollout_trajectory
from shared.contracts.wire import Rollout

ESTIMATORS = ("gtpo", "tracerl_shrink", "random_mask", "coupled")
COUPLED_T = (0.2, 0.8)
"""DiffuCoder's range of the mask ratio t (``coupled_grpo.py``: random.uniform(0.2, 0.8))."""


@dataclass
class EstimatorTrajectory(Trajectory):
    """A trajectory whose rounds are an estimator's masked copies; ``round_weights[r]`` multiplies round r's
    log-prob in the per-token estimate (a token's estimate sums its rounds' weighted log-probs)."""

    round_weights: list[float] = field(default_factory=list)

    @property
    def target_count(self) -> int:
        # one estimate per response token, however many copies it is predicted in
        if not self.rounds:
            return 0
        return int(torch.stack([r.targets for r in self.rounds]).any(0).sum())


def _round(masked: Tensor, targets: Tensor, block_size: int) -> Round:
    blocks = torch.unique(targets.nonzero().squeeze(1) // block_size)
    return Round(masked, targets, blocks)


def _spans(traj: Trajectory) -> tuple[Tensor, Tensor]:
    """(T,) bool masks of the generated positions (response + tail) and of the response."""
    total = traj.clean_ids.shape[0]
    generated = torch.arange(total) >= traj.prompt_len
    response = generated & (torch.arange(total) < traj.prompt_len + traj.response_len)
    return generated, response


def random_mask_trajectory(traj: Trajectory, gen: torch.Generator, prompt_mask: float, mask_id: int):
    """d1 / diffu-GRPO: one copy, response fully masked, prompt tokens masked with probability ``prompt_mask``."""
    generated, response = _spans(traj)
    hide = (torch.rand(traj.clean_ids.shape, generator=gen) < prompt_mask) & ~generated
    clean = torch.where(hide, torch.full_like(traj.clean_ids, mask_id), traj.clean_ids)
    rounds = [_round(generated, response, traj.block_size)] if bool(response.any()) else []
    fields = {f.name: getattr(traj, f.name) for f in dataclasses.fields(Trajectory)}
    return EstimatorTrajectory(**{**fields, "clean_ids": clean, "rounds": rounds}, round_weights=[1.0])


def coupled_trajectory(traj: Trajectory, gen: torch.Generator, t: float | None = None) -> EstimatorTrajectory:
    """coupled-GRPO: copies [full mask, M, complement of M], weights [1/2, 1/(2t), 1/(2(1-t))]; t drawn from
    ``COUPLED_T`` unless given. A token masked in neither M nor M' cannot exist: M' = generated & ~M."""
    generated, response = _spans(traj)
    if t is None:
        lo, hi = COUPLED_T
        t = lo + (hi - lo) * float(torch.rand((), generator=gen))
    in_m = (torch.rand(traj.clean_ids.shape, generator=gen) < t) & generated
    in_comp = generated & ~in_m
    masks = [generated, in_m, in_comp]
    weights = [0.5, 0.5 / t, 0.5 / (1.0 - t)]
    rounds, kept = [], []
    for m, w in zip(masks, weights, strict=True):
        if bool((m & response).any()):  # a copy whose masked positions are all tail trains nothing
            rounds.append(_round(m, m & response, traj.block_size))
            kept.append(w)
    fields = {f.name: getattr(traj, f.name) for f in dataclasses.fields(Trajectory)}
    return EstimatorTrajectory(**{**fields, "rounds": rounds}, round_weights=kept)


def estimator_trajectory(
    rollout: Rollout, estimator: str, *, shrink: int, gen: torch.Generator, prompt_mask: float, mask_id: int
) -> Trajectory:
    """The training view of a rollout under ``estimator`` (see the module docstring)."""
    if estimator in ("gtpo", "tracerl_shrink"):
        return rollout_trajectory(rollout, shrink)
    base = rollout_trajectory(rollout, 1)
    if estimator == "random_mask":
        return random_mask_trajectory(base, gen, prompt_mask, mask_id)
    if estimator == "coupled":
        return coupled_trajectory(base, gen)
    raise ValueError(f"loss.estimator: must be one of {ESTIMATORS}, got {estimator!r}")


def target_weights(trajs: list[Trajectory], batch: TrainBatch) -> Tensor | None:
    """(T,) the round weight of each target of ``batch`` (built from ``trajs``); None when every trajectory is an
    exact one (each token one target of weight 1: nothing to combine)."""
    if not any(isinstance(t, EstimatorTrajectory) for t in trajs):
        return None
    table = [t.round_weights if isinstance(t, EstimatorTrajectory) else [1.0] * len(t.rounds) for t in trajs]
    width = max((len(w) for w in table), default=1)
    dense = torch.tensor([w + [0.0] * (width - len(w)) for w in table], dtype=torch.float64)
    return dense[batch.response_index.cpu(), batch.round_index.cpu()]


def combine_targets(logp: Tensor, batch: TrainBatch, weights: Tensor | None) -> tuple[Tensor, TrainBatch]:
    """Per-token estimates ``sum over a token's targets of weight * log-prob``, and the batch reduced to one target
    per (response, token) (its first: the lowest round), in the batch's order of those first targets.

    Args:
        logp: (T,) log-probs of the batch's targets (may carry the gradient).
        batch: the forward's batch.
        weights: (T,) from :func:`target_weights`; None returns the inputs unchanged.

    Returns:
        (U,) estimates in logp's dtype (at least float32) and the reduced batch (U targets).
    """
    if weights is None:
        return logp, batch
    width = int(batch.token_index.max()) + 1 if len(batch.token_index) else 1
    key = (batch.response_index * width + batch.token_index).to(logp.device)
    uniq, inverse = torch.unique(key, return_inverse=True)
    dtype = torch.promote_types(logp.dtype, torch.float32)
    est = torch.zeros(len(uniq), dtype=dtype, device=logp.device)
    est = est.index_add(0, inverse, weights.to(device=logp.device, dtype=dtype) * logp.to(dtype))
    # the first target of each token: stable order of first appearance
    first = torch.full((len(uniq),), len(key), dtype=torch.long, device=logp.device)
    first = first.scatter_reduce(0, inverse, torch.arange(len(key), device=logp.device), "amin")
    order = torch.argsort(first)
    pick = first[order].cpu()
    reduced = dataclasses.replace(
        batch, target_index=batch.target_index[pick], labels=batch.labels[pick],
        response_index=batch.response_index[pick], round_index=batch.round_index[pick],
        token_index=batch.token_index[pick], temperature=batch.temperature[pick], top_k=batch.top_k[pick],
        top_p=batch.top_p[pick],
    )  # fmt: skip
    return est[order], reduced


def check_estimator(estimator: str, *, shrink: int, copies_per_forward: int | None, decoupled: bool) -> None:
    """Raise ValueError for a combination the estimator cannot honour."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"loss.estimator: must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "tracerl_shrink" and shrink < 2:
        raise ValueError(f"loss.estimator=tracerl_shrink: needs shrink >= 2 (shrink 1 is gtpo), got {shrink}")
    if estimator in ("random_mask", "coupled"):
        if shrink != 1:
            raise ValueError(f"shrink: {shrink} merges denoising steps, which loss.estimator={estimator} never uses")
        if decoupled:
            raise ValueError(f"loss.objective=decoupled: the engine's log-probs are of the trajectory, not of "
                             f"{estimator}'s masked copies; use objective=standard")  # fmt: skip
    if estimator == "coupled" and copies_per_forward is not None and copies_per_forward < 3:
        raise ValueError(
            "copies_per_forward: coupled combines a token's 3 copies in one forward; leave it unset or >= 3"
        )
