"""The GTPO objective against hand-derived numbers on tiny tensors (the arithmetic is in the comments)."""

import math

import pydantic
import pytest
import torch

from services.trainer.learner.objective import (
    LossConfig,
    clipped_surrogate,
    filter_groups,
    group_advantages,
    gtpo_loss,
    importance_weights,
    k3_kl,
    token_weights,
)

LN2 = math.log(2.0)  # 0.693147


def _close(actual: torch.Tensor, expected: list[float], atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), atol=atol, rtol=0)


def _log(values: list[float]) -> torch.Tensor:
    return torch.tensor(values).log()


# --- group_advantages ---------------------------------------------------------------------------------------------


def test_group_advantages_zscore_uses_unbiased_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 5.0]])
    # group 0: mean .5, deviations +-.5, unbiased var 4*.25/3 = 1/3, std .57735 -> +-.5/.57735 = +-.866025
    # group 1: mean 2.75, deviations -.75 x3, 2.25; var (3*.5625 + 5.0625)/3 = 2.25, std 1.5 -> -.5 x3, 1.5
    adv = group_advantages(rewards, "zscore")
    _close(adv, [[0.866025, -0.866025, -0.866025, 0.866025], [-0.5, -0.5, -0.5, 1.5]])


def test_group_advantages_mean_only_centres():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 5.0]])
    # r - mean: group 0 mean .5, group 1 mean 2.75
    _close(group_advantages(rewards, "mean"), [[0.5, -0.5, -0.5, 0.5], [-0.75, -0.75, -0.75, 2.25]])


def test_group_advantages_zero_variance_and_single_response_give_zero():
    # all equal: numerator 0, denominator eps -> 0
    _close(group_advantages(torch.tensor([[1.0, 1.0, 1.0]])), [[0.0, 0.0, 0.0]])
    # n == 1: no baseline (torch.std would be NaN)
    for mode in ("zscore", "mean"):
        _close(group_advantages(torch.tensor([[3.0], [5.0]]), mode), [[0.0], [0.0]])


def test_group_advantages_accepts_integer_rewards_and_rejects_bad_input():
    _close(group_advantages(torch.tensor([[1, 0]]), "mean"), [[0.5, -0.5]])
    with pytest.raises(ValueError, match="mode"):
        group_advantages(torch.zeros(1, 2), "median")
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.zeros(4), "mean")


# --- clipped_surrogate --------------------------------------------------------------------------------------------

RATIOS = [0.5, 0.9, 1.25, 1.3, 2.0]


def _surrogate(ratios: list[float], adv: float, **kw):
    # old_logp = 0, so logp = log(ratio) gives exactly these ratios
    logp = _log(ratios)
    return clipped_surrogate(logp, torch.zeros_like(logp), torch.full_like(logp, adv), 0.2, 0.28, **kw)


def test_clipped_surrogate_positive_advantage():
    obj, clipped = _surrogate(RATIOS, 1.0)
    # A = 1, clip range [.8, 1.28]: min(r, clamp(r)) ->
    # .5: min(.5, .8) = .5; .9: .9; 1.25: inside -> 1.25 (asymmetric: 1.25 < 1.28 is not clipped);
    # 1.3: min(1.3, 1.28) = 1.28 clipped; 2.0: min(2, 1.28) = 1.28 clipped
    _close(obj, [0.5, 0.9, 1.25, 1.28, 1.28])
    assert clipped.tolist() == [False, False, False, True, True]


def test_clipped_surrogate_negative_advantage():
    obj, clipped = _surrogate(RATIOS, -2.0)
    # A = -2: .5: min(-1.0, .8*-2 = -1.6) = -1.6 clipped; .9: -1.8; 1.25: -2.5;
    # 1.3: min(-2.6, 1.28*-2 = -2.56) = -2.6 not clipped; 2.0: min(-4, -2.56) = -4 not clipped
    _close(obj, [-1.6, -1.8, -2.5, -2.6, -4.0])
    assert clipped.tolist() == [True, False, False, False, False]


def test_clipped_surrogate_zero_advantage_is_never_clipped():
    obj, clipped = _surrogate(RATIOS, 0.0)
    _close(obj, [0.0] * 5)
    assert not clipped.any()


def test_clipped_tokens_get_no_gradient():
    logp = _log([0.5, 1.3]).requires_grad_()
    obj, _ = clipped_surrogate(logp, torch.zeros(2), torch.ones(2), 0.2, 0.28)
    (grad,) = torch.autograd.grad(obj.sum(), logp)
    # unclipped: d(r*A)/dlogp = r*A = .5; clipped at 1.28: constant -> 0
    _close(grad, [0.5, 0.0])


