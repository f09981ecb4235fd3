"""The LMDeploy step-map recorder, driven through LMDeploy's real pure-Python scheduler classes on CPU.

LMDeploy is installed without CUDA (docs/lmdeploy.md, "CPU install for tests"); only the model forward and the
sampler are replaced, by a fake model whose output is a pure function of the block state. The independent
reference decodes the same fake model with our own unmasking rules (services/rollout/engines/sampling.py), so
every schedule (batching, preemption, eviction and re-prefill) must give exactly its trajectory.
"""

import os

import numpy as np
import pytest

try:
    import lmdeploy  # noqa: F401
except ImportError:
    if os.environ.get("CI"):
        raise ImportError(
            "CI must install LMDeploy's pure-Python scheduler (see docs/lmdeploy.md, CPU install for tests)"
        ) from None
    pytest.skip("lmdeploy is not installed (docs/lmdeploy.md: CPU install for tests)", allow_module_level=True)

from oracles import lmdeploy_sim as sim

from services.rollout.engines import lmdeploy_patch as lp


@pytest.fixture(scope="module", autouse=True)
def patched():
    return lp.apply_patch()


def _final(record, prompt, cfg):
    return lp.finalize(
        record,
        prompt_len=len(prompt),
        block_size=cfg.block_size,
        max_new_tokens=cfg.max_new_tokens,
        stop_token_ids=cfg.stop_token_ids,
    )


CASES = [
    # (strategy, threshold, block_size, denoising_steps)
    ("low_confidence_dynamic", 0.5, 4, None),
    ("low_confidence_dynamic", 0.9, 8, None),
    ("low_confidence_dynamic", 0.0, 4, None),
    ("low_confidence_static", 0.9, 8, 4),
    ("sequential", 0.9, 4, 2),
    ("sequential", 0.9, 4, None),
]


@pytest.mark.parametrize("strategy, threshold, block, steps", CASES)
def test_recorder_equals_reference_over_many_seeds(strategy, threshold, block, steps):
    """Prefill, decode, preemption (random and KV-pool pressure), eviction + re-prefill, stop and length."""
    totals = {"re_prefills": 0, "evictions": 0, "preemptions": 0, "stop": 0, "length": 0, "mid_block_cut": 0}
    for seed in range(20):
        rng = np.random.default_rng([seed, block])
        n = int(rng.integers(1, 7))
        prompts = [rng.integers(0, 16, size=int(rng.integers(1, 12))).tolist() for _ in range(n)]
        seeds = rng.integers(0, 1 << 40, size=n).tolist()
        cfg = sim.SimConfig(
            block_size=block,
            strategy=strategy,
            threshold=threshold,
            denoising_steps=steps,
            max_new_tokens=int(rng.integers(1, 30)),
            stop_token_ids=(3,),
            num_gpu_blocks=int(rng.integers(3, 8)),
            max_batches=4,
            preempt_prob=0.2,
        )
        res = sim.simulate(prompts, seeds, cfg, rng_seed=seed)
        for key in ("re_prefills", "evictions", "preemptions"):
            totals[key] += getattr(res, key)
        for i, prompt in enumerate(prompts):
            got = _final(res.records[i], prompt, cfg)
            want = sim.reference_decode(prompt, seeds[i], cfg)
            assert sim.same_trajectory(got, want), (seed, i, prompt, cfg, got, want)
            totals[got.finish_reason] += 1
            totals["mid_block_cut"] += bool(got.tail_ids)
            assert (len(prompt) + len(got.token_ids) + len(got.tail_ids)) % block == 0
    assert all(v > 0 for v in totals.values()), totals  # every path was exercised


def test_sequential_gives_one_to_n():
    cfg = sim.SimConfig(strategy="sequential", max_new_tokens=13, num_gpu_blocks=4, preempt_prob=0.3)
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8, 9], [1], [1, 2, 3, 4, 5, 6, 7]]
    res = sim.simulate(prompts, [0, 1, 2, 3], cfg, rng_seed=3)
    for i, p in enumerate(prompts):
        t = _final(res.records[i], p, cfg)
        n = len(t.token_ids) + len(t.tail_ids)
        assert t.step_map + t.tail_steps == list(range(1, n + 1))


