"""TraceRL's value model: GAE over denoising steps by hand, the critic's first step, exact resume, memory plan."""

import sys
from pathlib import Path

import pytest
import torch

from services.trainer.config import OptimConfig, TrainerConfig, ValueConfig
from services.trainer.learner.memory_plan import FP32, MemorySettings, ModelShape, plan
from services.trainer.learner.trainer import Learner
from services.trainer.learner.value import Critic, gae, step_indices, token_variance
from shared.contracts.wire import StepBatch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "scripts"))
from rl_step import fixed_groups  # noqa: E402


@pytest.fixture(scope="module")
def groups(tiny_dir):
    return fixed_groups(str(tiny_dir), prompts=2, n=3)


def test_step_indices_rank_distinct_steps():
    assert step_indices([5, 2, 5, 9, 2]).tolist() == [1, 0, 1, 2, 0]


def test_gae_gamma_lambda_one_is_reward_minus_value():
    v = torch.tensor([0.2, -0.4, 0.6, 0.1])
    adv, ret = gae(v, torch.tensor([0, 1, 1, 2]), 0.7)
    assert adv.tolist() == pytest.approx([0.5, 1.1, 0.1, 0.6]) and ret.tolist() == pytest.approx([0.7] * 4)


def test_gae_by_hand_with_discount():
    # steps [0, 1, 1], V = [.2, .4, .6], r = 1, gamma = lam = .5: V*_1 = .5, A*_1 = 1 - .5 = .5,
    # token 0: 0 - .2 + .5 * .5 + .25 * .5 = .175 (return .5 * 1); tokens of step 1: 1 - V_j (return 1)
    adv, ret = gae(torch.tensor([0.2, 0.4, 0.6]), torch.tensor([0, 1, 1]), 1.0, gamma=0.5, lam=0.5)
    assert adv.tolist() == pytest.approx([0.175, 0.6, 0.4]) and ret.tolist() == pytest.approx([0.5, 1.0, 1.0])
    # lam = 0: one-step TD at the step level, token 0: 0 - .2 + .5 * .5 = .05
    adv0, _ = gae(torch.tensor([0.2, 0.4, 0.6]), torch.tensor([0, 1, 1]), 1.0, gamma=0.5, lam=0.0)
    assert adv0.tolist() == pytest.approx([0.05, 0.6, 0.4])


def test_token_variance_is_the_population_variance():
    assert token_variance([torch.tensor([1.0, 1.0]), torch.tensor([-1.0, -1.0])]) == pytest.approx(1.0)


def test_critic_record_round_trips_bit_for_bit():
    a = Critic(8, ValueConfig(lr=0.1), "cpu")
    h = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        a.optimizer.zero_grad()
        (a.head(h) - 1).pow(2).sum().backward()
        a.optimizer.step()
    b = Critic(8, ValueConfig(lr=0.1), "cpu")
    b.load(a.record())
    assert torch.equal(a.head.proj.weight, b.head.proj.weight)
    sa, sb = a.optimizer.state_dict()["state"][0], b.optimizer.state_dict()["state"][0]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _trainer(tiny_dir, out, value=True) -> Learner:
    cfg = TrainerConfig(model=tiny_dir, output_dir=out, optim=OptimConfig(lr=1e-3),
                        value=ValueConfig(lr=1e-2) if value else None)  # fmt: skip
    return Learner(cfg)


def test_first_step_with_a_zero_critic_is_the_group_baseline_then_the_critic_learns(tiny_dir, tmp_path, groups):
    plain = _trainer(tiny_dir, tmp_path / "plain", value=False).rl_step(StepBatch.of(*groups))
    trainer = _trainer(tiny_dir, tmp_path / "value")
    m = trainer.rl_step(StepBatch.of(*groups))
    # V = 0 (zero head), gamma = lam = 1: A_j = the group advantage, the same loss and gradient as without it
    assert m["loss"] == pytest.approx(plain["loss"], abs=1e-6) and m["grad_norm"] == pytest.approx(plain["grad_norm"])
    assert m["adv_var"] == pytest.approx(m["adv_var_group"]) == pytest.approx(plain["adv_var"])
    assert m["value_loss"] > 0 and m["value_mean"] == 0.0
    assert trainer.critic.head.proj.weight.abs().sum() > 0  # its own update, on its own learning rate
    m2 = trainer.rl_step(StepBatch.of(*groups))
    assert m2["value_mean"] != 0.0 and m2["adv_var"] != pytest.approx(m2["adv_var_group"])


def test_resume_with_a_critic_is_bit_for_bit(tiny_dir, tmp_path, groups):
    a = _trainer(tiny_dir, tmp_path / "run")
    a.rl_step(StepBatch.of(*groups))
    a.save()
    ma = a.rl_step(StepBatch.of(*groups))
    b = _trainer(tiny_dir, tmp_path / "run")
    assert b.resume()
    mb = b.rl_step(StepBatch.of(*groups))
    assert torch.equal(a.critic.head.proj.weight, b.critic.head.proj.weight)
    sa, sb = a.critic.optimizer.state_dict()["state"][0], b.critic.optimizer.state_dict()["state"][0]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    pa, pb = dict(a.unwrapped.lm.named_parameters()), dict(b.unwrapped.lm.named_parameters())
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert ma["value_loss"] == mb["value_loss"] and ma["adv_var"] == mb["adv_var"]


def test_value_model_needs_a_trajectory_estimator(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="denoising steps"):
        Learner(TrainerConfig(model=tiny_dir, output_dir=tmp_path, value=ValueConfig(),
                                  loss={"estimator": "random_mask"}))  # fmt: skip


def test_plan_memory_counts_the_value_head():
    shape = ModelShape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=100)
    base, with_head = plan(shape, MemorySettings()), plan(shape, MemorySettings(value_head=True))
    assert with_head.weights - base.weights == FP32 * 64 and with_head.optimizer - base.optimizer == 2 * FP32 * 64
    assert with_head.peak - base.peak == 4 * FP32 * 64  # weight, gradient, two Adam states
