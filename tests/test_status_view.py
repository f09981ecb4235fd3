"""`gtpo status [--watch]` against a real Redis: real worker heartbeats (StreamWorker.heartbeat), real stream
entries held by a consumer, the trainer's status as the driver writes it."""

import io
import json
import time

import pytest
from rich.console import Console
from typer.testing import CliRunner

from services.cli import app
from services.status_view import read_snapshot, show, worker_rows
from shared.config.settings import RedisConfig
from shared.contracts.wire import SamplingParams, TaskMessage, WeightsVersion
from shared.queues.queue import WeightRegistry
from shared.queues.worker import StreamWorker

pytestmark = pytest.mark.redis


def _task(i: int) -> TaskMessage:
    return TaskMessage(task_id=f"run:0:{i}:0", run_id="run", train_by=0, prompt_index=i, sample_index=0, group_size=1,
                       prompt_ids=[1, 2, 3], params=SamplingParams(seed=i), policy_version=0)  # fmt: skip


class RolloutBeat(StreamWorker):
    kind = "rollout"

    def loaded_version(self):
        return 3


class RewardBeat(StreamWorker):
    kind = "reward"


@pytest.fixture
def job(redis_url, redis_client, redis_ns):
    """Two rollout workers (one holding two tasks), one reward worker, a trainer status, weights v3."""
    rc = RedisConfig(url=redis_url, namespace=redis_ns.namespace)
    busy, idle, scorer = RolloutBeat(rc, "rollout-0"), RolloutBeat(rc, "rollout-1"), RewardBeat(rc, "reward-0")
    busy.queue.ensure_groups()
    for i in range(5):
        busy.queue.publish(redis_ns.tasks, _task(i), f"t{i}")
    held = busy.queue.consume(redis_ns.tasks, redis_ns.rollout_group, "rollout-0", TaskMessage, count=2, block_ms=10)
    assert len(held) == 2
    busy.busy_s = 3.0
    for w in (busy, idle, scorer):
        w.heartbeat()
    WeightRegistry(redis_client, redis_ns).publish(WeightsVersion(version=3, path="/ckpt/step-3/model", step=3))
    status = {"run_id": "r1", "step": 3, "policy_version": 3, "max_staleness": 0, "waiting": "waiting for 2 groups",
              "groups_buffered": 1, "groups_open": 2, "samples_in_flight": 6, "ts": time.time(),
              "last": {"step": 3, "time_wait_s": 1.25, "time_train_s": 2.5, "time_checkpoint_s": 0.75}}  # fmt: skip
    redis_client.set(redis_ns.trainer_status, json.dumps(status), ex=60)
    return redis_ns


def test_the_snapshot_reads_workers_queues_and_the_trainer(redis_client, job):
    snap = read_snapshot(redis_client, job.namespace)
    assert snap.depths[job.tasks]["length"] == 5 and snap.depths[job.tasks]["pending"] == 2
    rows = {r[0]: r for r in worker_rows(snap)}
    assert set(rows) == {"rollout-0", "rollout-1", "reward-0"}
    assert rows["rollout-0"][1:5] == ["rollout", "busy", "2", "v3"]  # holds two delivered, unfinished tasks
    assert rows["rollout-1"][1:5] == ["rollout", "idle", "0", "v3"]
    assert rows["reward-0"][1:5] == ["reward", "idle", "0", "-"]
    assert rows["rollout-0"][5].endswith(" s ago") and float(rows["rollout-0"][5].split()[0]) < 60
    assert snap.trainer.step == 3 and snap.current_version == 3 and snap.versions == [3]


def test_gtpo_status_prints_the_tables_once(redis_url, job):
    res = CliRunner().invoke(app, ["status", "--redis-url", redis_url, "--namespace", job.namespace],
                             env={"COLUMNS": "200"})  # fmt: skip
    assert res.exit_code == 0, res.output
    out = res.output
    assert f"queues ({job.namespace})" in out and "live workers (3)" in out
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 3}
    assert "busy" in lines["rollout-0"] and " 2 " in lines["rollout-0"] and "v3" in lines["rollout-0"]
    assert "idle" in lines["rollout-1"] and "idle" in lines["reward-0"]
    assert "waiting for 2 groups" in out and "1.25 / 2.50 / 0.75" in out
    assert "weights: current v3, published [3]" in out
    assert out.count("live workers") == 1  # once, then exit


def test_watch_redraws_what_changes(redis_url, redis_client, job):
    buf = io.StringIO()
    console = Console(file=buf, width=200, force_terminal=True)
    redis_client.delete(job.trainer_status)  # the trainer went away: the view says so, live
    show(redis_url, job.namespace, console, watch=True, interval_s=0.05, iterations=2)
    text = buf.getvalue()
    assert "no trainer status in the last minute" in text and "rollout-0" in text


def test_status_without_a_redis_url_is_one_line():
    res = CliRunner().invoke(app, ["status"], env={"REDIS_URL": ""})
    assert res.exit_code == 2 and "redis_url: not set" in res.output
