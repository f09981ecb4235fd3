"""LoRA: only the adapter trains, the KL reference is the base with adapters disabled, checkpoints in peft's own
layout resume exactly, the merged model computes what the adapter model computes, weight versions move only adapter
tensors into the torch engine, a version that cannot be applied is an error, and packed == engine log-probs."""

from __future__ import annotations

import doctest
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from services.rollout.engines.torch_engine import TorchEngine
from services.trainer.config import LoraSettings, OptimConfig, SFTConfig, TrainerConfig
from services.trainer.learner import lora
from services.trainer.learner.objective import LossConfig
from services.trainer.learner.policy import TokenLogProbs
from services.trainer.learner.trainer import Learner
from services.trainer.learner.trajectory import build_batch, rollout_trajectory
from shared.contracts.wire import GenerationRequest, SamplingParams, StepBatch
from shared.model import adapter
from shared.model.sdar import load_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "scripts"))
from rl_step import fixed_groups  # noqa: E402

LORA = LoraSettings(r=4, alpha=8)


@pytest.fixture(scope="module")
def groups(tiny_dir):
    return fixed_groups(str(tiny_dir))


def _trainer(tiny_dir, out: Path, **kw) -> Learner:
    kw.setdefault("optim", OptimConfig(lr=1e-2))
    kw.setdefault("lora", LORA)
    return Learner(TrainerConfig(model=tiny_dir, output_dir=out, **kw))


