"""In-flight weight updates (rollout.swap_at_block, docs/design.md section 7): the torch engine swaps weights at a
block boundary and every token keeps the version and behaviour log-prob it was sampled with; off, nothing changes;
the worker loads a newer version mid-generation through the real host; the trainer weights each token of a response
that spans versions by its own behaviour log-prob (hand-checked) and reports per-token staleness."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from services.rollout.engines.rows import expand_rows
from services.rollout.engines.sampling import block_uniforms
from services.rollout.engines.torch_engine import TorchEngine
from services.rollout.host import EngineHost, RolloutMetrics
from services.rollout.settings import RolloutSettings
from services.rollout.worker import RolloutWorker
from services.trainer.learner.objective import LossConfig, gtpo_loss, token_staleness, token_weights
from shared.config.settings import RedisConfig
from shared.contracts.wire import (
    GenerationRequest,
    RolloutMessage,
    SamplingParams,
    StepBatch,
    TaskMessage,
    WeightsVersion,
)
from shared.model.sdar import load_model
from shared.queues.queue import Codec

REPO = Path(__file__).resolve().parents[1]
B = 4  # the tiny preset's block size


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory) -> Path:
    """Other weights of the same shapes and spec: version 1."""
    from shared.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("tiny-v1"), seed=1)


def _req(prompt: list[int], new: int, seed: int = 3) -> GenerationRequest:
    return GenerationRequest(prompt_ids=prompt, params=SamplingParams(seed=seed, max_new_tokens=new,
                                                                      stop_token_ids=[], logprobs=True))  # fmt: skip


def _swapping_engine(tiny, v1_dir) -> tuple[TorchEngine, list[int]]:
    """An engine whose hook loads v1 at its first call (the boundary after the first block)."""
    engine, calls = TorchEngine(tiny), []

    def hook() -> None:
        calls.append(engine.policy_version)
        if len(calls) == 1:
            engine.load_weights(v1_dir, 1)

    engine.block_hook = hook
    return engine, calls


def test_a_swap_after_the_first_block_keeps_it_and_decodes_the_rest_with_the_new_weights(tiny, v1_dir):
    """P = 3 < B: no whole prompt block, so after the swap every cached key is the new weights' (block 0 is committed
    by block 1's first forward). The later blocks then equal v1 decoding with block 0 as the prompt, its generator
    one block further on, recomputed independently."""
    req = _req([5, 6, 7], 9)
    ((v0_only,),) = TorchEngine(tiny).generate([req])
    engine, calls = _swapping_engine(tiny, v1_dir)
    ((got,),) = engine.generate([req])
    assert calls == [0, 1]  # called at the two boundaries after block 0; the first loaded v1
    n0 = B - 3  # response tokens in block 0
    assert got.token_ids[:n0] == v0_only.token_ids[:n0] and got.logprobs[:n0] == v0_only.logprobs[:n0]
    assert got.step_map[:n0] == v0_only.step_map[:n0]
    assert got.policy_version == 0 and got.token_versions == [0] * n0 + [1] * (9 - n0)
    assert got.logprobs[n0:] != v0_only.logprobs[n0:]  # the new weights did decode the rest

    v1 = TorchEngine(load_model(v1_dir), policy_version=1)
    rows = expand_rows([_req([5, 6, 7, *got.token_ids[:n0]], 9 - n0)], B, [], v1.model.config.vocab_size)
    block_uniforms(rows[0].generator, B)  # the draw block 0 took
    (again,) = v1._decode(rows, B)
    assert got.token_ids[n0:] == again.token_ids
    assert max(abs(a - b) for a, b in zip(got.logprobs[n0:], again.logprobs, strict=True)) < 1e-5
    assert [s - got.step_map[n0 - 1] for s in got.step_map[n0:]] == again.step_map


def test_a_batch_swaps_every_row_at_the_same_boundary(tiny, v1_dir):
    """Rows of different prompt lengths (whole prompt blocks cached by v0) and lengths: each row's first block is
    the v0-only one bit for bit, and its versions change where its second block starts."""
    reqs = [_req([9] * n, new, seed=10 + n) for n, new in ((2, 5), (5, 11), (8, 7))]
    v0_only = [r for (r,) in TorchEngine(tiny).generate(reqs)]
    engine, _ = _swapping_engine(tiny, v1_dir)
    for req, ref, (got,) in zip(reqs, v0_only, engine.generate(reqs), strict=True):
        n0 = B - len(req.prompt_ids) % B
        assert got.token_ids[:n0] == ref.token_ids[:n0] and got.logprobs[:n0] == ref.logprobs[:n0]
        assert got.token_versions == [0] * n0 + [1] * (len(got.token_ids) - n0)


def test_off_is_bit_identical_and_records_no_versions(tiny):
    reqs = [_req([9] * n, new, seed=n) for n, new in ((2, 5), (5, 11), (8, 7))]
    plain = TorchEngine(tiny).generate(reqs)
    hooked = TorchEngine(tiny)
    hooked.block_hook = lambda: None  # on, but nothing newer to load
    for (a,), (b,) in zip(plain, hooked.generate(reqs), strict=True):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs and a.step_map == b.step_map
        assert a.tail_ids == b.tail_ids and a.token_versions is None
        assert b.token_versions == [0] * len(b.token_ids)


def test_token_versions_are_validated(tiny):
    ((r,),) = TorchEngine(tiny).generate([_req([5, 6, 7], 6)])
    data = r.model_dump()
    ok = {**data, "token_versions": [0, 2, 2, 2, 2, 3]}  # positions 3 | 4..7 | 8: swaps at blocks' starts
    assert type(r).model_validate(ok).versions() == [0, 2, 2, 2, 2, 3]
    for versions, needle in (([0, 0, 1, 1, 1, 1], "inside block 1"), ([0] * 5, "one version per token"),
                             ([1] * 6, "starts at v1"), ([0, 2, 2, 2, 2, 1], "goes back")):  # fmt: skip
        with pytest.raises(ValidationError, match=needle):
            type(r).model_validate({**data, "token_versions": versions})


def test_settings_refuse_swap_at_block_with_lmdeploy(tmp_path):
    with pytest.raises(ValidationError, match="swap_at_block: not supported by engine=lmdeploy: its scheduler"):
        RolloutSettings(model=tmp_path, engine="lmdeploy", swap_at_block=True)


# --------------------------------------------------------------------------- the worker, real host and Redis


@pytest.fixture
def worker(tmp_path, tiny_dir, v1_dir, redis_url, redis_ns):
    shutil.copytree(tiny_dir, tmp_path / "v0")
    shutil.copytree(v1_dir, tmp_path / "v1")
    settings = RolloutSettings(model=tmp_path / "v0", checkpoint_root=tmp_path, swap_at_block=True, swap_poll_ms=0,
                               redis=RedisConfig(url=redis_url, namespace=redis_ns.namespace))  # fmt: skip
    w = RolloutWorker(EngineHost(TorchEngine(load_model(tmp_path / "v0")), RolloutMetrics(), start=tmp_path / "v0"),
                      settings)  # fmt: skip
    w.queue.ensure_groups()
    w.registry.publish(WeightsVersion(version=0, path=str(tmp_path / "v0"), run="r"))
    yield w
    w.redis.close()


def test_the_worker_loads_a_newer_version_between_two_blocks(worker, tmp_path):
    """v1 is published while the first block decodes; the hook finds it at the next boundary, loads it through the
    host (whose lock the generating thread holds) and the rollout records both versions."""
    hook = worker.swap_at_block
    seen = []

    def publish_then_hook() -> None:
        if not seen:
            worker.registry.publish(WeightsVersion(version=1, path=str(tmp_path / "v1"), run="r"))
        seen.append(worker.host.served_version)
        hook()

    worker.swap_at_block = publish_then_hook
    t = TaskMessage(task_id="r:0:0:0", run_id="r", train_by=0, prompt_index=0, sample_index=0, group_size=1,
                    prompt_ids=[5, 6, 7], reference="3", policy_version=0, policy_run="r",
                    params=SamplingParams(seed=1, max_new_tokens=9, stop_token_ids=[], logprobs=True))  # fmt: skip
    assert worker.queue.publish(worker.keys.tasks, t, t.task_id)
    assert worker.tick() == 1
    ((_, fields),) = worker.redis.xrange(worker.keys.rollouts)
    msg = Codec.get(fields[b"v"].decode()).decode(fields[b"d"], RolloutMessage)
    r = msg.rollout
    assert seen == [0, 1] and worker.swaps == 1 and worker.host.served_version == 1
    assert r.policy_version == 0 and r.policy_run == "r" and r.token_versions == [0] + [1] * 8
    metrics = worker.host.metrics
    assert metrics.weight_loads.labels("registry")._value.get() == 1  # v0, at the tick
    assert metrics.weight_loads.labels("swap")._value.get() == 1  # v1, between two blocks
    assert metrics.weight_load_seconds.labels("swap")._sum.get() > 0  # the pause of generation it cost


def test_another_runs_version_is_never_swapped_in_mid_generation(worker, tmp_path):
    worker.refresh_weights()
    worker.registry.publish(WeightsVersion(version=5, path=str(tmp_path / "v1"), run="other"))
    worker.swap_at_block()
    assert worker.host.served_version == 0 and worker.swaps == 0  # the next tick's refresh takes it, between tasks


# --------------------------------------------------------------------------- the trainer


def test_a_response_spanning_two_versions_is_weighted_per_token_by_hand():
    """Two blocks of two tokens: block 1 sampled by v0 (behaviour .4, .05), block 2 by v1 (behaviour .5, .625);
    the trainer at v1, pi_prox = pi_theta = (.5, .2, .5, .5) at the first update (ratio 1). Each token's weight is
    min(pi_prox / its own pi_behav, cap 2): 1.25, 4 -> 2, 1, .8; with A = 1 and token norm (1/4 each) the loss is
    -(1.25 + 2 + 1 + .8) / 4 = -1.2625 and d loss / d log pi_theta_t = -iw_t / 4."""
    prox = torch.tensor([0.5, 0.2, 0.5, 0.5], dtype=torch.float64).log()
    behav = torch.tensor([0.4, 0.05, 0.5, 0.625], dtype=torch.float64).log()
    adv = torch.ones(4, dtype=torch.float64)
    w = token_weights(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 2, 3]), "token", n_responses=1,
                      n_tokens=4, max_len=4).double()  # fmt: skip
    logp = prox.clone().requires_grad_()
    cfg = LossConfig(objective="decoupled", tis_cap=2.0)
    loss, m = gtpo_loss(logp, prox, adv, w, cfg, behav_logp=behav)
    (grad,) = torch.autograd.grad(loss, logp)
    iw = [1.25, 2.0, 1.0, 0.8]
    assert loss.item() == pytest.approx(-sum(iw) / 4, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor([-x / 4 for x in iw], dtype=torch.float64))
    assert m["iw_mean"] == pytest.approx(sum(iw) / 4)
    assert token_staleness([[0, 0, 1, 1]], 1) == (0.5, 1)


def test_the_trainer_uses_each_tokens_own_behaviour_logprob(tiny_dir, tmp_path):
    """Real learner, trainer at v2: each response's tokens before its second block from v0 with
    log pi_behav = engine - .5 (raw weight e^.5 > cap 1.5: 1.5), the rest from v1 with engine + .2 (e^-.2)."""
    sys.path.insert(0, str(REPO / "tests" / "scripts"))
    from rl_step import fixed_groups

    from services.trainer.config import OptimConfig, TrainerConfig
    from services.trainer.learner.objective import group_advantages
    from services.trainer.learner.trainer import Learner

    rollouts, rewards = fixed_groups(str(tiny_dir))
    spanning, iws = [], []
    for g in rollouts:
        spanning.append([])
        for r in g:
            n0 = B - len(r.prompt_ids) % B
            versions = [0] * n0 + [1] * (len(r.token_ids) - n0)
            shift = [0.5 if v == 0 else -0.2 for v in versions]  # log pi_prox - log pi_behav, per token
            spanning[-1].append(r.model_copy(update={"token_versions": versions, "logprobs": [
                lp - s for lp, s in zip(r.logprobs, shift, strict=True)]}))  # fmt: skip
            iws.append([min(math.exp(s), 1.5) for s in shift])
    learner = Learner(TrainerConfig(model=tiny_dir, output_dir=tmp_path, optim=OptimConfig(lr=1e-3),
                                    loss=LossConfig(objective="decoupled", tis_cap=1.5)))  # fmt: skip
    learner.state.policy_version = 2
    m = learner.rl_step(StepBatch.of(spanning, rewards))
    adv = [a for ga in group_advantages(torch.tensor(rewards, dtype=torch.float64)).tolist() for a in ga]
    total = sum(len(x) for x in iws)
    assert m["loss"] == pytest.approx(-sum(a * sum(x) for a, x in zip(adv, iws, strict=True)) / total, abs=1e-5)
    assert m["iw_mean"] == pytest.approx(sum(map(sum, iws)) / total, abs=1e-5)
    assert (m["staleness_mean"], m["staleness_max"]) == (2.0, 2)  # the bound's view: the oldest token
    flat = [2 - v for g in spanning for r in g for v in r.token_versions]
    assert m["staleness_token_mean"] == pytest.approx(sum(flat) / len(flat)) and m["staleness_token_max"] == 2
