"""The data cursor and the Redis ledger agree after any crash: a checkpoint records the groups dispatched but not yet
trained, so when the trainer dies and Redis restarts without persistence (ledger, queues and cursor gone), the
resumed run dispatches those groups again (`groups_redispatched`) and every prompt the cursor passed is trained
exactly once."""

import json
import signal

import pytest
from conftest_redis import delete_namespace
from test_async_driver import DECOUPLED, AsyncStack
from test_collect import _answer, _collector, _tasks
from test_services_e2e import _assert_exactly_once, _config, _trained, _wait

from shared.queues.redis_server import EmbeddedRedis

pytestmark = pytest.mark.redis


def test_groups_lost_with_the_ledger_are_dispatched_again(redis_client, redis_ns, tmp_path):
    c = _collector(redis_client, redis_ns, tmp_path, k=2)
    c.start(0, 0, None)
    c.admit(0, 0)  # 6 groups, cursors 0..5, due at step 2
    _answer(c, 0)
    c.poll(0, 0, block_ms=0)
    batch = c.batch()
    record = c.resume_record(batch)  # the checkpoint of step 0: trains cursors 0 and 1
    delete_namespace(redis_client, redis_ns)  # trainer killed, Redis restarted empty
    again = _collector(redis_client, redis_ns, tmp_path, k=2)
    again.start(1, c.cursor, record)
    assert sorted(g.cursor for g in again.open_groups()) == [2, 3, 4, 5]  # not skipped by the cursor
    assert again.counts["redispatched"] == 4
    ledger = redis_client.hgetall(redis_ns.run_groups("run"))
    assert sorted(json.loads(v)["cursor"] for v in ledger.values()) == [2, 3, 4, 5]  # in the ledger again
    tasks = _tasks(again.queue)
    assert sorted({(t.train_by, t.prompt_index) for t in tasks}) == [(2, i) for i in range(2, 6)]
    assert again.admit(1, 1) == 2 and again.cursor == 8  # the window is refilled after them


def _latest_state(ckpt_root) -> dict:
    done = sorted(p for p in ckpt_root.glob("step-*") if (p / "trainer_state.json").is_file())
    return json.loads((done[-1] / "trainer_state.json").read_text())


def test_trainer_crash_and_a_redis_restart_without_persistence_lose_no_prompt(tmp_path, tiny_dir):
    k, per_step, steps = 2, 2, 5
    server = EmbeddedRedis(tmp_path / "redis", appendonly=False)
    server.start()
    cfg = _config(tmp_path, tiny_dir, "resume-ledger", steps=steps, max_staleness=k, loss=DECOUPLED)
    stack = AsyncStack(cfg, server.url, rollout_workers=1, reward_workers=1)
    ckpt = cfg.output_dir / "checkpoints"
    try:
        stack.start()
        marker = ckpt / "step-00000001" / "trainer_state.json"
        _wait(lambda: marker.exists() or stack.trainer.proc.poll() is not None, 240, "step 1")
        stack.trainer.proc.send_signal(signal.SIGKILL)
        stack.trainer.proc.wait(30)
        state = _latest_state(ckpt)
        assert state["step"] + k <= steps, "the trainer got too far before the kill"
        server.restart()  # no AOF: the ledger, the queues and the cursor are gone
        stack.trainer.cmd = [*stack.trainer.cmd, "--resume"]
        stack.trainer.start(stack.env)
        assert stack.wait_trainer(400) == 0, stack.logs()
    finally:
        stack.stop()
        server.stop()
    _assert_exactly_once(cfg.output_dir, steps, per_step)
    trained = {r["prompt_index"] for r in _trained(cfg.output_dir)}  # prompt index = cursor (50 prompts)
    missing = set(range(state["data_cursor"])) - trained
    assert not missing, f"dispatched before the crash and never trained: {sorted(missing)}"
    rows = [json.loads(x) for x in (cfg.output_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = next(r for r in rows if r["step"] == state["step"] + 1)
    assert resumed["groups_redispatched"] > 0
    assert sum(r.get("groups_expired", 0) for r in rows) == 0
