"""Speed methods: per-component normalisation (hand-checked values, its dynamic-sampling rule, the trainer's use of
it), the gated speed reward (pure and through the reward service's ASGI app), and every `gtpo demo --speed-method`
arm's reward + advantage path for one step: real scoring, the collector's verdict, the trainer's step, against an
independent computation of the advantages."""

import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from services.demo.pipeline import SPEED_METHODS, DemoConfig, rl_config, speed_arm
from services.reward.app import create_app
from services.reward.rewards import NEEDS_VERDICT, REWARDS, speed_gated
from services.reward.scoring import item_from_rollout, score_items
from services.reward.settings import RewardSettings
from services.reward.verify import VerifierPool
from services.trainer.config import LossConfig, OptimConfig, TrainerConfig
from services.trainer.learner.objective import (
    component_advantages,
    component_table,
    filter_component_groups,
    filter_groups,
    floor_correct,
    group_advantages,
)
from services.trainer.learner.trainer import Learner
from services.trainer.orchestrator.collect import verdict_of
from shared.contracts.wire import SamplingParams, ScoredMessage, ScoreItem, StepBatch, TaskMessage

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from rl_step import fixed_groups

# --------------------------------------------------------------------------- component_advantages

ACC = [1.0, 1.0, 0.0, 0.0]
SPEED = [1.0, 0.5, 0.0, 0.5]


def _comp(*columns):
    """(1, n, C) from C columns of n values."""
    return torch.tensor([list(zip(*columns, strict=True))], dtype=torch.float64)


def test_per_component_zscore_by_hand():
    # accuracy: mean .5, unbiased std sqrt(1/3): z = +-sqrt(3)/2; speed: centred [.5, 0, -.5, 0], std sqrt(1/6)
    za, zs = math.sqrt(3) / 2, 0.5 / math.sqrt(1 / 6)
    expected = [za + 0.5 * zs, za, -za - 0.5 * zs, -za]
    adv = component_advantages(_comp(ACC, SPEED), torch.tensor([1.0, 0.5], dtype=torch.float64))
    assert adv.shape == (1, 4) and adv[0].tolist() == pytest.approx(expected, rel=1e-5)
    # the total's z-score mixes the scales instead: it is not the same advantage
    total = group_advantages(torch.tensor([[a + 0.5 * s for a, s in zip(ACC, SPEED, strict=True)]]))
    assert total[0].tolist() != pytest.approx(expected, rel=1e-3)


def test_per_component_mean_centred_by_hand():
    adv = component_advantages(_comp(ACC, SPEED), torch.tensor([1.0, 2.0]), "mean")
    assert adv[0].tolist() == pytest.approx([0.5 + 1.0, 0.5, -0.5 - 1.0, -0.5])


def test_a_constant_component_contributes_exactly_zero():
    # 0.1 three times: the mean is 0.1 up to rounding, and (x - mean) / eps would be ~1e-11, not 0
    adv = component_advantages(_comp([0.1, 0.1, 0.1], [0.0, 1.0, 0.5]), torch.tensor([5.0, 1.0], dtype=torch.float64))
    speed_only = group_advantages(torch.tensor([[0.0, 1.0, 0.5]], dtype=torch.float64))
    assert torch.equal(adv, speed_only)
    assert torch.equal(component_advantages(_comp([0.1] * 3, [0.3] * 3), torch.ones(2)), torch.zeros(1, 3))
    assert torch.equal(component_advantages(_comp([1.0], [0.0]), torch.ones(2)), torch.zeros(1, 1))  # n = 1
    with pytest.raises(ValueError, match=r"\(G, n, C\)"):
        component_advantages(torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="weights"):
        component_advantages(torch.zeros(1, 2, 3), torch.ones(2))