def test_threshold_zero_gives_block_ordinal():
    """Dynamic with threshold 0 unmasks a whole block per forward; the KV-store pass is not counted."""
    cfg = sim.SimConfig(threshold=0.0, max_new_tokens=11, num_gpu_blocks=4, preempt_prob=0.3)
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7]]
    res = sim.simulate(prompts, [0, 1, 2], cfg, rng_seed=4)
    for i, p in enumerate(prompts):
        t = _final(res.records[i], p, cfg)
        steps = t.step_map + t.tail_steps
        first = len(p) // 4
        assert steps == [(len(p) + j) // 4 - first + 1 for j in range(len(steps))]


def test_stop_bug_q1_output_start_is_fixed():
    """LMDeploy ignores a stop id in the first (prompt-tail) block when len(prompt) % B != 0; the fix stops it."""
    cfg = sim.SimConfig(max_new_tokens=20, stop_token_ids=(3,), threshold=0.5)
    prompts, seeds = [[1, 2, 3, 4, 5]] * 60, list(range(60))
    seen = {}
    try:
        for fix in (False, True):
            lp.set_output_start_fix(fix)
            res = sim.simulate(prompts, seeds, cfg)
            hits = continued = stop_inside = 0
            for i, p in enumerate(prompts):
                want = sim.reference_decode(p, seeds[i], cfg)
                rec = res.records[i]
                assert sim.same_trajectory(_final(rec, p, cfg), want)  # our own cut is right either way
                if want.finish_reason == "stop" and len(want.token_ids) <= 3:  # the stop is in the first block
                    hits += 1
                    continued += len(rec.token_ids) > 3
                    stop_inside += 3 in rec.engine_ids[:-1]
            seen[fix] = (hits, continued, stop_inside)
    finally:
        lp.set_output_start_fix(True)
    hits = seen[False][0]
    assert hits > 0
    assert seen[False] == (hits, hits, hits)  # upstream: decodes on, LMDeploy's output has the stop mid-sequence
    assert seen[True] == (hits, 0, 0)  # fixed: LMDeploy stops at that block


def test_stop_bug_q2_length_position_wins_and_we_cut_at_the_stop():
    """In the block where max_new_tokens is reached LMDeploy keeps an earlier stop id and what follows it."""
    cfg = sim.SimConfig(max_new_tokens=6, stop_token_ids=(3,), threshold=0.5)
    prompts, seeds = [[1, 2, 3, 4]] * 200, list(range(200))
    res = sim.simulate(prompts, seeds, cfg)
    q2 = 0
    for i, p in enumerate(prompts):
        rec = res.records[i]
        got = _final(rec, p, cfg)
        assert sim.same_trajectory(got, sim.reference_decode(p, seeds[i], cfg))
        if 3 in rec.engine_ids[:-1]:
            q2 += 1
            assert got.finish_reason == "stop" and got.token_ids[-1] == 3 and 3 not in got.token_ids[:-1]
            assert len(got.token_ids) < len(rec.engine_ids)
    assert q2 > 0


def _record(ids, steps, **kw):
    return lp.StepRecord(session_id=7, token_ids=ids, step_map=steps, engine_ids=ids, stop_pos=0, **kw)


def test_finalize_cuts_ids_and_steps_together():
    # prompt of 5, B = 4: response positions 5.. -> blocks end after response index 3, 7, 11
    rec = _record([10, 11, 12, 13, 9, 14, 15, 16, 17, 18, 19], [1, 1, 2, 3, 3, 4, 4, 5, 6, 6, 7])
    t = lp.finalize(rec, prompt_len=5, block_size=4, max_new_tokens=50, stop_token_ids=[9])
    assert (t.token_ids, t.step_map, t.tail_ids, t.tail_steps) == (
        [10, 11, 12, 13, 9],
        [1, 1, 2, 3, 3],
        [14, 15],
        [4, 4],
    )
    assert t.finish_reason == "stop"
    t = lp.finalize(rec, prompt_len=5, block_size=4, max_new_tokens=2, stop_token_ids=[9])
    assert (t.token_ids, t.tail_ids, t.finish_reason) == ([10, 11], [12], "length")
    t = lp.finalize(rec, prompt_len=5, block_size=4, max_new_tokens=11, stop_token_ids=[])
    assert t.finish_reason == "length" and len(t.token_ids) == 11 and t.tail_ids == []


def test_finalize_refuses_broken_records():
    with pytest.raises(RuntimeError, match="recorder failed"):
        lp.finalize(_record([1], [1], error="boom"), prompt_len=3, block_size=4, max_new_tokens=1, stop_token_ids=[])
    with pytest.raises(RuntimeError, match="neither a stop id"):
        lp.finalize(_record([1, 2, 3], [1, 2, 3]), prompt_len=1, block_size=4, max_new_tokens=9, stop_token_ids=[5])
    with pytest.raises(RuntimeError, match="unstamped"):
        lp.finalize(_record([1, 2, 3], [1, 0, 3]), prompt_len=1, block_size=4, max_new_tokens=3, stop_token_ids=[])


def test_records_are_popped_once_and_bounded():
    store = lp._RecordStore(limit=2)
    for sid in (1, 2, 3):
        store.put(lp.StepRecord(session_id=sid, token_ids=[], step_map=[], engine_ids=[], stop_pos=0))
    assert store.pop(1) is None and store.pop(3).session_id == 3 and store.pop(3) is None and len(store) == 1


def _lookalike(**changes):
    """A class with SchedulerSequenceDLLM's own members, as an unpatched LMDeploy would have them."""
    from lmdeploy.pytorch.strategies.dllm.sequence import SchedulerSequenceDLLM

    members = {k: v for k, v in vars(SchedulerSequenceDLLM).items() if k not in ("__dict__", "__weakref__", lp._MARK)}
    members["__dataclass_fields__"] = SchedulerSequenceDLLM.__dataclass_fields__
    members.pop("generated_step_map")
    for k, v in changes.items():
        if v is None:
            members.pop(k)
        else:
            members[k] = v
    return type("Lookalike", (), members)


def test_version_and_internals_guard():
    from lmdeploy.pytorch import consts
    from lmdeploy.pytorch.strategies.dllm.sequence import SchedulerSequenceDLLM

    with pytest.raises(RuntimeError, match="untested"):
        lp.check_version("0.17.0")
    lp.check_version("0.17.0", allow_untested=True)  # warns only
    lp.check_sequence_class(SchedulerSequenceDLLM, consts)  # the patched class still passes
    lp.check_sequence_class(_lookalike(), consts)
    with pytest.raises(RuntimeError, match="upstream records step maps"):
        lp.check_sequence_class(_lookalike(generated_step_map=property(lambda self: None)), consts)
    with pytest.raises(RuntimeError, match="set_stop_pos missing"):
        lp.check_sequence_class(_lookalike(set_stop_pos=None), consts)
    with pytest.raises(RuntimeError, match="_update_token_ids_decode"):
        lp.check_sequence_class(_lookalike(_update_token_ids_decode=lambda self, ids, mask, mode: None), consts)


def test_engine_config_guard():
    from lmdeploy import PytorchEngineConfig

    lp.check_engine_config(PytorchEngineConfig(dllm_block_length=4))
    for kwargs, words in [
        ({"enable_mp_engine": True}, "child process"),
        ({"dp": 2}, "data-parallel"),
        ({"enable_prefix_caching": True}, "older weights"),
    ]:
        with pytest.raises(ValueError, match=words):
            lp.check_engine_config(PytorchEngineConfig(dllm_block_length=4, **kwargs))


def test_sampling_rows_are_sequence_major_with_a_seed_per_position():
    """Upstream repeats per-sequence settings position-major; the patch re-lays them to match the logit rows."""
    from lmdeploy.pytorch.messages import SamplingParam

    cfg = sim.SimConfig()
    driver = sim.Sim(cfg, rng_seed=0)
    for i, temp in enumerate([0.5, 1.0, 1.5]):
        sid = 50 + i
        session = driver.sched.add_session(sid)
        param = SamplingParam(temperature=temp, top_k=0, random_seed=100 + i, max_new_tokens=8)
        session.add_sequence(np.array([1, 2, 3, 4, 5]), sampling_param=param)
    seqs = driver.sched.waiting
    out = driver.sampling.make_sampling_inputs(seqs)
    b = cfg.block_size
    assert out.temperature.view(3, b).tolist() == [[s.sampling_param.temperature] * b for s in seqs]
    seeds = out.random_seeds.view(3, b)
    assert seeds[:, 0].tolist() == [s.sampling_param.random_seed for s in seqs]
    assert len(set(seeds.flatten().tolist())) == 3 * b  # no two rows share a seed
    assert out.random_offsets.view(3, b).tolist() == [[s.num_valid_ids] * b for s in seqs]


def test_mask_id_comes_from_config_json(tmp_path):
    from lmdeploy.pytorch.config import ModelConfig

    from shared.model.tiny import init_tiny_sdar

    path = init_tiny_sdar(tmp_path / "tiny-sdar")
    cfg = ModelConfig.from_pretrained(str(path))
    assert cfg.model_paradigm == "dllm" and cfg.dllm_mask_token == 259  # not LMDeploy's hard-coded 151669


@pytest.mark.parametrize(
    ("theta", "scaling", "emb_type"),
    [
        (10_000.0, None, "Default"),
        (1_000_000.0, None, "Default"),
        (1_000_000.0, {"type": "linear", "factor": 2.0}, "LinearScaling"),
    ],
)
def test_rotary_settings_come_from_sdar_rope_theta(tmp_path, theta, scaling, emb_type):
    """SDAR loads as a plain PreTrainedConfig (rope_parameters None): LMDeploy's rotary builder must still see
    config.json's rope_theta and rope_scaling rather than crash, or fall back to a default base."""
    import json

    from lmdeploy.pytorch.config import ModelConfig
    from lmdeploy.pytorch.nn.rotary_embedding import build_rotary_params, get_rope_theta

    from shared.model.tiny import init_tiny_sdar

    path = init_tiny_sdar(tmp_path / "tiny-sdar", rope_theta=theta)
    raw = json.loads((path / "config.json").read_text())
    del raw["rope_parameters"]  # SDAR's own (transformers 4.x) config.json has rope_theta / rope_scaling only
    raw["rope_scaling"] = scaling
    (path / "config.json").write_text(json.dumps(raw))
    hf_config = ModelConfig.from_pretrained(str(path)).hf_config
    assert get_rope_theta(hf_config, default=1.0) == theta
    params = build_rotary_params(hf_config)
    assert params["emb_type"].name == emb_type
    assert params.get("scaling_factor", 1.0) == (scaling or {}).get("factor", 1.0)


def test_self_check_passes():
    sim.self_check()


def test_logprobs_survive_lmdeploys_copies_of_the_outputs():
    """The engine loop receives the agent's outputs through BatchedOutputs.to_cpu (and to_numpy / to_tensor across
    processes), which rebuild extra outputs field by field: the log-prob field must come through."""
    import torch
    from lmdeploy.pytorch.config import DLLMConfig
    from lmdeploy.pytorch.engine.model_agent import BatchedOutputs
    from lmdeploy.pytorch.strategies.dllm.model_agent import DLLMExtraInputs, DLLMModelAgentStrategy

    agent = DLLMModelAgentStrategy(DLLMConfig(block_length=4), 16)
    extra = DLLMExtraInputs(dllm_mask=torch.zeros(8, dtype=torch.uint8))
    logits = torch.randn(8, 17)
    tokens = torch.arange(8)
    setattr(extra, lp._LOGPROBS, lp.sampled_logprobs(logits, tokens))
    out = BatchedOutputs(
        next_token_ids=tokens, stopped=torch.zeros(2, dtype=torch.bool), extra_outputs=agent.make_extra_outputs(extra)
    )
    want = logits.log_softmax(-1)[torch.arange(8), tokens]
    for copy in (out.to_cpu(), out.to_numpy().to_tensor()):
        assert torch.allclose(torch.as_tensor(copy.extra_outputs.logprobs), want, atol=1e-6)
        assert torch.equal(torch.as_tensor(copy.extra_outputs.dllm_mask), extra.dllm_mask)
