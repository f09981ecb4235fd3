"""Redis queue layer against a real Redis: idempotency, claims, dead letters, hand-off, weights, restarts."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from shared.contracts.wire import HeartbeatInfo, Rollout, RolloutMessage, SamplingParams, TaskMessage, WeightsVersion
from shared.queues.keys import Keys
from shared.queues.queue import Codec, Queue, WeightRegistry, connect, with_reconnect
from shared.queues.redis_server import EmbeddedRedis

GROUP = "rollout-workers"


def task(i: int = 0, version: int = 0) -> TaskMessage:
    return TaskMessage(
        task_id=f"run:0:{i}:0",
        run_id="run",
        train_by=0,
        prompt_index=i,
        sample_index=0,
        group_size=1,
        prompt_ids=[1, 2, 3, i],
        params=SamplingParams(seed=i),
        policy_version=version,
    )


def rollout_msg(t: TaskMessage) -> RolloutMessage:
    params = t.params.resolved(4, [0])
    r = Rollout(
        prompt_ids=t.prompt_ids,
        token_ids=[5, 6, 7, 151669],
        step_map=[1, 1, 2, 3],
        finish_reason="stop",
        params=params,
        seed=t.params.seed or 0,
        logprobs=[-0.1, -1e-9, -2.5, -0.75],
    )
    return RolloutMessage(task=t, rollout=r, worker="w0")


@pytest.fixture
def queue(redis_client: redis.Redis, redis_ns: Keys) -> Queue:
    q = Queue(redis_client, redis_ns, claim_idle_ms=200, max_deliveries=5)
    q.ensure_groups()
    return q


def test_keys_are_namespaced_and_validated() -> None:
    k = Keys("gtpo")
    assert k.tasks == "{gtpo}:stream:tasks" and k.idem(k.tasks, "r:1:2:3") == "{gtpo}:idem:stream:tasks:r:1:2:3"
    assert all(name.startswith(k.prefix) for name in (*k.streams, k.dead, k.workers, k.worker("rollout", "a")))
    with pytest.raises(ValueError, match="namespace"):
        Keys("a:b")


def test_publish_is_idempotent(queue: Queue, redis_client: redis.Redis) -> None:
    k = queue.keys
    first = queue.publish(k.tasks, task(1), "run:0:1:0")
    assert first is not None
    assert queue.publish(k.tasks, task(1), "run:0:1:0") is None
    assert redis_client.xlen(k.tasks) == 1
    assert redis_client.get(k.idem(k.tasks, "run:0:1:0")) == first.encode()  # the key remembers the entry
    assert 0 < redis_client.ttl(k.idem(k.tasks, "run:0:1:0")) <= queue.idem_ttl_s


@pytest.mark.parametrize("codec", ["json", "msgpack"])
def test_consume_ack_round_trip(codec: str, redis_client: redis.Redis, redis_ns: Keys) -> None:
    producer = Queue(redis_client, redis_ns, codec=codec)
    consumer = Queue(redis_client, redis_ns, codec="json")  # decodes whatever the producer used
    producer.ensure_groups()
    msg = rollout_msg(task(3))
    producer.publish(redis_ns.rollouts, msg, msg.task.task_id)
    got = consumer.consume(redis_ns.rollouts, "reward-workers", "r0", RolloutMessage, block_ms=100)
    assert len(got) == 1
    d = got[0]
    assert d.message == msg and d.deliveries == 1 and d.message_id == msg.task.task_id
    assert redis_client.xpending(redis_ns.rollouts, "reward-workers")["pending"] == 1
    assert consumer.ack(redis_ns.rollouts, "reward-workers", d.entry_id) == 1
    assert redis_client.xpending(redis_ns.rollouts, "reward-workers")["pending"] == 0
    assert consumer.consume(redis_ns.rollouts, "reward-workers", "r0", RolloutMessage, block_ms=50) == []


def test_codecs_round_trip_exactly() -> None:
    msg = rollout_msg(task(2))
    for name in ("json", "msgpack"):
        codec = Codec.get(name)
        assert codec.decode(codec.encode(msg), RolloutMessage) == msg
    assert len(Codec.get("msgpack").encode(msg)) < len(Codec.get("json").encode(msg))
    with pytest.raises(ValueError, match="codec"):
        Codec.get("pickle")


def test_dead_consumers_entries_are_claimed(queue: Queue) -> None:
    k = queue.keys
    for i in range(3):
        queue.publish(k.tasks, task(i), f"t{i}")
    held = queue.consume(k.tasks, GROUP, "A", TaskMessage, block_ms=100)
    assert len(held) == 3  # A dies holding them: never acks
    assert queue.consume(k.tasks, GROUP, "B", TaskMessage, block_ms=0) == []  # not idle long enough yet
    time.sleep(0.25)
    got = queue.consume(k.tasks, GROUP, "B", TaskMessage, block_ms=0)
    assert [d.message.prompt_index for d in got] == [0, 1, 2]
    assert all(d.deliveries == 2 for d in got)
    queue.ack(k.tasks, GROUP, *(d.entry_id for d in got))
    assert queue.depths()[k.tasks]["groups"][GROUP]["pending"] == 0


def test_redelivered_too_often_goes_to_dead_stream(redis_client: redis.Redis, redis_ns: Keys) -> None:
    q = Queue(redis_client, redis_ns, claim_idle_ms=50, max_deliveries=2)
    q.ensure_groups()
    q.publish(redis_ns.tasks, task(7), "t7")
    assert len(q.consume(redis_ns.tasks, GROUP, "A", TaskMessage, block_ms=0)) == 1  # delivery 1
    time.sleep(0.08)
    assert q.consume(redis_ns.tasks, GROUP, "B", TaskMessage, block_ms=0)[0].deliveries == 2
    time.sleep(0.08)
    assert q.consume(redis_ns.tasks, GROUP, "C", TaskMessage, block_ms=0) == []  # delivery 3 > 2: dead
    dead = q.dead_letters()
    assert len(dead) == 1
    assert "delivered 3 times" in dead[0]["reason"] and dead[0]["deliveries"] == 3
    assert dead[0]["stream"] == redis_ns.tasks and dead[0]["message_id"] == "t7"
    assert Codec.get(dead[0]["codec"]).decode(dead[0]["payload"], TaskMessage) == task(7)  # payload kept
    assert redis_client.xpending(redis_ns.tasks, GROUP)["pending"] == 0  # acked


def test_garbage_payload_is_dead_lettered_and_consumer_continues(queue: Queue, redis_client: redis.Redis) -> None:
    k = queue.keys
    redis_client.xadd(k.tasks, {"d": b"\xc1\xff not msgpack", "v": "msgpack", "id": "bad1"})
    redis_client.xadd(k.tasks, {"d": b'{"task_id": 3}', "v": "json", "id": "bad2"})  # valid JSON, invalid model
    redis_client.xadd(k.tasks, {"x": b"no d field"})
    queue.publish(k.tasks, task(1), "good")
    got = queue.consume(k.tasks, GROUP, "A", TaskMessage, block_ms=100)
    assert [d.message_id for d in got] == ["good"]
    reasons = [d["reason"] for d in queue.dead_letters()]
    assert len(reasons) == 3 and all(r.startswith("undecodable as TaskMessage") for r in reasons)
    assert redis_client.xpending(k.tasks, GROUP)["pending"] == 1  # only the good one awaits its ack


def test_fields_that_are_not_utf8_are_dead_lettered_and_read_back(queue: Queue, redis_client: redis.Redis) -> None:
    k = queue.keys
    redis_client.xadd(k.tasks, {"d": b"\xff", "v": b"\xfe\xff", "id": b"\xffbad-id"})
    queue.publish(k.tasks, task(2), "good")
    got = queue.consume(k.tasks, GROUP, "A", TaskMessage, block_ms=100)
    assert [d.message_id for d in got] == ["good"]  # its batch-mate went on
    redis_client.xadd(k.dead, {"reason": b"\xff", "deliveries": b"many", "ts": b"\x00", "id": b"\xfe"})
    dead = queue.dead_letters()  # whatever a dead letter holds, reading it never raises
    assert dead[0]["reason"] == "\ufffd" and dead[0]["deliveries"] == 0 and dead[0]["ts"] == 0.0
    assert dead[1]["message_id"] == "\ufffdbad-id" and dead[1]["reason"].startswith("undecodable")


def test_hand_off_is_idempotent_and_acks(queue: Queue, redis_client: redis.Redis) -> None:
    k = queue.keys
    queue.publish(k.tasks, task(1), "t1")
    d = queue.consume(k.tasks, GROUP, "A", TaskMessage, block_ms=100)[0]
    out = rollout_msg(d.message)
    first = queue.hand_off(k.tasks, GROUP, d.entry_id, k.rollouts, out, "t1")
    assert first is not None
    # a redelivery of the same task (A was too slow, B took it over) hands off again: no second entry
    queue.publish(k.tasks, task(1), "t1-again")
    d2 = queue.consume(k.tasks, GROUP, "B", TaskMessage, block_ms=100)[0]
    assert queue.hand_off(k.tasks, GROUP, d2.entry_id, k.rollouts, out, "t1") is None
    assert redis_client.xlen(k.rollouts) == 1
    assert redis_client.xpending(k.tasks, GROUP)["pending"] == 0  # both acked


def test_hand_off_failure_leaves_source_pending(queue: Queue, redis_client: redis.Redis) -> None:
    k = queue.keys
    queue.publish(k.tasks, task(1), "t1")
    d = queue.consume(k.tasks, GROUP, "A", TaskMessage, block_ms=100)[0]
    redis_client.set(k.rollouts, "not a stream")  # the XADD fails inside the script
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        queue.hand_off(k.tasks, GROUP, d.entry_id, k.rollouts, rollout_msg(d.message), "t1")
    assert redis_client.xpending(k.tasks, GROUP)["pending"] == 1  # not acked: nothing lost
    assert not redis_client.exists(k.idem(k.rollouts, "t1"))  # and the retry is not swallowed


def test_trimmed_pending_entry_is_dead_lettered(queue: Queue, redis_client: redis.Redis) -> None:
    k = queue.keys
    ids = [queue.publish(k.tasks, task(i), f"t{i}") for i in range(2)]
    assert len(queue.consume(k.tasks, GROUP, "A", TaskMessage, block_ms=100)) == 2
    redis_client.xdel(k.tasks, ids[0])  # what an over-eager MAXLEN trim does
    time.sleep(0.25)
    got = queue.consume(k.tasks, GROUP, "B", TaskMessage, block_ms=0)
    assert [d.message_id for d in got] == ["t1"]
    assert [(d["entry_id"], d["payload"]) for d in queue.dead_letters()] == [(ids[0], None)]
    assert redis_client.xpending(k.tasks, GROUP)["pending"] == 1  # the deleted one is no longer pending


def test_trim_acked_keeps_unfinished_work(queue: Queue, redis_client: redis.Redis) -> None:
    k = queue.keys
    for i in range(5):
        queue.publish(k.tasks, task(i), f"t{i}")
    got = queue.consume(k.tasks, GROUP, "A", TaskMessage, count=3, block_ms=100)
    queue.ack(k.tasks, GROUP, got[0].entry_id, got[2].entry_id)  # got[1] still pending, 2 never read
    queue.trim_acked(k.tasks)
    left = [entry_id.decode() for entry_id, _ in redis_client.xrange(k.tasks)]
    assert left[-4:] == [got[1].entry_id, got[2].entry_id, *left[-2:]] and len(left) >= 4


def test_depths_report_pending_per_consumer(queue: Queue) -> None:
    k = queue.keys
    for i in range(3):
        queue.publish(k.tasks, task(i), f"t{i}")
    queue.consume(k.tasks, GROUP, "A", TaskMessage, count=2, block_ms=100)
    depths = queue.depths()
    assert depths[k.tasks]["length"] == 3
    g = depths[k.tasks]["groups"][GROUP]
    assert g["pending"] == 2 and g["consumers"] == {"A": 2} and g["lag"] in (1, None)
    assert depths[k.tasks]["pending"] == 2 and depths[k.tasks]["lag"] == g["lag"]  # summed over groups
    assert depths[k.dead] == {"length": 0, "pending": 0, "lag": None, "groups": {}}


def test_restarted_consumer_resumes_its_own_pending(queue: Queue) -> None:
    k = queue.keys
    for i in range(3):
        queue.publish(k.tasks, task(i), f"t{i}")
    queue.consume(k.tasks, GROUP, "A", TaskMessage, count=2, block_ms=100)  # A crashes holding t0, t1
    queue.consume(k.tasks, GROUP, "B", TaskMessage, count=1, block_ms=100)  # B holds t2
    again = queue.own_pending(k.tasks, GROUP, "A", TaskMessage)  # A restarted under its name
    assert [(d.message_id, d.deliveries) for d in again] == [("t0", 2), ("t1", 2)]
    assert queue.own_pending(k.tasks, GROUP, "C", TaskMessage) == []


def test_block_must_stay_under_socket_timeout(redis_url: str, redis_ns: Keys) -> None:
    q = Queue(connect(redis_url, socket_timeout=1.0), redis_ns)
    with pytest.raises(ValueError, match="socket_timeout"):
        q.consume(redis_ns.tasks, GROUP, "A", TaskMessage, block_ms=1000)


@pytest.mark.parametrize("how", ["delete-stream", "destroy-group"])
def test_vanished_group_is_recreated(how: str, queue: Queue, redis_client: redis.Redis) -> None:
    k = queue.keys
    queue.publish(k.tasks, task(0), "t0")
    assert len(queue.consume(k.tasks, GROUP, "A", TaskMessage, block_ms=100)) == 1
    if how == "delete-stream":
        redis_client.delete(k.tasks)  # what a restart without persistence looks like
        redis_client.xadd(k.tasks, {"d": Codec.get("json").encode(task(1)), "v": "json", "id": "t1"})
    else:
        redis_client.xgroup_destroy(k.tasks, GROUP)
    got = queue.consume(k.tasks, GROUP, "A", TaskMessage, block_ms=100)
    # group recreated at id 0: everything still in the stream is delivered again (idempotency absorbs it)
    assert [d.message.prompt_index for d in got] == ([1] if how == "delete-stream" else [0])


def test_weights_publish_is_monotonic(redis_client: redis.Redis, redis_ns: Keys) -> None:
    reg = WeightRegistry(redis_client, redis_ns)
    assert reg.current() is None and reg.versions() == []
    v1, v2 = WeightsVersion(version=1, path="w/v1", step=1), WeightsVersion(version=2, path="w/v2", step=2)
    reg.publish(v1)
    reg.publish(v2)
    reg.publish(v2)  # the same again (a trainer retrying after a crash) is fine
    with pytest.raises(ValueError, match="not newer"):
        reg.publish(v1)
    with pytest.raises(ValueError, match="not newer"):
        reg.publish(WeightsVersion(version=2, path="w/other"))
    assert reg.current() == v2 and reg.versions() == [v1, v2]
    with pytest.raises(ValueError, match="current"):
        reg.forget(2)
    reg.forget(1)
    assert reg.versions() == [v2]


def test_heartbeats_expire(redis_client: redis.Redis, redis_ns: Keys) -> None:
    reg = WeightRegistry(redis_client, redis_ns)
    reg.heartbeat("rollout", "r0", 3, ttl_s=1, info=HeartbeatInfo(host="a"))
    reg.heartbeat("reward", "s0", None, ttl_s=30)
    live = reg.live_workers()
    assert set(live) == {"r0", "s0"} and live["r0"].version == 3 and live["r0"].info.model_extra == {"host": "a"}
    assert set(reg.live_workers("rollout")) == {"r0"}
    time.sleep(1.1)
    assert set(reg.live_workers()) == {"s0"}
    assert redis_client.smembers(redis_ns.workers) == {b"reward:s0"}  # the dead member was pruned


def test_deletable_versions_wait_for_the_slowest_live_worker(redis_client: redis.Redis, redis_ns: Keys) -> None:
    reg = WeightRegistry(redis_client, redis_ns)
    for v in range(1, 6):
        reg.publish(WeightsVersion(version=v, path=f"w/v{v}"))
    ids = lambda vs: [v.version for v in vs]  # noqa: E731
    assert ids(reg.deletable_versions()) == [1, 2, 3, 4]  # no live rollout worker: all but the current
    reg.heartbeat("rollout", "fast", 5)
    reg.heartbeat("rollout", "slow", 3)
    reg.heartbeat("reward", "scorer", 1)  # other kinds load no weights: ignored
    assert ids(reg.deletable_versions()) == [1, 2]
    reg.heartbeat("rollout", "dead", 1, ttl_s=0.3)
    assert ids(reg.deletable_versions()) == []
    time.sleep(0.4)
    assert ids(reg.deletable_versions()) == [1, 2]  # a dead worker holds nothing back
    reg.heartbeat("rollout", "starting", None)
    assert reg.deletable_versions() == []  # it may be about to load any version


def test_restart_keeps_streams_and_with_reconnect_waits(embedded_redis: EmbeddedRedis) -> None:
    client = connect(embedded_redis.url, retries=1)
    k = Keys("restart")
    q = Queue(client, k)
    q.ensure_groups()
    for i in range(3):
        q.publish(k.tasks, task(i), f"t{i}")
    held = q.consume(k.tasks, GROUP, "A", TaskMessage, count=1, block_ms=100)
    embedded_redis.restart()
    assert client.xlen(k.tasks) == 3  # the AOF brought back the stream...
    assert client.xpending(k.tasks, GROUP)["pending"] == 1  # ...the group and its pending entry...
    assert q.publish(k.tasks, task(0), "t0") is None  # ...and the idempotency keys
    assert [d.message_id for d in q.consume(k.tasks, GROUP, "A", TaskMessage, block_ms=100)] == ["t1", "t2"]
    q.ack(k.tasks, GROUP, held[0].entry_id)

    embedded_redis.stop()
    threading.Timer(0.5, embedded_redis.start).start()
    lines: list[str] = []
    t0 = time.monotonic()
    assert with_reconnect(lambda: client.xlen(k.tasks), what="reading tasks", deadline_s=10, log=lines.append) == 3
    assert time.monotonic() - t0 >= 0.4 and lines and all("redis unreachable while reading tasks" in s for s in lines)


def test_with_reconnect_gives_up_after_deadline() -> None:
    def down() -> int:
        raise redis.ConnectionError("refused")

    with pytest.raises(redis.ConnectionError):
        with_reconnect(down, what="testing", deadline_s=0.2, log=lambda s: None)
