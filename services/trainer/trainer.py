"""The GTPO / SFT trainer: Accelerate, explicit gradient accumulation, checkpoints, exact resume.

One ``step`` (an RL step or an SFT step) makes exactly ``updates_per_step * passes`` optimizer updates. Within an
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
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from services.trainer.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from services.trainer.config import TrainerConfig
from services.trainer.objective import filter_groups, floor_correct, group_advantages, gtpo_loss, token_weights
from services.trainer.policy import TokenLogProbs
from services.trainer.trajectory import Trajectory, build_batch, rollout_trajectory
from shared.contracts import Rollout
from shared.model import LoadedModel, load_model


@dataclass
class WorkItem:
    """One response to train on: its trajectory and per-response scalars for the loss."""

    trajectory: Trajectory
    advantage: float = 0.0
    engine_logprobs: list[float] | None = None
    token_scale: float = 1.0  # SFT: 1/t of the response's mask rate


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of one (step, rank): resume-safe randomness."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


def split_even(n: int, parts: int) -> list[range]:
    """Split range(n) into `parts` contiguous ranges whose sizes differ by at most one."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


class GTPOTrainer:
    """Owns the policy, the optimizer and the checkpoints; knows nothing of queues or rewards."""

    def __init__(self, cfg: TrainerConfig, accelerator=None):
        from accelerate import Accelerator

        self.cfg = cfg
        cuda = torch.cuda.is_available()
        mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if cuda else "no")
        self.accelerator = accelerator or Accelerator(mixed_precision=mp, cpu=not cuda)
        self.loaded: LoadedModel = load_model(cfg.model, device=self.accelerator.device)
        attention = cfg.attention if cfg.attention != "auto" else ("flex" if cuda else "sdpa")
        policy = TokenLogProbs(self.loaded.model, attention=attention)
        policy.train()
        o = cfg.optim
        optimizer = torch.optim.AdamW(
            policy.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        self.policy, self.optimizer, self.scheduler = self.accelerator.prepare(policy, optimizer, scheduler)
        self.ref = self._reference(attention) if cfg.loss.beta > 0 else None
        self.state = TrainerState()
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
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    # ------------------------------------------------------------------ RL

    def rl_step(
        self,
        groups: Sequence[Sequence[Rollout]],
        rewards: Sequence[Sequence[float]],
        extra: dict | None = None,
        correct: Sequence[Sequence[bool]] | None = None,
        *,
        write: bool = True,
    ) -> dict[str, float]:
        """One GTPO step on prompt groups with their rewards; returns metrics (same on every rank) with `extra`.

        `correct` (grouped like `rewards`) is each response's accuracy verdict; `loss.floor_correct` needs it.
        """
        if len(groups) != len(rewards) or any(len(g) != len(r) for g, r in zip(groups, rewards, strict=True)):
            raise ValueError("rewards: need one reward per rollout, grouped like the rollouts")
        if self.cfg.loss.floor_correct:
            if correct is None or [len(c) for c in correct] != [len(r) for r in rewards]:
                raise ValueError("loss.floor_correct: need one accuracy verdict per rollout, grouped like the rewards")
        keep, stats = filter_groups([list(map(float, r)) for r in rewards])
        if not self.cfg.dynamic_sampling:
            keep = [len(g) > 0 for g in groups]
        items: list[WorkItem] = []
        for i, (group, rew, k) in enumerate(zip(groups, rewards, keep, strict=True)):
            if not k:
                continue
            adv = group_advantages(torch.tensor([list(rew)], dtype=torch.float64), self.cfg.loss.advantage)
            if self.cfg.loss.floor_correct:
                adv = floor_correct(adv, torch.tensor([list(correct[i])], dtype=torch.bool))
            adv = adv[0]
            for rollout, a in zip(group, adv.tolist(), strict=True):
                items.append(WorkItem(rollout_trajectory(rollout, self.cfg.shrink), a, rollout.logprobs))
        stale = any(r.policy_version != self.state.policy_version for g in groups for r in g)
        metrics = self._train_items(items, rl=True, recompute_old=stale)
        flat = [x for r in rewards for x in r]
        metrics.update(
            reward_mean=sum(flat) / max(1, len(flat)),
            groups=stats.groups,
            groups_kept=stats.kept,
            groups_dropped=stats.dropped,
        )
        metrics.update(extra or {})
        return self._finish_step(metrics, write=write)

    # ------------------------------------------------------------------ SFT

    def sft_step(self, items: list[WorkItem]) -> dict[str, float]:
        """One SFT step on prepared items (random-masking or trace rounds); returns metrics."""
        return self._finish_step(self._train_items(items, rl=False, recompute_old=False))

    # ------------------------------------------------------------------ the shared update machinery

    def _train_items(self, items: list[WorkItem], *, rl: bool, recompute_old: bool) -> dict[str, float]:
        cfg = self.cfg
        passes = cfg.passes if rl else 1
        updates = cfg.updates_per_step * passes
        if not items:
            self.accelerator.print("no trainable responses in this step (all groups dropped); no update made")
            return {"updates": 0, "loss": 0.0, "tokens": 0}
        old = self._old_logprobs(items) if rl and (recompute_old or updates > 1) else None
        totals: dict[str, float] = {}
        done = 0
        for _ in range(passes):
            for chunk in split_even(len(items), cfg.updates_per_step):
                m = self._update([items[i] for i in chunk], None if old is None else [old[i] for i in chunk], rl)
                for k, v in m.items():
                    totals[k] = totals.get(k, 0.0) + v
                done += 1
        out = {k: v / done for k, v in totals.items()}
        out["updates"] = done
        return out

    def _update(self, chunk: list[WorkItem], old: list[Tensor] | None, rl: bool) -> dict[str, float]:
        """One optimizer update over `chunk` (all ranks), with explicit accumulation over micro-batches."""
        # RL normalises by target tokens; SFT by response tokens (SDAR), masked or not
        n_tokens = sum(it.trajectory.target_count if rl else it.trajectory.response_len for it in chunk)
        max_len = max(it.trajectory.response_len for it in chunk)
        mine = list(range(self.rank, len(chunk), self.world))
        per_rank = math.ceil(len(chunk) / self.world)
        n_micro = max(1, math.ceil(per_rank / self.cfg.micro_batch_size))
        sums = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "tokens": 0.0}
        for j in range(n_micro):
            idx = mine[j * self.cfg.micro_batch_size : (j + 1) * self.cfg.micro_batch_size]
            last = j == n_micro - 1
            # gradients are all-reduced once per update, at its last micro-batch: no_sync for DDP, and the
            # sync flag for DeepSpeed, whose engine would otherwise step the optimizer on every backward
            self.accelerator.gradient_state._set_sync_gradients(last)
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.policy):
                loss, m = self._micro_loss(chunk, idx, old, rl, len(chunk), n_tokens, max_len)
                self.accelerator.backward(loss * self.world)
            sums["loss"] += m["loss"]
            sums["tokens"] += m["tokens"]
            for k in ("clip_frac", "kl"):
                sums[k] += m.get(k, 0.0) * m["tokens"]
        grad_norm = self._optimizer_step()
        reduced = self.accelerator.reduce(torch.tensor(list(sums.values()), device=self.accelerator.device), "sum")
        s = dict(zip(sums, reduced.tolist(), strict=True))
        tok = max(s["tokens"], 1.0)
        return {"loss": s["loss"], "clip_frac": s["clip_frac"] / tok, "kl": s["kl"] / tok, "tokens": s["tokens"],
                "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0]}  # fmt: skip

    def _micro_loss(self, chunk, idx, old, rl, n_resp, n_tokens, max_len) -> tuple[Tensor, dict[str, float]]:
        """Loss of one micro-batch; `loss` is already weighted by the update's global counts."""
        dummy = not idx
        sel = idx or [0]  # an empty shard runs one zero-weight response so every rank joins the collectives
        batch = build_batch([chunk[i].trajectory for i in sel], self.loaded.spec.mask_token_id, self.cfg.layout)
        batch = batch.to(self.accelerator.device)
        logp = self.policy(batch)
        resp = batch.response_index
        w = token_weights(
            resp, batch.round_index, self.cfg.loss.norm if rl else "token",
            n_responses=n_resp, n_tokens=n_tokens, max_len=max_len,
        ).to(logp.device)  # fmt: skip
        if dummy:
            w = torch.zeros_like(w)
        if not rl:
            scale = torch.tensor([chunk[i].token_scale for i in sel], device=logp.device)[resp]
            loss = -(w * scale * logp).sum()
            return loss, {"loss": float(loss.detach()), "tokens": 0.0 if dummy else float(len(logp))}
        order_old = self._at_targets(old, sel, batch) if old is not None else logp.detach()
        adv = torch.tensor([chunk[i].advantage for i in sel], device=logp.device, dtype=torch.float32)[resp]
        ref = self._ref_logprobs(batch) if self.ref is not None else None
        eng = self._engine_logprobs(chunk, sel, batch)
        loss, m = gtpo_loss(logp, order_old, adv, w, self.cfg.loss, ref_logp=ref, engine_logp=eng)
        m["tokens"] = 0.0 if dummy else m["tokens"]
        return loss, m

    def _at_targets(self, per_response: list, sel: list[int], batch) -> Tensor:
        """Per-response values indexed by response position (old or engine log-probs), gathered at the targets."""
        pairs = zip(batch.response_index.tolist(), batch.token_index.tolist(), strict=True)
        return torch.tensor([float(per_response[sel[r]][t]) for r, t in pairs], device=self.accelerator.device)

    def _engine_logprobs(self, chunk, sel, batch) -> Tensor | None:
        if self.cfg.loss.tis_cap is None or any(chunk[i].engine_logprobs is None for i in sel):
            return None
        return self._at_targets([it.engine_logprobs for it in chunk], sel, batch)

    @torch.no_grad()
    def _ref_logprobs(self, batch) -> Tensor:
        return self.ref(batch)

    @torch.no_grad()
    def _old_logprobs(self, items: list[WorkItem]) -> list[Tensor]:
        """pi_old: the policy before this step's first update, per response, indexed by response position."""
        self.policy.eval()
        out = []
        for it in items:
            batch = build_batch([it.trajectory], self.loaded.spec.mask_token_id, self.cfg.layout)
            lp = self.unwrapped(batch.to(self.accelerator.device)).float()
            full = torch.zeros(it.trajectory.response_len, device=lp.device)
            full[batch.token_index.to(lp.device)] = lp
            out.append(full.cpu())
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

    def _finish_step(self, metrics: dict[str, float], *, write: bool = True) -> dict[str, float]:
        self.state.step += 1
        metrics["step"] = self.state.step
        metrics["time"] = time.time()
        if write and self.accelerator.is_main_process:
            with (self.cfg.output_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(metrics) + "\n")
        return metrics

    @property
    def checkpoint_root(self) -> Path:
        return self.cfg.output_dir / "checkpoints"

    def save(self, *, publish: bool = True) -> Path:
        """Checkpoint the current state; with `publish`, the weights become the next policy version."""
        if publish:
            self.state.policy_version += 1
        path = self.checkpoint_root / f"step-{self.state.step:08d}"
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            path = save_checkpoint(
                self.checkpoint_root, self.state.step, model=self.unwrapped.lm, tokenizer=self.loaded.tokenizer,
                spec=self.loaded.spec, optimizer=self.optimizer.optimizer, scheduler=self.scheduler.scheduler,
                state=self.state, keep_last=self.cfg.keep_last,
            )  # fmt: skip
        self.accelerator.wait_for_everyone()
        return path

    def resume(self) -> bool:
        """Continue from the latest checkpoint under output_dir, if any. Returns whether one was found."""
        path = latest_checkpoint(self.checkpoint_root)
        if path is None:
            return False
        self.state = load_checkpoint(
            path, model=self.unwrapped.lm, optimizer=self.optimizer.optimizer, scheduler=self.scheduler.scheduler
        )
        self.accelerator.print(f"resumed from {path} (step {self.state.step}, policy v{self.state.policy_version})")
        return True

    def generator(self) -> torch.Generator:
        """The random stream of the coming step on this rank."""
        return step_generator(self.cfg.seed, self.state.step, self.rank)
