"""The two memory dials are exact: copies_per_forward (c forwards of at most c copies, each with the clean sequence)
and gradient checkpointing give the log-probs and gradients of the one packed forward."""

import sys
from pathlib import Path

import pytest
import torch

from services.rollout.engines.torch_engine import TorchEngine
from services.trainer.config import OptimConfig, TrainerConfig
from services.trainer.learner.objective import LossConfig
from services.trainer.learner.policy import TokenLogProbs
from services.trainer.learner.trainer import Learner
from services.trainer.learner.trajectory import (
    Trajectory,
    build_batch,
    forward_rounds,
    rollout_trajectory,
    trajectory_rounds,
)
from shared.contracts.wire import GenerationRequest, SamplingParams, StepBatch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "scripts"))
from oracles.per_round import per_round_batch  # noqa: E402
from rl_step import fixed_groups  # noqa: E402

# the hand example of tests/test_trajectory.py: prompt 3, B = 4, steps of positions 3..9, position 9 the tail
STEPS = [1, 3, 2, 2, 4, 6, 5]


def test_forward_rounds_by_hand():
    assert forward_rounds(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert forward_rounds(3, None) == [range(0, 3)] == forward_rounds(3, 3) == forward_rounds(3, 8)
    assert forward_rounds(3, 1) == [range(0, 1), range(1, 2), range(2, 3)]
    with pytest.raises(ValueError, match="copies_per_forward"):
        forward_rounds(3, 0)


def test_two_forwards_of_the_hand_example():
    clean = torch.tensor([10, 11, 12, 20, 21, 22, 23, 24, 25, 26])
    traj = Trajectory(clean, 3, 6, 4, trajectory_rounds(3, STEPS, 6, 4))
    m = 99
    first, second = (build_batch([traj], m, rounds=r) for r in forward_rounds(3, 2))
    assert first.input_ids[0].tolist() == [*clean.tolist(), 10, 11, 12, m, m, m, m, m, m, 22, 23, m, m, 26]
    assert second.input_ids[0].tolist() == [*clean.tolist(), 21, 22, 23, m]  # [clean | copy of round 3]
    assert second.copy_ids[0].tolist() == [0] * 10 + [1] * 4
    # round 3's target keeps its round index and position; the two forwards hold every target once
    assert second.round_index.tolist() == [2] and second.token_index.tolist() == [4]
    assert second.target_index.tolist() == [13] and second.labels.tolist() == [24]
    whole = build_batch([traj], m)
    assert sorted(first.labels.tolist() + second.labels.tolist()) == sorted(whole.labels.tolist())
    assert build_batch([traj], m, rounds=range(3, 4)).input_ids.shape[0] == 0  # no such round: no row


@pytest.fixture(scope="module")
def trajs(sharp):
    """8 rollouts: mixed prompt lengths, stops and tails, multi-token steps; 1..4 rounds per response."""
    g = torch.Generator().manual_seed(3)
    reqs = []
    for i in range(8):
        plen = int(torch.randint(1, 15, (1,), generator=g))
        prompt = torch.randint(0, 250, (plen,), generator=g).tolist()
        params = SamplingParams(seed=i, max_new_tokens=int(torch.randint(5, 23, (1,), generator=g)),
                                confidence_threshold=0.02, stop_token_ids=[257])  # fmt: skip
        reqs.append(GenerationRequest(prompt_ids=prompt, params=params))
    out = [rollout_trajectory(r) for (r,) in TorchEngine(sharp).generate(reqs)]
    assert len({len(t.rounds) for t in out}) > 1  # responses with different round counts
    return out


def _logprobs_and_grad(policy, trajs, mask_id, layout, c):
    """Canonically ordered log-probs of all forwards of copies_per_forward=c, and the summed gradient."""
    policy.zero_grad()
    adv = torch.linspace(-1.0, 1.0, len(trajs))
    lps, keys = [], []
    for rounds in forward_rounds(max(len(t.rounds) for t in trajs), c) if c else [None]:
        batch = (build_batch if layout == "packed" else per_round_batch)(trajs, mask_id, rounds=rounds)
        if batch.input_ids.shape[0] == 0:
            continue
        lp = policy(batch)
        (-(adv[batch.response_index] * lp).sum()).backward()  # one backward per forward, as the trainer does
        lps.append(lp.detach())
        keys.append(batch.response_index * 10_000 + batch.token_index)
    order = torch.argsort(torch.cat(keys))
    grad = torch.cat([p.grad.flatten() for p in policy.parameters()])
    policy.zero_grad()
    return torch.cat(lps)[order], grad


def test_every_c_gives_the_packed_and_per_round_log_probs_and_gradients(sharp, trajs):
    policy = TokenLogProbs(sharp.model)
    mask_id = sharp.spec.mask_token_id
    base_lp, base_grad = _logprobs_and_grad(policy, trajs, mask_id, "packed", None)  # c = R: one forward
    ref_lp, ref_grad = _logprobs_and_grad(policy, trajs, mask_id, "per_round", None)
    assert len(base_lp) == sum(t.target_count for t in trajs)
    assert (base_lp - ref_lp).abs().max() <= 1e-5
    for c in (1, 2, 3):
        lp, grad = _logprobs_and_grad(policy, trajs, mask_id, "packed", c)
        assert len(lp) == len(base_lp)
        assert (lp - base_lp).abs().max() <= 1e-5, c
        assert (lp - ref_lp).abs().max() <= 1e-5, c
        assert (grad - base_grad).norm() / base_grad.norm() <= 1e-5, c
        assert (grad - ref_grad).norm() / ref_grad.norm() <= 1e-5, c


def test_c_changes_the_forward_lengths_as_the_memory_model_says(trajs):
    """c = 1 rows are [clean | one copy]; c = R one row [clean | all copies]: the longest forward shrinks."""
    longest = {
        c: max(build_batch(trajs, 99, rounds=r).input_ids.shape[1] for r in forward_rounds(4, c)) for c in (1, 4)
    }
    assert longest[1] < longest[4]


def test_checkpointing_gives_the_same_gradients(tiny_dir):
    from shared.model.sdar import load_model

    clean = torch.arange(40, 80)
    traj = Trajectory(clean, 7, 33, 4, trajectory_rounds(7, [1 + (i % 4) for i in range(33)], 33, 4))
    batch = build_batch([traj], 259)
    grads = {}
    for ckpt in (False, True):
        policy = TokenLogProbs(load_model(tiny_dir).model, checkpointing=ckpt).train()
        lp = policy(batch)
        (-(lp * torch.linspace(-1, 1, len(lp))).sum()).backward()
        grads[ckpt] = torch.cat([p.grad.flatten() for p in policy.parameters()])
    assert policy.lm.model.gradient_checkpointing
    assert (grads[True] - grads[False]).abs().max() <= 1e-6 * grads[False].abs().max()


def test_checkpointing_recomputes_dropout_with_the_same_masks(tmp_path):
    """With dropout on, the recomputed forward must draw the masks of the first one (RNG restored)."""
    from shared.model.sdar import load_model
    from shared.model.tiny import init_tiny

    model_dir = init_tiny(tmp_path / "dropout", seed=0, attention_dropout=0.5)
    clean = torch.arange(40, 80)
    traj = Trajectory(clean, 7, 33, 4, trajectory_rounds(7, [1 + (i % 4) for i in range(33)], 33, 4))
    batch = build_batch([traj], 259)

    def grad(ckpt: bool, seed: int) -> torch.Tensor:
        policy = TokenLogProbs(load_model(model_dir).model, checkpointing=ckpt).train()
        torch.manual_seed(seed)
        policy(batch).sum().backward()
        return torch.cat([p.grad.flatten() for p in policy.parameters()])

    plain = grad(False, 0)
    assert (plain - grad(False, 1)).abs().max() > 1e-3  # dropout is live: another seed, another gradient
    assert (grad(True, 0) - plain).abs().max() <= 1e-6 * plain.abs().max()


def _trainer(tiny_dir, tmp_path, **kw) -> Learner:
    return Learner(TrainerConfig(model=tiny_dir, output_dir=tmp_path, optim=OptimConfig(lr=1e-4), **kw))


@pytest.fixture(scope="module")
def groups(tiny_dir):
    return fixed_groups(str(tiny_dir))


def _update_grads(trainer: Learner) -> list[torch.Tensor]:
    """Record the summed gradient of every update, just before the optimizer consumes it."""
    grads, step = [], trainer._optimizer_step

    def record() -> float:
        grads.append(torch.cat([p.grad.flatten().clone() for p in trainer.unwrapped.parameters()]))
        return step()

    trainer._optimizer_step = record
    return grads


@pytest.mark.parametrize("norm", ["token", "step"])
def test_trainer_updates_agree_for_c_and_checkpointing(tiny_dir, tmp_path, groups, norm, monkeypatch):
    """Two updates (so pi_prox is recomputed through the same forwards), micro-batches of 2; "per_round" is the
    learner with the oracle's one-row-per-round batches in place of the packed ones."""
    settings = {"base": {}, "c1": {"copies_per_forward": 1}, "c2+ckpt": {"copies_per_forward": 2,
                "gradient_checkpointing": True}, "per_round": {"copies_per_forward": 1}}  # fmt: skip
    grads, losses = {}, {}
    for name, kw in settings.items():
        if name == "per_round":
            monkeypatch.setattr("services.trainer.learner.trainer.build_batch", per_round_batch)
        trainer = _trainer(
            tiny_dir, tmp_path / name, micro_batch_size=2, updates_per_step=2, loss=LossConfig(norm=norm), **kw
        )
        grads[name] = _update_grads(trainer)
        losses[name] = trainer.rl_step(StepBatch.of(*groups))["loss"]
    assert len(grads["base"]) == 2
    for name in settings:
        assert losses[name] == pytest.approx(losses["base"], abs=1e-6), name
        for got, want in zip(grads[name], grads["base"], strict=True):
            assert (got - want).norm() / want.norm() <= 1e-5, name
