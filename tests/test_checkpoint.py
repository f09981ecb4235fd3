"""Trainer checkpoints: pickle-free files, exact resume, retention, SDAR-loadable weights, clear errors."""

from __future__ import annotations

import ast
import doctest
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import services.trainer.learner.checkpoint as ckpt_module
from services.trainer.learner.checkpoint import (
    CheckpointError,
    TrainerState,
    checkpoint_dir,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
)
from shared.model.sdar import load_model
from shared.model.tiny import init_tiny

VOCAB = 256  # byte tokens of the tiny tokenizer


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory) -> Path:
    return init_tiny(tmp_path_factory.mktemp("ckpt") / "init", seed=0)


def _warmup(step: int) -> float:
    return min(1.0, (step + 1) / 4)


def _setup(init_dir: Path):
    """A fresh model from the init checkpoint, AdamW and a LambdaLR warmup (what a trainer builds on start)."""
    loaded = load_model(init_dir)
    loaded.model.train()
    opt = torch.optim.AdamW(loaded.model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup)
    return loaded, opt, sched


def train_steps(model, opt, sched, k: int) -> list[float]:
    """k optimizer steps on random data drawn from the torch, python and numpy global RNGs."""
    losses = []
    for _ in range(k):
        length = random.randint(6, 10)  # python RNG decides the shape
        ids = torch.randint(0, VOCAB, (2, length))
        shift = int(np.random.randint(1, 4))  # numpy RNG decides the targets
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ((ids + shift) % VOCAB).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _assert_same(a, b, where: str = "root") -> None:
    """Exact structural equality: same types (tuple vs list), same key order, tensors equal with equal dtypes."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}.{i}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# --------------------------------------------------------------------------- optimizer codec


def test_optimizer_tensors_round_trip(init_dir, tmp_path):
    loaded, opt, sched = _setup(init_dir)
    _seed_all(0)
    train_steps(loaded.model, opt, sched, 2)
    sd = opt.state_dict()
    # torch 2.13 AdamW keeps `step` as a 0-d float32 tensor; older / other optimizers use a float: cover both,
    # plus a bf16 state tensor whose dtype must survive
    sd["state"][1]["step"] = 2.0
    sd["state"][2]["exp_avg"] = sd["state"][2]["exp_avg"].to(torch.bfloat16)

    tensors, meta = optimizer_to_tensors(sd)
    assert tensors["state.0.step"].dtype == torch.float32 and tensors["state.0.step"].dim() == 0
    assert "state.1.step" not in tensors and tensors["state.2.exp_avg"].dtype == torch.bfloat16
    assert all(not isinstance(v, torch.Tensor) for v in json.loads(json.dumps(meta)).values())

    # through the real file formats, as save/load do
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "o.safetensors"))
    restored = optimizer_from_tensors(load_file(str(tmp_path / "o.safetensors")), json.loads(json.dumps(meta)))
    _assert_same(sd, restored)
    assert isinstance(restored["param_groups"][0]["betas"], tuple)


def test_scheduler_state_encodes_or_fails_clearly(init_dir, tmp_path):
    loaded, opt, _ = _setup(init_dir)
    lr = torch.optim.lr_scheduler
    seq = lr.SequentialLR(opt, [lr.LinearLR(opt, 0.1, 1.0, 3), lr.CosineAnnealingLR(opt, 10)], milestones=[3])
    for _ in range(4):
        opt.step()
        seq.step()
    encoded = json.loads(json.dumps(ckpt_module._encode(seq.state_dict(), "scheduler", None)))
    _assert_same(seq.state_dict(), ckpt_module._decode(encoded))

    class Warmup:  # a callable object: LambdaLR stores its __dict__, here holding a lambda
        def __init__(self):
            self.fn = lambda s: 1.0

        def __call__(self, step):
            return self.fn(step)

    bad = lr.LambdaLR(opt, Warmup())
    with pytest.raises(TypeError, match=r"scheduler\.lr_lambdas\.0\.fn"):
        save_checkpoint(
            tmp_path, 1, model=loaded.model, tokenizer=loaded.tokenizer, spec=loaded.spec, scheduler=bad,
            state=TrainerState(step=1),
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


# --------------------------------------------------------------------------- exact resume


def test_resume_is_exact(init_dir, tmp_path):
    _seed_all(0)
    loaded_a, opt_a, sched_a = _setup(init_dir)
    losses_a = train_steps(loaded_a.model, opt_a, sched_a, 6)

    _seed_all(0)
    loaded_b, opt_b, sched_b = _setup(init_dir)
    losses_b = train_steps(loaded_b.model, opt_b, sched_b, 3)
    state = TrainerState(step=3, policy_version=3, data_cursor=6, extra={"queue": ("1700-0", 5), "workers": {"w0": 2}})
    path = save_checkpoint(
        tmp_path, 3, model=loaded_b.model, tokenizer=loaded_b.tokenizer, spec=loaded_b.spec, optimizer=opt_b,
        scheduler=sched_b, state=state,
    )  # fmt: skip

    loaded_c, opt_c, sched_c = _setup(init_dir)  # a new process: fresh objects, other RNG states
    _seed_all(12345)
    restored = load_checkpoint(latest_checkpoint(tmp_path), model=loaded_c.model, optimizer=opt_c, scheduler=sched_c)
    _assert_same(state, restored)
    assert latest_checkpoint(tmp_path) == path == checkpoint_dir(tmp_path, 3)
    losses_c = train_steps(loaded_c.model, opt_c, sched_c, 3)

    assert losses_b == losses_a[:3]
    assert losses_c == losses_a[3:]  # exact, not approximately
    params_a, params_c = loaded_a.model.state_dict(), loaded_c.model.state_dict()
    assert all(torch.equal(params_a[k], params_c[k]) for k in params_a)
    _assert_same(opt_a.state_dict(), opt_c.state_dict())
    _assert_same(sched_a.state_dict(), sched_c.state_dict())


def test_rng_is_restored_only_when_asked(init_dir, tmp_path):
    loaded, _, _ = _setup(init_dir)
    _seed_all(3)
    path = save_checkpoint(
        tmp_path, 0, model=loaded.model, tokenizer=loaded.tokenizer, spec=loaded.spec, state=TrainerState()
    )
    expected = (torch.rand(3), random.random(), np.random.rand())
    _seed_all(4)
    load_checkpoint(path, restore_rng=False)
    assert not torch.equal(torch.rand(3), expected[0])
    load_checkpoint(path)
    assert (torch.equal(torch.rand(3), expected[0]), random.random(), np.random.rand()) == (True, *expected[1:])


# --------------------------------------------------------------------------- layout, retention, discovery


def test_keep_last_latest_and_partial_dirs(init_dir, tmp_path):
    loaded, _, _ = _setup(init_dir)

    def save(step: int) -> Path:
        return save_checkpoint(
            tmp_path, step, model=loaded.model, tokenizer=loaded.tokenizer, spec=loaded.spec,
            state=TrainerState(step=step), keep_last=2,
        )  # fmt: skip

    for step in range(1, 6):
        save(step)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000005"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000004", "step-00000005"]

    save(5)  # the same step again (a re-run after a crash) replaces it
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]

    # a crash mid-save leaves a partial dir (even with a trainer_state.json) and maybe a step dir without one
    partial = tmp_path / ".step-00000009.partial-x1"
    partial.mkdir()
    (partial / "trainer_state.json").write_text("{}")
    (tmp_path / "step-00000007").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000005"
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000005"
    (tmp_path / "latest").write_text("../../etc\n")  # never followed outside the root
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000005"

    save(6)  # the next save removes the partial dir
    assert not partial.exists()
    assert latest_checkpoint(tmp_path / "absent") is None


def test_checkpoint_names_are_zero_padded_step_numbers(tmp_path):
    assert [checkpoint_name(s) for s in (0, 7, 40, 12345678)] == [
        "step-00000000", "step-00000007", "step-00000040", "step-12345678",
    ]  # fmt: skip
    assert sorted(checkpoint_name(s) for s in (10, 9, 100)) == [checkpoint_name(s) for s in (9, 10, 100)]
    assert checkpoint_dir(tmp_path, 40) == tmp_path / "step-00000040"
    with pytest.raises(ValueError, match="step must be >= 0"):
        checkpoint_name(-1)
    assert doctest.testmod(ckpt_module).failed == 0


def test_saved_model_dir_loads_as_sdar(init_dir, tmp_path):
    loaded, opt, sched = _setup(init_dir)
    _seed_all(1)
    train_steps(loaded.model, opt, sched, 1)
    path = save_checkpoint(
        tmp_path, 1, model=loaded.model, tokenizer=loaded.tokenizer, spec=loaded.spec, optimizer=opt,
        scheduler=sched, state=TrainerState(step=1),
    )  # fmt: skip
    names = {p.name for p in path.iterdir()}
    assert names == {
        "model", "optimizer.safetensors", "optimizer.json", "scheduler.json", "rng.safetensors", "rng.json",
        "trainer_state.json", "manifest.json",
    }  # fmt: skip
    assert json.loads((path / "model" / "config.json").read_text())["model_type"] == "sdar"

    engine = load_model(path / "model")  # the rollout engine's path
    assert engine.spec == loaded.spec
    ours, theirs = loaded.model.state_dict(), engine.model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_tied_embeddings_load(tmp_path):
    """save_pretrained writes tied weights once (no lm_head.weight): the strict key check must accept that."""
    source = load_model(init_tiny(tmp_path / "a", seed=1, tie_word_embeddings=True))
    path = save_checkpoint(
        tmp_path / "ck", 0, model=source.model, tokenizer=source.tokenizer, spec=source.spec, state=TrainerState()
    )
    assert "lm_head.weight" not in load_file(str(path / "model" / "model.safetensors"))
    target = load_model(init_tiny(tmp_path / "b", seed=2, tie_word_embeddings=True)).model
    load_checkpoint(path, model=target)
    assert torch.equal(target.lm_head.weight, source.model.lm_head.weight)
    assert target.lm_head.weight is target.model.embed_tokens.weight


def test_no_pickle(init_dir, tmp_path):
    loaded, opt, sched = _setup(init_dir)
    path = save_checkpoint(
        tmp_path, 0, model=loaded.model, tokenizer=loaded.tokenizer, spec=loaded.spec, optimizer=opt,
        scheduler=sched, state=TrainerState(),
    )  # fmt: skip
    suffixes = {p.suffix for p in path.rglob("*") if p.is_file()}
    assert not suffixes & {".bin", ".pt", ".pth", ".pkl", ".pickle"}, suffixes

    source = Path(ckpt_module.__file__).read_text()
    assert "torch.load(" not in source and "torch.save(" not in source
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            assert not {"pickle", "dill", "cloudpickle", "joblib"} & set(modules), modules
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            assert (node.value.id, node.attr) not in {("torch", "load"), ("torch", "save")}
            assert node.value.id != "pickle"


# --------------------------------------------------------------------------- errors


def test_errors_name_the_problem(init_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        load_checkpoint(tmp_path)

    loaded, opt, _ = _setup(init_dir)
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(
            tmp_path, 1, model=loaded.model, tokenizer=loaded.tokenizer, spec=loaded.spec, state=TrainerState(),
            keep_last=0,
        )  # fmt: skip
    path = save_checkpoint(
        tmp_path, 1, model=loaded.model, tokenizer=loaded.tokenizer, spec=loaded.spec, state=TrainerState()
    )
    with pytest.raises(FileNotFoundError, match="optimizer.json"):
        load_checkpoint(path, optimizer=opt)  # saved without an optimizer
    with pytest.raises(CheckpointError, match=r"missing \['bias', 'weight'\]"):
        load_checkpoint(path, model=torch.nn.Linear(2, 2))

    (path / "rng.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="rng.safetensors"):
        load_checkpoint(path)
    (path / "trainer_state.json").write_text("{")
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        load_checkpoint(path)
    with pytest.raises(TypeError, match="unwrap"):
        save_checkpoint(
            tmp_path, 2, model=torch.nn.Linear(2, 2), tokenizer=None, spec=loaded.spec, state=TrainerState()
        )
