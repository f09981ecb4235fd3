"""TraceRL's value model: a critic over the denoising-step trajectory and GAE advantages over its steps.

Design: a separate small head on the policy's backbone, ``Linear(hidden, 1, bias=False)`` zero-initialised as
TraceRL's ``value_head``, reading the policy's last hidden state at each target position of the noisy copy (the
state in which that token was unmasked), with the features DETACHED. Why not TraceRL's separate model (a second
backbone with that head): it doubles the weights, gradients and optimizer state and adds a forward and backward
per step, which is what limits block-diffusion RL at 8K tokens already. Why not a head that trains the backbone:
the value loss would then move the policy (PPO's shared-critic interference) and its gradient scale would have to
be tuned against the policy's. The cost of the choice: the critic is a linear probe of the policy's features, so it
can explain less of the return than a fine-tuned model. It costs one forward without backward per step (features
before the update) and hidden + Adam floats, replicated on every rank (too small to shard: the trainer reduces
its gradient over ranks instead; `gtpo plan-memory` counts it).

Returns and advantages (TraceRL ``compute_returns_and_advantages_from_fragments``, one response): the steps are
the sorted distinct values of its step map, t = 1..S; the outcome reward r sits on the tokens of the last step.
Step level: ``r*_t = mean_{j in t} r_j``, ``V*_t = mean_{j in t} V_j``, ``R*_t = r*_t + gamma R*_{t+1}``,
``A*_t = r*_t - V*_t + gamma V*_{t+1} + gamma lam A*_{t+1}``; token level ``R_j = r_j + gamma R*_{t+1}``,
``A_j = r_j - V_j + gamma V*_{t+1} + gamma lam A*_{t+1}``. With gamma = lam = 1, ``R_j = r`` and ``A_j = r - V_j``.
The returns never bootstrap on V, so the critic's loss ``0.5 (V_j - R_j)^2`` (mean over the step's target tokens)
is known in the same forward that predicts V. One critic update per RL step, before the policy's, on values taken
before it (TraceRL: ``train_value_every: 1``, one epoch, so V_old = V and its PPO value clip is inactive: omitted).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from services.trainer.config import ValueConfig


class ValueHead(nn.Module):
    """``(T, H) -> (T,)`` values; zero-initialised, so the first step's advantages are the returns themselves."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = nn.Linear(hidden, 1, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, h: Tensor) -> Tensor:
        return self.proj(h.to(self.proj.weight.dtype)).squeeze(-1)


def step_indices(step_map: Sequence[int]) -> Tensor:
    """(N,) each token's step as its index among the response's sorted distinct steps.

    >>> step_indices([3, 1, 3, 7]).tolist()
    [1, 0, 1, 2]
    """
    steps = torch.tensor(list(step_map), dtype=torch.long)
    _, inverse = torch.unique(steps, sorted=True, return_inverse=True)
    return inverse


def gae(values: Tensor, step: Tensor, reward: float, gamma: float = 1.0, lam: float = 1.0) -> tuple[Tensor, Tensor]:
    """Token advantages and returns of one response by GAE over its denoising steps (module docstring).

    Args:
        values: (N,) V_j of each response token, in the state it was unmasked in.
        step: (N,) long, the token's step index (``step_indices``), 0..S-1.
        reward: the outcome reward, on the tokens of the last step.
        gamma, lam: discount and GAE lambda.

    Returns:
        advantages (N,), returns (N,), float64.
    """
    values = values.double()
    n_steps = int(step.max()) + 1 if step.numel() else 0
    r_tok = torch.where(step == n_steps - 1, reward, 0.0).double()
    count = torch.zeros(n_steps, dtype=torch.float64).index_add(0, step, torch.ones_like(values))
    v_step = torch.zeros(n_steps, dtype=torch.float64).index_add(0, step, values) / count
    r_step = torch.zeros(n_steps, dtype=torch.float64).index_add(0, step, r_tok) / count
    ret, adv = torch.zeros(n_steps + 1, dtype=torch.float64), torch.zeros(n_steps + 1, dtype=torch.float64)
    v_next = torch.zeros(n_steps + 1, dtype=torch.float64)
    v_next[:n_steps] = v_step
    for t in range(n_steps - 1, -1, -1):
        ret[t] = r_step[t] + gamma * ret[t + 1]
        adv[t] = r_step[t] - v_step[t] + gamma * v_next[t + 1] + gamma * lam * adv[t + 1]
    nxt = step + 1
    tok_adv = r_tok - values + gamma * v_next[nxt] + gamma * lam * adv[nxt]
    tok_ret = r_tok + gamma * ret[nxt]
    return tok_adv, tok_ret


def token_variance(per_token: Sequence[Tensor]) -> float:
    """Population variance of all the advantages the loss weighs, over every target token of the step."""
    flat = torch.cat([t.double().flatten() for t in per_token]) if per_token else torch.zeros(0)
    return float(flat.var(unbiased=False)) if flat.numel() else 0.0


