"""The decoupled objective inside the trainer: on-policy it is the standard step, off-policy its loss and metrics
are hand-checked, bad rollouts are refused, and two processes report what one does."""

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.trainer.config import OptimConfig, TrainerConfig
from services.trainer.learner.objective import LossConfig, group_advantages
from services.trainer.learner.trainer import Learner
from shared.contracts.wire import StepBatch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "scripts"))
from rl_step import SHIFT, fixed_groups, shifted_behaviour  # noqa: E402

DECOUPLED = LossConfig(objective="decoupled", tis_cap=1.5)
BEHAVIOUR_KEYS = {"logprob_gap_mean", "logprob_gap_max", "behav_kl_k3"}
WEIGHT_KEYS = {"iw_mean", "iw_max", "iw_truncated_frac"}


@pytest.fixture(scope="module")
def groups(tiny_dir):
    """Responses of different lengths and rewards, so that -sum A / T (the on-policy loss) is not 0.

    A response is cut as a stop token would cut it: the rest of its last block stays, as the tail, so every
    trained token keeps the context it was sampled in (and its engine log-prob stays exact)."""
    rollouts, rewards = fixed_groups(str(tiny_dir))
    rewards = [[r + 0.1 * i for i, r in enumerate(g)] for g in rewards]
    rollouts = [[r.model_copy(update={"token_ids": r.token_ids[:k], "step_map": r.step_map[:k],
                                      "tail_ids": r.token_ids[k:] + r.tail_ids, "tail_steps": r.step_map[k:] + r.tail_steps,
                                      "logprobs": r.logprobs[:k]})
                 for r, k in zip(g, (7, 5, 6, 7), strict=True)] for g in rollouts]  # fmt: skip
    return rollouts, rewards


def _trainer(tiny_dir, path, **kw) -> Learner:
    kw.setdefault("optim", OptimConfig(lr=1e-3))
    return Learner(TrainerConfig(model=tiny_dir, output_dir=path, **kw))


def _params(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.unwrapped.lm.named_parameters()}


def test_on_policy_decoupled_step_is_the_standard_step(tiny_dir, tmp_path, groups):
    std = _trainer(tiny_dir, tmp_path / "std").rl_step(StepBatch.of(*groups))
    dec = _trainer(tiny_dir, tmp_path / "dec", loss=DECOUPLED).rl_step(StepBatch.of(*groups))
    # pi_behav is the engine's log-prob, equal to the trainer's within float error, so every weight is ~1
    assert dec["loss"] == pytest.approx(std["loss"], abs=1e-6) and abs(std["loss"]) > 1e-3
    assert dec["grad_norm"] == pytest.approx(std["grad_norm"], rel=1e-5)
    assert dec["logprob_gap_max"] < 1e-5 and dec["behav_kl_k3"] < 1e-10
    assert dec["iw_mean"] == pytest.approx(1.0, abs=1e-5) and dec["iw_max"] < 1 + 1e-5
    assert dec["iw_truncated_frac"] == 0.0
    assert (dec["staleness_mean"], dec["staleness_max"], dec["groups_identical"]) == (0.0, 0, 0)
    # the standard step reports the engine-vs-trainer gap too (its rollouts carry log-probs), but has no weights
    assert BEHAVIOUR_KEYS <= set(std) and not WEIGHT_KEYS & set(std) and std["logprob_gap_max"] < 1e-5


def test_decoupled_refuses_rollouts_without_engine_logprobs(tiny_dir, tmp_path, groups):
    rollouts, rewards = groups
    broken = [list(g) for g in rollouts]
    broken[1][2] = broken[1][2].model_copy(update={"logprobs": None})
    trainer = _trainer(tiny_dir, tmp_path, loss=DECOUPLED)
    before = _params(trainer)
    with pytest.raises(ValueError, match=r"Rollout\.logprobs: .* group 1 sample 2 has none"):
        trainer.rl_step(StepBatch.of(broken, rewards))
    assert all(torch.equal(before[k], v) for k, v in _params(trainer).items()) and trainer.state.step == 0


