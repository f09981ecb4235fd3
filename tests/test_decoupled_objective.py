"""The decoupled PPO objective (three policies per token) and the behaviour diagnostics, by hand on tiny tensors."""

import math

import pytest
import torch

from services.trainer.learner.objective import (
    LossConfig,
    behaviour_metrics,
    behaviour_sums,
    gtpo_loss,
    identical_groups,
    staleness,
    token_weights,
)


def _log(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).log()


# Four tokens of two responses, clip [0.8, 1.28], cap 2, token norm (w = 1/4):
#   t0: theta .6, prox .5, behav .4,   A = +1: ratio 1.2 (inside), iw .5/.4 = 1.25;  loss -1.2 * 1.25 = -1.5
#   t1: theta .3, prox .2, behav .05,  A = +2: ratio 1.5 -> 1.28 (clipped), iw 4 -> 2;  loss -2.56 * 2 = -5.12
#   t2: theta .35, prox .5, behav .5,  A = -1: ratio .7 -> .8 (clipped: -.8 < -.7), iw 1;  loss .8
#   t3: theta .45, prox .5, behav .625, A = -1: ratio .9 (inside), iw .5/.625 = .8;  loss .9 * .8 = .72
# sum -5.1, loss -5.1 / 4 = -1.275. Gradient wrt log theta: -w * iw * ratio * A where unclipped, else 0:
#   t0 -(1/4)(1.25)(1.2)(1) = -.375; t1 0; t2 0; t3 -(1/4)(.8)(.9)(-1) = +.18.
# The standard objective on the same tokens has no iw: [-1.2, -2.56, .8, .9], sum -2.06, loss -.515.
THETA = [0.6, 0.3, 0.35, 0.45]
PROX = _log([0.5, 0.2, 0.5, 0.5])
BEHAV = _log([0.4, 0.05, 0.5, 0.625])
ADV = torch.tensor([1.0, 2.0, -1.0, -1.0], dtype=torch.float64)
RESP = torch.tensor([0, 0, 1, 1])
ROUND = torch.tensor([0, 1, 0, 1])
W = token_weights(RESP, ROUND, "token", n_responses=2, n_tokens=4, max_len=2).double()
DECOUPLED = LossConfig(objective="decoupled", tis_cap=2.0)


def _loss_and_grad(cfg: LossConfig, prox=PROX, behav=BEHAV, theta=None):
    logp = (_log(THETA) if theta is None else theta).clone().requires_grad_()
    loss, metrics = gtpo_loss(logp, prox, ADV, W, cfg, behav_logp=behav if cfg.objective == "decoupled" else None)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss, grad, metrics


def test_decoupled_loss_and_gradient_by_hand():
    loss, grad, metrics = _loss_and_grad(DECOUPLED)
    assert loss.item() == pytest.approx(-1.275, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor([-0.375, 0.0, 0.0, 0.18], dtype=torch.float64))
    assert metrics["clip_frac"] == 0.5  # t1, t2
    assert metrics["iw_mean"] == pytest.approx((1.25 + 2 + 1 + 0.8) / 4)


def test_standard_loss_on_the_same_tokens_has_no_weight():
    loss, grad, metrics = _loss_and_grad(LossConfig())
    assert loss.item() == pytest.approx(-0.515, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor([-0.3, 0.0, 0.0, 0.225], dtype=torch.float64))  # -w * ratio * A
    assert metrics["iw_mean"] == 1.0


def test_a_cap_of_one_makes_no_token_weigh_more_than_on_policy():
    # iw = [min(1.25, 1), min(4, 1), 1, .8] = [1, 1, 1, .8]: loss (-1.2 - 2.56 + .8 + .72) / 4 = -.56
    loss, _, _ = _loss_and_grad(LossConfig(objective="decoupled", tis_cap=1.0))
    assert loss.item() == pytest.approx(-0.56, abs=1e-12)


def test_on_policy_decoupled_equals_standard():
    # pi_behav == pi_prox (to the bit) and pi_prox = pi_theta.detach() (the recompute skipped): every weight is
    # exp(0) = 1, so the loss and its gradient are the standard ones exactly, clipped or not
    theta = _log(THETA)
    std = _loss_and_grad(LossConfig(), prox=theta, theta=theta)
    dec = _loss_and_grad(DECOUPLED, prox=theta, behav=theta.clone(), theta=theta)
    assert torch.equal(std[0], dec[0]) and torch.equal(std[1], dec[1])
    # ratio 1: loss -sum w A = -(1 + 2 - 1 - 1) / 4
    assert dec[0].item() == pytest.approx(-0.25, abs=1e-12)
    # off only by the engine's float error (1e-6 nats here): equal within that relative error
    jitter = torch.tensor([1e-6, -1e-6, 5e-7, -5e-7], dtype=torch.float64)
    near = _loss_and_grad(DECOUPLED, prox=theta, behav=theta + jitter, theta=theta)
    assert near[0].item() == pytest.approx(std[0].item(), rel=2e-6)
    torch.testing.assert_close(near[1], std[1], rtol=2e-6, atol=0)


