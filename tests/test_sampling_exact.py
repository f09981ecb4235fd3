"""One sampling transform for engines and trainer (issue 34, docs/sampling.md): hand-derived values on a small
vocabulary, the trainer's log-probs equal to the torch engine's recorded ones at the published settings, the
decoupled objective on-policy equal to the standard one bit for bit, tokens outside the kept set dropped and
counted, and greedy refused for RL."""

import math

import pytest
import torch

from services.rollout.engines.torch_engine import TorchEngine
from services.trainer.config import LossConfig, OptimConfig, RolloutSampling, TrainerConfig
from services.trainer.learner.objective import gtpo_loss
from services.trainer.learner.policy import TokenLogProbs
from services.trainer.learner.trainer import Learner
from services.trainer.learner.trajectory import build_batch, rollout_trajectory
from shared.contracts.wire import GenerationRequest, SamplingParams, StepBatch
from shared.model.sampling import sampling_log_probs, settings_tensors

INF = float("-inf")
DIRL = {"temperature": 1.0, "top_k": 50}
SETTINGS = [DIRL, {"temperature": 0.7, "top_p": 0.95}, {"temperature": 0.6, "top_k": 20, "top_p": 0.9}]
MIXED = [*SETTINGS, {}]  # plus the defaults


def _lp(logits, t, k, p):
    return sampling_log_probs(torch.tensor([logits]), *settings_tensors([t], [k], [p]))[0].tolist()


# --------------------------------------------------------------------------- the transform, by hand


def test_top_k_renormalises_over_the_k_largest():
    z = math.log(math.e**2 + math.e)  # logits 2, 1 kept
    assert _lp([2.0, 1.0, 0.0, -1.0], 1.0, 2, 1.0) == pytest.approx([2 - z, 1 - z, INF, INF])


def test_temperature_then_top_p_keeps_the_smallest_prefix_reaching_p():
    # T 0.5: scaled 4, 2, 0, -2 -> p = .8650, .1171, .0158, .0021; the mass before the third is .982 >= .9
    z = math.log(math.e**4 + math.e**2)
    assert _lp([2.0, 1.0, 0.0, -1.0], 0.5, 0, 0.9) == pytest.approx([4 - z, 2 - z, INF, INF])
    assert _lp([2.0, 1.0, 0.0, -1.0], 0.5, 0, 0.99)[2] == pytest.approx(-math.log(math.e**4 + math.e**2 + 1))
    # top-p .8: the most likely token alone already has .865 of the mass
    assert _lp([2.0, 1.0, 0.0, -1.0], 0.5, 0, 0.8) == pytest.approx([0.0, INF, INF, INF])


def test_top_k_then_top_p_on_the_renormalised_top_k():
    # T 2: scaled 1, .5, 0, -.5; top-k 3 -> p = .5065, .3072, .1863; mass before the third .8137 >= .7
    z = math.log(math.e + math.e**0.5)
    assert _lp([2.0, 1.0, 0.0, -1.0], 2.0, 3, 0.7) == pytest.approx([1 - z, 0.5 - z, INF, INF])


def test_top_k_keeps_ties_with_the_kth_value():
    assert _lp([1.0, 1.0, 1.0, 0.0], 1.0, 2, 1.0) == pytest.approx([-math.log(3)] * 3 + [INF])


def test_defaults_are_plain_log_softmax_and_rows_do_not_depend_on_their_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 64, generator=g) * 3
    rows = [(1.0, 0, 1.0), (1.0, 50, 1.0), (0.7, 0, 0.95), (0.6, 20, 0.9)]
    whole = sampling_log_probs(logits, *settings_tensors(*map(list, zip(*rows, strict=True))))
    assert torch.equal(whole[0], logits[0].log_softmax(-1))
    for i, (t, k, p) in enumerate(rows):  # alone, and as (B, V) rows of its own: the same bits
        alone = sampling_log_probs(logits[i : i + 1], *settings_tensors([t], [k], [p]))[0]
        flat = sampling_log_probs(logits[i], *settings_tensors([t] * 3, [k] * 3, [p] * 3))
        assert torch.equal(whole[i], alone) and torch.equal(whole[i], flat)
    assert (whole[1].isfinite().sum(-1) == 50).all()


# --------------------------------------------------------------------------- engine == trainer on the tiny model


def _rollouts(model, settings: list[dict], n: int = 2):
    """One request per setting, all in one engine call (the engine batches their rows together)."""
    reqs = [
        GenerationRequest(prompt_ids=list(range(20 + i, 26 + i)),
                          params=SamplingParams(seed=i, n=n, max_new_tokens=12, stop_token_ids=[], logprobs=True, **s))
        for i, s in enumerate(settings)
    ]  # fmt: skip
    return TorchEngine(model).generate(reqs)