def test_floor_correct_applies_to_the_summed_per_component_advantage():
    # all correct: only speed varies, so the slow correct answers would be pushed down; the floor keeps them at 0
    acc, speed = [1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]
    adv = component_advantages(_comp(acc, speed), torch.tensor([1.0, 1.0]), "mean")
    assert adv[0].tolist() == pytest.approx([0.25 + 0.5, 0.25 - 0.5, 0.25 - 0.5, -0.75 + 0.5])
    floored = floor_correct(adv, torch.tensor([[True, True, True, False]]))
    assert floored[0].tolist() == pytest.approx([0.75, 0.0, 0.0, -0.25])


# --------------------------------------------------------------------------- dynamic sampling under per_component


def test_a_group_is_dropped_only_when_no_weighted_component_varies():
    same_total = [[1.0, 0.0], [0.0, 0.5]]  # weights (1, 2): both totals are 1, but the components differ
    varies_unweighted = [[1.0, 0.2], [1.0, 0.7]]
    all_same = [[0.0, 0.5], [0.0, 0.5]]
    keep, stats = filter_component_groups([same_total, varies_unweighted, all_same, [[1.0, 1.0]]], [1.0, 2.0])
    assert keep == [True, True, False, False]
    assert (stats.kept, stats.dropped_all_same, stats.dropped_too_small, stats.same_values) == (2, 1, 1, [1.0])
    assert filter_groups([[1.0, 1.0]])[0] == [False]  # the same `same_total` group, by its totals
    assert filter_component_groups([varies_unweighted], [1.0, 0.0])[0] == [False]  # weight 0: no signal
    # the rule follows the advantages: kept groups here get some, dropped ones all 0
    for group, w in ((same_total, [1.0, 2.0]), (varies_unweighted, [1.0, 0.0]), (all_same, [1.0, 1.0])):
        adv = component_advantages(torch.tensor([group]), torch.tensor(w))
        assert bool(adv.abs().max() > 1e-3) == filter_component_groups([group], w)[0][0]
    with pytest.raises(ValueError, match="non-finite"):
        filter_component_groups([[[math.nan, 0.0], [0.0, 0.0]]], [1.0, 1.0])
    with pytest.raises(ValueError, match="2 components per response"):
        filter_component_groups([[[1.0], [0.0]]], [1.0, 1.0])


def test_component_table_orders_by_name_and_checks_the_totals():
    comps = [[{"speed": 0.5, "accuracy": 1.0}, {"accuracy": 0.0, "speed": -0.5}]]
    names, table = component_table([[1.25, -0.25]], comps, {"speed": 0.5, "accuracy": 1.0})
    assert names == ["accuracy", "speed"] and table == [[[1.0, 0.5], [0.0, -0.5]]]
    with pytest.raises(ValueError, match="other weights"):
        component_table([[1.5, -0.5]], comps, {"speed": 0.5, "accuracy": 1.0})  # scored with speed weight 1
    with pytest.raises(ValueError, match="reward_weights name"):
        component_table([[1.0, 0.0]], [[{"accuracy": 1.0}, {"accuracy": 0.0}]], {"speed": 0.5, "accuracy": 1.0})
    with pytest.raises(ValueError, match="grouped like the rewards"):
        component_table([[1.25, -0.25]], [comps[0][:1]], {"speed": 0.5, "accuracy": 1.0})
    with pytest.raises(ValueError, match="per_component"):
        component_table([[1.0]], None, {"accuracy": 1.0})


def test_reward_norm_defaults_to_total_and_names_the_field():
    assert LossConfig().reward_norm == "total"
    with pytest.raises(ValueError, match="reward_norm"):
        LossConfig(reward_norm="per_reward")


# --------------------------------------------------------------------------- speed_gated


def _item(**kw):
    return ScoreItem(**{"id": "a", "response": r"\boxed{2}", "finish_reason": "stop", **kw})


