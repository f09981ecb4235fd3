"""`gtpo up`: the processes it plans get every Redis setting of the run and no secret on their command lines or in
the trainer's config file; each planned command, run as the launcher would run it (with --dry-run), resolves the
same settings."""

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from services.stack import plan, redis_arguments
from services.trainer.config import RLConfig
from shared.config.loader import dump_config
from shared.config.settings import RedisConfig

REPO = Path(__file__).resolve().parents[1]
TOKEN, PASSWORD = "tok-abc #def", "hunter2pw"


@pytest.fixture
def stack(tmp_path):
    cfg = RLConfig.model_validate({
        "model": str(tmp_path / "models" / "tiny"), "output_dir": str(tmp_path / "run"), "data": str(tmp_path / "d.json"),
        "api_token": TOKEN, "reward_weights": {"accuracy": 1.0, "cosine": 0.5},
        "redis": {"url": f"redis://:{PASSWORD}@127.0.0.1:1/0", "namespace": "up-plan", "codec": "json",
                  "claim_idle_ms": 1234, "max_deliveries": 7},
    })  # fmt: skip
    cfg.output_dir.mkdir(parents=True)
    workers, trainer, trainer_cfg, cfg_path = plan(cfg, cfg.output_dir, 2, 1, resume=False)
    cfg_path.write_text(dump_config(trainer_cfg))  # what run_stack writes
    env = {k: v for k, v in os.environ.items() if not k.startswith("GTPO_")}
    env.update(PYTHONPATH=str(REPO), REDIS_URL=cfg.redis.resolved_url(), GTPO_TRAIN__API_TOKEN=TOKEN,
               GTPO_ROLLOUT__API_TOKEN=TOKEN)  # fmt: skip
    return cfg, workers, trainer, cfg_path, env


def _dry_run(cmd: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run([*cmd, "--dry-run"], capture_output=True, text=True, env=env, cwd=REPO, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_every_redis_setting_but_the_url_is_an_argument():
    assert [a.split("=")[0] for a in redis_arguments(RLConfig(model="m", output_dir="o", data="d"))] == [
        f"redis.{name}" for name in RedisConfig.model_fields if name != "url"
    ]


def test_no_secret_on_a_command_line_or_in_the_trainer_config(stack):
    cfg, workers, trainer, cfg_path, _ = stack
    for p in [*workers, trainer]:
        assert not any(TOKEN in a or PASSWORD in a for a in p.cmd), p.cmd
    text = cfg_path.read_text()
    assert TOKEN not in text and PASSWORD not in text and "**********" not in text


def test_planned_workers_resolve_the_runs_redis_settings(stack):
    cfg, workers, _, _, env = stack
    want = cfg.redis.model_dump(mode="json", exclude={"url"})
    for p in (workers[0], workers[-1]):  # a rollout and a reward worker
        shown = yaml.safe_load(_dry_run(p.cmd, env))  # YAML, as every command prints it
        assert {k: shown["redis"][k] for k in want} == want, p.name
        assert shown["redis"]["url"] is None and shown["worker"] is True and shown["worker_id"] == p.name
    reward = yaml.safe_load(_dry_run(workers[-1].cmd, env))
    assert reward["weights"] == cfg.reward_weights


def test_the_planned_trainer_resolves_the_same_run_with_its_secrets_from_the_environment(stack):
    cfg, workers, trainer, _, env = stack
    shown = yaml.safe_load(_dry_run(trainer.cmd, env))
    assert shown["redis"] == {**cfg.redis.model_dump(mode="json"), "url": None}  # the URL: $REDIS_URL
    assert shown["api_token"] == "**********"  # set, from $GTPO_TRAIN__API_TOKEN
    ports = [a.removeprefix("port=") for p in workers if p.name.startswith("rollout") for a in p.cmd if "port=" in a]
    assert shown["rollout_urls"] == [f"http://127.0.0.1:{port}" for port in ports] and len(ports) == 2


def test_rollout_arguments_reach_every_rollout_worker_and_no_other(stack, tmp_path):
    """`run_stack(rollout_args=...)` (the demo's in-flight arm): each rollout worker resolves them, the reward
    worker's command does not carry them."""
    cfg, _, _, _, env = stack
    workers, *_ = plan(cfg, cfg.output_dir, 2, 1, resume=False, rollout_args=["swap_at_block=true"])
    rollouts = [p for p in workers if p.name.startswith("rollout")]
    assert len(rollouts) == 2 and all("swap_at_block=true" in p.cmd for p in rollouts)
    assert not any("swap_at_block=true" in p.cmd for p in workers if p.name.startswith("reward"))
    assert yaml.safe_load(_dry_run(rollouts[0].cmd, env))["swap_at_block"] is True
