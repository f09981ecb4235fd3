"""The learner (SFT and GTPO steps): Accelerate, explicit gradient accumulation, checkpoints, exact resume.

One ``step`` (an RL step or an SFT step) makes exactly ``updates_per_step * passes`` optimizer updates (a step with
fewer responses than ``updates_per_step`` makes one update per response and pass). Within an
update, the batch's responses are spread over the processes (response i on rank i % world) and over micro-batches;
every target token carries a normalisation weight computed from counts over the whole update (known on every
rank, since every rank sees the whole batch), so summing the ranks' gradients gives the single-process gradient.
DDP averages gradients over ranks, hence the loss is scaled by the world size. Every rank runs the same number of
micro-batches (empty shards run a zero-weight micro-batch) so that collectives never wait on a missing rank.

Random draws (SFT masks) come from generators seeded by (seed, step, rank), so a resumed run draws what an
uninterrupted one would have, without depending on saved RNG state.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from services.trainer.config import CommonConfig, TrainerConfig
from services.trainer.learner import baselines, sharding
from services.trainer.learner import value as value_model
from services.trainer.learner.checkpoint import (
    CheckpointError,
    CheckpointMissing,
    TrainerState,
    checkpoint_name,
    earlier_run,
    fresh_dir,
    load_checkpoint,
    move_aside,
    resume_checkpoint,
    save_checkpoint,
    staging_dir,
)
from services.trainer.learner.objective import (
    BEHAVIOUR_MAXES,
    BEHAVIOUR_SUMS,
    behaviour_metrics,
    behaviour_sums,
    component_advantages,
    component_table,
    correct_nll,
    filter_component_groups,
    filter_groups,
    floor_correct,
    group_advantages,
    gtpo_loss,
    identical_groups,
    staleness,
    token_staleness,
    token_weights,
)
from services.trainer.learner.policy import TokenLogProbs
from services.trainer.learner.trajectory import TrainBatch, Trajectory, build_batch, forward_rounds
from shared.contracts.wire import Rollout, StepBatch
from shared.model.sampling import MIN_TEMPERATURE
from shared.model.sdar import LoadedModel, load_model

log = logging.getLogger("gtpo.trainer")


@dataclass
class WorkItem:
    """One response to train on: its trajectory and per-response scalars for the loss."""

    trajectory: Trajectory
    advantage: float = 0.0
    engine_logprobs: list[float] | None = None
    token_scale: float = 1.0  # SFT: 1/t of the response's mask rate
    correct: bool = False  # RL: the accuracy verdict (loss.nll_coef trains the correct ones' tokens)
    token_advantages: Tensor | None = None  # RL with a value model: (response_len,) GAE advantages (value.py)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of one (step, rank): resume-safe randomness."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


OUTSIDE_KEPT = ("outside_kept_tokens", "ref_outside_kept_tokens")
"""Per-update counts of target tokens outside the kept set (top-k / top-p) of pi_theta or pi_prox (dropped from the
loss) and of the reference only (KL term dropped); see docs/sampling.md."""


def check_sampled(groups: Sequence[Sequence[Rollout]]) -> None:
    """Raise ValueError naming the first greedy rollout: argmax decoding has no distribution to train."""
    for g, group in enumerate(groups):
        for i, r in enumerate(group):
            if r.params.temperature < MIN_TEMPERATURE:
                raise ValueError(
                    f"Rollout.params.temperature: group {g} sample {i} was decoded greedily (temperature "
                    f"{r.params.temperature}); RL needs sampled rollouts (rollout.temperature >= {MIN_TEMPERATURE})"
                )


def check_behaviour_logprobs(groups: Sequence[Sequence[Rollout]]) -> None:
    """Raise ValueError naming the first rollout without the engine's per-token log-probs (pi_behav)."""
    for g, group in enumerate(groups):
        for i, r in enumerate(group):
            if r.logprobs is None:
                raise ValueError(
                    f"Rollout.logprobs: loss.objective='decoupled' needs the engine's log-prob of every token "
                    f"(pi_behav); group {g} sample {i} has none (sample with SamplingParams.logprobs=True)"
                )