def test_speed_gated_values():
    slow = _item(token_count=8, steps=8, block_size=4)  # u = 0
    mid = _item(token_count=5, steps=2, block_size=4)  # u = T / 2: the cosine's midpoint
    fast = _item(token_count=8, steps=2, block_size=4)  # u = T
    assert [speed_gated(x, True) for x in (slow, mid, fast)] == pytest.approx([0.0, 0.5, 1.0])
    assert [speed_gated(x, False) for x in (slow, mid, fast)] == [0.0, 0.0, 0.0]  # wrong: 0 however fast
    # it is speed's correct branch rescaled to [0, 1]
    assert speed_gated(mid, True) == pytest.approx(2 * (REWARDS["speed"](mid, True) - 0.5))
    assert speed_gated(_item(token_count=8, steps=2, block_size=4, finish_reason="length"), True) == 0.0
    with pytest.raises(ValueError, match="verdict"):
        speed_gated(fast, None)
    with pytest.raises(ValueError, match="steps >= 1"):
        speed_gated(_item(token_count=3, steps=0), False)  # a wrong answer's bad step count is an error too
    assert "speed_gated" in NEEDS_VERDICT and REWARDS["speed_gated"] is speed_gated


def test_speed_gated_through_the_reward_service():
    items = [
        {"id": "right_fast", "response": r"\boxed{2}", "reference": "2", "token_count": 8, "steps": 2},
        {"id": "right_slow", "response": r"\boxed{2}", "reference": "2", "token_count": 8, "steps": 8},
        {"id": "wrong_fast", "response": r"\boxed{3}", "reference": "2", "token_count": 8, "steps": 2},
        {"id": "no_box", "response": "2", "reference": "2", "token_count": 8, "steps": 2},
    ]
    for item in items:
        item.update(block_size=4, finish_reason="stop", max_new_tokens=16)
    settings = RewardSettings(workers=1, timeout_s=5.0, max_items=8, max_body_bytes=1 << 20)
    with TestClient(create_app(settings)) as client:
        both = client.post("/v1/score", json={"items": items, "weights": {"accuracy": 1.0, "speed_gated": 0.5}})
        alone = client.post("/v1/score", json={"items": items, "weights": {"speed_gated": 1.0}})
    assert both.status_code == alone.status_code == 200
    out = {r["id"]: r for r in both.json()["results"]}
    assert out["right_fast"]["components"] == {"accuracy": 1.0, "speed_gated": 1.0}
    assert out["right_fast"]["total"] == pytest.approx(1.5)
    assert out["right_slow"]["components"] == {"accuracy": 1.0, "speed_gated": 0.0}
    for wrong in ("wrong_fast", "no_box"):
        assert out[wrong]["components"] == {"accuracy": 0.0, "speed_gated": 0.0} and out[wrong]["status"] == "ok"
    # without accuracy among the weights the service still checks the answers: the verdict gates the speed
    assert [r["total"] for r in alone.json()["results"]] == pytest.approx([1.0, 0.0, 0.0, 0.0])


# --------------------------------------------------------------------------- every demo method, one step

FAST, MID, SLOW = 4, 2, 1
"""Tokens unmasked per denoising step within a block."""


def _step_map(prompt_len: int, n: int, per_step: int, block: int = 4) -> list[int]:
    """A valid step map: within each block (absolute positions), `per_step` tokens per step; steps keep rising."""
    steps, step, last_block, in_block = [], 0, None, 0
    for i in range(n):
        b = (prompt_len + i) // block
        if b != last_block:
            last_block, in_block = b, 0
        if in_block % per_step == 0:
            step += 1
        steps.append(step)
        in_block += 1
    return steps


SCENARIO = (
    ((True, FAST), (True, SLOW), (False, FAST), (False, SLOW)),  # mixed
    ((True, FAST), (True, SLOW), (True, MID), (True, SLOW)),  # all right, speeds differ
    ((False, FAST), (False, SLOW), (False, MID), (False, SLOW)),  # all wrong, speeds differ
)
KEPT = {"spread": [0], "dirl": [0, 1, 2], "dirl_floor": [0, 1, 2], "gated": [0, 1], "per_component": [0, 1, 2],
        "gated_pc": [0, 1], "gated_floor": [0, 1]}  # fmt: skip
"""The groups each method trains: a gated reward gives an all-wrong group nothing to tell apart."""


