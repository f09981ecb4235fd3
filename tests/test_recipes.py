"""recipes/: every recipe's configs load and validate, the memory verdicts its README states hold, `--dry-run`
prints the run, and a shrunk recipe (the tiny model, the recipe's sampling, loss, normalisation and rewards, 2 RL
steps) runs end to end through `gtpo up`."""

import json
import os
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli import app
from services.trainer.config import RLConfig, SFTConfig
from services.trainer.learner.memory_plan import GIB, MemorySettings, ModelShape, plan, settings_from_run
from shared.config.loader import load_config, read_yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
NAMES = ("dirl-dipo", "trado-tracerl", "lightningrl", "aha-8b")
SDAR_8B = REPO / "docs" / "models" / "sdar-8b-chat"
runner = CliRunner()


def _rl(name: str) -> RLConfig:
    return load_config(RLConfig, RECIPES / name / "rl.yaml", [], environ={})


def test_every_recipe_ships_its_files():
    assert sorted(p.name for p in RECIPES.iterdir() if p.is_dir()) == sorted(NAMES)
    for name in NAMES:
        files = {p.name for p in (RECIPES / name).iterdir()}
        assert {"rl.yaml", "accelerate.yaml", "eval.sh", "README.md"} <= files, name


@pytest.mark.parametrize("name", NAMES)
def test_recipe_configs_load_and_validate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    _rl(name)
    if (RECIPES / name / "sft.yaml").exists():
        load_config(SFTConfig, RECIPES / name / "sft.yaml", [], environ={})
    for acc in (RECIPES / name).glob("accelerate*.yaml"):
        cfg = load_config_from_file(str(acc))
        assert cfg.num_processes == 8 and cfg.mixed_precision == "bf16"
        assert cfg.deepspeed_config["gradient_accumulation_steps"] == 1  # the trainer accumulates itself


def test_recipes_carry_the_papers_settings():
    dirl, trado, light, aha = (_rl(n) for n in NAMES)
    assert (dirl.prompts_per_step, dirl.rollout.group_size, dirl.rollout.max_new_tokens) == (128, 8, 8192)
    assert (dirl.rollout.temperature, dirl.rollout.top_k, dirl.loss.norm, dirl.loss.beta) == (1.0, 50, "dipo", 0.0)
    assert dirl.zero_truncated and dirl.dynamic_sampling and dirl.optim.warmup_steps == 10
    assert (trado.prompts_per_step, trado.rollout.group_size, trado.rollout.max_new_tokens) == (64, 16, 2000)
    assert (trado.loss.beta, trado.loss.norm, trado.optim.schedule) == (0.01, "length", "cosine")
    assert (light.rollout.group_size, light.loss.nll_coef, light.loss.reward_norm) == (32, 0.1, "per_component")
    assert light.prompt_filter_tpf is not None and light.loss.beta == 0.01
    assert "speed_gated" in aha.reward_weights and aha.loss.floor_correct


# the verdicts each README states: (accelerate file, prompt_len, block_size) -> peak GiB per GPU
PLANS = {
    "dirl-dipo": ("accelerate.yaml", 1024, 4, 108.6),
    "dirl-dipo-80gb": ("accelerate-80gb.yaml", 1024, 4, 55.2),
    "trado-tracerl": ("accelerate.yaml", 784, 4, 56.0),
    "lightningrl": ("accelerate.yaml", 1024, 32, 74.5),
    "aha-8b": ("accelerate.yaml", 1024, 4, 55.2),
}


@pytest.mark.parametrize("key", sorted(PLANS))
def test_the_readmes_memory_verdicts_hold(key):
    name = key.removesuffix("-80gb")
    acc, prompt_len, block, peak = PLANS[key]
    s = settings_from_run(_rl(name), read_yaml(RECIPES / name / acc))
    p = plan(ModelShape.from_dir(SDAR_8B), MemorySettings(**s, prompt_len=prompt_len, block_size=block))
    assert p.peak / GIB == pytest.approx(peak, abs=0.05)
    assert f"{peak:.1f}" in (RECIPES / name / "README.md").read_text()


