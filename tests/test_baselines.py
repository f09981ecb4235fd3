"""The baseline log-prob estimators (random-mask d1, coupled DiffuCoder): their masks, estimates, loss and gradient by
hand, and the trainer's gradient against a naive per-copy computation with the bare LM."""

import math
import sys
from pathlib import Path

import pytest
import torch

from services.trainer.config import OptimConfig, TrainerConfig
from services.trainer.learner.baselines import (
    EstimatorTrajectory,
    check_estimator,
    combine_targets,
    coupled_trajectory,
    random_mask_trajectory,
    target_weights,
)
from services.trainer.learner.objective import LossConfig, group_advantages, gtpo_loss
from services.trainer.learner.trainer import Learner, step_generator
from services.trainer.learner.trajectory import (
    TrainBatch,
    Trajectory,
    build_batch,
    rollout_trajectory,
    trajectory_rounds,
)
from shared.contracts.wire import StepBatch
from shared.model.masks import to_additive
from shared.model.sdar import load_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "scripts"))
from oracles.per_round import per_round_layout  # noqa: E402
from rl_step import fixed_groups  # noqa: E402

MASK = 99


def _traj() -> Trajectory:
    # prompt 3 tokens, block 2: blocks [0,1] [2,3] [4,5]; response = positions 3, 4; tail = position 5
    clean = torch.tensor([10, 11, 12, 20, 21, 22])
    rounds = trajectory_rounds(3, [1, 2, 2], 2, 2)
    return Trajectory(clean, 3, 2, 2, rounds)


def test_random_mask_masks_every_generated_position_and_trains_the_response_once():
    tr = random_mask_trajectory(_traj(), torch.Generator().manual_seed(0), 0.0, MASK)
    assert len(tr.rounds) == 1 and tr.round_weights == [1.0] and tr.target_count == 2
    assert tr.rounds[0].masked.tolist() == [False, False, False, True, True, True]  # tail masked too
    assert tr.rounds[0].targets.tolist() == [False, False, False, True, True, False]
    assert tr.rounds[0].blocks.tolist() == [1, 2]
    assert tr.clean_ids.tolist() == [10, 11, 12, 20, 21, 22]  # prompt_mask 0: prompt intact
    hidden = random_mask_trajectory(_traj(), torch.Generator().manual_seed(0), 0.999999, MASK)
    assert hidden.clean_ids.tolist() == [MASK, MASK, MASK, 20, 21, 22]  # only the prompt is ever hidden


def test_random_mask_prompt_rate_is_the_configured_one():
    base = Trajectory(torch.arange(4000).clamp(max=50), 3990, 10, 2, trajectory_rounds(3990, [1] * 10, 10, 2))
    tr = random_mask_trajectory(base, torch.Generator().manual_seed(1), 0.15, MASK)
    rate = float((tr.clean_ids[:3990] == MASK).float().mean())
    assert abs(rate - 0.15) < 0.02  # 3990 Bernoulli(0.15): sd 0.006


def test_coupled_masks_are_complementary_with_the_paper_weights():
    tr = coupled_trajectory(_traj(), torch.Generator().manual_seed(3), t=0.25)
    full, m, comp = (r.masked for r in tr.rounds)
    generated = torch.tensor([False, False, False, True, True, True])
    assert torch.equal(full, generated) and torch.equal(m | comp, generated) and not bool((m & comp).any())
    assert tr.round_weights == [0.5, 0.5 / 0.25, 0.5 / 0.75]
    # each response token is trained in the full copy and in exactly one of the pair
    per_token = torch.stack([r.targets for r in tr.rounds]).sum(0)
    assert per_token.tolist() == [0, 0, 0, 2, 2, 0] and tr.target_count == 2


def test_coupled_drawn_ratio_is_in_diffucoders_range():
    for seed in range(20):
        tr = coupled_trajectory(_traj(), torch.Generator().manual_seed(seed))
        t = 0.5 / tr.round_weights[1] if len(tr.rounds) == 3 else None
        assert t is None or 0.2 <= t <= 0.8


