"""The rollout worker against a real Redis and the tiny model: each task stands alone (a poison task is
dead-lettered at once with its reason, its batch-mates are handed off), the limits of HTTP hold for the stream,
tasks waiting for unpublished weights stay pending, and registry pick-ups only move forward."""

from __future__ import annotations

import shutil

import pytest

from services.rollout.engines.torch_engine import TorchEngine
from services.rollout.host import EngineHost, RolloutMetrics
from services.rollout.settings import RolloutSettings
from services.rollout.worker import RolloutWorker
from shared.config.settings import RedisConfig
from shared.contracts.wire import RolloutMessage, SamplingParams, TaskMessage, WeightsVersion
from shared.queues.queue import Codec

LIMITS = {"max_prompt_tokens": 16, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("ckpts")
    shutil.copytree(tiny_dir, root / "v0")
    shutil.copytree(tiny_dir, root / "v1")
    return root


@pytest.fixture
def worker(root, tiny, redis_url, redis_ns):
    settings = RolloutSettings(
        model=root / "v0", checkpoint_root=root, task_batch=16, weights_wait_s=0.5,
        redis=RedisConfig(url=redis_url, namespace=redis_ns.namespace, claim_idle_ms=60_000), **LIMITS,
    )  # fmt: skip
    w = RolloutWorker(EngineHost(TorchEngine(tiny), RolloutMetrics(), start=root / "v0"), settings)
    w.queue.ensure_groups()
    w.registry.publish(WeightsVersion(version=0, path=str(root / "v0")))
    yield w
    w.redis.close()


def task(i: int, **changes) -> TaskMessage:
    fields = {
        "task_id": f"run:0:{i}:0", "run_id": "run", "train_by": 0, "prompt_index": i, "sample_index": 0,
        "group_size": 1, "prompt_ids": [5, 6, 7 + i], "reference": "3",
        "params": SamplingParams(seed=i, max_new_tokens=6), "policy_version": 0,
    }  # fmt: skip
    return TaskMessage(**{**fields, **changes})


def enqueue(worker, tasks):
    for t in tasks:
        assert worker.queue.publish(worker.keys.tasks, t, t.task_id)


def handed_off(worker) -> dict[str, RolloutMessage]:
    entries = worker.redis.xrange(worker.keys.rollouts)
    msgs = [Codec.get(fields[b"v"].decode()).decode(fields[b"d"], RolloutMessage) for _, fields in entries]
    return {m.task.task_id: m for m in msgs}


def pending(worker) -> int:
    return worker.redis.xpending(worker.keys.tasks, worker.keys.rollout_group)["pending"]


POISON = {
    "vocab": (task(100, prompt_ids=[5, 10**6, 7]), "prompt_ids: token ids must be in [0, 320)"),
    "negative": (task(101, prompt_ids=[5, -1]), "prompt_ids"),
    "long prompt": (task(102, prompt_ids=[5] * 17), "prompt_ids: needs 1 to 16 tokens, got 17"),
    "max_new_tokens": (task(103, params=SamplingParams(max_new_tokens=9)), "params.max_new_tokens: at most 8"),
    "n": (task(104, params=SamplingParams(n=2, max_new_tokens=4)), "params.n: a task is one sample"),
    "task id": (task(105, task_id="x" * 300), "the reward stage would refuse it"),
    "reference": (task(106, reference="1" * 100_001), "reference"),
    "denoising steps": (task(107, params=SamplingParams(denoising_steps=8, max_new_tokens=4)), "denoising_steps"),
}


def test_poison_tasks_are_dead_lettered_at_once_and_their_batch_mates_go_on(worker):
    good = [task(i) for i in range(5)]
    poison = [t for t, _ in POISON.values()]
    enqueue(worker, good[:2] + poison[:4] + good[2:] + poison[4:])

    assert worker.tick() == len(good) + len(poison)  # one read: every task done, nothing left pending
    out = handed_off(worker)
    assert sorted(out) == sorted(t.task_id for t in good)
    assert all(len(m.rollout.token_ids) <= 6 and m.rollout.policy_version == 0 for m in out.values())
    assert pending(worker) == 0

    dead = {d["message_id"]: d for d in worker.queue.dead_letters()}
    assert sorted(dead) == sorted(t.task_id for t in poison)
    for t, needle in POISON.values():
        d = dead[t.task_id]
        assert needle in d["reason"] and d["deliveries"] == 1 and d["stream"] == worker.keys.tasks, d["reason"]
        assert Codec.get(d["codec"]).decode(d["payload"], TaskMessage) == t  # the task comes back as it was


def test_the_batch_falls_back_to_one_by_one(worker):
    """A batch whose decoding fails as a whole (here the engine's own vocabulary check) is retried task by task."""
    good = [task(i) for i in range(3)]
    bad = task(9, prompt_ids=[319, 320])
    enqueue(worker, [good[0], bad, *good[1:]])
    assert worker.tick() == 4
    assert sorted(handed_off(worker)) == sorted(t.task_id for t in good)
    (dead,) = worker.queue.dead_letters()
    assert dead["message_id"] == bad.task_id and "cannot be generated: prompt_ids" in dead["reason"]


def test_tasks_for_unpublished_weights_stay_pending_not_dead(worker):
    enqueue(worker, [task(0), task(1, policy_version=7)])
    assert worker.tick() == 1
    assert list(handed_off(worker)) == [task(0).task_id]
    assert pending(worker) == 1 and worker.queue.dead_letters() == []


def test_registry_pick_up_only_moves_forward(worker, root):
    host = worker.host
    worker.refresh_weights()
    assert host.served_version == 0
    worker.registry.publish(WeightsVersion(version=5, path=str(root / "v1")))
    worker.refresh_weights()
    assert host.served_version == 5 and host.served.path == str((root / "v1").resolve())

    host.load(root / "v0", root, 6, "http")  # pushed over HTTP ahead of the registry
    worker.refresh_weights()
    assert host.served_version == 6  # the registry's v5 is not loaded over it

    worker.registry.publish(WeightsVersion(version=6, path=str(root / "v1")))  # v6 from another folder
    worker.refresh_weights()
    assert (host.served_version, host.served.path) == (6, str((root / "v0").resolve()))
    assert 'gtpo_rollout_weight_load_failures_total{source="registry"} 1.0' in _metrics(host)


def test_a_broken_published_version_keeps_the_old_weights(worker, root):
    broken = root / "broken"
    shutil.copytree(root / "v0", broken, dirs_exist_ok=True)
    (broken / "config.json").write_text("[]")
    worker.refresh_weights()
    worker.registry.publish(WeightsVersion(version=1, path=str(broken)))
    worker.refresh_weights()
    worker.refresh_weights()  # refused once, not retried every tick
    assert worker.host.served_version == 0
    assert 'gtpo_rollout_weight_load_failures_total{source="registry"} 1.0' in _metrics(worker.host)


def _metrics(host) -> str:
    from prometheus_client import generate_latest

    return generate_latest(host.metrics.registry).decode()


def test_shutdown_abandons_the_batch_at_a_block_boundary_and_leaves_it_pending(root, tiny, redis_url, redis_ns):
    """SIGTERM sets the stop event: the engine stops at its next block boundary, the task is neither handed off
    nor dead-lettered, and the next worker gets it."""
    import threading
    import time

    engine = TorchEngine(tiny)
    settings = RolloutSettings(
        model=root / "v0", checkpoint_root=root, max_new_tokens=131072,
        redis=RedisConfig(url=redis_url, namespace=redis_ns.namespace),
    )  # fmt: skip
    w = RolloutWorker(EngineHost(engine, RolloutMetrics()), settings)
    w.queue.ensure_groups()
    w.registry.publish(WeightsVersion(version=0, path=str(root / "v0")))
    enqueue(w, [task(0, params=SamplingParams(max_new_tokens=131072, stop_token_ids=[], seed=0))])
    stop = threading.Event()
    thread = w.start(stop)
    deadline = time.monotonic() + 60
    while engine.stats.forwards < 20:  # decoding has started
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    stop.set()
    thread.join(60)
    assert not thread.is_alive()
    assert engine.stats.forwards < 131072 // engine.spec.block_size  # far short of the whole generation
    assert handed_off(w) == {} and w.queue.dead_letters() == [] and pending(w) == 1
    assert 'gtpo_rollout_cancelled_total{source="queue"} 1.0' in _metrics(w.host)
    w.redis.close()
