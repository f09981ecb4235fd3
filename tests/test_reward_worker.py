"""The reward worker on a real Redis and a real verifier pool: a batch of good rollouts read together with poison
entries (over the ScoreItem limits, not UTF-8) scores every good one and dead-letters each poison one with its reason."""

import msgpack
import pytest

from services.reward.scoring import item_from_rollout
from services.reward.settings import RewardSettings
from services.reward.verify import VerifierPool
from services.reward.worker import RewardWorker
from shared.config.settings import RedisConfig
from shared.contracts.wire import Rollout, RolloutMessage, SamplingParams, ScoredMessage, ScoreItem, TaskMessage
from shared.queues.queue import Queue


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(workers=1, timeout_s=5.0) as p:
        assert p.wait_ready(60)
        yield p


def rollout_message(task_id: str, text: str, reference: str | None) -> RolloutMessage:
    """Prompt of 4 tokens, response of 4 unmasked in 2 steps (block size 4)."""
    params = SamplingParams(block_size=4, max_new_tokens=8, seed=1)
    task = TaskMessage(task_id=task_id, run_id="r", train_by=0, prompt_index=0, sample_index=0, group_size=1,
                       prompt_ids=[1, 2, 3, 4], reference=reference, params=params, policy_version=0)  # fmt: skip
    rollout = Rollout(prompt_ids=[1, 2, 3, 4], token_ids=[5, 6, 7, 8], step_map=[1, 1, 2, 2], text=text,
                      finish_reason="stop", params=params, seed=1)  # fmt: skip
    return RolloutMessage(task=task, rollout=rollout, worker="w")


def test_item_from_rollout():
    item = item_from_rollout("t", rollout_message("t", r"\boxed{2}", "2").rollout, "2")
    assert item == ScoreItem(id="t", response=r"\boxed{2}", reference="2", token_count=4, steps=2, block_size=4,
                             max_new_tokens=8, finish_reason="stop")  # fmt: skip


def test_poison_entries_are_dead_lettered_and_their_batch_mates_scored(redis_url, redis_client, redis_ns, pool):
    settings = RewardSettings(workers=1, weights={"accuracy": 1.0}, batch=32, worker_id="reward-test",
                              redis=RedisConfig(url=redis_url, namespace=redis_ns.namespace))  # fmt: skip
    worker = RewardWorker(pool, settings)
    worker.queue.ensure_groups()
    producer = {codec: Queue(redis_client, redis_ns, codec=codec) for codec in ("json", "msgpack")}
    good = {f"good-{i}": (rf"so \boxed{{{i}}}", str(i if i % 2 else i + 1)) for i in range(6)}  # odd i correct
    for n, (task_id, (text, ref)) in enumerate(good.items()):
        codec = "json" if n % 2 else "msgpack"
        producer[codec].publish(redis_ns.rollouts, rollout_message(task_id, text, ref), task_id)
        if n == 2:  # poison in the middle of the batch, in both codecs
            long_id = "t" * 300  # a valid TaskMessage id (<= 512), too long for ScoreItem.id (<= 256)
            producer["json"].publish(redis_ns.rollouts, rollout_message(long_id, r"\boxed{1}", "1"), long_id)
            huge_ref = rollout_message("huge-ref", r"\boxed{1}", "1" * 100_001)  # ScoreItem.reference <= 100_000
            producer["msgpack"].publish(redis_ns.rollouts, huge_ref, "huge-ref")
            body = rollout_message("bad-json", "x", "1").model_dump_json().encode().replace(b'"x"', b'"\xff\xfe"')
            redis_client.xadd(redis_ns.rollouts, {"d": body, "v": "json", "id": "bad-json"})
            data = rollout_message("bad-msgpack", "x", "1").model_dump(mode="json")
            data["rollout"]["text"] = b"\xff\xfe"  # packed as a str (no bin type) that is not UTF-8
            packed = msgpack.packb(data, use_bin_type=False)
            redis_client.xadd(redis_ns.rollouts, {"d": packed, "v": "msgpack", "id": "bad-msgpack"})

    assert worker.tick() == len(good) + 2  # one read: the undecodable two never reach the worker

    trainer = Queue(redis_client, redis_ns)
    scored = trainer.consume(redis_ns.scored, redis_ns.trainer_group, "trainer", ScoredMessage, count=100, block_ms=0)
    got = {d.message.task.task_id: d.message.score for d in scored}
    assert sorted(got) == sorted(good)
    for task_id, res in got.items():
        i = int(task_id.split("-")[1])
        assert (res.id, res.status, res.total) == (task_id, "ok", 1.0 if i % 2 else 0.0)

    dead = {d["message_id"]: d for d in trainer.dead_letters()}
    assert sorted(dead) == sorted(["t" * 300, "huge-ref", "bad-json", "bad-msgpack"])
    assert all(d["stream"] == redis_ns.rollouts and d["group"] == redis_ns.reward_group for d in dead.values())
    assert dead["t" * 300]["reason"].startswith("cannot be scored: id: String should have at most 256 characters")
    assert dead["huge-ref"]["reason"].startswith(
        "cannot be scored: reference: String should have at most 100000 characters"
    )
    assert dead["bad-json"]["reason"].startswith("undecodable as RolloutMessage")
    assert dead["bad-msgpack"]["reason"].startswith("undecodable as RolloutMessage")
    assert RolloutMessage.model_validate_json(dead["t" * 300]["payload"]).task.task_id == "t" * 300  # kept whole
    assert redis_client.xpending(redis_ns.rollouts, redis_ns.reward_group)["pending"] == 0  # nothing left behind
    assert worker.tick() == 0