def test_plan_memory_reads_a_recipe_and_its_accelerate_config():
    args = ["plan-memory", str(SDAR_8B), "--config", str(RECIPES / "dirl-dipo" / "rl.yaml"), "--accelerate-config",
            str(RECIPES / "dirl-dipo" / "accelerate.yaml"), "--json"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)["settings"]
    assert (s["gen_len"], s["gpus"], s["zero"], s["responses_per_update"], s["checkpointing"]) == (
        8192,
        8,
        1,
        128,
        True,
    )
    res = runner.invoke(app, [*args[:-1], "prompt_len=512", "--json"])  # key=value after the config wins
    assert json.loads(res.output)["settings"]["prompt_len"] == 512


@pytest.mark.parametrize(("arg", "name"), [("max_new_tokens=8192", "gen_len"), ("gradient_checkpointing=true",
                                                                               "checkpointing")])  # fmt: skip
def test_plan_memory_names_the_planners_field_for_a_run_config_name(arg, name):
    res = runner.invoke(app, ["plan-memory", str(SDAR_8B), arg])
    assert res.exit_code == 2 and f"the planner's is {name}=" in res.output
    res = runner.invoke(app, ["plan-memory", str(SDAR_8B), "gen_lenn=5"])
    assert res.exit_code == 2 and "did you mean gen_len" in res.output


def test_plan_memory_refuses_an_accelerate_config_alone():
    res = runner.invoke(app, ["plan-memory", str(SDAR_8B), "--accelerate-config", "x.yaml"])
    assert res.exit_code == 2 and "needs --config" in res.output


def test_dry_run_prints_the_recipe():
    res = runner.invoke(app, ["train", "--config", str(RECIPES / "dirl-dipo" / "rl.yaml"), "--dry-run"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "norm: dipo" in out and "top_k: 50" in out and "zero_truncated: true" in out


# --- a shrunk recipe, end to end ----------------------------------------------------------------------------------


def shrunk(name: str, tmp: Path, tiny_dir: Path, ns: str) -> RLConfig:
    """The recipe at the tiny model's size: its sampling, loss, normalisation, rewards and filters; the sizes
    (steps, groups, lengths, batch) small enough for a CPU, dynamic sampling off (a random model solves nothing)."""
    cfg = _rl(name)
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+{a}=?", "ground_truth_answer": str(2 * a)}) + "\n"
                            for a in range(20)))  # fmt: skip
    rollout = cfg.rollout.model_copy(update={"group_size": 4, "max_new_tokens": 12, "denoising_steps": None})
    return RLConfig.model_validate({
        **cfg.model_dump(), "model": str(tiny_dir), "output_dir": str(tmp / "run"), "data": str(data),
        "question_field": "question", "answer_field": "ground_truth_answer", "answer_extract": "none",
        "steps": 2, "prompts_per_step": 2, "dynamic_sampling": False, "updates_per_step": 1, "micro_batch_size": 8,
        "gradient_checkpointing": False, "copies_per_forward": None, "rollout": rollout.model_dump(),
        "redis": {"namespace": ns}, "step_timeout_s": 120, "chat_template": False,
    })  # fmt: skip


# what sets each recipe apart, checked on the shrunk config before it runs
DISTINCT = {
    "lightningrl": lambda c: c.loss.nll_coef == 0.1 and c.loss.reward_norm == "per_component" and c.prompt_filter_tpf,
    "dirl-dipo": lambda c: c.loss.norm == "dipo" and c.rollout.top_k == 50 and c.zero_truncated,
    "trado-tracerl": lambda c: c.loss.beta == 0.01 and c.rollout.group_size == 4,
    "aha-8b": lambda c: c.reward_weights.get("speed_gated") == 1.0 and c.rollout.threshold_spread == 0.2,
}


# one recipe end to end in the default suite (~1-2 min each on 2 cores); the others with -m slow
@pytest.mark.redis
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n == "lightningrl" else pytest.mark.slow) for n in NAMES]
)
def test_shrunk_recipe_runs_two_steps_through_gtpo_up(tmp_path, tiny_dir, redis_url, name):
    sys.path.insert(0, str(REPO / "tests"))
    from procs import run_gtpo_up

    cfg = shrunk(name, tmp_path, tiny_dir, f"recipe-{os.getpid()}-{time.time_ns()}")
    assert DISTINCT[name](cfg), name
    run_gtpo_up(cfg, redis_url, timeout_s=240)
    rows = [json.loads(x) for x in (cfg.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(r["updates"] == 1 and "kl" in r for r in rows)
    assert all("nll" in r for r in rows) == (name == "lightningrl")
