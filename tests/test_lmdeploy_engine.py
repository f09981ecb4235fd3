"""The `lmdeploy` engine on CPU: the real engine wrapper and step-map recorder, with LMDeploy's AsyncEngine replaced
by a stand-in that decodes through LMDeploy's real scheduler classes (lmdeploy_sim.simulate), with the fake model
or with the tiny torch model sampled as the torch engine samples.

Covers: the rollout contract (same as the torch engine's, and the torch engine's very rollouts and log-probs for
the same model), behaviour log-probs, grouping by LMDeploy's engine-wide settings, cancellation, numerical edge
settings, weight versions (rebuild and in-place paths), the rollout service choosing the engine by its setting
alone, and the error naming the extra when LMDeploy is absent.
"""

import itertools
import math
import os
import shutil
import sys
import threading
from copy import deepcopy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from services.rollout.engines import GenerationCancelled, create_engine
from shared.contracts.wire import MAX_ID, GenerationRequest, Rollout, SamplingParams
from shared.model.step_map import denoising_steps

try:
    import lmdeploy  # noqa: F401

    HAVE_LMDEPLOY = True
except ImportError:
    if os.environ.get("CI"):
        raise ImportError(
            "CI must install LMDeploy's pure-Python scheduler (see docs/lmdeploy.md, CPU install for tests)"
        ) from None
    HAVE_LMDEPLOY = False

needs_lmdeploy = pytest.mark.skipif(not HAVE_LMDEPLOY, reason="lmdeploy not installed (docs/lmdeploy.md)")

EXTRA_EOS = 258
"""An id the stand-in adds to the stop ids, as LMDeploy adds the tokenizer's and generation_config's eos."""


class FakeAsyncEngine:
    """What LMDeployEngine uses of `lmdeploy.serve.core.async_engine.AsyncEngine`, decoding on CPU."""

    instances: list["FakeAsyncEngine"] = []
    model = None  # a lmdeploy_sim.SimModel (read from the class: a plain function); None = the fake model
    sim_options: dict = {}

    def __init__(self, model_path, cfg):
        self.model_path, self.backend_config = model_path, cfg
        self.session_len = 4096
        self.session_mgr = SimpleNamespace(get=lambda ids=itertools.count(1): SimpleNamespace(session_id=next(ids)))
        self.started = self.closed = False
        self.requests = []
        FakeAsyncEngine.instances.append(self)

    def start_loop(self, loop, use_async_api=False):
        self.started = True

    def close(self):
        self.closed = True

    async def preprocess(self, messages, session, gen_config=None, input_ids=None):
        assert messages is None and input_ids
        gc = deepcopy(gen_config)
        gc.stop_token_ids = sorted({*(gc.stop_token_ids or []), EXTRA_EOS})  # as LMDeploy does
        return SimpleNamespace(session=session, inputs={"input_ids": list(input_ids)}, gen_config=gc)

    async def generate(self, req, stream_response=True):
        from oracles import lmdeploy_sim as lp

        bc, gc = self.backend_config, req.gen_config
        self.requests.append(req)
        stops = tuple(gc.stop_token_ids or ())
        cfg = lp.SimConfig(
            block_size=bc.dllm_block_length,
            strategy=bc.dllm_unmasking_strategy,
            threshold=bc.dllm_confidence_threshold,
            denoising_steps=bc.dllm_denoising_steps,
            max_new_tokens=gc.max_new_tokens,
            stop_token_ids=stops,
            temperature=gc.temperature,
            logit_width=1024,  # prompts are tiny-tokenizer ids (< 320)
            **self.sim_options,
        )
        sid = req.session.session_id
        res = lp.simulate(
            [req.inputs["input_ids"]],
            [gc.random_seed],
            cfg,
            session_ids=[sid],
            keep_published=True,
            model=type(self).model,
        )
        ids = res.records[0].engine_ids
        reason = "stop" if ids and ids[-1] in stops else "length"
        yield SimpleNamespace(token_ids=ids[:-1] if reason == "stop" else ids, finish_reason=None)
        yield SimpleNamespace(token_ids=[], finish_reason=reason)


