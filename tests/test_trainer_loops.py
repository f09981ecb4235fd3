"""The trainer's long-lived loops against a real Redis and a real `gtpo train` process: a Redis restart mid-run,
a garbage heartbeat in the namespace, a SIGTERM while it waits for groups. A thread of the test plays the rollout
and reward workers (it answers every task at once), so each run takes seconds."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from test_services_e2e import _config, _trained

from shared.config.loader import dump_config
from shared.contracts.wire import Rollout, ScoredMessage, ScoreResult, TaskMessage
from shared.queues.keys import Keys
from shared.queues.queue import TRANSIENT_ERRORS, Queue, connect

pytestmark = pytest.mark.redis

REPO = Path(__file__).resolve().parents[1]


class FakeWorkers(threading.Thread):
    """Scores every task as soon as it is published: a 4-token rollout at the task's version, reward 0 or 1.

    `tag_seen` is set at the first task tagged `watch_tag`: with k >= 1 the trainer enqueues the tasks of tag s + k
    when it starts collecting step s, just before it trains."""

    def __init__(self, url: str, keys: Keys, weights: dict[str, float], watch_tag: int = -1) -> None:
        super().__init__(daemon=True)
        self.url, self.keys, self.weights, self.done = url, keys, weights, threading.Event()
        self.watch_tag, self.tag_seen = watch_tag, threading.Event()

    def run(self) -> None:
        client = connect(self.url, retries=0)
        q, k = Queue(client, self.keys), self.keys
        while not self.done.is_set():
            try:
                q.ensure_groups()
                for d in q.consume(k.tasks, k.rollout_group, "fake", TaskMessage, count=64, block_ms=20):
                    if d.message.train_by == self.watch_tag:
                        self.tag_seen.set()
                    q.hand_off(k.tasks, k.rollout_group, d.entry_id, k.scored, _scored(d.message, self.weights),
                               d.message.task_id)  # fmt: skip
            except TRANSIENT_ERRORS:  # Redis restarting: the test's outage, not the fake's business
                time.sleep(0.1)
        client.close()


def _scored(t: TaskMessage, weights: dict[str, float]) -> ScoredMessage:
    n = 4
    rollout = Rollout(prompt_ids=t.prompt_ids, token_ids=[3, 4, 5, 6][:n], step_map=list(range(1, n + 1)),
                      finish_reason="length", policy_version=t.policy_version, policy_run=t.policy_run, seed=t.params.seed or 0,
                      params=t.params.model_copy(update={"block_size": 4}), logprobs=[-1.0] * n)  # fmt: skip
    reward = float(t.sample_index % 2)
    score = ScoreResult(id=t.task_id, total=reward, components={"accuracy": reward, "cosine": 0.0}, status="ok")
    # scored with the trainer's own weights: a score made with others is refused (issue 32, item 2)
    return ScoredMessage(task=t, rollout=rollout, score=score, reward_weights=weights)


def _start_trainer(cfg, url: str) -> tuple[subprocess.Popen, Path]:
    path = cfg.output_dir.parent / "trainer.yaml"
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(cfg))
    log = cfg.output_dir.parent / "trainer.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GTPO_")}
    env.update(PYTHONPATH=str(REPO), REDIS_URL=url, OMP_NUM_THREADS="1")
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services", "train", "--config", str(path)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    return proc, log


def _wait(pred, proc: subprocess.Popen, log: Path, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert proc.poll() is None, f"the trainer exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen, log: Path, timeout_s: float) -> int:
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the trainer did not exit within {timeout_s} s:\n{log.read_text()[-3000:]}") from None


def test_async_trainer_survives_a_4s_redis_outage(tmp_path, tiny_dir, embedded_redis):
    """Redis stopped for 4 s as a k = 2 run starts step 1 (it collects, then trains): the trainer waits for it and
    finishes every step (it used to die at its first Redis call after training, the lease check)."""
    steps, ns, k = 4, "loops-outage", 2
    cfg = _config(
        tmp_path,
        tiny_dir,
        ns,
        steps=steps,
        max_staleness=k,
        reward_weights={"accuracy": 1.0},
        loss={"objective": "decoupled", "tis_cap": 2.0},
    )
    fake = FakeWorkers(embedded_redis.url, Keys(ns), cfg.reward_weights, watch_tag=1 + k)
    fake.start()
    proc, log = _start_trainer(cfg, embedded_redis.url)
    try:
        _wait(fake.tag_seen.is_set, proc, log, 120, "step 1")
        embedded_redis.stop()
        time.sleep(4)
        embedded_redis.start()
        assert _finish(proc, log, 180) == 0, log.read_text()[-3000:]
    finally:
        fake.done.set()
        if proc.poll() is None:
            proc.kill()
    assert sorted({row["step"] for row in _trained(cfg.output_dir)}) == list(range(steps))
    assert "redis unreachable while" in log.read_text()  # the outage was seen, and waited out


def test_a_garbage_heartbeat_is_skipped_not_fatal(tmp_path, tiny_dir, redis_url, redis_client):
    """A non-JSON worker heartbeat (and a heartbeat key of the wrong type) in the namespace: the trainer warns,
    naming the key, and trains (it used to exit 2 as if its config were wrong)."""
    ns = f"loops-garbage-{uuid.uuid4().hex[:8]}"
    keys = Keys(ns)
    redis_client.set(keys.worker("rollout", "junk"), b"\xff not json", ex=600)
    redis_client.hset(keys.worker("reward", "hash"), "a", "b")
    redis_client.expire(keys.worker("reward", "hash"), 600)
    redis_client.sadd(keys.workers, "rollout:junk", "reward:hash")
    cfg = _config(tmp_path, tiny_dir, ns, steps=1, reward_weights={"accuracy": 1.0})
    fake = FakeWorkers(redis_url, keys, cfg.reward_weights)
    fake.start()
    proc, log = _start_trainer(cfg, redis_url)
    try:
        code = _finish(proc, log, 180)
    finally:
        fake.done.set()
        for key in redis_client.scan_iter(match=keys.pattern, count=1000):
            redis_client.delete(key)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert f"skipping {keys.worker('rollout', 'junk')}" in text and f"skipping {keys.worker('reward', 'hash')}" in text
    metrics = [json.loads(x) for x in (cfg.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1]


def test_sigterm_while_waiting_for_groups_exits_at_once(tmp_path, tiny_dir, redis_url, redis_client):
    """No rollout worker: the trainer waits for groups (step_timeout_s = 10 minutes). A SIGTERM ends the wait: exit
    0 within seconds, nothing trained, its tasks left for a resume."""
    ns = f"loops-sigterm-{uuid.uuid4().hex[:8]}"
    keys = Keys(ns)
    cfg = _config(tmp_path, tiny_dir, ns, steps=3, step_timeout_s=600)
    proc, log = _start_trainer(cfg, redis_url)
    try:
        _wait(lambda: b"waiting for" in (redis_client.get(keys.trainer_status) or b""), proc, log, 120,
              "the trainer to wait for groups")  # fmt: skip
        proc.send_signal(signal.SIGTERM)
        code = _finish(proc, log, 30)  # it used to wait out step_timeout_s
    finally:
        if proc.poll() is None:
            proc.kill()
        for key in redis_client.scan_iter(match=keys.pattern, count=1000):
            redis_client.delete(key)
    assert code == 0, log.read_text()[-3000:]
    assert "stopped while waiting for" in log.read_text()
    assert not (cfg.output_dir / "checkpoints" / "step-00000001").exists() and _trained(cfg.output_dir) == []


def test_live_workers_skips_every_kind_of_bad_heartbeat(redis_client, redis_ns, caplog):
    """Non-JSON, JSON of the wrong shape, a negative version, a hash at the key: each skipped, counted and named
    once in the log; the good heartbeat still reads."""
    from shared.contracts.wire import HeartbeatInfo
    from shared.queues.queue import WeightRegistry

    reg = WeightRegistry(redis_client, redis_ns)
    reg.heartbeat("rollout", "good", 3, info=HeartbeatInfo(busy_s=1.0, up_s=2.0, host="h"))
    bad = {"nonjson": b"\xff{", "shape": b"[1, 2]", "version": json.dumps({"kind": "rollout", "id": "v", "version": -1,
           "ts": 1.0}).encode(), "busy": json.dumps({"kind": "rollout", "id": "b", "ts": 1.0,
           "info": {"busy_s": "lots"}}).encode()}  # fmt: skip
    for name, value in bad.items():
        redis_client.set(redis_ns.worker("rollout", name), value)
    redis_client.hset(redis_ns.worker("rollout", "hash"), "a", "b")
    redis_client.sadd(redis_ns.workers, *[f"rollout:{n}" for n in [*bad, "hash"]])
    for _ in range(2):
        live = reg.live_workers()
        assert list(live) == ["good"] and live["good"].version == 3
        assert live["good"].ts == pytest.approx(time.time(), abs=60)
        assert live["good"].info == HeartbeatInfo(busy_s=1.0, up_s=2.0, host="h")
    assert reg.deletable_versions() == []  # its readers go through the same check
    keys = {redis_ns.worker("rollout", n) for n in [*bad, "hash"]}
    assert set(reg.skipped) == keys and min(reg.skipped.values()) >= 2
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping ")]
    assert all(sum(w.startswith(f"skipping {k}: ") for w in warned) == 1 for k in keys)  # once, not at every read
    assert len(warned) == len(keys)


def test_lease_with_garbage_at_its_key_is_taken_not_fatal(redis_client, redis_ns, tmp_path):
    from services.trainer.orchestrator.lease import RunLease

    redis_client.set(redis_ns.trainer_lease, b"garbage")
    lease = RunLease(redis_client, redis_ns.trainer_lease, "run", tmp_path, ttl_s=5)
    lease.acquire()  # no trainer holds it: garbage is not a holder
    redis_client.set(redis_ns.trainer_lease, b'{"no": "token"}')
    assert lease.renew() and not lease.lost.is_set()  # re-taken
    assert json.loads(redis_client.get(redis_ns.trainer_lease))["token"] == lease.token
    lease.release()
    assert redis_client.get(redis_ns.trainer_lease) is None


def test_with_reconnect_stops_on_request_and_names_what_after_its_deadline():
    import redis

    from shared.queues.queue import RedisUnavailable, StopRequested, with_reconnect

    def down() -> int:
        raise redis.ConnectionError("refused")

    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    with pytest.raises(StopRequested, match="while reading"):
        with_reconnect(down, what="reading", deadline_s=3600, log=lambda s: None, stop=stop)
    with pytest.raises(RedisUnavailable, match=r"for 0 s while renewing the trainer lease .*redis.reconnect_s"):
        with_reconnect(down, what="renewing the trainer lease", deadline_s=0.1, log=lambda s: None)


def test_garbage_in_the_weights_registry_is_skipped_and_replaced(redis_client, redis_ns):
    """What the trainer reads of the registry at start-up and after every checkpoint: garbage at the current key and
    in the version table is skipped and counted; the trainer's next publish replaces it."""
    from shared.contracts.wire import WeightsVersion
    from shared.queues.queue import WeightRegistry

    reg = WeightRegistry(redis_client, redis_ns)
    redis_client.set(redis_ns.weights_current, b"\x00garbage")
    redis_client.hset(redis_ns.weights_meta, mapping={"7": b"{", "8": b'{"version": -1, "path": "x"}'})
    assert reg.current() is None and reg.versions() == []
    reg.publish(WeightsVersion(version=1, path="/ckpt/1"))
    assert reg.current() == WeightsVersion(version=1, path="/ckpt/1")
    assert [v.version for v in reg.versions()] == [1]
    assert reg.skipped[redis_ns.weights_current] == 1 and reg.skipped[f"{redis_ns.weights_meta}[7]"] >= 1
