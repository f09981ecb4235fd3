"""Experiment trackers: a short SFT and a short GTPO run (the real services over Redis) write TensorBoard event files
that TensorBoard's own reader reads back with every metrics.jsonl row; W&B offline writes its run folder; a tracker
whose package is missing is a one-line error naming the extra."""

import doctest
import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import yaml
from procs import run_gtpo_up

import services.trainer.learner.tracking as tracking
from services.trainer.config import RLConfig, SFTConfig
from services.trainer.learner.tracking import flatten, scalars


def test_doctests():
    assert doctest.testmod(tracking).failed == 0


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _assert_events_match_metrics(run: Path, names: list[str]) -> None:
    """Every numeric entry of every metrics.jsonl row is in TensorBoard at its step (as float32)."""
    rows = _rows(run / "metrics.jsonl")
    acc = _events(run / "tensorboard")
    tags = set(acc.Tags()["scalars"])
    assert set(names) <= tags, sorted(tags)
    assert tags == {k for row in rows for k in scalars(row)}  # every curve comes from a metrics row, and only those
    for name in names:
        events = acc.Scalars(name)
        assert [e.step for e in events] == [r["step"] for r in rows]
        for e, row in zip(events, rows, strict=True):
            assert e.value == pytest.approx(float(row[name]), rel=1e-6, abs=1e-6)


def _sft_data(tmp_path: Path) -> Path:
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "response": str(2 * a)}) + "\n" for a in range(8)))
    return data


def test_sft_writes_tensorboard_events_with_every_metric_and_the_config(tmp_path, tiny_dir):
    from services.trainer.learner.sft import run_sft

    cfg = SFTConfig(model=tiny_dir, output_dir=tmp_path / "sft", data=_sft_data(tmp_path), steps=3, batch_size=4,
                    save_every=3, chat_template=False, log_with="tensorboard")  # fmt: skip
    history = run_sft(cfg, progress=False)
    assert len(history) == 3
    _assert_events_match_metrics(cfg.output_dir, ["loss", "lr", "grad_norm"])
    # the resolved config is the run's hyper-parameters: flattened, as Accelerate's tracker stores them
    (hparams,) = (cfg.output_dir / "tensorboard").glob("*/hparams.yml")
    stored = yaml.safe_load(hparams.read_text())
    assert stored == flatten(cfg.model_dump(mode="json"))
    assert stored["optim.lr"] == cfg.optim.lr and stored["log_with"] == '["tensorboard"]'


def test_rl_through_gtpo_up_writes_tensorboard_events_next_to_metrics(tmp_path, tiny_dir, redis_url):
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"{a}+{a}=?", "ground_truth_answer": str(2 * a)}) + "\n" for a in range(20))
    )
    cfg = RLConfig.model_validate({
        "model": str(tiny_dir), "output_dir": str(tmp_path / "run"), "data": str(data), "steps": 2,
        "prompts_per_step": 2, "dynamic_sampling": False, "micro_batch_size": 4, "api_token": "s3cret-token",
        "rollout": {"group_size": 2, "max_new_tokens": 8}, "step_timeout_s": 120, "log_with": ["tensorboard"],
        "redis": {"namespace": f"track-{os.getpid()}-{time.time_ns()}"},
    })  # fmt: skip
    run_gtpo_up(cfg, redis_url)
    run = cfg.output_dir
    _assert_events_match_metrics(run, ["loss", "reward_mean", "accuracy", "time_wait_s", "time_train_s"])
    (hparams,) = (run / "tensorboard").glob("*/hparams.yml")
    stored = yaml.safe_load(hparams.read_text())
    assert stored["rollout.group_size"] == 2 and stored["redis.namespace"] == cfg.redis.namespace
    assert "s3cret" not in hparams.read_text()  # `gtpo up` hands the trainer no token; none is ever logged


def test_hyperparameters_never_hold_a_secret():
    cfg = RLConfig(model="m", output_dir="o", data="d", api_token="s3cret-token",
                   redis={"url": "redis://:hunter2@redis:6379/0"})  # fmt: skip
    flat = flatten(cfg.model_dump(mode="json"))
    assert flat["api_token"] == "**********" and flat["redis.url"] == "redis://:***@redis:6379/0"
    assert not any("s3cret" in str(v) or "hunter2" in str(v) for v in flat.values())


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_writes_its_run_folder(tmp_path, tiny_dir, monkeypatch):
    from services.trainer.learner.sft import run_sft

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = SFTConfig(model=tiny_dir, output_dir=tmp_path / "sft", data=_sft_data(tmp_path), steps=2, batch_size=4,
                    save_every=2, chat_template=False, log_with=["wandb"], tracker_project="gtpo-test")  # fmt: skip
    run_sft(cfg, progress=False)
    (folder,) = (cfg.output_dir / "wandb").glob("offline-run-*")
    (log,) = folder.glob("run-*.wandb")
    # the run's records (wandb sync uploads them later): the metric curves and the flattened config are in it;
    # wandb's own service process writes the file, which on a loaded machine can trail the run's end by a moment
    keys = ("loss", "grad_norm", "optim.lr", "sft_mask_eps", "gtpo-test")
    deadline = time.monotonic() + 30
    while not all(key.encode() in log.read_bytes() for key in keys) and time.monotonic() < deadline:
        time.sleep(0.5)
    records = log.read_bytes()
    assert [k for k in keys if k.encode() not in records] == []


def _missing_tracker() -> str | None:
    return next((t for t in ("mlflow", "trackio", "wandb", "tensorboard") if importlib.util.find_spec(t) is None), None)


@pytest.mark.skipif(_missing_tracker() is None, reason="every tracker package is installed here")
@pytest.mark.parametrize("command", ["sft", "train"])
def test_a_tracker_that_is_not_installed_is_one_line_naming_the_extra(tmp_path, command):
    from typer.testing import CliRunner

    from services.cli import app

    name = _missing_tracker()
    args = [command, "model=m", "output_dir=o", "data=d", f"log_with=tensorboard,{name}", "--dry-run"]
    res = CliRunner().invoke(app, args, env={k: v for k, v in os.environ.items() if not k.startswith("GTPO_")})
    assert res.exit_code == 2
    model = "SFTConfig" if command == "sft" else "RLConfig"
    assert res.output.strip().splitlines() == [
        f"gtpo {command}: invalid {model}: log_with: {name} needs the {name} package; install it with "
        f"`pip install 'gtpo[{name}]'` (or `pip install {name}`) (got 'tensorboard,{name}')"
    ]