def _trainer_logprobs(model, rollouts, mask_id, *, old: bool = False) -> list[list[float]]:
    """The trainer's log-prob of every response token, per rollout (``old``: temperature 1 over the whole vocab)."""
    trajs = [rollout_trajectory(r) for r in rollouts]
    batch = build_batch(trajs, mask_id)
    if old:
        batch.temperature, batch.top_k, batch.top_p = (torch.ones_like(batch.temperature),
                                                       torch.zeros_like(batch.top_k), torch.ones_like(batch.top_p))  # fmt: skip
    with torch.no_grad():
        lp = TokenLogProbs(model)(batch).double()
    out = [[math.nan] * len(r.token_ids) for r in rollouts]
    for v, resp, pos in zip(lp.tolist(), batch.response_index.tolist(), batch.token_index.tolist(), strict=True):
        out[resp][pos] = v
    return out


@pytest.mark.parametrize("settings", [[s] for s in SETTINGS] + [MIXED], ids=["dirl", "t07p095", "t06k20p09", "mixed"])
def test_trainer_logprobs_equal_the_engine_logprobs(tiny, settings):
    rollouts = [r for g in _rollouts(tiny, settings) for r in g]
    new = _trainer_logprobs(tiny.model, rollouts, tiny.spec.mask_token_id)
    old = _trainer_logprobs(tiny.model, rollouts, tiny.spec.mask_token_id, old=True)
    gap = max(abs(a - b) for r, lp in zip(rollouts, new, strict=True) for a, b in zip(r.logprobs, lp, strict=True))
    assert gap < 1e-5
    old_gap = max(abs(a - b) for r, lp in zip(rollouts, old, strict=True) for a, b in zip(r.logprobs, lp, strict=True))
    assert old_gap > 1e-2  # what the temperature-1, whole-vocabulary trainer got wrong


# --------------------------------------------------------------------------- decoupled on-policy == standard


@pytest.mark.parametrize("settings", [[s] for s in SETTINGS] + [MIXED], ids=["dirl", "t07p095", "t06k20p09", "mixed"])
def test_on_policy_decoupled_step_is_the_standard_step_bit_for_bit(tiny_dir, tmp_path, settings):
    """pi_behav = pi_prox to the bit (the rollouts carry the trainer's own log-probs): every importance weight is
    exp(0) = 1 and the two objectives make the same update, bit for bit."""
    groups = _rollouts(_model(tiny_dir), settings, n=3)
    rewards = [[float(i) + 0.1 * g for i in range(len(group))] for g, group in enumerate(groups)]

    def trainer(name, objective):
        cfg = TrainerConfig(model=tiny_dir, output_dir=tmp_path / name, micro_batch_size=16,
                            loss=LossConfig(objective=objective), optim=OptimConfig(lr=1e-3))  # fmt: skip
        return Learner(cfg)

    std = trainer("std", "standard")
    flat = [r for g in groups for r in g]
    own = _trainer_logprobs(std.unwrapped.lm, flat, std.loaded.spec.mask_token_id)  # the step's one micro-batch
    it = iter(own)
    groups = [[r.model_copy(update={"logprobs": next(it)}) for r in g] for g in groups]
    dec = trainer("dec", "decoupled")
    m_std, m_dec = std.rl_step(StepBatch.of(groups, rewards)), dec.rl_step(StepBatch.of(groups, rewards))
    assert m_std["loss"] == m_dec["loss"] and m_dec["iw_mean"] == 1.0 and m_dec["logprob_gap_max"] == 0.0
    assert m_std["outside_kept_tokens"] == m_dec["outside_kept_tokens"] == 0.0
    for (name, a), b in zip(std.unwrapped.lm.named_parameters(), dec.unwrapped.lm.parameters(), strict=True):
        assert torch.equal(a, b), name


def _model(tiny_dir):
    from shared.model.sdar import load_model

    return load_model(tiny_dir)


# --------------------------------------------------------------------------- outside the kept set


def test_token_outside_the_kept_set_is_dropped_from_the_loss_and_counted():
    """Token 1 is outside pi_theta's (and pi_prox's) kept set: log-prob -inf. Its term is dropped (its exact
    gradient is 0), the others' loss and gradient are what they would be without it, nothing is NaN."""
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0], [1.0, 0.5, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1])  # target 1: token 0 under top-k 1 keeps only token 2
    t, k, p = settings_tensors([1.0, 1.0, 1.0], [2, 1, 0], [1.0, 1.0, 1.0])
    adv, w = torch.tensor([1.0, -2.0, 0.5]), torch.full((3,), 1 / 3)
    for objective in ("standard", "decoupled"):
        logp = sampling_log_probs(logits, t, k, p).gather(-1, labels[:, None]).squeeze(-1)
        assert logp[1] == INF
        cfg = LossConfig(objective=objective, beta=0.1)
        behav = _finite(logp.detach() - 0.1) if objective == "decoupled" else None
        loss, m = gtpo_loss(logp, logp.detach(), adv, w, cfg, ref_logp=logp.detach(), behav_logp=behav)
        (grad,) = torch.autograd.grad(loss, logits)
        iw = math.exp(0.1) if behav is not None else 1.0
        assert loss.item() == pytest.approx(-(1.0 + 0.5) / 3 * iw)  # ratio 1 on the kept two; the third weight stays
        assert torch.isfinite(grad).all() and (grad[1] == 0).all() and (grad[0] != 0).any()
        assert m["outside_kept_tokens"] == 1.0 and m["ref_outside_kept_tokens"] == 0.0
        assert math.isfinite(m["ratio_mean"]) and m["clip_frac"] == 0.0