@pytest.fixture
def fake(monkeypatch):
    from services.rollout.engines import lmdeploy_engine

    FakeAsyncEngine.instances = []
    monkeypatch.setattr(lmdeploy_engine, "build_async_engine", FakeAsyncEngine)
    monkeypatch.setattr(FakeAsyncEngine, "model", None)
    monkeypatch.setattr(FakeAsyncEngine, "sim_options", {})
    return FakeAsyncEngine


def torch_sim_model(loaded):
    """A loaded torch model as a `lmdeploy_sim.SimModel`, sampling as the torch engine does.

    Logits: the naive decoder's forward (the whole sequence, block-causal). Tokens: `sample_block` at T on the
    sample's own uniforms, row s of block k's draw at the block's s-th denoising forward. The forward index is
    recovered from which positions are still masked (each forward unmasks some, so a block's states are distinct),
    so a preempted sequence that re-prefills the same state draws the same row again.
    """
    from services.rollout.engines.sampling import block_uniforms, sample_block
    from shared.model.masks import block_causal_mask, to_additive

    b = loaded.spec.block_size
    dtype = next(loaded.model.parameters()).dtype
    states: dict[tuple[int, int], dict[bytes, int]] = {}

    @torch.inference_mode()
    def forward(seed, ids, masked, block_start, prompt_len, temperature):
        x = torch.as_tensor(ids, dtype=torch.long)[None]
        attn = to_additive(block_causal_mask(x.shape[1], b)[None], dtype)
        hidden = loaded.model.model(input_ids=x, attention_mask=attn, use_cache=False).last_hidden_state
        logits = loaded.model.lm_head(hidden[0, -b:]).float()
        if not masked.any():  # LMDeploy's KV-store pass of a finished block: nothing is sampled
            return logits, np.zeros(b, dtype=np.int64)
        seen = states.setdefault((seed, block_start), {})
        step = seen.setdefault(masked.tobytes(), len(seen))
        gen = torch.Generator().manual_seed(seed)
        for _ in range(block_start // b - prompt_len // b + 1):
            u = block_uniforms(gen, b)
        tok, _, _ = sample_block(
            logits[None], u[step][None], torch.full((1,), temperature), torch.zeros(1, dtype=torch.long), torch.ones(1)
        )
        return logits, tok[0].numpy()

    return forward


@pytest.fixture
def engine(fake, tiny_dir):
    eng = create_engine("lmdeploy", tiny_dir, device="auto", max_batch_size=8)
    yield eng
    eng.close()


def expected(prompt, rollout, *, extra_stops=()):
    """The reference trajectory for one rollout: the fake model decoded by our own rules."""
    from oracles import lmdeploy_sim as lp

    p = rollout.params
    cfg = lp.SimConfig(
        block_size=p.block_size,
        strategy=p.strategy.value,
        threshold=p.confidence_threshold,
        denoising_steps=p.denoising_steps,
        max_new_tokens=p.max_new_tokens,
        stop_token_ids=tuple(p.stop_token_ids),
        temperature=p.temperature if p.temperature > 0 else 1.0,  # greedy reaches LMDeploy as T = 1, no sampling
    )
    return lp.reference_decode(prompt, rollout.seed, cfg)


def assert_contract(r: Rollout, prompt: list[int]) -> None:
    """What every engine's rollout satisfies (docs/design.md section 2)."""
    p = r.params
    b, stops = p.block_size, set(p.stop_token_ids)
    assert r.prompt_ids == prompt and len(r.step_map) == len(r.token_ids) and min(r.step_map) >= 1
    assert (len(prompt) + len(r.token_ids) + len(r.tail_ids)) % b == 0 and len(r.tail_ids) < b
    assert not stops & set(r.token_ids[:-1])
    if r.finish_reason == "stop":
        assert r.token_ids[-1] in stops
    else:
        assert len(r.token_ids) == p.max_new_tokens
    assert p.block_size is not None and p.denoising_steps is not None and p.stop_token_ids is not None


@needs_lmdeploy
def test_rollouts_equal_the_reference_and_the_torch_contract(engine, tiny):
    from services.rollout.engines.torch_engine import TorchEngine

    reqs = [
        GenerationRequest(prompt_ids=[1, 2, 3, 4, 5], params=SamplingParams(n=3, seed=11, max_new_tokens=9)),
        GenerationRequest(
            prompt_ids=[6, 7, 8, 9], params=SamplingParams(seed=5, max_new_tokens=14, stop_token_ids=[3])
        ),
        GenerationRequest(prompt_ids=[2], params=SamplingParams(n=2, seed=2, max_new_tokens=6, stop_token_ids=[3, 5])),
    ]
    out = engine.generate(reqs)
    ref = TorchEngine(tiny).generate(reqs)
    assert [len(g) for g in out] == [len(g) for g in ref] == [3, 1, 2]
    reasons = set()
    for req, group, ref_group in zip(reqs, out, ref, strict=True):
        for r, t in zip(group, ref_group, strict=True):
            assert_contract(r, req.prompt_ids)
            assert_contract(t, req.prompt_ids)
            assert (r.params, r.seed, r.policy_version, r.logprobs) == (t.params, t.seed, t.policy_version, None)
            want = expected(req.prompt_ids, r)
            assert (r.token_ids, r.step_map, r.tail_ids, r.tail_steps, r.finish_reason) == (
                want.token_ids,
                want.step_map,
                want.tail_ids,
                want.tail_steps,
                want.finish_reason,
            )
            assert r.text == engine.tokenizer.decode(
                r.token_ids[:-1] if r.finish_reason == "stop" else r.token_ids, skip_special_tokens=True
            )
            reasons.add(r.finish_reason)
    assert reasons == {"stop", "length"}


@needs_lmdeploy
def test_requests_are_sent_as_ids_with_the_contract_stop_ids_and_sampling(engine, fake):
    params = SamplingParams(seed=1, max_new_tokens=4, stop_token_ids=[], temperature=0.7, top_k=20, top_p=0.9)
    engine.generate([GenerationRequest(prompt_ids=[1, 2, 3], params=params)])
    (req,) = fake.instances[-1].requests
    gc = req.gen_config
    assert req.inputs["input_ids"] == [1, 2, 3]
    assert gc.stop_token_ids == [] and not gc.ignore_eos  # LMDeploy's extra eos is removed, not banned
    assert (gc.do_sample, gc.temperature, gc.top_k, gc.top_p, gc.random_seed) == (True, 0.7, 20, 0.9, 1)
    bc = fake.instances[-1].backend_config
    assert (bc.dllm_block_length, bc.enable_mp_engine, bc.enable_prefix_caching) == (4, False, False)
    engine.generate([GenerationRequest(prompt_ids=[1], params=SamplingParams(temperature=0, max_new_tokens=2))])
    gc = fake.instances[-1].requests[-1].gen_config
    assert (gc.do_sample, gc.temperature) == (False, 1.0)


@needs_lmdeploy
def test_engine_wide_settings_group_requests_and_rebuild(engine, fake):
    reqs = [
        GenerationRequest(prompt_ids=[1, 2, 3], params=SamplingParams(seed=1, max_new_tokens=5)),
        GenerationRequest(prompt_ids=[4, 5], params=SamplingParams(seed=2, max_new_tokens=5, temperature=0.5)),
        GenerationRequest(
            prompt_ids=[6], params=SamplingParams(seed=3, max_new_tokens=6, strategy="sequential", denoising_steps=2)
        ),
    ]
    out = engine.generate(reqs)
    assert len(fake.instances) == 2 and fake.instances[0].closed  # one rebuild, for the sequential request
    assert fake.instances[-1].backend_config.dllm_unmasking_strategy == "sequential"
    assert engine.settings.strategy == "sequential" and engine.settings.denoising_steps == 2
    # what a strategy ignores does not force a rebuild: sequential ignores the threshold
    again = SamplingParams(seed=3, max_new_tokens=6, strategy="sequential", denoising_steps=2, confidence_threshold=0.1)
    engine.generate([GenerationRequest(prompt_ids=[6], params=again)])
    assert len(fake.instances) == 2
    for req, (r,) in zip(reqs, out, strict=True):
        want = expected(req.prompt_ids, r)
        assert (r.token_ids, r.step_map) == (want.token_ids, want.step_map)


@needs_lmdeploy
def test_unsupported_requests_are_value_errors(engine):
    for params, words in [
        (SamplingParams(logprobs=True, temperature=0.7, top_k=5), r"top_k: .*before its top_k filter.*got top_k=5"),
        (SamplingParams(logprobs=True, top_p=0.9), r"top_p: .*before its top_p filter.*got top_p=0.9"),
        (SamplingParams(logprobs=True, temperature=0), r"temperature: greedy decoding"),
        (SamplingParams(temperature=3.0), "temperature"),
        (SamplingParams(max_new_tokens=5000), "session_len"),
    ]:
        with pytest.raises(ValueError, match=words):
            engine.generate([GenerationRequest(prompt_ids=[1, 2], params=params)])
    with pytest.raises(ValueError, match="prompt_ids"):
        engine.generate([GenerationRequest(prompt_ids=[1, 10**6])])


@needs_lmdeploy
def test_cpu_device_and_unknown_options_are_refused(fake, tiny_dir):
    with pytest.raises(ValueError, match="CUDA only"):
        create_engine("lmdeploy", tiny_dir, device="cpu")
    with pytest.raises(ValueError, match="unknown options"):
        create_engine("lmdeploy", tiny_dir, device="auto", enable_mp_engine=True)


@needs_lmdeploy
def test_without_cuda_the_real_engine_refuses_to_build(tiny_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        create_engine("lmdeploy", tiny_dir)


@needs_lmdeploy
def test_weight_versions_rebuild_when_not_in_process(engine, fake, tiny_dir, tmp_path):
    v1 = shutil.copytree(tiny_dir, tmp_path / "v1")
    engine.load_weights(v1, 1)
    assert engine.policy_version == 1
    assert fake.instances[-1].model_path == str(v1) and fake.instances[0].closed
    (r,) = engine.generate([GenerationRequest(prompt_ids=[1, 2], params=SamplingParams(max_new_tokens=3))])[0]
    assert r.policy_version == 1


@needs_lmdeploy
def test_weight_versions_load_in_place_with_lmdeploys_loader(engine, fake, tiny_dir, tmp_path):
    """Same architecture and an in-process model: LMDeploy's weight loader fills the running model."""
    import contextlib

    import torch

    loaded = []

    class Model(torch.nn.Module):
        def load_weights(self, weights):
            loaded.extend(name for name, _ in weights)

    class GraphRunner:  # what LMDeploy's agent holds, eager mode included: no load_weights of its own
        def __init__(self):
            self.model = Model()

        def get_model(self):
            return self.model

    resets = []
    agent = SimpleNamespace(patched_model=GraphRunner(), all_context=contextlib.nullcontext, device="cpu",
                            reset_graph_runner=lambda: resets.append(1))  # fmt: skip
    fake.instances[-1].engine = SimpleNamespace(executor=SimpleNamespace(model_agent=agent))
    v2 = shutil.copytree(tiny_dir, tmp_path / "v2")
    engine.load_weights(v2, 2)
    assert len(fake.instances) == 1 and engine.policy_version == 2  # no rebuild
    assert "model.embed_tokens.weight" in loaded and "lm_head.weight" in loaded
    assert resets == [1]  # captured graphs are dropped after the load


@needs_lmdeploy
def test_weights_with_another_spec_are_refused(engine, tmp_path):
    from shared.model.tiny import init_tiny

    other = init_tiny(tmp_path / "b8", block_size=8)
    with pytest.raises(ValueError, match="weights"):
        engine.load_weights(other, 1)


@needs_lmdeploy
@pytest.mark.parametrize("kind", ["torch", "lmdeploy"])
def test_rollout_service_picks_the_engine_by_setting_alone(fake, tiny_dir, kind):
    from fastapi.testclient import TestClient

    from services.rollout.app import create_app
    from services.rollout.settings import RolloutSettings

    settings = RolloutSettings(model=tiny_dir, engine=kind)
    with TestClient(create_app(settings)) as client:
        assert client.get("/ready").json()["engine"] == kind
        body = {"prompts": ["1+1="], "params": {"n": 2, "seed": 3, "max_new_tokens": 5}}
        r = client.post("/v1/generate", json=body)
        assert r.status_code == 200, r.text
        group = r.json()["rollouts"][0]
        assert len(group) == 2 and all(len(x["step_map"]) == len(x["token_ids"]) for x in group)
    assert len(fake.instances) == (kind == "lmdeploy")


def test_lmdeploy_absent_names_the_extra(monkeypatch, tiny_dir):
    monkeypatch.setitem(sys.modules, "lmdeploy", None)  # `import lmdeploy` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'gtpo\[lmdeploy\]'"):
        create_engine("lmdeploy", tiny_dir)


def test_rollout_service_without_lmdeploy_fails_at_startup_naming_the_extra(monkeypatch, tiny_dir):
    from fastapi.testclient import TestClient

    from services.rollout.app import create_app
    from services.rollout.settings import RolloutSettings

    monkeypatch.setitem(sys.modules, "lmdeploy", None)
    with (
        pytest.raises(ImportError, match=r"gtpo\[lmdeploy\]"),
        TestClient(create_app(RolloutSettings(model=tiny_dir, engine="lmdeploy"))),
    ):
        pass


@needs_lmdeploy
def test_gpu_check_script_dry_run_with_the_torch_engine(tmp_path):
    """scripts/gpu_check.py runs once on a GPU box; its stages are exercised here with the torch engine on CPU."""
    import json
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "scripts/gpu_check.py", "--engine", "torch", "--skip-graphs", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}  # tiny tensors: one thread is fastest
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert {k: v["result"] for k, v in stages.items()} == {
        **dict.fromkeys(["patch", "build", "rl", "greedy", "stop", "weights", "sequential", "tau0"], "PASS"),
        "graphs": "SKIP",
    }


@needs_lmdeploy
def test_logprobs_are_the_behaviour_log_probs_of_the_reference(engine):
    """At T = 1, top-k 0, top-p 1 the recorder's log-prob is log softmax(logits)[token] of the forward that unmasked
    the token: the reference decoder's value under the torch engine's maths (`sampling_log_probs`)."""
    reqs = [
        GenerationRequest(
            prompt_ids=[1, 2, 3, 4, 5], params=SamplingParams(n=2, seed=4, max_new_tokens=9, logprobs=True)
        ),
        GenerationRequest(
            prompt_ids=[7], params=SamplingParams(seed=8, max_new_tokens=6, stop_token_ids=[3], logprobs=True)
        ),
    ]
    checked = 0
    for req, group in zip(reqs, engine.generate(reqs), strict=True):
        for r in group:
            want = expected(req.prompt_ids, r)
            assert (r.token_ids, r.step_map) == (want.token_ids, want.step_map)
            assert len(r.logprobs) == len(r.token_ids) and all(math.isfinite(x) and x <= 0 for x in r.logprobs)
            assert max(abs(a - b) for a, b in zip(r.logprobs, want.logprobs, strict=True)) <= 1e-5
            checked += len(r.logprobs)
    assert checked >= 20
    ((plain,),) = engine.generate(
        [GenerationRequest(prompt_ids=[7], params=reqs[1].params.model_copy(update={"logprobs": False}))]
    )
    assert plain.logprobs is None


@needs_lmdeploy
@pytest.mark.parametrize(("model", "tol"), [("tiny", 1e-5), ("peaky", 2e-3)])  # peaky: fp32 rounding x 200
def test_through_lmdeploys_scheduler_the_tiny_model_gives_the_torch_engines_rollouts(
    request, fake, tiny_dir, model, tol
):
    """LMDeploy's scheduler, unmasking and stopping code with our patch, driven by the tiny model's logits and the
    torch engine's sampler: the very rollouts of the torch engine (tokens, step maps, tails, finish reasons) at
    temperatures 0.6 to 1.7 mixed in one batch, and its log-probs within `tol` (the torch engine caches KV, the stand-in recomputes the sequence)."""
    from services.rollout.engines.torch_engine import TorchEngine

    loaded = request.getfixturevalue(model)
    fake.model = torch_sim_model(loaded)
    # preemption with a small KV pool: re-prefilled states must draw what they drew before
    fake.sim_options = {
        "vocab": loaded.model.config.vocab_size,
        "mask_id": loaded.spec.mask_token_id,
        "preempt_prob": 0.3,
        "num_gpu_blocks": 4,
    }
    stops = list(range(0, 320, 9))  # about one token in nine stops: stops in the first block and later ones
    reqs = [
        GenerationRequest(
            prompt_ids=list(range(10, 10 + n)),
            params=SamplingParams(
                n=2, seed=30 + n, max_new_tokens=10, stop_token_ids=stops, logprobs=True, temperature=temperature
            ),
        )
        # the settings the recorder is exact at (issue 34): any temperature, no top-k, no top-p
        for n, temperature in zip((1, 2, 3, 4, 5, 7, 9), (1.0, 0.7, 1.3, 0.6, 1.0, 1.7, 0.85), strict=True)
    ]
    eng = create_engine("lmdeploy", tiny_dir, device="auto", max_batch_size=8)
    try:
        out = eng.generate(reqs)
    finally:
        eng.close()
    ref = TorchEngine(loaded).generate(reqs)
    reasons, multi = set(), 0
    for group, ref_group in zip(out, ref, strict=True):
        for r, t in zip(group, ref_group, strict=True):
            assert (r.token_ids, r.step_map, r.tail_ids, r.tail_steps, r.finish_reason) == (
                t.token_ids,
                t.step_map,
                t.tail_ids,
                t.tail_steps,
                t.finish_reason,
            )
            assert max(abs(a - b) for a, b in zip(r.logprobs, t.logprobs, strict=True)) <= tol
            reasons.add(r.finish_reason)
            multi += denoising_steps(r.step_map) < len(r.step_map)
    assert reasons == {"stop", "length"}
    if model == "peaky":
        assert multi > 0  # several tokens unmasked in one step really happened


@needs_lmdeploy
def test_cancel_set_raises_and_the_engine_serves_on(engine, fake):
    cancel = threading.Event()
    cancel.set()
    req = GenerationRequest(prompt_ids=[1, 2, 3], params=SamplingParams(seed=1, max_new_tokens=6))
    with pytest.raises(GenerationCancelled):
        engine.generate([req], cancel=cancel)
    assert fake.instances[-1].requests == []  # nothing reached LMDeploy
    ((r,),) = engine.generate([req], cancel=threading.Event())
    assert r.token_ids == expected(req.prompt_ids, r).token_ids


@needs_lmdeploy
def test_numerical_edge_settings_reach_lmdeploy_in_range(engine, fake):
    """A vanishing temperature is greedy, a top-k past the vocabulary is no top-k, and stop ids outside the
    vocabulary (never sampled) are not sent: nothing LMDeploy would overflow on."""
    for temperature in (1e-300, 1e-45, 1e-6):
        params = SamplingParams(seed=1, max_new_tokens=3, temperature=temperature)
        ((r,),) = engine.generate([GenerationRequest(prompt_ids=[1, 2], params=params)])
        gc = fake.instances[-1].requests[-1].gen_config
        assert (gc.do_sample, gc.temperature, r.params.temperature) == (False, 1.0, 0.0)
    params = SamplingParams(seed=1, max_new_tokens=5, top_k=MAX_ID, stop_token_ids=[MAX_ID, 3])
    ((r,),) = engine.generate([GenerationRequest(prompt_ids=[1, 2], params=params)])
    gc = fake.instances[-1].requests[-1].gen_config
    assert (gc.top_k, gc.stop_token_ids, r.params.top_k) == (0, [3], 0)
    assert r.params.stop_token_ids == [MAX_ID, 3]  # the contract's own list, cut by us


@needs_lmdeploy
def test_logprobs_need_the_model_agent_in_this_process(fake, tiny_dir):
    eng = create_engine("lmdeploy", tiny_dir, device="auto", tp=2)
    try:
        with pytest.raises(ValueError, match=r"logprobs: .*tp=1 .*tp=2"):
            eng.generate([GenerationRequest(prompt_ids=[1, 2], params=SamplingParams(logprobs=True))])
        ((r,),) = eng.generate([GenerationRequest(prompt_ids=[1, 2], params=SamplingParams(max_new_tokens=3))])
        assert r.logprobs is None
    finally:
        eng.close()