def _randomise(peft_model, seed: int = 0, std: float = 0.05) -> None:
    """Non-zero adapter weights (lora_B starts at 0, which would make every comparison trivially the base)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.adapter_parameters(peft_model).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 40, 99, 3, 250, 7, 8, 9, 11]])


def test_doctests():
    assert doctest.testmod(lora).failed == 0


def test_settings_are_checked_naming_the_field(tiny_dir, tmp_path):
    with pytest.raises(ValidationError, match="ref_model"):
        TrainerConfig(model=tiny_dir, output_dir=tmp_path, lora=LORA, ref_model=tiny_dir)
    with pytest.raises(ValidationError, match="r"):
        LoraSettings(r=0)
    with pytest.raises(ValidationError, match="target_modules"):
        LoraSettings(target_modules=[])
    with pytest.raises(adapter.AdapterError, match="lora.target_modules.*qkv"):
        _trainer(tiny_dir, tmp_path, lora=LoraSettings(target_modules=["qkv"]))


def test_only_the_adapter_trains_and_the_reference_is_the_base(tiny_dir, tiny, tmp_path, groups):
    t = _trainer(tiny_dir, tmp_path / "run", loss=LossConfig(beta=0.1))
    assert t.ref is None  # no second copy of the model
    names = {n for n, p in t.unwrapped.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n for n in names)
    before = {n: p.detach().clone() for n, p in t.unwrapped.named_parameters()}
    m1 = t.rl_step(StepBatch.of(*groups))
    assert m1["kl"] == 0.0  # lora_B = 0: the adapted model starts exactly at the base
    t.rl_step(StepBatch.of(*groups))
    after = dict(t.unwrapped.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {n for n in names if ".lora_B." in n} | {n for n in names if ".lora_A." in n}
    # optimizer state only for the adapter: exp_avg / exp_avg_sq of each LoRA tensor, nothing of the base
    state = t.optimizer.optimizer.state
    assert sum(s["exp_avg"].numel() for s in state.values()) == sum(after[n].numel() for n in names)
    # the reference log-probs are the untouched base model's, while the policy has moved away from them
    traj = [rollout_trajectory(r) for g in groups[0] for r in g]
    batch = build_batch(traj, tiny.spec.mask_token_id)
    with torch.no_grad():
        base = TokenLogProbs(tiny.model)(batch)
        policy = t.policy(batch)
    assert torch.equal(t._ref_logprobs(batch), base)
    assert (policy - base).abs().max() > 1e-3


def test_checkpoint_holds_the_adapter_in_peft_layout(tiny_dir, tmp_path, groups):
    from peft import PeftModel

    t = _trainer(tiny_dir, tmp_path / "run")
    t.rl_step(StepBatch.of(*groups))
    ckpt = t.save()
    folder = ckpt / adapter.ADAPTER_DIR
    assert {adapter.ADAPTER_CONFIG, adapter.ADAPTER_WEIGHTS, adapter.BASE_FILE} <= {p.name for p in folder.iterdir()}
    assert not (ckpt / "model").exists() and t.weights_path(ckpt) == folder
    assert json.loads((folder / adapter.ADAPTER_CONFIG).read_text())["r"] == LORA.r
    opt = load_file(ckpt / "optimizer.safetensors")
    assert sum(v.numel() for k, v in opt.items() if k.endswith("exp_avg")) == sum(
        v.numel() for v in load_file(folder / adapter.ADAPTER_WEIGHTS).values()
    )
    # peft's own loader reads the folder and computes what the trainer's model computes
    reloaded = PeftModel.from_pretrained(load_model(tiny_dir).model, str(folder)).eval()
    t.unwrapped.eval()
    assert torch.equal(_logits(reloaded, IDS), _logits(t.peft, IDS))


def _losses(history) -> list[float]:
    return [m["loss"] for m in history]


def test_sft_interrupted_and_resumed_equals_uninterrupted(tiny_dir, tmp_path):
    from services.trainer.learner.sft import run_sft

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "response": str(2 * a)}) + "\n" for a in range(30)))
    base = {
        "model": tiny_dir,
        "data": data,
        "batch_size": 6,
        "micro_batch_size": 3,
        "save_every": 2,
        "chat_template": False,
        "optim": OptimConfig(lr=1e-2),
        "lora": LoraSettings(r=4, dropout=0.1),
    }
    straight = run_sft(SFTConfig(output_dir=tmp_path / "a", steps=4, **base), progress=False)
    first = run_sft(SFTConfig(output_dir=tmp_path / "b", steps=2, **base), progress=False)
    rest = run_sft(SFTConfig(output_dir=tmp_path / "b", steps=4, **base), resume=True, progress=False)
    assert len(rest) == 2 and _losses(first + rest) == _losses(straight)  # exact: same floats
    a, b = (load_file(tmp_path / r / "checkpoints" / "step-00000004" / "adapter" / adapter.ADAPTER_WEIGHTS) for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa, ob = (load_file(tmp_path / r / "checkpoints" / "step-00000004" / "optimizer.safetensors") for r in "ab")
    assert all(torch.equal(oa[k], ob[k]) for k in oa)


def test_rl_interrupted_and_resumed_equals_uninterrupted(tiny_dir, tmp_path, groups):
    kw = {"loss": LossConfig(beta=0.05), "passes": 2, "lora": LoraSettings(r=4, dropout=0.1)}
    straight = _trainer(tiny_dir, tmp_path / "a", **kw)
    losses = [straight.rl_step(StepBatch.of(*groups))["loss"] for _ in range(2)]
    straight.save()
    losses.append(straight.rl_step(StepBatch.of(*groups))["loss"])
    first = _trainer(tiny_dir, tmp_path / "b", **kw)
    resumed_losses = [first.rl_step(StepBatch.of(*groups))["loss"] for _ in range(2)]
    first.save()
    del first
    resumed = _trainer(tiny_dir, tmp_path / "b", **kw)
    assert resumed.resume() and resumed.state.step == 2
    resumed_losses.append(resumed.rl_step(StepBatch.of(*groups))["loss"])
    assert resumed_losses == losses
    a, b = adapter.adapter_parameters(straight.peft), adapter.adapter_parameters(resumed.peft)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_merged_checkpoint_computes_what_the_adapter_model_computes(tiny_dir, tmp_path, groups):
    from typer.testing import CliRunner

    from services.cli import app

    t = _trainer(tiny_dir, tmp_path / "run")
    _randomise(t.peft)
    ckpt = t.save()
    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge-lora", str(ckpt), "--out", str(out)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "sdar" and "lora" not in json.dumps(config)
    merged = load_model(out)  # transformers' Qwen3ForCausalLM, through the SDAR adapter: unchanged loading
    t.unwrapped.eval()
    diff = (_logits(merged.model, IDS) - _logits(t.peft, IDS)).abs().max()
    assert diff <= 1e-5
    assert not torch.equal(_logits(merged.model, IDS), _logits(load_model(tiny_dir).model, IDS))
    # the command refuses a folder without an adapter: one line, exit 2
    bad = CliRunner().invoke(app, ["merge-lora", str(tiny_dir), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "no LoRA adapter" in bad.output


def test_publish_merged_writes_sdar_weights_next_to_the_adapter(tiny_dir, tmp_path, groups):
    t = _trainer(tiny_dir, tmp_path / "run", lora=LoraSettings(r=4, publish="merged"))
    _randomise(t.peft)
    ckpt = t.save()
    assert t.weights_path(ckpt) == ckpt / "model" and (ckpt / adapter.ADAPTER_DIR / adapter.ADAPTER_WEIGHTS).is_file()
    t.unwrapped.eval()
    assert (_logits(load_model(ckpt / "model").model, IDS) - _logits(t.peft, IDS)).abs().max() <= 1e-5


# --------------------------------------------------------------------------- weight versions in the engine


def _adapter_version(tiny_dir, out: Path, seed: int, settings: LoraSettings = LORA) -> Path:
    """An adapter folder with non-zero weights trained (here: drawn) on the tiny base."""
    base = load_model(tiny_dir)
    peft_model = lora.apply_lora(base.model, settings)
    _randomise(peft_model, seed)
    return lora.save_adapter(peft_model, out, base.spec)


def _sample(engine, n: int = 4):
    reqs = [GenerationRequest(prompt_ids=[5, 6, 7 + i], params=SamplingParams(seed=i, max_new_tokens=12,
            stop_token_ids=[], logprobs=True)) for i in range(n)]  # fmt: skip
    return [r for (r,) in engine.generate(reqs)]


def test_torch_engine_applies_adapter_versions_in_place(tiny_dir, tmp_path):
    v1, v2 = (_adapter_version(tiny_dir, tmp_path / f"v{i}", seed=i) for i in (1, 2))
    engine = TorchEngine(load_model(tiny_dir))
    base_ptrs = {n: p.data_ptr() for n, p in engine.model.named_parameters()}
    engine.load_weights(v1, 1)
    engine.load_weights(v2, 2)
    # the base tensors never moved; only the adapter's bytes were copied
    kept = {adapter.base_key(n): p.data_ptr() for n, p in engine.model.named_parameters() if adapter.base_key(n)}
    assert kept == base_ptrs
    tensors = load_file(v2 / adapter.ADAPTER_WEIGHTS)
    assert engine.adapter_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    full = sum(p.numel() * p.element_size() for p in load_model(tiny_dir).model.parameters())
    assert engine.adapter_bytes < full / 10
    # what it serves is the merged model of v2: same tokens, log-probs within float error
    merged = TorchEngine(load_model(lora.merge_lora(v2, tmp_path / "m2", base=tiny_dir)))
    a, b = _sample(engine), _sample(merged)
    assert [r.token_ids for r in a] == [r.token_ids for r in b] and all(r.policy_version == 2 for r in a)
    assert (
        max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra.logprobs, rb.logprobs, strict=True))
        <= 1e-5
    )


def test_packed_log_probs_equal_engine_log_probs_with_an_adapter(tiny_dir, tmp_path):
    """The exactness claim of test_trajectory with non-zero adapter weights on a sharpened base."""
    sharp = tmp_path / "sharp"
    shutil.copytree(tiny_dir, sharp)
    w = load_file(sharp / "model.safetensors")
    w["lm_head.weight"] = w["lm_head.weight"] * 8.0  # logits x8: the dynamic rule unmasks several tokens a step
    save_file(w, sharp / "model.safetensors", metadata={"format": "pt"})
    folder = _adapter_version(sharp, tmp_path / "ad", seed=3, settings=LoraSettings(r=8, alpha=16))
    engine = TorchEngine(load_model(sharp))
    engine.load_weights(folder, 1)
    g = torch.Generator().manual_seed(0)
    reqs = []
    for i in range(12):
        prompt = torch.randint(0, 250, (int(torch.randint(1, 15, (1,), generator=g)),), generator=g).tolist()
        params = SamplingParams(seed=i, max_new_tokens=int(torch.randint(5, 23, (1,), generator=g)),
                                confidence_threshold=0.02, stop_token_ids=[257], logprobs=True)  # fmt: skip
        reqs.append(GenerationRequest(prompt_ids=prompt, params=params))
    rollouts = [r for (r,) in engine.generate(reqs)]
    steps = sum(max(r.step_map + r.tail_steps) for r in rollouts)
    assert sum(len(r.step_map) + len(r.tail_steps) for r in rollouts) / steps > 1.2  # multi-token steps
    peft_model, loaded = lora.load_with_adapter(folder, sharp)  # the trainer's side: a fresh base + the adapter
    batch = build_batch([rollout_trajectory(r) for r in rollouts], loaded.spec.mask_token_id)
    with torch.no_grad():
        packed = TokenLogProbs(loaded.model)(batch)[batch.canonical_order()]
        bare = TokenLogProbs(load_model(sharp).model)(batch)[batch.canonical_order()]
    behav = torch.tensor([x for r in rollouts for x in r.logprobs])
    assert (packed - behav).abs().max() <= 1e-5
    assert (bare - behav).abs().max() > 1e-3  # the adapter matters: the base alone gives other log-probs


def test_a_version_that_cannot_be_applied_is_an_error(tiny_dir, tmp_path):
    from services.rollout.app import create_app
    from services.rollout.engines.lmdeploy_engine import LMDeployEngine
    from services.rollout.settings import RolloutSettings
    from shared.model.tiny import init_tiny

    root = tmp_path / "root"
    shutil.copytree(tiny_dir, root / "v0")
    good = _adapter_version(tiny_dir, root / "good", seed=1)
    other = _adapter_version(init_tiny(tmp_path / "other", seed=5), root / "other", seed=1)  # another base
    wider = _adapter_version(tiny_dir, root / "wider", seed=1, settings=LoraSettings(r=8))
    nobase = root / "nobase"
    shutil.copytree(good, nobase)
    (nobase / adapter.BASE_FILE).unlink()
    bent = root / "bent"
    shutil.copytree(good, bent)
    t = load_file(good / adapter.ADAPTER_WEIGHTS)
    key = next(k for k in t if "q_proj.lora_A" in k)
    save_file({**t, key: t[key][:, :-1].contiguous()}, bent / adapter.ADAPTER_WEIGHTS)
    settings = RolloutSettings(model=root / "v0", checkpoint_root=root, api_token="t")
    auth = {"Authorization": "Bearer t"}
    body = {"prompt_ids": [[5, 6, 7]], "params": {"seed": 3, "max_new_tokens": 8, "stop_token_ids": []}}
    with TestClient(create_app(settings, engine=TorchEngine(load_model(tiny_dir)))) as c:

        def push(path, version):
            return c.post("/v1/weights", json={"version": version, "path": str(path)}, headers=auth)

        for folder, needle in [(other, "another base"), (nobase, adapter.BASE_FILE), (bent, "q_proj")]:
            r = push(folder, 1)
            assert r.status_code == 422 and needle in r.json()["detail"], r.text
        assert push(good, 1).status_code == 200
        served = c.post("/v1/generate", json=body).json()
        r = push(wider, 2)  # another rank than the served adapter: refused, v1 still served
        assert r.status_code == 422 and "r=8" in r.json()["detail"]
        again = c.post("/v1/generate", json=body).json()
        assert again == served and again["policy_version"] == 1
    # LMDeploy builds adapters with its engine and cannot swap them: an adapter version is refused by name
    with pytest.raises(ValueError, match="lora.publish=merged"):
        LMDeployEngine.__new__(LMDeployEngine).load_weights(good, 1)
