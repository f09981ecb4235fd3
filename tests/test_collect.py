"""The collector of the round driver against a real Redis: admission under the staleness bound, the buffer of scored
groups, deadline order, acknowledgement after the checkpoint, rebuilding the buffer on resume, stale and poison
samples. The test plays the rollout and reward workers: it reads the tasks the collector published and answers
with scored messages."""

import json

import pytest

from services.trainer.config import RLConfig
from services.trainer.orchestrator.collect import MAX_ATTEMPTS, Collector, Prompt, parse_task_id
from shared.config.settings import default_reward_weights
from shared.contracts.wire import Rollout, ScoredMessage, ScoreResult, TaskMessage
from shared.queues.queue import Queue

pytestmark = pytest.mark.redis

VOCAB = 512
IDENTITY = "run.0123456789ab"


class Tok:
    """Prompts as their bytes (the collector only needs ids; the tests never decode)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode())[:8] or [1]}


def _collector(redis_client, keys, tmp_path, k=0, **over) -> Collector:
    cfg = RLConfig.model_validate({
        "model": str(tmp_path), "output_dir": str(tmp_path / "run"), "data": str(tmp_path / "d.jsonl"),
        "prompts_per_step": 2, "oversample": 1.0, "max_staleness": k, "chat_template": False,
        "loss": {"objective": "decoupled" if k else "standard"},
        "rollout": {"group_size": 2, "max_new_tokens": 8}, "redis": {"namespace": keys.namespace}, **over,
    })  # fmt: skip
    prompts = [Prompt(f"q{i}", str(i)) for i in range(50)]
    return Collector(cfg, Queue(redis_client, keys, codec="json"), prompts, Tok(), VOCAB, identity=IDENTITY)


def _tasks(queue: Queue) -> list[TaskMessage]:
    """Everything on the tasks stream, in order (read as a rollout worker would, then acked)."""
    out = []
    for d in queue.consume(queue.keys.tasks, queue.keys.rollout_group, "w", TaskMessage, count=1000, block_ms=0):
        out.append(d.message)
        queue.ack(queue.keys.tasks, queue.keys.rollout_group, d.entry_id)
    return out


def _score(queue: Queue, task: TaskMessage, reward: float, version: int, token_ids=(5, 6), again: bool = False) -> None:
    """A scored message for `task`, as the reward worker hands it on."""
    rollout = Rollout(
        prompt_ids=task.prompt_ids, token_ids=list(token_ids), step_map=list(range(1, len(token_ids) + 1)),
        finish_reason="length", policy_version=version, policy_run=task.policy_run,
        params=task.params.model_copy(update={"block_size": 4}),
        seed=task.params.seed or 0, logprobs=[-0.5] * len(token_ids),
    )  # fmt: skip
    score = ScoreResult(id=task.task_id, total=reward, components={"accuracy": reward}, status="ok")
    msg_id = task.task_id + (":again" if again else "")  # a second hand-off needs another idempotency id
    msg = ScoredMessage(task=task, rollout=rollout, score=score, reward_weights=default_reward_weights())
    queue.publish(queue.keys.scored, msg, msg_id)


def _answer(c: Collector, version: int, rewards=lambda t: float(t.sample_index)) -> list[TaskMessage]:
    tasks = _tasks(c.queue)
    for t in tasks:
        _score(c.queue, t, rewards(t), version)
    return tasks


def _pending(c: Collector) -> int:
    return c.redis.xpending(c.keys.scored, c.keys.trainer_group)["pending"]


def test_k0_admits_one_step_and_k2_three_steps_ahead(redis_client, redis_ns, tmp_path):
    sync = _collector(redis_client, redis_ns, tmp_path, k=0)
    sync.start(0, 0, None)
    assert sync.admit(step=0, version=0) == 2
    tasks = _tasks(sync.queue)
    assert [t.task_id for t in tasks] == ["run:0:0:0", "run:0:0:1", "run:0:1:0", "run:0:1:1"]
    assert sync.admit(step=0, version=0) == 0  # the window is full: nothing more until something is trained


def test_k2_fills_the_window_with_groups_due_k_steps_later(redis_client, redis_ns, tmp_path):
    c = _collector(redis_client, redis_ns, tmp_path, k=2)
    c.start(0, 0, None)
    assert c.admit(step=0, version=0) == 6  # (k + 1) x prompts_per_step
    tasks = _tasks(c.queue)
    assert {t.train_by for t in tasks} == {2} and {t.policy_version for t in tasks} == {0}
    ledger = redis_client.hgetall(redis_ns.run_groups("run"))
    assert sorted(json.loads(v)["cursor"] for v in ledger.values()) == list(range(6))
    assert int(redis_client.get(redis_ns.run_cursor("run"))) == 6


def test_a_step_takes_the_earliest_deadline_first_and_acks_after_the_checkpoint(redis_client, redis_ns, tmp_path):
    c = _collector(redis_client, redis_ns, tmp_path, k=1)
    c.start(0, 0, None)
    c.admit(0, 0)  # 4 groups due at step 1
    first = _answer(c, version=0)
    c.poll(0, 0, block_ms=0)
    assert len(c.kept_groups()) == 4 and c.in_flight() == 0
    batch = c.batch()
    assert [g.cursor for g in batch] == [0, 1]  # same deadline: completion order
    c.finish_step(batch, next_step=1)
    assert _pending(c) == 4  # the two buffered groups stay pending in Redis until a step trains them
    assert len(redis_client.hgetall(redis_ns.run_groups("run"))) == 2
    assert c.admit(1, 1) == 2  # refill the window: due at step 2
    newer = _tasks(c.queue)
    assert {t.train_by for t in newer} == {2} and {t.policy_version for t in newer} == {1}
    for t in reversed(newer):  # the newer groups complete first...
        _score(c.queue, t, float(t.sample_index), 1)
    c.poll(1, 1, block_ms=0)
    assert [g.train_by for g in c.batch()] == [1, 1]  # ...but the groups due now are trained first
    assert {t.task_id for t in first} >= {m.task.task_id for g in c.batch() for m in g.samples.values()}


def test_a_restarted_collector_rebuilds_the_same_buffer_and_enqueues_nothing_twice(redis_client, redis_ns, tmp_path):
    c = _collector(redis_client, redis_ns, tmp_path, k=1)
    c.start(0, 0, None)
    c.admit(0, 0)
    _answer(c, 0)
    c.poll(0, 0, block_ms=0)
    batch = c.batch()
    record = c.resume_record(batch)  # what the checkpoint of step 0 holds
    # killed after the checkpoint of step 0, before its acknowledgement
    again = _collector(redis_client, redis_ns, tmp_path, k=1)
    tasks_before = redis_client.xlen(redis_ns.tasks)
    again.start(1, c.cursor, record)
    assert redis_client.xlen(redis_ns.tasks) == tasks_before  # every task republished is a duplicate: a no-op
    assert sorted(g.cursor for g in again.kept_groups()) == [2, 3]  # the trained groups are not back
    assert _pending(again) == 4  # the trained groups' entries were acknowledged on the way
    assert again.admit(1, 1) == 2 and again.cursor == 6


def test_a_group_past_its_deadline_is_given_up_and_acknowledged(redis_client, redis_ns, tmp_path):
    c = _collector(redis_client, redis_ns, tmp_path, k=0, oversample=2.0)
    c.start(0, 0, None)
    c.admit(0, 0)
    tasks = _answer(c, 0)
    c.poll(0, 0, block_ms=0)
    c.finish_step(c.batch()[:1], next_step=1)  # step 0 trained one group; the other was kept but never trained
    assert c.counts["expired"] == 1 and not c.groups
    assert _pending(c) == 0 and not redis_client.hgetall(redis_ns.run_groups("run"))
    _score(
        c.queue, tasks[0], 0.0, 0, again=True
    )  # a late duplicate of an old step's sample is acknowledged and ignored
    c.poll(1, 1, block_ms=0)
    assert c.counts["late"] == 1 and _pending(c) == 0


def test_a_stale_sample_is_sampled_again_never_trained(redis_client, redis_ns, tmp_path):
    c = _collector(redis_client, redis_ns, tmp_path, k=1)
    c.start(2, 0, None)
    c.admit(2, 2)
    tasks = _tasks(c.queue)
    _score(c.queue, tasks[0], 1.0, version=0)  # generated 2 versions before the trainer's: beyond k = 1
    c.poll(2, 2, block_ms=0)
    assert c.counts["stale"] == 1
    retry = _tasks(c.queue)
    assert [t.task_id for t in retry] == [tasks[0].task_id + ":a1"] and retry[0].attempt == 1
    assert _pending(c) == 0


def test_poison_is_dead_lettered_alone_and_its_sample_drawn_again(redis_client, redis_ns, tmp_path):
    c = _collector(redis_client, redis_ns, tmp_path, k=0)
    c.start(0, 0, None)
    c.admit(0, 0)
    tasks = _tasks(c.queue)
    _score(c.queue, tasks[0], 1.0, 0, token_ids=(5, VOCAB + 3))  # a token id outside the vocabulary
    for t in tasks[1:]:
        _score(c.queue, t, float(t.sample_index), 0)
    c.poll(0, 0, block_ms=0)
    dead = c.queue.dead_letters()
    assert (
        len(dead) == 1 and "outside the vocabulary" in dead[0]["reason"] and dead[0]["message_id"] == tasks[0].task_id
    )
    assert len(c.kept_groups()) == 1  # its batch-mates went on
    c.poll(0, 0, block_ms=0)  # the dead-letter watch draws the sample again under a new attempt
    assert [t.task_id for t in _tasks(c.queue)] == [tasks[0].task_id + ":a1"]


def test_a_sample_dead_lettered_upstream_every_time_drops_its_group(redis_client, redis_ns, tmp_path):
    c = _collector(redis_client, redis_ns, tmp_path, k=0)
    c.start(0, 0, None)
    c.admit(0, 0)
    q = c.queue
    for _ in range(MAX_ATTEMPTS):  # a rollout worker rejects the same poison prompt's task at every attempt
        for d in q.consume(q.keys.tasks, q.keys.rollout_group, "w", TaskMessage, count=100, block_ms=0):
            if d.message.prompt_index == 0 and d.message.sample_index == 0:
                q.reject(d, q.keys.rollout_group, "prompt longer than max_prompt_tokens")
        c.poll(0, 0, block_ms=0)
    assert c.counts["dead_lettered"] == 1 and "0:0" not in c.groups
    assert c.admit(0, 0) == 0  # the step's budget (oversample 1) is spent: the driver trains on what there is


def test_task_ids_parse_back():
    assert parse_task_id("run.x-1:12:7:3") == ("run.x-1", 12, 7, 3, 0)
    assert parse_task_id("a:1:2:3:b4") is None and parse_task_id("a:1:x:3") is None


def test_a_redis_error_while_routing_leaves_the_rest_for_the_retried_poll(
    redis_client, redis_ns, tmp_path, monkeypatch
):
    """Redis goes away between reading a batch and acknowledging its stale samples: the retried poll routes the rest
    (the trainer never reclaims its own pending entries, so a dropped batch would wait for a restart)."""
    import redis

    c = _collector(redis_client, redis_ns, tmp_path)
    c.start(0, 0, None)
    c.admit(0, 0)
    _answer(c, version=0)  # the trainer is at version 1 with k = 0: every sample is stale, re-sampled and acked
    real_ack, calls = c.queue.ack, []

    def flaky(*args):
        calls.append(args)
        if len(calls) == 2:
            raise redis.ConnectionError("restarting")
        return real_ack(*args)

    monkeypatch.setattr(c.queue, "ack", flaky)
    with pytest.raises(redis.ConnectionError):
        c.poll(0, 1, block_ms=0)
    c.poll(0, 1, block_ms=0)
    assert _pending(c) == 0
    assert all(g.attempts == {0: 1, 1: 1} for g in c.open_groups())
