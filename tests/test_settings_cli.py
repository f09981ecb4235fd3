"""Config errors through the `gtpo` commands themselves: one message naming the field (and the nearest one for a
typo), exit status 2, no traceback, and never a secret, for train, sft, up, serve rollout|reward, launch, demo, eval."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from services.cli import app

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t #tok"
PASSWORD = "hunter2pw"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No GTPO_* variable of the calling shell, no scheduler topology: each test sets what it means."""
    for name in [n for n in os.environ if n.startswith(("GTPO_", "PET_")) or n in ("REDIS_URL", "NNODES")]:
        monkeypatch.delenv(name)


@pytest.fixture
def files(tmp_path):
    """A valid trainer config, a broken one, and the data file they name."""
    (tmp_path / "d.jsonl").write_text(json.dumps({"question": "1+1", "ground_truth_answer": "2"}) + "\n")
    good = tmp_path / "run.yaml"
    good.write_text(f"model: {tmp_path / 'm'}\noutput_dir: {tmp_path / 'o'}\ndata: {tmp_path / 'd.jsonl'}\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\nsteps: 3\n")
    return {"good": good, "broken": broken, "data": tmp_path / "d.jsonl"}


def gtpo(*args, env=None):
    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result


def assert_config_error(result, *needles):
    """Exit 2 with a short message that holds every needle, and no secret."""
    out = result.output
    assert result.exit_code == 2, out
    assert "Traceback" not in out and SECRET not in out and PASSWORD not in out, out
    assert len(out.strip().splitlines()) <= 4, out
    for needle in needles:
        assert needle in out, (needle, out)


TRAINER_COMMANDS = [["train"], ["sft"], ["up"]]


@pytest.mark.parametrize("command", TRAINER_COMMANDS, ids=lambda c: c[0])
def test_trainer_commands_broken_file_bad_value_unknown_key(command, files):
    assert_config_error(gtpo(*command, "--config", files["broken"]), f"config {files['broken']}", "not valid YAML")
    assert_config_error(gtpo(*command, "--config", files["good"].parent / "absent.yaml"), "cannot read it")
    assert_config_error(gtpo(*command, "--config", files["good"], "steps=0"), "steps: Input should be greater")
    assert_config_error(gtpo(*command, "--config", files["good"], "stepz=3"), "stepz:", "did you mean steps?")
    prefix = "GTPO_SFT__" if command == ["sft"] else "GTPO_TRAIN__"
    typo = gtpo(*command, "--config", files["good"], "--dry-run", env={f"{prefix}STEPZ": "4"})
    assert_config_error(typo, f"{prefix}STEPZ", f"did you mean {prefix}STEPS?")


@pytest.mark.parametrize("command", [["train"], ["up"]], ids=lambda c: c[0])
def test_rl_commands_print_no_secret_and_ignore_the_services_variables(command, files):
    env = {"GTPO_TRAIN__API_TOKEN": SECRET, "GTPO_TRAIN__REDIS__URL": f"redis://:{PASSWORD}@redis:6379/0",
           "GTPO_REWARD__WEIGHTS": "{not json", "GTPO_REWARD__TIMEOUT_S": "soon", "GTPO_ROLLOUT__API_TOKEN": SECRET}  # fmt: skip
    result = gtpo(*command, "--config", files["good"], "--dry-run", env=env)
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output and PASSWORD not in result.output
    assert "api_token: '**********'" in result.output and "url: redis://:***@redis:6379/0" in result.output
    # a secret of the wrong type in the file: refused, not shown
    files["good"].write_text(files["good"].read_text() + "api_token: 424242\n")
    assert_config_error(gtpo(*command, "--config", files["good"]), "api_token:", "(got **********)")
    assert "424242" not in gtpo(*command, "--config", files["good"]).output


def test_sft_leaves_the_rl_commands_variables_alone(files):
    env = {"GTPO_TRAIN__RUN_ID": "r", "GTPO_TRAIN__API_TOKEN": SECRET, "GTPO_TRAIN__STEPS": "9"}
    result = gtpo("sft", "--config", files["good"], "--dry-run", env=env)
    assert result.exit_code == 0 and SECRET not in result.output and "run_id" not in result.output
    assert "steps: 100" in result.output and "\nloss:" not in result.output


def test_sft_refuses_an_rl_setting_naming_it(files):
    """`loss.beta` in SFT used to load a reference model that nothing read."""
    assert_config_error(gtpo("sft", "--config", files["good"], "loss.beta=0.1", "--dry-run"),
                        "gtpo sft: loss.beta: loss is an RL setting (gtpo train)")  # fmt: skip
    files["good"].write_text(files["good"].read_text() + "ref_model: m\n")
    assert_config_error(gtpo("sft", "--config", files["good"], "--dry-run"), "ref_model: an RL setting")