def _batch(resp, rnd, tok) -> TrainBatch:
    t = len(resp)
    z = torch.zeros(t, dtype=torch.long)
    return TrainBatch(torch.zeros(1, 8, dtype=torch.long), z[None], z[None], torch.ones(1, 8, dtype=torch.bool),
                      torch.arange(t), torch.arange(t), torch.tensor(resp), torch.tensor(rnd), torch.tensor(tok), 2,
                      torch.ones(t), z, torch.ones(t))  # fmt: skip


def test_combine_targets_by_hand_values_and_gradient():
    # response 0 (coupled, t = 0.4): token 0 in copies 0 and 1, token 1 in copies 0 and 2; response 1 exact
    b = _batch([0, 0, 0, 0, 1], [0, 0, 1, 2, 0], [0, 1, 0, 1, 0])
    w = torch.tensor([0.5, 0.5, 1.25, 0.5 / 0.6, 1.0], dtype=torch.float64)
    logp = torch.tensor([-1.0, -2.0, -0.4, -0.6, -3.0], requires_grad=True)
    est, red = combine_targets(logp, b, w)
    assert est.tolist() == pytest.approx([0.5 * -1 + 1.25 * -0.4, 0.5 * -2 + (0.5 / 0.6) * -0.6, -3.0])
    assert red.response_index.tolist() == [0, 0, 1] and red.token_index.tolist() == [0, 1, 0]
    assert red.round_index.tolist() == [0, 0, 0]
    est.sum().backward()
    assert logp.grad.tolist() == pytest.approx(w.tolist())


def test_target_weights_read_each_trajectorys_rounds():
    co = coupled_trajectory(_traj(), torch.Generator().manual_seed(3), t=0.25)
    batch = build_batch([_traj(), co], MASK)
    w = target_weights([_traj(), co], batch)
    exact = batch.response_index == 0
    assert w[exact].tolist() == [1.0] * int(exact.sum())
    expect = torch.tensor(co.round_weights, dtype=torch.float64)[batch.round_index[~exact]]
    assert torch.equal(w[~exact], expect)
    assert target_weights([_traj()], build_batch([_traj()], MASK)) is None  # exact only: nothing to combine


def test_coupled_loss_and_gradient_by_hand():
    # one token, t = 0.5: est = 0.5 * l_full + 1 * l_m; pi_prox's estimate -2.6, A = 1, clip [0.8, 1.28]
    b = _batch([0, 0], [0, 1], [0, 0])
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    est, _ = combine_targets(lp, b, torch.tensor([0.5, 1.0], dtype=torch.float64))
    cfg = LossConfig()
    loss, _ = gtpo_loss(est, torch.tensor([-2.6]), torch.tensor([1.0]), torch.tensor([1.0]), cfg)
    ratio = math.exp(-2.5 + 2.6)  # 1.105: inside the clip range, the unclipped branch
    assert float(loss.detach()) == pytest.approx(-ratio)
    loss.backward()
    assert lp.grad.tolist() == pytest.approx([-ratio * 0.5, -ratio * 1.0])
    # beyond 1 + eps_high with A > 0 the clipped branch is flat: no gradient
    lp2 = torch.tensor([-1.0, -2.0], requires_grad=True)
    est2, _ = combine_targets(lp2, b, torch.tensor([0.5, 1.0], dtype=torch.float64))
    loss2, m = gtpo_loss(est2, torch.tensor([-3.0]), torch.tensor([1.0]), torch.tensor([1.0]), cfg)
    loss2.backward()
    assert float(loss2.detach()) == pytest.approx(-1.28) and m["clip_frac"] == 1.0 and lp2.grad.abs().sum() == 0