def split_even(n: int, parts: int) -> list[range]:
    """Split range(n) into `parts` contiguous ranges whose sizes differ by at most one."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


class Learner:
    """The learner of both SFT (`sft_step`) and GTPO (`rl_step`): owns the policy, the optimizer and the
    checkpoints; knows nothing of queues or rewards, and writes no metrics row (the training loop does)."""

    def __init__(self, cfg: CommonConfig, accelerator=None):
        self.cfg = cfg
        beta = cfg.loss.beta if isinstance(cfg, TrainerConfig) else 0.0  # SFT has no KL term, so no reference
        if isinstance(cfg, TrainerConfig):
            baselines.check_estimator(cfg.loss.estimator, shrink=cfg.shrink, copies_per_forward=cfg.copies_per_forward,
                                      decoupled=cfg.loss.objective == "decoupled")  # fmt: skip
        cuda = torch.cuda.is_available()
        mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if cuda else "no")
        self.accelerator = accelerator or sharding.make_accelerator(mp, cuda=cuda)
        self.sharding = sharding.sharding_kind(self.accelerator)  # None, "fsdp2" or "deepspeed"
        if self.sharding and cfg.lora is not None:
            raise ValueError(
                f"lora: not supported with {self.sharding} sharding; LoRA's optimizer state is small, so train"
                " adapters with plain data parallel (deploy/accelerate/ddp.yaml)"
            )
        if self.sharding == sharding.DEEPSPEED:
            sharding.set_deepspeed_micro_batch(self.accelerator, cfg.micro_batch_size)
            if self.accelerator.state.deepspeed_plugin.zero_stage == 3 and beta > 0:
                raise ValueError(
                    f"loss.beta: {beta} needs a reference model, which ZeRO-3 would partition outside its"
                    " engine; use FSDP2 (deploy/accelerate/fsdp.yaml) or ZeRO-2 for a KL term, or beta=0"
                )
        self.loaded: LoadedModel = load_model(cfg.model, device=self.accelerator.device)
        self.peft = None  # with LoRA: the peft model around loaded.model (the same modules, adapters injected)
        if cfg.lora is not None:
            from services.trainer.learner.lora import apply_lora

            self.peft = apply_lora(self.loaded.model, cfg.lora, seed=cfg.seed, base=Path(cfg.model).resolve())
        attention = cfg.attention if cfg.attention != "auto" else ("flex" if cuda else "sdpa")
        policy = TokenLogProbs(self.loaded.model, attention=attention, checkpointing=cfg.gradient_checkpointing)
        policy.train()
        o = cfg.optim
        optimizer = torch.optim.AdamW(  # only what trains: a frozen base carries no optimizer state
            [p for p in policy.parameters() if p.requires_grad], lr=o.lr, betas=o.betas, eps=o.eps,
            weight_decay=o.weight_decay,
        )  # fmt: skip
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        self.policy, self.optimizer, self.scheduler = self.accelerator.prepare(policy, optimizer, scheduler)
        # with LoRA the reference is this model with its adapters disabled (`_ref_logprobs`), not a second copy
        self.ref = self._reference(attention) if beta > 0 and cfg.lora is None else None
        self.state = TrainerState()
        self.critic = None
        if getattr(cfg, "value", None) is not None:  # RL only (TrainerConfig)
            if cfg.loss.estimator not in ("gtpo", "tracerl_shrink"):
                raise ValueError(f"value: the value model rates denoising steps; loss.estimator={cfg.loss.estimator} "
                                 "has none (use gtpo or tracerl_shrink)")  # fmt: skip
            self.critic = value_model.Critic(self.loaded.model.config.hidden_size, cfg.value, self.accelerator.device)
        self.cfg.output_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ setup helpers

    def _lr_factor(self, update: int) -> float:
        o = self.cfg.optim
        if update < o.warmup_steps:
            return (update + 1) / (o.warmup_steps + 1)
        if o.schedule == "constant" or not o.total_updates:
            return 1.0
        progress = min(1.0, (update - o.warmup_steps) / max(1, o.total_updates - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _reference(self, attention: str) -> TokenLogProbs:
        ref_lm = load_model(self.cfg.ref_model or self.cfg.model, device=self.accelerator.device).model
        ref = TokenLogProbs(ref_lm, attention=attention).eval()
        ref.requires_grad_(False)
        return ref

    @property
    def unwrapped(self) -> TokenLogProbs:
        return self.accelerator.unwrap_model(self.policy)

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self.loaded.model.config.vocab_size)

    @property
    def spec(self):
        """The model's DiffusionSpec (block size, mask token id)."""
        return self.loaded.spec

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    # ------------------------------------------------------------------ RL

    def rl_step(self, batch: StepBatch) -> dict[str, float]:
        """One GTPO step on a batch of scored prompt groups; returns its metrics row (the same on every rank), the
        batch's own `metrics` included. The caller writes the row (`Trackers.log`) once the step is durable.

        Each sample's `correct` verdict is what `loss.floor_correct` and `loss.nll_coef` need; its `components`,
        with the batch's `reward_weights`, are what `loss.reward_norm: per_component` normalises instead of the
        totals. Each rollout's `policy_version` is the version that sampled it: a sample from an older version
        than the trainer's makes the step recompute pi_prox (design.md section 7). With in-flight updates a rollout
        spans versions (`Rollout.versions()`): `staleness_*` are per sample (its oldest token), `staleness_token_*`
        per response token.
        """
        groups = [[s.rollout for s in g] for g in batch.groups]
        rewards = [[s.reward for s in g] for g in batch.groups]
        self._check_batch(batch, groups)
        now = self.state.policy_version
        lag_mean, lag_max = staleness([[r.policy_version for r in g] for g in groups], now)
        token_lag_mean, token_lag_max = token_staleness([r.versions() for g in groups for r in g], now)
        same = identical_groups([[r.token_ids for r in g] for g in groups])
        if same and self.accelerator.is_main_process:
            log.warning("step %d: %d of %d groups have all their samples identical (groups %s): does the decoder "
                        "ignore the temperature or the per-sample seed?", self.state.step + 1, len(same),
                        len(groups), same[:10])  # fmt: skip
        items, returns, stats = self._rl_items(batch, rewards)
        extra_metrics = self._value_metrics(items, groups, returns)
        # pi_prox is the weights at the start of the step: with one update, that is the weights being trained, so a
        # stale sample needs no extra forward (pi_prox = pi_theta.detach() to the bit); several updates recompute it
        metrics = self._train_items(items, rl=True)
        metrics.update(extra_metrics)
        flat = [x for r in rewards for x in r]
        metrics.update(
            reward_mean=sum(flat) / max(1, len(flat)), groups=stats.groups, groups_kept=stats.kept,
            groups_dropped=stats.dropped, groups_identical=len(same), staleness_mean=lag_mean, staleness_max=lag_max,
            staleness_token_mean=token_lag_mean, staleness_token_max=token_lag_max,
        )  # fmt: skip
        metrics.update(batch.metrics)
        return self._finish_step(metrics)

    def _check_batch(self, batch: StepBatch, groups: list[list[Rollout]]) -> None:
        """Raise ValueError for a batch this configuration cannot train (a missing verdict, a greedy rollout, no
        behaviour log-probs for the decoupled objective)."""
        if self.cfg.loss.floor_correct or self.cfg.loss.nll_coef > 0:
            if any(s.correct is None for g in batch.groups for s in g):
                raise ValueError(
                    "loss.floor_correct / nll_coef: need one accuracy verdict per rollout (the reward service "
                    "must weigh an accuracy component)"
                )
        check_sampled(groups)
        if self.cfg.loss.objective == "decoupled":
            check_behaviour_logprobs(groups)

    def _value_metrics(self, items: list[WorkItem], groups: list[list[Rollout]], returns: list[float]) -> dict:
        """`adv_var`; with the value model, its step (the items' token advantages become GAE's) and its metrics."""
        out = {"adv_var": value_model.token_variance(
            [torch.full((it.trajectory.target_count,), it.advantage) for it in items])}  # fmt: skip
        if self.critic is not None and items:
            out |= value_model.critic_step(self, items, [r.step_map for g in groups for r in g], returns)
            out["adv_var_group"] = out["adv_var"]  # the group baseline alone, same samples
            out["adv_var"] = value_model.token_variance([it.token_advantages for it in items])
        return out

    def _rl_items(self, batch: StepBatch, rewards: list[list[float]]) -> tuple[list[WorkItem], list[float], object]:
        """Every response of the batch with its advantage, the value model's outcome return of each, and the groups'
        keep / drop counts.

        Every group given is trained: which groups are worth training (dynamic sampling) is decided once, where
        groups are collected and refilled (services.trainer.orchestrator.collect); a zero-variance group has advantage 0.
        """
        _, stats = filter_groups([list(map(float, r)) for r in rewards])  # refuses non-finite rewards
        loss = self.cfg.loss
        if per_component := loss.reward_norm == "per_component":
            components = [[s.components for s in g] for g in batch.groups]
            names, table = component_table(rewards, components, batch.reward_weights)
            w = [float(batch.reward_weights[n]) for n in names]
            _, stats = filter_component_groups(table, w)
        items: list[WorkItem] = []
        returns: list[float] = []
        gen = step_generator(self.cfg.seed, self.state.step, 0)  # the baselines' masks: the same on every rank
        raw_returns = self.cfg.value is not None and self.cfg.value.reward != "group"
        for i, group in enumerate(batch.groups):
            if not group:
                continue
            if per_component:
                comp = torch.tensor([table[i]], dtype=torch.float64)
                adv = component_advantages(comp, torch.tensor(w, dtype=torch.float64), loss.advantage)
            else:
                adv = group_advantages(torch.tensor([rewards[i]], dtype=torch.float64), loss.advantage)
            if loss.floor_correct:
                adv = floor_correct(adv, torch.tensor([[bool(s.correct) for s in group]], dtype=torch.bool))
            for s, a in zip(group, adv[0].tolist(), strict=True):
                items.append(self._rl_item(s.rollout, a, bool(s.correct), gen))
                returns.append(float(s.reward) if raw_returns else a)
        return items, returns, stats

    def _rl_item(self, rollout: Rollout, advantage: float, correct: bool, gen: torch.Generator) -> WorkItem:
        """A rollout's work item under ``loss.estimator``; a baseline's copies have no engine log-probs."""
        est = self.cfg.loss.estimator
        traj = baselines.estimator_trajectory(rollout, est, shrink=self.cfg.shrink, gen=gen,
                                              prompt_mask=self.cfg.loss.prompt_mask,
                                              mask_id=self.loaded.spec.mask_token_id)  # fmt: skip
        exact = est in ("gtpo", "tracerl_shrink")
        return WorkItem(traj, advantage, rollout.logprobs if exact else None, correct=correct)

    def _logprobs(self, model, batch: TrainBatch, trajs: list[Trajectory]) -> tuple[Tensor, TrainBatch]:
        """``model(batch)`` with a baseline's copies combined into one estimate per token (baselines.py)."""
        return baselines.combine_targets(model(batch), batch, baselines.target_weights(trajs, batch))

    # ------------------------------------------------------------------ SFT

    def sft_step(self, items: list[WorkItem]) -> dict[str, float]:
        """One SFT step on prepared items (random-masking or trace rounds); returns metrics."""
        return self._finish_step(self._train_items(items, rl=False))

    # ------------------------------------------------------------------ the shared update machinery

    def _train_items(self, items: list[WorkItem], *, rl: bool) -> dict[str, float]:
        cfg = self.cfg
        passes = cfg.passes if rl else 1
        if cfg.lora is not None and cfg.lora.dropout > 0:
            # peft's dropout draws from the global RNG: seed it per (step, rank), so a resumed run drops the same
            torch.manual_seed(self.generator().initial_seed())
        if not items:
            self.accelerator.print("no trainable responses in this step (all groups dropped); no update made")
            return {"updates": 0, "loss": 0.0, "tokens": 0}
        # fewer responses than updates: the surplus updates would have nothing to train on
        chunks = [c for c in split_even(len(items), cfg.updates_per_step) if len(c)]
        prox = self._proximal_logprobs(items, chunks) if rl and len(chunks) * passes > 1 else None
        # the behaviour diagnostics need pi_behav for every response (they are then the same set on every rank)
        diagnose = rl and all(it.engine_logprobs is not None for it in items)
        totals: dict[str, float] = {}
        behav: tuple[Tensor, Tensor] | None = None
        done = 0
        for p in range(passes):
            for chunk in chunks:
                sub = None if prox is None else [prox[i] for i in chunk]
                m, b = self._update([items[i] for i in chunk], sub, rl, diagnose=diagnose and p == 0)
                for k, v in m.items():
                    totals[k] = totals.get(k, 0.0) + v
                if b is not None:
                    behav = b if behav is None else (behav[0] + b[0], torch.maximum(behav[1], b[1]))
                done += 1
        out = {k: v / done for k, v in totals.items()}
        out["updates"] = done
        if behav is not None:
            out.update(behaviour_metrics(*behav, weighted=cfg.loss.objective == "decoupled"))
        return out

    def _micro_batches(self, n: int) -> list[list[int]]:
        """This rank's positions among an update's n responses, in micro-batches.

        Every rank gets the same number of micro-batches (some may be empty), so each joins every collective.
        """
        mine = list(range(self.rank, n, self.world))
        size = self.cfg.micro_batch_size
        n_micro = max(1, math.ceil(math.ceil(n / self.world) / size))
        return [mine[j * size : (j + 1) * size] for j in range(n_micro)]

    def _update(
        self, chunk: list[WorkItem], prox: list | None, rl: bool, *, diagnose: bool = False
    ) -> tuple[dict[str, float], tuple[Tensor, Tensor] | None]:
        """One optimizer update over `chunk` (all ranks), with explicit accumulation over micro-batches.

        Returns the update's metrics and, with `diagnose`, its ``behaviour_sums`` summed (maxed) over all ranks.
        """
        # RL normalises by target tokens; SFT by response tokens (SDAR), masked or not
        n_tokens = sum(it.trajectory.target_count if rl else it.trajectory.response_len for it in chunk)
        max_len = max(it.trajectory.response_len for it in chunk)
        n_correct = sum(it.trajectory.target_count for it in chunk if it.correct) if rl else 0
        sums = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "tokens": 0.0, "nll": 0.0, **dict.fromkeys(OUTSIDE_KEPT, 0.0)}
        b_sums = torch.zeros(len(BEHAVIOUR_SUMS), dtype=torch.float64)
        b_max = torch.zeros(len(BEHAVIOUR_MAXES), dtype=torch.float64)
        # each micro-batch makes one forward + backward per group of copies_per_forward rounds
        forwards = [(idx, rounds) for idx in self._micro_batches(len(chunk)) for rounds in self._round_groups(chunk)]
        for j, (idx, rounds) in enumerate(forwards):
            last = j == len(forwards) - 1
            # gradients are all-reduced once per update, at its last backward: no_sync for DDP, and the
            # sync flag for DeepSpeed, whose engine would otherwise step the optimizer on every backward
            self.accelerator.gradient_state._set_sync_gradients(last)
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.policy):
                counts = (len(chunk), n_tokens, max_len, n_correct)
                loss, m, b = self._micro_loss(chunk, idx, prox, rl, counts, diagnose, rounds)
                self.accelerator.backward(loss * self.world)
            for k in ("loss", "tokens", "nll", *OUTSIDE_KEPT):
                sums[k] += m.get(k, 0.0)
            for k in ("clip_frac", "kl"):
                sums[k] += m.get(k, 0.0) * m["tokens"]
            if b is not None:
                b_sums, b_max = b_sums + b[0].cpu(), torch.maximum(b_max, b[1].cpu())
        grad_norm = self._optimizer_step()
        dev = self.accelerator.device
        vec = torch.cat([torch.tensor(list(sums.values()), dtype=torch.float64), b_sums if diagnose else b_sums[:0]])
        reduced = self.accelerator.reduce(vec.to(dev), "sum").cpu()
        s = dict(zip(sums, reduced[: len(sums)].tolist(), strict=True))
        tok = max(s["tokens"], 1.0)
        metrics = {"loss": s["loss"], "clip_frac": s["clip_frac"] / tok, "kl": s["kl"] / tok, "tokens": s["tokens"],
                   "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0]}  # fmt: skip
        if rl:
            metrics.update({k: s[k] for k in OUTSIDE_KEPT})
        if rl and self.cfg.loss.nll_coef > 0:
            metrics["nll"] = s["nll"]  # the correct responses' mean target NLL (before nll_coef)
        if not diagnose:
            return metrics, None
        maxes = self.accelerator.gather(b_max.to(dev)).view(-1, len(BEHAVIOUR_MAXES)).max(0).values.cpu()
        return metrics, (reduced[len(sums) :], maxes)

    def _round_groups(self, chunk: list[WorkItem]) -> list[range | None]:
        """The rounds of each forward of a micro-batch (copies_per_forward); None: all rounds in one forward.

        The count comes from the whole update's longest trajectory, known on every rank, so every rank makes the
        same number of forwards (ZeRO-3 / FSDP gather parameters in each).
        """
        c = self.cfg.copies_per_forward
        if c is None:
            return [None]
        return list(forward_rounds(max(len(it.trajectory.rounds) for it in chunk), c))

    def _forward_batch(self, trajs: list[Trajectory], rounds: range | None) -> tuple[TrainBatch, bool]:
        """The batch of one forward, and whether it is a stand-in: when none of `trajs` has a round in `rounds`,
        one copy of the first trajectory, whose results the caller discards (every rank still joins)."""
        mask_id = self.loaded.spec.mask_token_id
        batch = build_batch(trajs, mask_id, rounds=rounds)
        stand_in = batch.input_ids.shape[0] == 0
        if stand_in:
            batch = build_batch(trajs[:1], mask_id, rounds=range(1) if trajs[0].rounds else None)
        return batch.to(self.accelerator.device), stand_in

    def _micro_loss(
        self, chunk, idx, prox, rl, counts, diagnose, rounds=None
    ) -> tuple[Tensor, dict[str, float], tuple | None]:
        """Loss of one forward of a micro-batch (its `rounds`), already weighted by the update's global `counts`
        (responses, targets, max length); with `diagnose`, also its ``behaviour_sums`` (None for an empty shard)."""
        sel = idx or [0]  # an empty shard runs one zero-weight response so every rank joins the collectives
        trajs = [chunk[i].trajectory for i in sel]
        full, stand_in = self._forward_batch(trajs, rounds)
        dummy = not idx or stand_in
        logp, batch = self._logprobs(self.policy, full, trajs)
        resp = batch.response_index
        n_resp, n_tokens, max_len, n_correct = counts
        w = token_weights(
            resp, batch.round_index, self.cfg.loss.norm if rl else "token",
            n_responses=n_resp, n_tokens=n_tokens, max_len=max_len, block_size=self.loaded.spec.block_size,
        ).to(logp.device)  # fmt: skip
        if dummy:
            w = torch.zeros_like(w)
        if not rl:
            scale = torch.tensor([chunk[i].token_scale for i in sel], device=logp.device)[resp]
            loss = -(w * scale * logp).sum()
            return loss, {"loss": float(loss.detach()), "tokens": 0.0 if dummy else float(len(logp))}, None
        # not recomputed (one update, every sample from the current weights): pi_prox is pi_theta.detach() exactly;
        # an empty shard's stand-in response is another rank's, whose pi_prox this rank never computed
        prox_lp = self._at_targets(prox, sel, batch) if prox is not None and not dummy else logp.detach()
        if chunk[sel[0]].token_advantages is not None:  # the value model's GAE, per token
            adv = self._at_targets([it.token_advantages for it in chunk], sel, batch).float()
        else:
            adv = torch.tensor([chunk[i].advantage for i in sel], device=logp.device, dtype=torch.float32)[resp]
        ref = self._logprobs(self._ref_logprobs, full, trajs)[0] if self.cfg.loss.beta > 0 else None
        decoupled = self.cfg.loss.objective == "decoupled"
        behav = self._at_targets([it.engine_logprobs for it in chunk], sel, batch) if decoupled or diagnose else None
        loss, m = gtpo_loss(logp, prox_lp, adv, w, self.cfg.loss, ref_logp=ref, behav_logp=behav if decoupled else None)
        if dummy:
            m.update(dict.fromkeys(("tokens", *OUTSIDE_KEPT), 0.0))
        if self.cfg.loss.nll_coef > 0:
            # a token outside the kept set (-inf) has no NLL to learn from: left out, as in the surrogate
            kept_lp = torch.isfinite(logp)
            right = torch.tensor([chunk[i].correct and not dummy for i in sel], device=logp.device)[resp] & kept_lp
            nll = correct_nll(torch.where(kept_lp, logp, torch.zeros_like(logp)), right, n_correct)
            loss = loss + self.cfg.loss.nll_coef * nll
            m["nll"] = float(nll.detach())
        stats = None
        if diagnose and not dummy:
            # a token outside pi_prox's kept set has no finite gap to pi_behav: counted in outside_kept_tokens
            kept = torch.isfinite(prox_lp)
            stats = behaviour_sums(prox_lp[kept], behav[kept], self.cfg.loss.tis_cap)
        return loss, m, stats

    def _at_targets(self, per_response: list, sel: list[int], batch) -> Tensor:
        """Per-response values indexed by response position (pi_prox or pi_behav), gathered at the targets (float64:
        an engine's log-probs arrive as python floats, and a 1e-6 gap must survive)."""
        rows = [torch.as_tensor(per_response[i], dtype=torch.float64) for i in sel]
        starts = torch.tensor([0] + [len(r) for r in rows[:-1]]).cumsum(0)
        at = starts[batch.response_index.cpu()] + batch.token_index.cpu()
        return torch.cat(rows)[at].to(self.accelerator.device)

    @torch.no_grad()
    def _ref_logprobs(self, batch) -> Tensor:
        if self.ref is not None:
            return self.ref(batch)
        from services.trainer.learner.lora import adapters_disabled

        with adapters_disabled(self.peft):
            return self.policy(batch)

    @torch.no_grad()
    def _proximal_logprobs(self, items: list[WorkItem], chunks: list[range]) -> list[Tensor | None]:
        """pi_prox, the weights before this step's first update: per response, indexed by response position.

        Only for the responses this rank trains, in the micro-batches its updates will use, so that the first
        update's ratio is 1 to the bit and no rank recomputes another's share; every rank makes the same number
        of forwards (DDP buffer syncs and ZeRO-3 / FSDP gathers are collectives). Others' entries stay None.
        """
        self.policy.eval()
        out: list[Tensor | None] = [None] * len(items)
        for chunk in chunks:
            group = [items[i] for i in chunk]
            for idx in self._micro_batches(len(chunk)):
                sel = [chunk[i] for i in idx] or [chunk[0]]  # an empty shard joins on a response it discards
                for i in sel if idx else []:
                    out[i] = torch.zeros(items[i].trajectory.response_len, dtype=torch.float64)
                for rounds in self._round_groups(group):
                    trajs = [items[i].trajectory for i in sel]
                    full, stand_in = self._forward_batch(trajs, rounds)
                    lp, batch = self._logprobs(self.policy, full, trajs)
                    lp = lp.double().cpu()
                    resp, pos = batch.response_index.cpu(), batch.token_index.cpu()
                    for k, i in enumerate(sel if idx and not stand_in else []):
                        out[i][pos[resp == k]] = lp[resp == k]
        self.policy.train()
        return out

    def _optimizer_step(self) -> float:
        norm = 0.0
        if self.cfg.optim.max_grad_norm is not None:
            norm = float(self.accelerator.clip_grad_norm_(self.policy.parameters(), self.cfg.optim.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # ------------------------------------------------------------------ state

    def _finish_step(self, metrics: dict[str, float]) -> dict[str, float]:
        """Count the step; the metrics row gets its `step` and `time` (the training loop writes it)."""
        self.state.step += 1
        metrics["step"] = self.state.step
        metrics["time"] = time.time()
        return metrics

    @property
    def checkpoint_root(self) -> Path:
        return self.cfg.output_dir / "checkpoints"

    def save(self, *, publish: bool = True) -> Path:
        """Checkpoint the current state; with `publish`, the weights become the next policy version.

        Every process calls it. Sharded, every process first writes its part into the step's shared staging
        folder, then the main process adds the gathered weights and the rest and commits it.
        """
        if publish:
            self.state.policy_version += 1
        root, main = self.checkpoint_root, self.accelerator.is_main_process
        if self.critic is not None:  # in the state file: covered by the manifest, written with the step atomically
            self.state.extra["value_model"] = self.critic.record()
        path = root / checkpoint_name(self.state.step)
        optimizer, staging, model_state = self.optimizer.optimizer, None, None
        self.accelerator.wait_for_everyone()
        if self.sharding:
            staging = staging_dir(root, self.state.step)
            if main:
                fresh_dir(staging)
            self.accelerator.wait_for_everyone()
            model_state = sharding.full_state_dict(self.accelerator, self.policy, self.unwrapped.lm)
            if self.sharding == sharding.FSDP2:
                sharding.save_shards(staging / sharding.SHARDS_DIR, self.unwrapped.lm, optimizer, rank=self.rank,
                                     world=self.world)  # fmt: skip
            else:
                sharding.save_deepspeed(staging / sharding.DEEPSPEED_DIR, self.policy, world=self.world, main=main)
            optimizer = None  # its state is in the shards
            self.accelerator.wait_for_everyone()
        if main:
            path = save_checkpoint(
                root, self.state.step, model=self.peft or self.unwrapped.lm,
                tokenizer=self.loaded.tokenizer, spec=self.loaded.spec, optimizer=optimizer,
                scheduler=self.scheduler.scheduler, state=self.state, keep_last=self.cfg.keep_last,
                merged=self.cfg.lora is not None and self.cfg.lora.publish == "merged",
                model_state=model_state, staging=staging,
            )  # fmt: skip
        self.accelerator.wait_for_everyone()
        return path

    def resume(self) -> bool:
        """Continue from the newest checkpoint under output_dir. Returns whether one was found: False only for an
        output folder no run has written to yet (a first start under an always-`--resume` deployment).

        The main process verifies the checkpoint's files against their checksums; every process gets its verdict,
        so all of them stop together on a bad checkpoint.

        Raises:
            CheckpointError: no whole checkpoint to continue from although an earlier run wrote here (what is
                missing or corrupt named), or its layout cannot be resumed by this run (both sides named).
        """
        verdict, error = "", None
        if self.accelerator.is_main_process:
            try:
                path = resume_checkpoint(self.checkpoint_root)
                verdict = "none" if path is None else str(path)
                if path is None and (earlier := earlier_run(self.cfg.output_dir)):
                    raise CheckpointMissing(
                        f"--resume: no checkpoint under {self.checkpoint_root}, but an earlier run wrote "
                        f"{', '.join(p.name for p in earlier)} in {self.cfg.output_dir}: pass --fresh to start again "
                        "at step 0 (its files are moved aside), or use another output_dir"
                    )
            except CheckpointError as e:
                verdict, error = f"error:{e}", e
        verdict = _broadcast(self.accelerator, verdict)
        if verdict.startswith("error:"):
            raise error or CheckpointError(verdict.removeprefix("error:"))
        if verdict == "none":
            self.accelerator.print(f"--resume: nothing to resume in {self.cfg.output_dir} yet; starting at step 0")
            return False
        path = Path(verdict)
        kind = sharding.checkpoint_kind(path)
        if problem := sharding.resume_problem(kind, self.sharding, self.world):
            raise CheckpointError(f"{path}: {problem}")
        lm = self.peft or self.unwrapped.lm
        try:
            if kind is None:
                self.state = load_checkpoint(
                    path, model=lm, optimizer=self.optimizer.optimizer, scheduler=self.scheduler.scheduler,
                    verify=False,
                )  # fmt: skip
            else:  # the counters and the scheduler from the main files, the rest from the shards
                self.state = load_checkpoint(path, scheduler=self.scheduler.scheduler, restore_rng=False, verify=False)
                if kind == sharding.FSDP2:
                    sharding.load_shards(path / sharding.SHARDS_DIR, lm, self.optimizer.optimizer, rank=self.rank,
                                         world=self.world)  # fmt: skip
                else:
                    sharding.load_deepspeed(path / sharding.DEEPSPEED_DIR, self.policy, world=self.world)
        except FileNotFoundError as e:  # a file the manifest does not cover (an old checkpoint): named, no traceback
            raise CheckpointMissing(str(e)) from e
        if self.critic is not None:
            if "value_model" not in self.state.extra:
                raise CheckpointError(f"{path}: value: this run has a value model, the checkpoint has none")
            self.critic.load(self.state.extra["value_model"])
        self.accelerator.print(f"resumed from {path} (step {self.state.step}, policy v{self.state.policy_version})")
        return True

    def start_fresh(self) -> None:
        """`--fresh`: start at step 0 in an output folder an earlier run used, its metrics, audit rows and
        checkpoints moved aside first (never appended to, never deleted)."""
        if self.accelerator.is_main_process and (dest := move_aside(self.cfg.output_dir)) is not None:
            self.accelerator.print(f"--fresh: moved the earlier run's files to {dest}; starting at step 0")
        self.accelerator.wait_for_everyone()

    def weights_path(self, checkpoint: Path) -> Path:
        """The folder of `checkpoint` a rollout engine loads as this weight version: the SDAR model, or with LoRA
        the adapter (``lora.publish=adapter``) or the merged model (``merged``)."""
        from services.trainer.learner.lora import published_weights

        return published_weights(checkpoint)

    def generator(self) -> torch.Generator:
        """The random stream of the coming step on this rank."""
        return step_generator(self.cfg.seed, self.state.step, self.rank)


def _broadcast(accelerator, text: str) -> str:
    """The main process's `text` on every process (a no-op with one process)."""
    if accelerator.num_processes == 1:
        return text
    from accelerate.utils import broadcast_object_list

    box = [text]
    broadcast_object_list(box, from_process=0)
    return box[0]