def _stale_expectations(rollouts, rewards) -> dict[str, float]:
    """By hand: trainer at v2, groups from v0, v1, v2; log pi_prox - log pi_behav = +SHIFT at even positions (raw
    weight e^.5 = 1.648721 > cap 1.5: truncated) and -SHIFT at odd ones (weight e^-.5 = .606531)."""
    lengths = [[len(r.token_ids) for r in g] for g in rollouts]
    even = sum((n + 1) // 2 for g in lengths for n in g)
    total = sum(n for g in lengths for n in g)
    w_even, w_odd = 1.5, math.exp(-SHIFT)
    k3 = lambda d: math.expm1(d) - d  # noqa: E731
    # first update: pi_theta == pi_prox, ratio 1, so loss = -sum_t A_t iw_t / T (token norm)
    adv = group_advantages(torch.tensor(rewards, dtype=torch.float64)).tolist()
    weighted = sum(a * ((n + 1) // 2 * w_even + n // 2 * w_odd) for ga, gl in zip(adv, lengths, strict=True)
                   for a, n in zip(ga, gl, strict=True))  # fmt: skip
    versions = [2 - (0, 1, 2)[g % 3] for g in range(len(rollouts)) for _ in rollouts[g]]
    return {
        "loss": -weighted / total,
        "iw_mean": (even * w_even + (total - even) * w_odd) / total,
        "iw_max": math.exp(SHIFT),
        "iw_truncated_frac": even / total,
        "logprob_gap_mean": SHIFT,
        "logprob_gap_max": SHIFT,
        "behav_kl_k3": (even * k3(SHIFT) + (total - even) * k3(-SHIFT)) / total,
        "staleness_mean": sum(versions) / len(versions),
        "staleness_max": 2,
    }


@pytest.mark.parametrize(("updates", "passes", "micro"), [(1, 1, 4), (2, 2, 1)])
def test_stale_decoupled_step_by_hand(tiny_dir, tmp_path, groups, updates, passes, micro):
    rollouts, rewards = groups
    stale = shifted_behaviour(rollouts)
    trainer = _trainer(tiny_dir, tmp_path, loss=DECOUPLED, updates_per_step=updates, passes=passes,
                       micro_batch_size=micro)  # fmt: skip
    trainer.state.policy_version = 2
    m = trainer.rl_step(StepBatch.of(stale, rewards))
    expected = _stale_expectations(rollouts, rewards)
    assert m["updates"] == updates * passes
    # the behaviour metrics come from pi_prox (fixed for the step): the same however the step is split
    for key in expected.keys() - {"loss"}:
        assert m[key] == pytest.approx(expected[key], abs=1e-5), key
    if updates == 1:  # one update: its loss is the hand-computed one (several updates average other losses)
        assert m["loss"] == pytest.approx(expected["loss"], abs=1e-5)
    assert expected["iw_truncated_frac"] > 0.4 and expected["staleness_mean"] == 1.0 and abs(expected["loss"]) > 1e-2


def test_a_stale_step_of_one_update_equals_the_on_policy_one(tiny_dir, tmp_path, groups):
    # same data, one at the current version, one a version behind: with one update pi_prox is the weights being
    # trained either way (no extra forward), so the same loss and gradient, to the bit
    on = _trainer(tiny_dir, tmp_path / "on", micro_batch_size=2).rl_step(StepBatch.of(*groups))
    behind = _trainer(tiny_dir, tmp_path / "behind", micro_batch_size=2)
    behind.state.policy_version = 1
    m = behind.rl_step(StepBatch.of(*groups))
    assert m["staleness_max"] == 1 and m["clip_frac"] == 0.0
    assert (m["loss"], m["grad_norm"]) == (on["loss"], on["grad_norm"])


def test_identical_groups_are_counted_and_warned(tiny_dir, tmp_path, groups, caplog):
    rollouts, rewards = groups
    copies = [[rollouts[0][0]] * len(rollouts[0]), *rollouts[1:]]
    rewards = [[0.0, 1.0, 0.0, 1.0], *rewards[1:]]  # a speed reward could still tell copies apart
    trainer = _trainer(tiny_dir, tmp_path)
    with caplog.at_level(logging.WARNING, logger="gtpo.trainer"):
        m = trainer.rl_step(StepBatch.of(copies, rewards))
    assert m["groups_identical"] == 1 and m["groups_kept"] == 3
    assert any("1 of 3 groups have all their samples identical" in r.getMessage() for r in caplog.records)


def test_a_rollout_newer_than_the_trainer_is_refused(tiny_dir, tmp_path, groups):
    rollouts, rewards = groups
    ahead = [[r.model_copy(update={"policy_version": 1}) for r in g] for g in rollouts]
    with pytest.raises(ValueError, match="policy_version"):
        _trainer(tiny_dir, tmp_path).rl_step(StepBatch.of(ahead, rewards))


def test_decoupled_two_processes_give_the_same_update_and_metrics_as_one(tiny_dir, tmp_path):
    from test_trainer import _free_port

    script = REPO / "tests" / "scripts" / "rl_step.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    # 11 responses, micro-batch 1: rank 0 recomputes pi_prox for its 6, rank 1 for its 5 (and joins the 6th
    # forward on a response it discards); neither recomputes the other's
    subprocess.run([sys.executable, str(script), str(tiny_dir), str(one), "1", "decoupled"], check=True, env=env,
                   timeout=300)  # fmt: skip
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]  # fmt: skip
    out = subprocess.run([*launch, str(script), str(tiny_dir), str(two), "1", "decoupled"], env=env, timeout=300,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rank 1/2" in out.stdout
    a, b = load_file(one), load_file(two)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    m1, m2 = json.loads(one.with_suffix(".json").read_text()), json.loads(two.with_suffix(".json").read_text())
    keys = BEHAVIOUR_KEYS | WEIGHT_KEYS | {"staleness_mean", "staleness_max", "tokens", "loss"}
    assert keys <= set(m1)
    assert {k: m2[k] for k in keys} == pytest.approx({k: m1[k] for k in keys}, abs=1e-6)
    assert m1["iw_truncated_frac"] > 0.4 and m1["staleness_max"] == 2