def test_check_estimator_refuses_what_it_cannot_honour():
    with pytest.raises(ValueError, match="shrink >= 2"):
        check_estimator("tracerl_shrink", shrink=1, copies_per_forward=None, decoupled=False)
    with pytest.raises(ValueError, match="decoupled"):
        check_estimator("random_mask", shrink=1, copies_per_forward=None, decoupled=True)
    with pytest.raises(ValueError, match="copies_per_forward"):
        check_estimator("coupled", shrink=1, copies_per_forward=1, decoupled=False)
    check_estimator("tracerl_shrink", shrink=2, copies_per_forward=1, decoupled=True)


def _naive_estimates(lm, traj: EstimatorTrajectory, block: int, mask_id: int) -> torch.Tensor:
    """(response_len,) the estimator's per-token estimate, one bare LM forward per copy (no build_batch)."""
    est = torch.zeros(traj.response_len)
    for rnd, w in zip(traj.rounds, traj.round_weights, strict=True):
        noisy = torch.where(rnd.masked, torch.full_like(traj.clean_ids, mask_id), traj.clean_ids)
        lay = per_round_layout(traj.clean_ids, noisy, traj.prompt_len, block)
        hidden = lm.model(input_ids=lay.input_ids[None], position_ids=lay.position_ids[None],
                          attention_mask=to_additive(lay.bool_mask(block)[None])).last_hidden_state[0]  # fmt: skip
        logp = torch.log_softmax(lm.lm_head(hidden).float(), -1)
        for idx in ((lay.copy_ids == 1) & rnd.targets[lay.position_ids]).nonzero().squeeze(1).tolist():
            pos = int(lay.position_ids[idx])
            est = est.index_add(0, torch.tensor([pos - traj.prompt_len]), w * logp[idx, traj.clean_ids[pos]][None])
    return est


@pytest.mark.parametrize("estimator", ["random_mask", "coupled"])
def test_trainer_gradient_matches_a_naive_per_copy_computation(tiny_dir, tmp_path, estimator):
    rollouts, rewards = fixed_groups(str(tiny_dir), prompts=2, n=3)
    loss_cfg = LossConfig(estimator=estimator, prompt_mask=0.3)
    trainer = Learner(TrainerConfig(model=tiny_dir, output_dir=tmp_path / "run", loss=loss_cfg,
                                        optim=OptimConfig(lr=1e-3, max_grad_norm=None)))  # fmt: skip
    grads = {}
    real_step = trainer._optimizer_step

    def capture():
        grads.update({k: p.grad.clone() for k, p in trainer.unwrapped.lm.named_parameters() if p.grad is not None})
        return real_step()

    trainer._optimizer_step = capture
    m = trainer.rl_step(StepBatch.of(rollouts, rewards))
    # naive: the same masks (the step's generator, items in group order), -sum_i A_i sum_k est_ik / N
    loaded = load_model(tiny_dir)
    mask_id = loaded.spec.mask_token_id
    gen = step_generator(0, 0, 0)
    adv = group_advantages(torch.tensor(rewards, dtype=torch.float64))
    total, n_tokens = 0.0, 0
    for g, group in enumerate(rollouts):
        for i, r in enumerate(group):
            base = rollout_trajectory(r, 1)
            traj = (random_mask_trajectory(base, gen, 0.3, mask_id) if estimator == "random_mask"
                    else coupled_trajectory(base, gen))  # fmt: skip
            total = total - float(adv[g, i]) * _naive_estimates(loaded.model, traj, base.block_size, mask_id).sum()
            n_tokens += traj.target_count
    (total / n_tokens).backward()
    assert m["tokens"] == n_tokens == sum(len(r.token_ids) for g in rollouts for r in g)
    assert m["loss"] == pytest.approx(-float((adv * torch.tensor([[len(r.token_ids) for r in g] for g in rollouts]))
                                             .sum()) / n_tokens, abs=1e-6)  # fmt: skip
    for k, p in loaded.model.named_parameters():
        assert torch.allclose(grads[k], p.grad, rtol=1e-4, atol=1e-7), k