@pytest.mark.parametrize("service", ["rollout", "reward"])
def test_serve_broken_file_bad_value_unknown_key(service, files, tmp_path):
    assert_config_error(gtpo("serve", service, "--config", files["broken"]), f"config {files['broken']}")
    assert_config_error(gtpo("serve", service, "--config", tmp_path / "absent.yaml"), "cannot read it")
    required = ["model=m"] if service == "rollout" else []
    assert_config_error(gtpo("serve", service, *required, "port=70000", "--dry-run"), "port: Input should be")
    assert_config_error(gtpo("serve", service, *required, "portt=1"), "portt:", "did you mean port?")
    prefix = f"GTPO_{service.upper()}__"
    typo = gtpo("serve", service, *required, "--dry-run", env={f"{prefix}PORTT": "1"})
    assert_config_error(typo, f"{prefix}PORTT", f"did you mean {prefix}PORT?")


def test_serve_rollout_keeps_the_token_and_hides_it(files):
    env = {"GTPO_ROLLOUT__API_TOKEN": SECRET, "GTPO_ROLLOUT__REDIS__URL": f"redis://app:{PASSWORD}@r/0",
           "GTPO_TRAIN__ROLLOUT__GROUP_SIZE": "4", "GTPO_TRAIN__API_TOKEN": SECRET, "GTPO_STEPS": "3"}  # the trainer's  # fmt: skip
    result = gtpo("serve", "rollout", "model=m", "--dry-run", env=env)
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert shown["api_token"] == "**********" and shown["redis"]["url"] == "redis://app:***@r/0"
    assert SECRET not in result.output and PASSWORD not in result.output
    assert_config_error(gtpo("serve", "rollout", "model=m", f"api_token={SECRET}", "port=x"), "port:")


def test_serve_reward_environment_value_that_does_not_parse(files):
    result = gtpo("serve", "reward", "--dry-run", env={"GTPO_REWARD__WEIGHTS": "{not json"})
    assert_config_error(result, "GTPO_REWARD__WEIGHTS: not valid YAML")  # the variable, as for a trainer command
    assert_config_error(gtpo("serve", "reward", 'weights={"nope": 1}'), "weights: unknown reward 'nope'")
    assert_config_error(gtpo("serve", "other"), "service: unknown 'other'")


def test_launch_validates_the_config_before_starting_anything(files):
    assert_config_error(gtpo("launch", "--config", files["broken"], "--dry-run"), "gtpo launch: config")
    assert_config_error(gtpo("launch", "--config", files["good"], "--dry-run", "stepz=2"), "did you mean steps?")
    typo = gtpo("launch", "--config", files["good"], "--dry-run", env={"GTPO_TRAIN__OPTIM__LRR": "1"})
    assert_config_error(typo, "GTPO_TRAIN__OPTIM__LRR", "did you mean GTPO_TRAIN__OPTIM__LR?")
    env = {"NPROC_PER_NODE": "1", "GTPO_LAUNCH__RENDEZVOUS_TIMEOUT": "30", "GTPO_TRAIN__SEED": "5"}
    ok = gtpo("launch", "--config", files["good"], "--dry-run", "steps=2", env=env)
    assert ok.exit_code == 0 and "-m services train --config" in ok.output
    launch, run, _ = ok.stdout.split("---\n")
    assert yaml.safe_load(launch)["rendezvous_timeout"] == 30.0 and yaml.safe_load(launch)["overrides"] == ["steps=2"]
    assert (yaml.safe_load(run)["steps"], yaml.safe_load(run)["seed"]) == (2, 5)
    typo = gtpo("launch", "--config", files["good"], "--dry-run", env={"GTPO_LAUNCH__NPROC_PER_NOD": "1"})
    assert_config_error(typo, "GTPO_LAUNCH__NPROC_PER_NOD", "did you mean GTPO_LAUNCH__NPROC_PER_NODE?")


def test_demo_bad_value_and_unknown_key(tmp_path):
    assert_config_error(gtpo("demo", "--out", tmp_path, "rl_stepz=3"), "rl_stepz:", "did you mean rl_steps?")
    assert_config_error(gtpo("demo", "--out", tmp_path, "sft_steps=0"), "sft_steps: Input should be greater")
    assert_config_error(gtpo("demo", "--out", tmp_path, "threshold_spread=[1"), "threshold_spread: not valid YAML")
    assert not any(tmp_path.iterdir())  # refused before any stage ran


def test_demo_dry_run_prints_the_resolved_config_and_runs_nothing(tmp_path):
    out = tmp_path / "demo"
    result = gtpo("demo", "--out", out, "--dry-run", "--seed", "3", "rl_steps=7", "log_with=tensorboard")
    assert result.exit_code == 0, result.output
    assert "rl_steps: 7" in result.output and "seed: 3" in result.output and "tensorboard" in result.output
    assert not out.exists()  # nothing ran


def test_demo_reasoning_is_the_maths_task_with_its_preset_and_the_users_values_win(tmp_path):
    from services.demo.pipeline import REASONING

    out = tmp_path / "demo"
    preset = gtpo("demo", "--task", "reasoning", "--out", out, "--dry-run")
    assert preset.exit_code == 0, preset.output
    assert "task: math" in preset.output and all(f"{k}: {v}" in preset.output for k, v in REASONING.items())
    mine = gtpo("demo", "--task", "reasoning", "--out", out, "--dry-run", "sft_steps=250")
    assert "sft_steps: 250" in mine.output and "boxed_rate: 1.0" in mine.output
    assert_config_error(gtpo("demo", "--task", "maths", "--out", out), "--task: 'maths' is not math, reasoning or code")
    assert not out.exists()