def test_log_ratio_is_clamped_before_exp():
    logp, old = torch.tensor([20.0]), torch.tensor([0.0])
    # log ratio 20 -> clamped to 10 -> ratio e^10 = 22026.4658; A = -1 picks the unclipped branch
    obj, _ = clipped_surrogate(logp, old, torch.tensor([-1.0]), 0.2, 0.28)
    _close(obj, [-22026.4658], atol=1e-2)
    # clamp 1 -> ratio e = 2.718282
    obj, _ = clipped_surrogate(logp, old, torch.tensor([-1.0]), 0.2, 0.28, log_ratio_clamp=1.0)
    _close(obj, [-2.718282])


# --- k3_kl, importance_weights -------------------------------------------------------------------------------------------


def test_k3_kl_by_hand():
    logp = _log([0.5, 0.25, 0.3])
    ref = _log([0.25, 0.5, 0.3])
    # d = ref - logp: log .5 -> .5 - (-.693147) - 1 = .193147; log 2 -> 2 - .693147 - 1 = .306853; 0 -> 0
    _close(k3_kl(logp, ref), [0.193147, 0.306853, 0.0])


def test_importance_weights_cap_and_no_grad():
    prox = _log([0.3, 0.9, 0.4]).requires_grad_()
    behav = _log([0.6, 0.3, 0.4])
    w = importance_weights(prox, behav, cap=2.0)
    # .3/.6 = .5; .9/.3 = 3 -> capped at 2; .4/.4 = 1
    _close(w, [0.5, 2.0, 1.0])
    assert not w.requires_grad


# --- token_weights ------------------------------------------------------------------------------------------------

# Two responses, tokens interleaved across rounds; both responses have a round 0:
#   response 0: round 0 has 2 targets (t0, t2), round 1 has 1 (t1)
#   response 1: round 0 has 1 target (t3), round 1 has 3 (t4, t5, t6)
RESP = torch.tensor([0, 0, 0, 1, 1, 1, 1])
ROUND = torch.tensor([0, 1, 0, 0, 1, 1, 1])
LOSSES = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
COUNTS = {"n_responses": 2, "n_tokens": 7, "max_len": 5}


def test_token_weights_token_mode():
    # 1 / 7 = .142857
    _close(token_weights(RESP, ROUND, "token", **COUNTS), [1 / 7] * 7)


def test_token_weights_step_mode():
    w = token_weights(RESP, ROUND, "step", **COUNTS)
    # 1 / (count * 2): (r0, round 0) 2 -> .25; (r0, round 1) 1 -> .5; (r1, round 0) 1 -> .5; (r1, round 1) 3 -> 1/6
    _close(w, [0.25, 0.5, 0.25, 0.5, 1 / 6, 1 / 6, 1 / 6])
    # losses 1..7: r0 = mean(1,3) + 2 = 4; r1 = 4 + mean(5,6,7) = 10; mean over responses = 7
    assert (w * LOSSES).sum().item() == pytest.approx(7.0)


def test_token_weights_length_mode():
    # 1 / (2 responses * max_len 5) = .1
    _close(token_weights(RESP, ROUND, "length", **COUNTS), [0.1] * 7)


@pytest.mark.parametrize(("mode", "total"), [("token", 28 / 7), ("step", 7.0), ("length", 28 / 10)])
def test_token_weights_data_parallel_split_is_exact(mode, total):
    full = (token_weights(RESP, ROUND, mode, **COUNTS) * LOSSES).sum()
    assert full.item() == pytest.approx(total)
    # rank 0 gets response 0 (t0..t2), rank 1 gets response 1 (t3..t6); each uses the global counts
    parts = [(token_weights(RESP[s], ROUND[s], mode, **COUNTS) * LOSSES[s]).sum() for s in (slice(0, 3), slice(3, 7))]
    assert (parts[0] + parts[1]).item() == pytest.approx(total)


def test_local_token_means_would_not_be_exact():
    # the naive alternative, mean per rank then mean over ranks: (2 + 5.5) / 2 = 3.75, not 28 / 7 = 4
    assert (LOSSES[:3].mean() + LOSSES[3:].mean()).item() / 2 == pytest.approx(3.75)


