"""The start-up agreement check through real HTTP (uvicorn on free ports) and real Redis heartbeats: a matching
rollout and reward service pass; each kind of mismatch (namespace, codec, an unknown reward, per-component weights,
block size, mask id) is an error naming both values; `gtpo up` stops before the trainer when a service exits."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from procs import serve_app

from services.reward.app import create_app as reward_app
from services.reward.settings import RewardSettings
from services.rollout.app import create_app as rollout_app
from services.rollout.engines.torch_engine import TorchEngine
from services.rollout.settings import RolloutSettings
from services.stack import Managed, check_services
from services.trainer.config import RLConfig
from services.trainer.orchestrator.driver import Driver
from shared.config.settings import RedisConfig
from shared.contracts.agreement import AgreementError, TrainerSide, check_agreement, fetch_info, registered_infos
from shared.contracts.wire import ServiceInfo
from shared.queues.queue import WeightRegistry

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def services(tiny_dir, tiny):
    """A rollout service (namespace run-a, msgpack) and a reward service (namespace run-a, json, weights
    accuracy 1 + format 0.5), each under uvicorn."""
    redis = {"namespace": "run-a"}
    rollout = rollout_app(RolloutSettings(model=tiny_dir, worker_id="rollout-0", redis=redis), engine=TorchEngine(tiny))
    reward = reward_app(RewardSettings(workers=1, worker_id="reward-0", weights={"accuracy": 1.0, "format": 0.5},
                                       redis={**redis, "codec": "json"}))  # fmt: skip
    running = [serve_app(rollout), serve_app(reward)]
    yield SimpleNamespace(rollout=running[0][2], reward=running[1][2], spec=tiny.spec)
    for server, thread, _ in running:
        server.should_exit = True
        thread.join(30)


def _found(s) -> dict[str, ServiceInfo]:
    return {s.rollout: fetch_info(s.rollout, 10), s.reward: fetch_info(s.reward, 10)}


def _side(s, **changes) -> TrainerSide:
    agreeing = {"namespace": "run-a", "codec": "msgpack", "reward_weights": {"accuracy": 1.0, "format": 0.5},
                "block_size": s.spec.block_size, "mask_token_id": s.spec.mask_token_id}  # fmt: skip
    return TrainerSide(**{**agreeing, **changes})


def _mismatches(side: TrainerSide, found) -> list[str]:
    with pytest.raises(AgreementError) as err:
        check_agreement(side, found)
    return [line.strip() for line in str(err.value).splitlines()[1:]]


def test_info_routes_say_what_each_service_runs_with(services):
    rollout, reward = _found(services).values()
    assert (rollout.kind.value, rollout.worker_id, rollout.namespace, rollout.codec) == (
        "rollout", "rollout-0", "run-a", "msgpack")  # fmt: skip
    assert (rollout.block_size, rollout.mask_token_id) == (services.spec.block_size, services.spec.mask_token_id)
    assert (reward.kind.value, reward.codec, reward.weights) == ("reward", "json", {"accuracy": 1.0, "format": 0.5})
    assert {"accuracy", "format", "speed", "cosine"} <= set(reward.rewards)


def test_a_matching_pair_passes(services):
    found = {services.rollout: fetch_info(services.rollout, 10)}
    check_agreement(_side(services), found)  # the rollout alone: namespace, codec, block size, mask id agree
    check_agreement(_side(services, codec="json", block_size=None), {services.reward: fetch_info(services.reward)})


def test_each_kind_of_mismatch_names_both_values(services):
    r, w = services.rollout, services.reward
    bs, mask = services.spec.block_size, services.spec.mask_token_id
    found = _found(services)
    assert _mismatches(_side(services), found) == [f"redis.codec: trainer 'msgpack', reward {w}: 'json'"]
    assert _mismatches(_side(services, namespace="run-b", codec="json"), found) == [
        f"redis.namespace: trainer 'run-b', rollout {r}: 'run-a'",
        f"redis.codec: trainer 'json', rollout {r}: 'msgpack'",
        f"redis.namespace: trainer 'run-b', reward {w}: 'run-a'",
    ]
    changed = _side(services, codec="json", block_size=bs * 2, mask_token_id=mask + 1)
    assert _mismatches(changed, {r: found[r]}) == [
        f"redis.codec: trainer 'json', rollout {r}: 'msgpack'",
        f"block_size: trainer {bs * 2}, rollout {r}: {bs}",
        f"mask_token_id: trainer {mask + 1}, rollout {r}: {mask}",
    ]
    unknown = _mismatches(_side(services, codec="json", reward_weights={"accuracy": 1, "nope": 1}), {w: found[w]})
    assert len(unknown) == 1 and unknown[0].startswith(f"reward_weights: trainer names nope, unknown to reward {w} ")
    assert "(it knows " in unknown[0] and "accuracy" in unknown[0]
    # the trainer trains on totals the reward worker summed: its weights must be the trainer's, whatever the norm
    side = _side(services, codec="json", reward_weights={"accuracy": 1.0})
    assert _mismatches(side, {w: found[w]})[0].startswith(
        f"reward_weights: trainer {{'accuracy': 1.0}}, reward {w}: {{'accuracy': 1.0, 'format': 0.5}}"
    )
    check_agreement(TrainerSide("run-a", "json", {"accuracy": 1.0, "format": 0.5, "speed": 0}), {w: found[w]})


def test_gtpo_up_checks_every_service_it_started(services, tmp_path):
    cfg = RLConfig(model="m", output_dir=tmp_path, data="d.json", redis={"namespace": "run-a", "codec": "json"})
    started = [Managed("rollout-0", [], tmp_path / "r.log", url=services.rollout),
               Managed("reward-0", [], tmp_path / "w.log", url=services.reward)]  # fmt: skip
    with pytest.raises(AgreementError, match=rf"redis.codec: trainer 'json', rollout {services.rollout}: 'msgpack'"):
        check_services(cfg, started, wait_s=5)
    cfg.redis.codec = "msgpack"
    with pytest.raises(AgreementError, match=rf"redis.codec: trainer 'msgpack', reward {services.reward}: 'json'"):
        check_services(cfg, started, wait_s=5)
    assert list(check_services(cfg, started[:1], wait_s=5)) == [services.rollout]


def test_the_trainer_checks_its_rollout_urls_and_the_workers_registered_in_redis(services, tiny_dir, redis_url,
                                                                                   redis_ns):  # fmt: skip
    from services.reward.worker import RewardWorker

    rc = RedisConfig(url=redis_url, namespace=redis_ns.namespace, codec="json")
    RewardWorker(None, RewardSettings(worker_id="reward-7", weights={"speed": 1.0}, redis=rc)).heartbeat()
    registry = WeightRegistry(RewardWorker(None, RewardSettings(redis=rc)).redis, redis_ns)
    live = registered_infos(registry.live_workers())
    assert list(live) == ["reward-7"] and live["reward-7"].weights == {"speed": 1.0}
    cfg = RLConfig(model="m", output_dir=tiny_dir.parent / "run", data="d.json", rollout_urls=[services.rollout],
                   redis={"namespace": redis_ns.namespace, "codec": "json"}, reward_weights={"speed": 1.0, "nope": 1})  # fmt: skip
    trainer = SimpleNamespace(
        cfg=cfg,
        registry=registry,
        trainer=SimpleNamespace(spec=services.spec),
        stop=threading.Event(),
        _redis=lambda fn, what: fn(),
    )
    with pytest.raises(AgreementError) as err:
        Driver.check_agreement(trainer)
    lines = [line.strip() for line in str(err.value).splitlines()[1:]]
    assert lines[:2] == [
        f"redis.namespace: trainer '{redis_ns.namespace}', rollout {services.rollout}: 'run-a'",
        f"redis.codec: trainer 'json', rollout {services.rollout}: 'msgpack'",
    ]
    assert lines[2].startswith("reward_weights: trainer names nope, unknown to reward reward-7 ") and len(lines) == 3


def test_gtpo_up_stops_before_the_trainer_when_a_service_refuses_its_settings(tiny_dir, tmp_path, redis_url):
    run = tmp_path / "run"
    f = tmp_path / "run.yaml"
    f.write_text(f"model: {tiny_dir}\noutput_dir: {run}\ndata: {tmp_path / 'd.json'}\n"
                 "reward_weights: {accuracy: 1.0, nope: 1.0}\n")  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "REDIS_URL": redis_url, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "services", "up", "--config", str(f)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert "gtpo up: reward-0 exited before answering GET /info" in out.stderr
    assert "unknown reward 'nope'" in out.stderr, out.stderr
    assert not (run / "logs" / "trainer.log").exists()  # the trainer never started


def test_doctests():
    import doctest

    import shared.contracts.agreement

    assert doctest.testmod(shared.contracts.agreement).failed == 0
