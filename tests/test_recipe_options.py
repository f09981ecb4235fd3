"""What the published recipes need (issue 34, part 2): LightningRL's NLL on correct samples and its prompt filter
by tokens per step, DiRL's zero score for a truncated response, DiPO's exact normalisation. Values by hand."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from services.reward.scoring import score_items
from services.reward.verify import Verdict
from services.trainer.config import LossConfig, OptimConfig, RLConfig, TrainerConfig
from services.trainer.learner.objective import correct_nll, token_weights
from services.trainer.learner.trainer import Learner
from services.trainer.orchestrator.collect import group_tokens_per_step, verdict_of
from shared.contracts.wire import ScoreItem, StepBatch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "scripts"))
from rl_step import fixed_groups  # noqa: E402

# two responses: r0 has rounds 0 (2 targets) and 1 (1 target); r1 has round 0 (1 target)
RESP, ROUND = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 1, 0])
LOSSES = torch.tensor([1.0, 3.0, 5.0, 8.0])
COUNTS = {"n_responses": 2, "n_tokens": 4, "max_len": 3}


# --- norm: dipo against step ----------------------------------------------------------------------------------------


def test_step_is_the_sum_of_round_means_and_dipo_divides_it_by_the_block_size():
    # step: r0 = mean(1, 3) + 5 = 7, r1 = 8; mean over the 2 responses = 7.5
    step = (token_weights(RESP, ROUND, "step", **COUNTS) * LOSSES).sum().item()
    assert step == pytest.approx(7.5)
    # DiPO divides each response by B = 4 whatever its rounds (r0 has 2, r1 has 1): (7 / 4 + 8 / 4) / 2 = 1.875
    dipo = token_weights(RESP, ROUND, "dipo", **COUNTS, block_size=4)
    assert dipo.tolist() == pytest.approx([1 / 16, 1 / 16, 1 / 8, 1 / 8])
    assert (dipo * LOSSES).sum().item() == pytest.approx(1.875)


def test_dipo_needs_the_block_size_and_splits_exactly_over_ranks():
    with pytest.raises(ValueError, match="block_size"):
        token_weights(RESP, ROUND, "dipo", **COUNTS)
    parts = [(token_weights(RESP[s], ROUND[s], "dipo", **COUNTS, block_size=4) * LOSSES[s]).sum() for s in
             (slice(0, 3), slice(3, 4))]  # fmt: skip
    assert (parts[0] + parts[1]).item() == pytest.approx(1.875)


def test_norm_field_names_dipo_and_says_how_step_differs():
    desc = LossConfig.model_fields["norm"].description
    assert LossConfig(norm="dipo").norm == "dipo" and "block size" in desc and "rounds" in desc


# --- the NLL term on correct samples ----------------------------------------------------------------------------------


def test_correct_nll_is_the_mean_nll_over_the_updates_correct_tokens():
    logp = torch.tensor([-1.0, -2.0, -4.0, -0.5], requires_grad=True)
    right = torch.tensor([True, False, True, True])
    # (1 + 4 + .5) / 5: the global count 5 (another rank holds 2 more correct tokens)
    nll = correct_nll(logp, right, 5)
    assert nll.item() == pytest.approx(1.1)
    nll.backward()
    assert logp.grad.tolist() == pytest.approx([-0.2, 0.0, -0.2, -0.2])  # wrong samples get no gradient


def test_correct_nll_without_correct_tokens_is_zero_and_refuses_a_bad_count():
    logp = torch.tensor([-1.0, -2.0])
    assert correct_nll(logp, torch.tensor([False, False]), 0).item() == 0.0
    with pytest.raises(ValueError, match="n_correct_tokens"):
        correct_nll(logp, torch.tensor([True, True]), 1)
    with pytest.raises(ValueError, match="shape"):
        correct_nll(logp, torch.tensor([True]), 1)


@pytest.fixture(scope="module")
def groups(tiny_dir):
    return fixed_groups(str(tiny_dir))


def _trainer(tiny_dir, tmp_path, **kw) -> Learner:
    return Learner(TrainerConfig(model=tiny_dir, output_dir=tmp_path / "run", optim=OptimConfig(lr=1e-3), **kw))


def _params(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.unwrapped.lm.named_parameters()}


def test_trainer_nll_is_the_engines_mean_nll_of_the_correct_responses(tiny_dir, tmp_path, groups):
    rollouts, _ = groups
    same = [[1.0] * len(g) for g in rollouts]  # all advantages 0: only the NLL term moves the weights
    correct = [[True, False, False, True], [False, False, False, False], [False, True, False, False]]
    trainer = _trainer(tiny_dir, tmp_path, loss=LossConfig(nll_coef=0.1))
    with pytest.raises(ValueError, match="nll_coef"):
        trainer.rl_step(StepBatch.of(rollouts, same))
    before = _params(trainer)
    m = trainer.rl_step(StepBatch.of(rollouts, same, correct=correct))
    # on-policy at T = 1 the engine's recorded log-probs are the trainer's: the NLL by hand from them
    right = [r for g, c in zip(rollouts, correct, strict=True) for r, ok in zip(g, c, strict=True) if ok]
    expected = -sum(sum(r.logprobs) for r in right) / sum(len(r.logprobs) for r in right)
    assert m["nll"] == pytest.approx(expected, rel=1e-4) and m["grad_norm"] > 0
    assert any(not torch.equal(before[k], v) for k, v in _params(trainer).items())


def test_trainer_without_nll_leaves_zero_advantage_groups_untouched(tiny_dir, tmp_path, groups):
    rollouts, _ = groups
    trainer = _trainer(tiny_dir, tmp_path)
    before = _params(trainer)
    m = trainer.rl_step(StepBatch.of(rollouts, [[1.0] * len(g) for g in rollouts], correct=[[True] * 4] * 3))
    assert "nll" not in m and m["grad_norm"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in _params(trainer).items())


def test_trainer_dipo_gradient_is_the_step_gradient_over_the_block_size(tiny_dir, tmp_path, groups):
    # ratio 1 on the first pass: each loss is linear in the weights, so dipo's gradient is step's / B exactly
    norms = {}
    for norm in ("step", "dipo"):
        norms[norm] = _trainer(tiny_dir, tmp_path / norm, loss=LossConfig(norm=norm)).rl_step(StepBatch.of(*groups))["grad_norm"]
    b = groups[0][0][0].params.block_size
    assert b > 1 and norms["step"] > 1e-4 and norms["dipo"] == pytest.approx(norms["step"] / b, rel=1e-4)


def test_rl_config_nll_needs_the_accuracy_reward(tmp_path):
    with pytest.raises(ValueError, match="nll_coef"):
        RLConfig(model=tmp_path, output_dir=tmp_path, data="x.jsonl", loss=LossConfig(nll_coef=0.1),
                 reward_weights={"speed_gated": 1.0})  # fmt: skip


# --- DiRL: a length-truncated response scores 0 -----------------------------------------------------------------------


class _Verifier:
    def verify_many(self, pairs, deadline=None):
        return [Verdict("ok", a == b) for a, b in pairs]


def _items():
    # 8 tokens in 2 steps of block 4: the speed reward's fastest (correct: 1.0)
    common = {"response": r"\boxed{2}", "reference": "2", "token_count": 8, "steps": 2, "block_size": 4,
              "max_new_tokens": 8}  # fmt: skip
    return [ScoreItem(id="cut", finish_reason="length", **common), ScoreItem(id="done", finish_reason="stop", **common)]


def test_zero_truncated_scores_every_component_of_a_truncated_response_zero():
    weights = {"accuracy": 1.0, "speed": 0.5}
    plain = {r.id: r for r in score_items(_items(), weights, _Verifier())}
    # accuracy already scores a truncated answer 0; speed does not look at truncation: 0.5 * 1.0
    assert plain["cut"].components == {"accuracy": 0.0, "speed": 1.0} and plain["cut"].total == pytest.approx(0.5)
    zeroed = {r.id: r for r in score_items(_items(), weights, _Verifier(), zero_truncated=True)}
    assert zeroed["cut"].components == {"accuracy": 0.0, "speed": 0.0} and zeroed["cut"].total == 0.0
    assert zeroed["cut"].status == "ok"  # a real 0, trained on, not an error
    assert zeroed["done"].total == pytest.approx(1.0 + 0.5 * 1.0)  # a finished response is untouched


def test_zero_truncated_reaches_the_reward_workers_gtpo_up_starts(tmp_path):
    from services.reward.settings import RewardSettings
    from shared.config.loader import load_config

    cfg = RLConfig(model=tmp_path, output_dir=tmp_path, data="x.jsonl", zero_truncated=True)
    arg = f"zero_truncated={cfg.zero_truncated}"  # what services/stack.py passes
    assert load_config(RewardSettings, None, [arg], environ={}).zero_truncated is True
    assert "zero_truncated={cfg.zero_truncated}" in (REPO / "services" / "stack.py").read_text()


# --- LightningRL: prompt filter by tokens per step --------------------------------------------------------------------


def _scored(tpfs, total=(1.0, 0.0)):
    """Samples whose tokens per step are `tpfs` (8 tokens each), rewards alternating `total`."""
    out = []
    for i, tpf in enumerate(tpfs):
        steps = int(8 / tpf)
        step_map = [1 + j * steps // 8 for j in range(8)]
        out.append(SimpleNamespace(rollout=SimpleNamespace(token_ids=[0] * 8, step_map=step_map),
                                   score=SimpleNamespace(status="ok", total=total[i % 2])))  # fmt: skip
    return out


def test_group_tokens_per_step_is_the_mean_over_samples():
    assert group_tokens_per_step(_scored([4.0, 2.0, 1.0, 1.0])) == pytest.approx(2.0)  # (4 + 2 + 1 + 1) / 4


def test_tpf_window_drops_groups_outside_it():
    group = _scored([4.0, 2.0, 1.0, 1.0])  # mean 2.0
    assert verdict_of(group, True) == "kept"
    assert verdict_of(group, True, tpf_window=(1.5, 3.0)) == "kept"
    assert verdict_of(group, True, tpf_window=(2.5, 4.0)) == "tpf_filtered"  # too slow for the window
    assert verdict_of(group, True, tpf_window=(1.0, 1.9)) == "tpf_filtered"  # too fast
    assert verdict_of(group, True, tpf_window=(2.0, 2.0)) == "kept"  # the bounds are inclusive


def test_prompt_filter_tpf_must_be_a_window(tmp_path):
    ok = RLConfig(model=tmp_path, output_dir=tmp_path, data="x.jsonl", prompt_filter_tpf=[1.5, 3.0])
    assert ok.prompt_filter_tpf == (1.5, 3.0)
    for bad in ([3.0, 1.5], [0.0, 2.0]):
        with pytest.raises(ValueError, match="prompt_filter_tpf"):
            RLConfig(model=tmp_path, output_dir=tmp_path, data="x.jsonl", prompt_filter_tpf=bad)