def test_token_weights_rejects_bad_arguments():
    for name in ("n_responses", "n_tokens", "max_len"):
        with pytest.raises(ValueError, match=name):
            token_weights(RESP, ROUND, "token", **{**COUNTS, name: 0})
    with pytest.raises(ValueError, match="mode"):
        token_weights(RESP, ROUND, "sequence", **COUNTS)
    with pytest.raises(ValueError, match="round_index"):
        token_weights(RESP, ROUND[:3], "step", **COUNTS)
    with pytest.raises(ValueError, match="n_tokens"):
        token_weights(RESP, ROUND, "token", **{**COUNTS, "n_tokens": 3})  # 7 local tokens > global 3


def test_token_weights_empty_shard():
    empty = torch.zeros(0, dtype=torch.long)
    for mode in ("token", "step", "length"):
        assert token_weights(empty, empty, mode, **COUNTS).shape == (0,)


# --- gtpo_loss ----------------------------------------------------------------------------------------------------

# Two responses: r0 (A = +1) has rounds 0 and 1 with one target each; r1 (A = -.5) has two targets in round 0.
# old p = .5 everywhere and p = [.5, .75, .25, .5] -> ratios [1, 1.5, .5, 1].
# obj: t0 1*1 = 1; t1 min(1.5, 1.28) = 1.28 (clipped); t2 min(.5*-.5 = -.25, .8*-.5 = -.4) = -.4 (clipped);
#      t3 1*-.5 = -.5.  Per-token loss -obj = [-1, -1.28, .4, .5], sum -1.38.
G_RESP = torch.tensor([0, 0, 1, 1])
G_ROUND = torch.tensor([0, 1, 0, 0])
G_ADV = torch.tensor([1.0, 1.0, -0.5, -0.5])
G_LOGP = _log([0.5, 0.75, 0.25, 0.5])
G_OLD = _log([0.5, 0.5, 0.5, 0.5])
G_COUNTS = {"n_responses": 2, "n_tokens": 4, "max_len": 4}


def _gtpo(norm="token", **kw):
    cfg_kw = {k: kw.pop(k) for k in ("beta", "tis_cap", "objective") if k in kw}
    cfg = LossConfig(norm=norm, **cfg_kw)
    w = token_weights(G_RESP, G_ROUND, norm, **G_COUNTS)
    return gtpo_loss(G_LOGP, G_OLD, G_ADV, w, cfg, **kw)


@pytest.mark.parametrize(
    ("norm", "expected"),
    [
        ("token", -0.345),  # -1.38 / 4
        ("step", -0.915),  # w = [.5, .5, .25, .25]: -.5 - .64 + .1 + .125
        ("length", -0.1725),  # -1.38 / (2 * 4)
    ],
)
def test_gtpo_loss_each_normalisation(norm, expected):
    loss, metrics = _gtpo(norm)
    assert loss.item() == pytest.approx(expected)
    assert metrics == pytest.approx(
        {
            "loss": expected,
            "clip_frac": 0.5,  # t1 and t2
            "ratio_mean": 1.0,  # (1 + 1.5 + .5 + 1) / 4
            "kl": 0.0,
            "iw_mean": 1.0,
            "adv_mean": 0.25,  # (1 + 1 - .5 - .5) / 4
            "tokens": 4.0,
            "outside_kept_tokens": 0.0,
            "ref_outside_kept_tokens": 0.0,
        }
    )


def test_gtpo_loss_with_kl():
    # ref chosen so that d = ref - logp is [log 2, -log 2, 0, 0]: k3 = [.306853, .193147, 0, 0], sum exactly .5
    ref = _log([1.0, 0.375, 0.25, 0.5])
    loss, metrics = _gtpo("token", beta=0.1, ref_logp=ref)
    # -1.38 / 4 + .1 * .5 / 4 = -.345 + .0125
    assert loss.item() == pytest.approx(-0.3325)
    assert metrics["kl"] == pytest.approx(0.125)  # .5 / 4


def test_gtpo_loss_decoupled_weights_by_prox_over_behav():
    # prox .5 against behav [.25, .5, 1, .1]: weights [2, 1, .5, 5 -> cap 2]
    behav = _log([0.25, 0.5, 1.0, 0.1])
    loss, metrics = _gtpo("token", objective="decoupled", tis_cap=2.0, behav_logp=behav)
    # -obj * iw = [-2, -1.28, .2, 1.0], sum -2.08, / 4
    assert loss.item() == pytest.approx(-0.52)
    assert metrics["iw_mean"] == pytest.approx(1.375)  # 5.5 / 4