class Critic:
    """The value head, its AdamW and its exact-resume record (JSON floats: float32 round-trips bit for bit)."""

    def __init__(self, hidden: int, cfg: ValueConfig, device):
        self.cfg = cfg
        self.head = ValueHead(hidden).to(device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=cfg.lr, weight_decay=0.0)

    def record(self) -> dict:
        """What a checkpoint keeps (``TrainerState.extra['value_model']``)."""
        opt = self.optimizer.state_dict()
        state = {str(k): {n: v.cpu().flatten().tolist() for n, v in s.items()} for k, s in opt["state"].items()}
        return {"weight": self.head.proj.weight.detach().cpu().flatten().tolist(), "optimizer": state}

    def load(self, record: dict) -> None:
        w = self.head.proj.weight
        with torch.no_grad():
            w.copy_(torch.tensor(record["weight"], dtype=w.dtype).view_as(w))
        opt = self.optimizer.state_dict()
        shapes = {"exp_avg": w.shape, "exp_avg_sq": w.shape, "step": ()}
        opt["state"] = {int(k): {n: torch.tensor(v, dtype=torch.float32).view(shapes[n]).to(w.device if n != "step"
                                 else "cpu") for n, v in s.items()} for k, s in record["optimizer"].items()}  # fmt: skip
        self.optimizer.load_state_dict(opt)


def critic_step(trainer, items: list, step_maps: list[Sequence[int]], rewards: list[float]) -> dict[str, float]:
    """The step's critic pass: values of every target (pi_theta's features before the update), the critic's update on
    the returns, and each item's ``token_advantages`` by GAE. Every rank computes its share of the responses; the
    values and the head's gradient are summed over ranks, so every rank ends with the same advantages and head.

    Args:
        trainer: the Learner (its policy, micro-batching and accelerator).
        items: the step's work items (exact trajectories), in order.
        step_maps: each item's rollout step map (one step per response token).
        rewards: each item's return r (the group advantage or the raw reward, per ``ValueConfig.reward``).
    """
    critic, cfg, acc = trainer.critic, trainer.critic.cfg, trainer.accelerator
    steps = [step_indices(s) for s in step_maps]
    returns = [gae(torch.zeros(len(s)), s, r, cfg.gamma, cfg.lam)[1] for s, r in zip(steps, rewards, strict=True)]
    offsets = [0]
    for it in items:
        offsets.append(offsets[-1] + it.trajectory.response_len)
    values = torch.zeros(offsets[-1], dtype=torch.float64)
    n_targets = max(1, sum(it.trajectory.target_count for it in items))
    loss_sum = 0.0
    trainer.policy.eval()
    critic.optimizer.zero_grad(set_to_none=False)
    for idx in trainer._micro_batches(len(items)):
        sel = idx or [0]
        for rounds in trainer._round_groups(items):
            batch, stand_in = trainer._forward_batch([items[i].trajectory for i in sel], rounds)
            with torch.no_grad():
                _, h = trainer.policy(batch, with_hidden=True)
            v = critic.head(h.float())
            resp, tok = batch.response_index.cpu(), batch.token_index.cpu()
            at = torch.tensor([offsets[i] for i in sel], dtype=torch.long)[resp] + tok
            ret = torch.cat([returns[i] for i in sel]) if sel else torch.zeros(0)
            local = torch.tensor([0] + [len(returns[i]) for i in sel[:-1]]).cumsum(0)[resp] + tok
            target = ret[local].to(v.device, v.dtype)
            live = 0.0 if (not idx or stand_in) else 1.0
            loss = live * 0.5 * ((v - target) ** 2).sum() / n_targets
            loss.backward()
            loss_sum += float(loss.detach())
            if live:
                values[at] = v.detach().double().cpu()
    trainer.policy.train()
    head_params = list(critic.head.parameters())
    for p in head_params:
        p.grad = acc.reduce(p.grad, "sum") if acc.num_processes > 1 else p.grad
    values = acc.reduce(values.to(acc.device), "sum").cpu() if acc.num_processes > 1 else values
    norm = torch.nn.utils.clip_grad_norm_(head_params, cfg.max_grad_norm or float("inf"))
    critic.optimizer.step()
    for i, it in enumerate(items):
        it.token_advantages = gae(values[offsets[i] : offsets[i + 1]], steps[i], rewards[i], cfg.gamma, cfg.lam)[0]
    loss_total = (
        float(acc.reduce(torch.tensor(loss_sum, device=acc.device), "sum")) if acc.num_processes > 1 else loss_sum
    )
    return {"value_loss": loss_total, "value_mean": float(values.mean()) if values.numel() else 0.0,
            "value_grad_norm": float(norm)}  # fmt: skip