def test_decoupled_gradient_matches_autograd_of_the_formula():
    # independent of the implementation: sum_t w_t * -min(r A, clip(r) A) * min(pi_prox / pi_behav, cap)
    logp = _log(THETA).requires_grad_()
    r = torch.exp(logp - PROX)
    obj = torch.minimum(r * ADV, torch.clamp(r, 0.8, 1.28) * ADV)
    iw = torch.clamp(torch.exp(PROX - BEHAV), max=2.0)
    (expected,) = torch.autograd.grad((W * -obj * iw).sum(), logp)
    _, grad, _ = _loss_and_grad(DECOUPLED)
    torch.testing.assert_close(grad, expected)


def test_decoupled_needs_behaviour_logprobs_and_a_cap_of_at_least_one():
    logp = _log(THETA)
    with pytest.raises(ValueError, match="behav_logp"):
        gtpo_loss(logp, PROX, ADV, W, DECOUPLED)
    with pytest.raises(ValueError, match="behav_logp"):
        gtpo_loss(logp, PROX, ADV, W, DECOUPLED, behav_logp=BEHAV[:3])
    with pytest.raises(ValueError, match="tis_cap"):
        LossConfig(objective="decoupled", tis_cap=0.5)


# --- behaviour diagnostics ----------------------------------------------------------------------------------------

# d = log prox - log behav = [log 1.25, log 4, 0, log .8] = [.223144, 1.386294, 0, -.223144]; w = e^d = [1.25, 4, 1, .8]
# |d| sum 1.832581, max 1.386294; k3 = w - 1 - d = [.026856, 1.613706, 0, .023144], sum 1.663706
# min(w, 2) sum 5.05; w > 2: one token; max w 4.
SUMS = [4.0, 1.832581, 1.663706, 5.05, 1.0]
MAXES = [1.386294, 4.0]


def test_behaviour_sums_by_hand():
    sums, maxes = behaviour_sums(PROX, BEHAV, cap=2.0)
    assert sums.dtype == torch.float64
    torch.testing.assert_close(sums, torch.tensor(SUMS, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(maxes, torch.tensor(MAXES, dtype=torch.float64), atol=1e-6, rtol=0)


def test_behaviour_metrics_by_hand():
    m = behaviour_metrics(torch.tensor(SUMS), torch.tensor(MAXES), weighted=True)
    assert m == pytest.approx(
        {
            "logprob_gap_mean": 0.458145,  # 1.832581 / 4
            "logprob_gap_max": 1.386294,
            "behav_kl_k3": 0.415927,  # 1.663706 / 4
            "iw_mean": 1.2625,  # 5.05 / 4
            "iw_max": 4.0,
            "iw_truncated_frac": 0.25,
        },
        abs=1e-6,
    )
    assert set(behaviour_metrics(torch.tensor(SUMS), torch.tensor(MAXES), weighted=False)) == {
        "logprob_gap_mean",
        "logprob_gap_max",
        "behav_kl_k3",
    }


def test_behaviour_sums_add_up_over_shards():
    a, b = behaviour_sums(PROX[:1], BEHAV[:1], 2.0), behaviour_sums(PROX[1:], BEHAV[1:], 2.0)
    empty = behaviour_sums(PROX[:0], BEHAV[:0], 2.0)  # a rank with no targets adds nothing
    whole = behaviour_sums(PROX, BEHAV, 2.0)
    torch.testing.assert_close(a[0] + b[0] + empty[0], whole[0])
    torch.testing.assert_close(torch.maximum(torch.maximum(a[1], b[1]), empty[1]), whole[1])


def test_behaviour_kl_of_equal_policies_keeps_tiny_gaps():
    # d = 1e-6: k3 = e^d - 1 - d = d^2 / 2 = 5e-13; exp(d) - 1 - d in float32 would be rounding noise (~1e-7)
    prox = torch.tensor([-2.0], dtype=torch.float32)
    sums, _ = behaviour_sums(prox, prox.double() - 1e-6, 2.0)
    assert sums[2].item() == pytest.approx(5e-13, rel=1e-2)
    assert sums[1].item() == pytest.approx(1e-6, rel=1e-6)


def test_behaviour_of_a_huge_gap_is_capped_not_nan():
    sums, maxes = behaviour_sums(torch.tensor([0.0]), torch.tensor([-1000.0]), 2.0)
    assert sums[3].item() == 2.0 and sums[4].item() == 1.0 and math.isinf(maxes[1].item())


# --- staleness and identical groups -------------------------------------------------------------------------------


def test_staleness_by_hand():
    # trainer at v5; lags [0, 1], [3], [5] -> mean 9 / 4, max 5
    assert staleness([[5, 4], [2], [0]], 5) == (2.25, 5)
    assert staleness([[]], 5) == (0.0, 0)


def test_a_sample_newer_than_the_trainer_is_refused():
    with pytest.raises(
        ValueError, match=r"Rollout.policy_version: group 1 sample 0 has v4, newer than the trainer's v3"
    ):
        staleness([[3, 3], [4]], 3)


def test_identical_groups():
    groups = [
        [[1, 2, 3], [1, 2, 3], [1, 2, 3]],  # identical
        [[1, 2, 3], [1, 2, 3], [1, 2, 4]],  # one differs
        [[7]],  # a lone sample proves nothing
        [[], []],  # two empty responses are identical
        [[1, 2], [1, 2, 3]],  # a prefix is not the same response
    ]
    assert identical_groups(groups) == [0, 3]