def _finite(behav):
    # an engine's log-prob is always finite (the token was sampled): the dropped token's pi_behav is some value
    return torch.where(behav.isfinite(), behav, torch.full_like(behav, -2.0))


def test_token_outside_the_references_kept_set_drops_only_its_kl_term():
    logp = torch.tensor([-0.5, -1.0], requires_grad=True)
    ref = torch.tensor([-0.5, INF])
    loss, m = gtpo_loss(logp, logp.detach(), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.5]), LossConfig(beta=0.1),
                        ref_logp=ref)  # fmt: skip
    loss.backward()
    assert loss.item() == pytest.approx(-1.0) and logp.grad.tolist() == pytest.approx([-0.5, -0.5])
    assert (m["outside_kept_tokens"], m["ref_outside_kept_tokens"]) == (0.0, 1.0)


def test_stale_sample_outside_the_current_kept_set_is_counted_per_step(tiny_dir, tmp_path):
    """A sample drawn at top-k 50 by other weights: tokens the current weights' top-k drops get -inf under
    pi_theta; the step stays finite and reports how many it dropped."""
    model = _model(tiny_dir)
    (group,) = _rollouts(model, [{"top_k": 50}], n=3)
    # the current weights' top-20 set: many of the sampled tokens fall outside it
    stale = [r.model_copy(update={"params": r.params.model_copy(update={"top_k": 20}), "policy_version": 0})
             for r in group]  # fmt: skip
    cfg = TrainerConfig(model=tiny_dir, output_dir=tmp_path, loss=LossConfig(objective="decoupled"))
    trainer = Learner(cfg)
    trainer.state.policy_version = 1
    own = _trainer_logprobs(trainer.unwrapped.lm, stale, trainer.loaded.spec.mask_token_id)
    outside = sum(math.isinf(x) for lp in own for x in lp)
    assert 0 < outside < sum(len(r.token_ids) for r in stale)
    m = trainer.rl_step(StepBatch.of([stale], [[0.0, 1.0, 2.0]]))
    assert m["outside_kept_tokens"] == outside and math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])
    assert math.isfinite(m["logprob_gap_mean"]) and math.isfinite(m["behav_kl_k3"])


# --------------------------------------------------------------------------- greedy is refused for RL


def test_greedy_is_refused_for_rl(tiny_dir, tmp_path, sharp):
    with pytest.raises(ValueError, match="rollout.temperature"):
        RolloutSampling(temperature=0.0)
    (group,) = TorchEngine(sharp).generate([GenerationRequest(
        prompt_ids=[5, 6, 7], params=SamplingParams(n=2, temperature=0.0, max_new_tokens=4, stop_token_ids=[]))])  # fmt: skip
    trainer = Learner(TrainerConfig(model=tiny_dir, output_dir=tmp_path))
    with pytest.raises(ValueError, match=r"Rollout.params.temperature: group 0 sample 0 was decoded greedily"):
        trainer.rl_step(StepBatch.of([group], [[0.0, 1.0]]))


# --------------------------------------------------------------------------- LMDeploy: exact settings only


def test_lmdeploy_logprobs_lifted_for_temperature_refused_naming_top_k_and_top_p():
    from services.rollout.engines.lmdeploy_engine import check_logprob_settings

    for t in (0.6, 0.7, 1.0, 2.0):  # its processors divide by T before the recorder sees the logits: exact
        check_logprob_settings(SamplingParams(temperature=t, logprobs=True))
    for kw, name in (({"top_k": 50}, "top_k"), ({"temperature": 0.7, "top_p": 0.95}, "top_p"),
                     ({"temperature": 0.0}, "temperature")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"^{name}: "):
            check_logprob_settings(SamplingParams(logprobs=True, **kw))


# --------------------------------------------------------------------------- the bench


def test_sampling_gap_bench_table(tiny, capsys):
    from bench.sampling_gap import DIRL, gaps, summary, table

    g = gaps(tiny, prompts=2, n=2, max_new_tokens=8, settings=DIRL)
    old, new = summary(g["old"]), summary(g["new"])
    assert old["tokens"] == new["tokens"] == 32
    assert new["gap_max"] < 1e-5 and old["gap_mean"] > 0.5 and old["w_out_clip"] == 1.0
    text = table([("tiny x1", "old", old), ("tiny x1", "new", new)])
    assert "mean|gap|" in text and len(text.splitlines()) == 4