@pytest.fixture(scope="module")
def scenario(tiny_dir):
    """fixed_groups' rollouts made right or wrong, fast or slow (their texts and step maps)."""
    groups, _ = fixed_groups(str(tiny_dir))
    return [[r.model_copy(update={"text": r"\boxed{2}" if right else r"\boxed{3}", "finish_reason": "stop",
                                  "step_map": _step_map(len(r.prompt_ids), len(r.token_ids), per_step)})
             for r, (right, per_step) in zip(group, spec, strict=True)]
            for group, spec in zip(groups, SCENARIO, strict=True)]  # fmt: skip


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(workers=1, timeout_s=5.0) as p:
        yield p


def _zscore(xs):
    if max(xs) - min(xs) <= 1e-9:
        return [0.0] * len(xs)
    m, sd = statistics.fmean(xs), statistics.stdev(xs)
    return [(x - m) / (sd + 1e-6) for x in xs]


def _expected_advantages(comps, weights, loss):
    """The advantages of one group by the definitions, in plain Python (independent of objective.py)."""
    names = sorted(weights)
    if loss.reward_norm == "per_component":
        cols = [_zscore([c[n] for c in comps]) for n in names]
        adv = [sum(weights[n] * col[i] for n, col in zip(names, cols, strict=True)) for i in range(len(comps))]
    else:
        adv = _zscore([math.fsum(weights[n] * c[n] for n in names) for c in comps])
    if loss.floor_correct:
        adv = [max(a, 0.0) if c["accuracy"] >= 1.0 else a for a, c in zip(adv, comps, strict=True)]
    return adv


@pytest.mark.parametrize("method", list(SPEED_METHODS))
def test_each_demo_method_scores_filters_and_trains_one_step(method, scenario, pool, tiny_dir, tmp_path):
    demo = DemoConfig(speed=True, speed_method=method)
    arm = speed_arm(demo, method, tmp_path)
    train = tmp_path / "train.json"
    train.write_text("[]")
    rl = rl_config(demo, tiny_dir, train, arm)  # the demo's own config of this arm
    assert rl.rollout.threshold_spread == demo.threshold_spread > 0
    scored = []
    for g, group in enumerate(scenario):
        results = score_items([item_from_rollout(f"{g}:{i}", r, "2") for i, r in enumerate(group)],
                              rl.reward_weights, pool)  # fmt: skip
        scored.append([ScoredMessage(task=TaskMessage(task_id=f"r:0:{g}:{i}", run_id="r", train_by=0, prompt_index=g,
                                                      sample_index=i, group_size=4, prompt_ids=[1],
                                                      params=SamplingParams(), policy_version=0), rollout=r, score=s)
                       for i, (r, s) in enumerate(zip(group, results, strict=True))])  # fmt: skip
    norm = rl.loss.reward_norm
    weights = rl.reward_weights if norm == "per_component" else None
    kept = [g for g, msgs in enumerate(scored) if verdict_of(msgs, rl.dynamic_sampling, weights) == "kept"]
    assert kept == KEPT[method]

    batch = [scored[g] for g in kept]
    trainer = Learner(TrainerConfig(model=tiny_dir, output_dir=tmp_path / "run", loss=rl.loss,
                                        optim=OptimConfig(lr=1e-4)))  # fmt: skip
    m = trainer.rl_step(StepBatch.of(
        [[x.rollout for x in msgs] for msgs in batch],
        [[x.score.total for x in msgs] for msgs in batch],
        correct=[[x.score.components["accuracy"] >= 1.0 for x in msgs] for msgs in batch],
        components=[[x.score.components for x in msgs] for msgs in batch],
        reward_weights=rl.reward_weights,
    ))
    # on-policy first pass, token normalisation: loss = -sum_t A_t / T, every response 7 target tokens long
    adv = [a for msgs in batch for a in _expected_advantages([x.score.components for x in msgs], rl.reward_weights,
                                                             rl.loss)]  # fmt: skip
    assert any(abs(a) > 1e-3 for a in adv)
    assert m["groups_kept"] == len(batch) and m["loss"] == pytest.approx(-sum(adv) / len(adv), abs=1e-6)
