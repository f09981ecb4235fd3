"""The memory planner: parameter counts against the real modules, a plan derived by hand, sharding, what fits, the
`gtpo plan-memory` command, and one bench configuration measured in its own process."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from services.cli import app
from services.trainer.learner.memory_plan import (
    GIB,
    MemorySettings,
    ModelShape,
    activation_bytes,
    fitting,
    lora_param_count,
    param_count,
    plan,
)
from tests.conftest import REPO

SDAR_8B_CONFIG = (
    REPO / "docs" / "models" / "sdar-8b-chat"
)  # its config.json only (conftest.SDAR_8B: with the tokenizer)
SMALL = ModelShape(layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4, vocab=32)
runner = CliRunner()


@pytest.mark.parametrize("tied", [False, True])
def test_param_count_matches_the_real_model(tied):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied)  # fmt: skip
    model = Qwen3ForCausalLM(cfg)
    assert param_count(ModelShape.from_config(cfg.to_dict())) == sum(p.numel() for p in model.parameters())


def test_sdar_8b_has_its_published_size():
    shape = ModelShape.from_dir(SDAR_8B_CONFIG)
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.head_dim) == (36, 4096, 32, 8, 128)
    assert 8.1e9 < param_count(shape) < 8.3e9  # SDAR-8B: 8.19B parameters (untied 151,936-row embeddings)


def test_lora_count_matches_peft(tiny_dir):
    from services.trainer.config import LoraSettings
    from services.trainer.learner.lora import apply_lora
    from shared.model.adapter import adapter_parameters
    from shared.model.sdar import load_model

    loaded = load_model(tiny_dir)
    settings = LoraSettings(r=4, target_modules=["q_proj", "down_proj"])
    peft_model = apply_lora(loaded.model, settings)
    counted = sum(p.numel() for p in adapter_parameters(peft_model).values())
    shape = ModelShape.from_dir(tiny_dir)
    assert lora_param_count(shape, 4, ["q_proj", "down_proj"]) == counted


def test_a_plan_derived_by_hand():
    # q = 2 x 4 = 8, kv = 4. Per token and layer: 4h + 8q + 5kv + 4I = 32 + 64 + 20 + 64 = 180 fp32 elements.
    # c = 2 of R = 4 copies: S = 4 + 8 x 3 = 28 tokens, T = 8 x 2 / 4 = 4 targets.
    s = MemorySettings(prompt_len=4, gen_len=8, block_size=4, copies_per_forward=2, responses_per_update=2,
                       precision="fp32", attention="sdpa")  # fmt: skip
    kept, transient = activation_bytes(SMALL, s)
    layers = 2 * 4 * 180 * 28  # 40,320
    mask = 4 * 28 * 28  # dense fp32 additive mask: 3,136
    head = 4 * (2 * 8 * 28 + 8 * 4 + 32 * 4)  # final norm in/out, hidden at the targets, log-softmax: 2,432
    assert kept == layers + mask + head == 45_888
    assert transient == 2 * 4 * 32 * 4  # the log-softmax backward's two T x V buffers
    # parameters: per layer linears 64 + 32 + 32 + 64 + 3 x 128 = 576, norms 2 x 8 + 2 x 4 = 24; embeddings 2 x 256
    assert param_count(SMALL) == 2 * 600 + 512 + 8 == 1720
    p = plan(SMALL, s)
    assert (p.weights, p.gradients, p.optimizer) == (4 * 1720, 4 * 1720, 8 * 1720)
    # 2 micro-batches x 2 forwards each: the whole gradient is live during the later forwards
    assert p.forwards_per_update == 4
    assert p.peak == 6880 + 13760 + 6880 + 45_888 + 1024


def test_one_forward_keeps_only_the_head_gradient():
    s = MemorySettings(prompt_len=4, gen_len=8, block_size=4, responses_per_update=1, precision="fp32")
    p = plan(SMALL, s)
    kept, transient = activation_bytes(SMALL, s)
    assert p.forwards_per_update == 1
    assert p.peak == p.weights + p.optimizer + max(p.gradients, 4 * 32 * 8 + kept + transient)


def test_zero_stages_shard_what_they_say():
    base = MemorySettings(gpus=4, gen_len=64, prompt_len=16)
    p0, p1, p2, p3 = (plan(SMALL, base.model_copy(update={"zero": z})) for z in range(4))
    n = param_count(SMALL)
    assert (p0.weights, p0.gradients, p0.optimizer) == (4 * n, 4 * n, 8 * n)
    assert (p1.weights, p1.gradients, p1.optimizer) == (4 * n, 4 * n, 8 * n // 4)
    assert (p2.weights, p2.gradients, p2.optimizer) == (4 * n, 4 * n // 4, 8 * n // 4)
    assert (p3.weights, p3.gradients, p3.optimizer) == (4 * n // 4, 4 * n // 4, 8 * n // 4)
    assert p0.activations == p3.activations  # activations are per GPU, never sharded


def test_lora_checkpointing_and_copies_lower_the_plan():
    shape = ModelShape.from_dir(SDAR_8B_CONFIG)
    dp = MemorySettings(gpus=8)
    full, lora = plan(shape, dp), plan(shape, dp.model_copy(update={"lora_r": 16}))
    assert (full.optimizer + full.gradients) / (lora.optimizer + lora.gradients) > 100  # 8.2 B against 43.6 M
    s = MemorySettings(gpus=8, zero=3)
    full = plan(shape, s)
    ckpt = plan(shape, s.model_copy(update={"checkpointing": True}))
    assert full.activations / ckpt.activations > 10
    c1 = plan(shape, s.model_copy(update={"copies_per_forward": 1}))
    assert c1.activations < full.activations and c1.forwards_per_update == 4 * full.forwards_per_update


def test_fitting_lists_only_what_fits_cheapest_first():
    shape = ModelShape.from_dir(SDAR_8B_CONFIG)
    s = MemorySettings(gpus=8)
    fits = fitting(shape, s, 80 * GIB)
    assert fits and all(p.peak <= 80 * GIB for _, p in fits)
    keys = [(c.checkpointing, -c.c, c.lora_r is not None, c.zero) for c, _ in fits]
    assert keys == sorted(keys)
    assert not fitting(shape, s, 1 * GIB)


def test_plan_memory_command_prints_the_plan_and_what_fits():
    res = runner.invoke(app, ["plan-memory", str(SDAR_8B_CONFIG), "gpus=8", "zero=3", "checkpointing=true", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    expect = plan(ModelShape.from_dir(SDAR_8B_CONFIG), MemorySettings(gpus=8, zero=3, checkpointing=True, block_size=4))
    assert out["plan"] == expect.model_dump()
    assert out["settings"]["block_size"] == 4  # the checkpoint's own block size
    res = runner.invoke(app, ["plan-memory", str(SDAR_8B_CONFIG), "gpus=8", "--gpu-gib", "80"], env={"COLUMNS": "150"})
    assert res.exit_code == 0 and "settings that fit 80 GiB" in res.output and "does NOT fit" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [(["zero=5"], "zero"), (["lora_r=0"], "lora_r"), (["lora_r=8", "lora_targets=[q_proj,wq]"], "lora target_modules"),
     (["gen_len=ten"], "gen_len"), (["lora_r=16", "zero=3"], "plain data parallel")],
)  # fmt: skip
def test_plan_memory_names_the_bad_field(args, message):
    res = runner.invoke(app, ["plan-memory", str(SDAR_8B_CONFIG), *args])
    assert res.exit_code == 2 and message in res.output


def test_plan_memory_without_a_config(tmp_path):
    res = runner.invoke(app, ["plan-memory", str(tmp_path)])
    assert res.exit_code == 2 and "no config.json" in res.output


def test_bench_measures_one_configuration_in_its_own_process(tmp_path):
    """The bench's counted optimizer and gradient bytes equal the planner's exactly; its resident-memory
    measurements are real (non-zero) and near the plan even at this toy size."""
    out = tmp_path / "mem.json"
    # big enough (about 20 MiB of activations) that page-sized resident-set noise does not decide the ratio
    cmd = [sys.executable, "bench/memory.py", "--layers", "2", "--hidden", "128", "--intermediate", "384", "--heads",
           "4", "--kv-heads", "2", "--vocab", "1024", "--prompt", "64", "--gen", "256", "--repeats", "1", "--threads",
           "1", "--only", "lora-off-2", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["lora"] and row["c"] == 2
    assert row["optimizer"] == row["plan_optimizer"] and row["gradients"] == row["plan_gradients"]
    assert row["kept"] > 10 * 2**20 and 0.7 < row["plan_peak"] / row["peak"] < 1.4