def test_behav_logp_goes_with_the_decoupled_objective_only():
    behav = _log([0.25, 0.5, 1.0, 0.1])
    with pytest.raises(ValueError, match="behav_logp"):
        _gtpo("token", behav_logp=behav)  # standard: it would be silently unused
    with pytest.raises(ValueError, match="behav_logp"):
        _gtpo("token", objective="decoupled")  # decoupled: never silently without the correction


@pytest.mark.parametrize("norm", ["token", "step", "length"])
def test_on_policy_gradient_is_minus_weight_times_advantage(norm):
    logp = G_LOGP.clone().requires_grad_()
    w = token_weights(G_RESP, G_ROUND, norm, **G_COUNTS)
    loss, metrics = gtpo_loss(logp, logp.detach(), G_ADV, w, LossConfig(norm=norm))
    (grad,) = torch.autograd.grad(loss, logp)
    # ratio 1 -> d(-w * r * A)/dlogp = -w * A; e.g. step: w [.5, .5, .25, .25] -> [-.5, -.5, .125, .125]
    torch.testing.assert_close(grad, -w * G_ADV)
    assert metrics["ratio_mean"] == 1.0 and metrics["clip_frac"] == 0.0
    if norm == "step":
        _close(grad, [-0.5, -0.5, 0.125, 0.125])
        assert loss.item() == pytest.approx(-0.75)  # -(.5 + .5 - .125 - .125)


def test_gtpo_loss_errors():
    w = torch.full((4,), 0.25)
    with pytest.raises(ValueError, match="ref_logp"):
        gtpo_loss(G_LOGP, G_OLD, G_ADV, w, LossConfig(beta=0.1))
    with pytest.raises(ValueError, match="adv"):
        gtpo_loss(G_LOGP, G_OLD, G_ADV[:3], w, LossConfig())


def test_gtpo_loss_empty_shard_is_finite():
    empty = torch.zeros(0)
    loss, metrics = gtpo_loss(empty, empty, empty, empty, LossConfig())
    assert loss.item() == 0.0
    assert all(math.isfinite(v) for v in metrics.values()) and metrics["tokens"] == 0.0


# --- LossConfig, filter_groups ------------------------------------------------------------------------------------


def test_loss_config_defaults_and_validation():
    cfg = LossConfig()
    assert (cfg.eps_low, cfg.eps_high, cfg.advantage, cfg.norm, cfg.beta, cfg.objective, cfg.tis_cap) == (
        0.2,
        0.28,
        "zscore",
        "token",
        0.0,
        "standard",
        2.0,
    )
    with pytest.raises(pydantic.ValidationError, match="eps_low"):
        LossConfig(eps_low=1.5)
    for bad in (
        {"beta": -0.1},
        {"tis_cap": 0.99},
        {"objective": "areal"},
        {"log_ratio_clamp": 0.0},
        {"norm": "seq"},
        {"typo": 1},
    ):
        with pytest.raises(pydantic.ValidationError, match=next(iter(bad))):
            LossConfig(**bad)


def test_filter_groups():
    rewards = [[1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.5, 0.5 + 1e-12, 0.5], [2.0], [0.0, 1e-3]]
    keep, stats = filter_groups(rewards)
    # varied; all 1; all 0; equal within atol 1e-9; a single response; differ by 1e-3 > atol
    assert keep == [True, False, False, False, False, True]
    assert (stats.groups, stats.kept, stats.dropped, stats.dropped_all_same, stats.dropped_too_small) == (6, 2, 4, 3, 1)
    assert stats.same_values == [1.0, 0.0, 0.5]
    # a looser atol also drops the last group
    assert filter_groups([[0.0, 1e-3]], atol=1e-2)[0] == [False]


def test_filter_groups_rejects_nan():
    with pytest.raises(ValueError, match=r"rewards\[1\]"):
        filter_groups([[0.0, 1.0], [float("nan"), 1.0]])


def test_gtpo_loss_upcasts_bf16_and_keeps_float64():
    w = torch.full((4,), 0.25)
    loss, _ = gtpo_loss(G_LOGP.bfloat16(), G_OLD.bfloat16(), G_ADV, w, LossConfig())
    assert loss.dtype == torch.float32
    loss, _ = gtpo_loss(G_LOGP.double(), G_OLD.double(), G_ADV, w, LossConfig())
    assert loss.dtype == torch.float64 and loss.item() == pytest.approx(-0.345)