def test_eval_bad_inputs(files, tmp_path):
    assert_config_error(gtpo("eval", tmp_path / "absent.json", "--model", tmp_path), "is neither a file nor a preset")
    assert_config_error(gtpo("eval", files["data"], "--model", tmp_path, "--template", "{q}"), "template", "{question}")
    assert_config_error(gtpo("eval", files["data"], "--model", tmp_path / "none"), "config.json")
    (tmp_path / "rows.json").write_text('[{"question": "q"}]')
    assert_config_error(gtpo("eval", tmp_path / "rows.json", "--model", tmp_path), "ground_truth_answer")


def test_a_real_process_prints_one_line_for_a_broken_serve_config(files):
    """The console script as an operator runs it: stderr holds one line and no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GTPO_")}
    env.update(PYTHONPATH=str(REPO), GTPO_ROLLOUT__API_TOKEN=SECRET)
    proc = subprocess.run([sys.executable, "-m", "services", "serve", "rollout", "--config", str(files["broken"])],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"gtpo serve rollout: config {files['broken']}: not valid YAML at line 2, column 6 "
        "(expected ',' or ']', but got ':')"
    ]


def test_dry_run_of_the_commands_without_a_config_file_prints_their_settings_and_does_nothing(files, tmp_path):
    out = tmp_path / "nothing-here"
    env = {"GTPO_INIT_MODEL__SEED": "4", "GTPO_INIT_MODEL__FORCE": "true"}
    shown = yaml.safe_load(gtpo("init-model", "tiny", "--out", out, "--dry-run", env=env).stdout)
    assert shown == {"preset": "tiny", "out": str(out), "seed": 4, "force": True} and not out.exists()
    shown = yaml.safe_load(gtpo("init-model", "tiny", "--out", out, "--seed", "3", "--dry-run", env=env).stdout)
    assert shown["seed"] == 3  # a flag beats the variable
    assert_config_error(gtpo("init-model", "huge", "--out", out, "--dry-run"), "preset: Input should be 'tiny'")
    shown = yaml.safe_load(gtpo("merge-lora", tmp_path / "ckpt", "--out", out, "--dry-run").stdout)
    assert shown == {"checkpoint": str(tmp_path / "ckpt"), "out": str(out), "base": None} and not out.exists()
    # a closed port: nothing connects to it
    env = {"GTPO_STATUS__NAMESPACE": "run1", "GTPO_STATUS__INTERVAL": "2"}
    result = gtpo("status", "--redis-url", f"redis://:{PASSWORD}@127.0.0.1:1/0", "--dry-run", env=env)
    assert PASSWORD not in result.output
    assert yaml.safe_load(result.stdout) == {"redis_url": "redis://:***@127.0.0.1:1/0", "namespace": "run1",
                                             "watch": False, "interval": 2.0, "timeout": 3.0}  # fmt: skip
    assert_config_error(gtpo("status", "--dry-run"), "redis_url: not set")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")  # only looked for: nothing is loaded
    env = {"GTPO_GENERATE__PARAMS__TEMPERATURE": "0.5", "GTPO_GENERATE__DEVICE": "cpu"}
    result = gtpo("generate", "--model", tmp_path / "m", "--prompt", "1+1", "--top-k", "5", "--dry-run", env=env)
    shown = yaml.safe_load(result.stdout)
    assert shown["params"]["top_k"] == 5 and shown["params"]["temperature"] == 0.5 and shown["prompt"] == ["1+1"]
    assert (shown["params"]["max_new_tokens"], shown["params"]["logprobs"], shown["device"]) == (32, True, "cpu")
    env = {"GTPO_EVAL__LIMIT": "3", "GTPO_EVAL__ENGINES": "[torch, reference]"}
    result = gtpo("eval", files["data"], "--model", tmp_path / "absent", "--k", "2", "--out", out, "--dry-run", env=env)
    shown = yaml.safe_load(result.stdout)
    assert (shown["k"], shown["limit"], shown["engines"], shown["answer_field"]) == (
        2, 3, ["torch", "reference"], "ground_truth_answer")  # fmt: skip
    assert shown["resolved"]["k"] == 2 and shown["resolved"]["decodings"]["custom"]["max_new_tokens"] == 512
    assert not out.exists()
    assert_config_error(gtpo("eval", files["data"], "--answer-extract", "last", "--dry-run"), "answer_extract")


def test_serve_rollout_dry_run_shows_an_lmdeploy_option_from_the_environment():
    result = gtpo("serve", "rollout", "model=m", "engine=lmdeploy", "--dry-run", env={"GTPO_ROLLOUT__LMDEPLOY__TP": "2"})
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["lmdeploy"]["tp"] == 2
