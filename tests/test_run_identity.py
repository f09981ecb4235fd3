"""Probes of issue 32, items 1 and 2, with real worker processes and a real Redis: what a step may train is checked
sample by sample, not only at start-up.

1. A rollout worker left running from an earlier run (Redis restarted empty since) served that run's v4; the new
   run's v0 replaces it at once (a version number names weights of one run only), and a sample another run's
   weights generated is dead-lettered and counted (`samples_foreign`), never trained, even at the same number.
2. A reward worker started with other reward weights scores the stream: each of its samples is dead-lettered and
   counted (`samples_reward_mismatch`), never trained, and the agreement check names both weightings.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from conftest_redis import delete_namespace

from services.stack import plan
from services.trainer.config import RLConfig
from services.trainer.orchestrator.collect import Collector
from services.trainer.orchestrator.driver import load_prompts, new_identity
from services.trainer.orchestrator.publish import publish
from shared.contracts.agreement import AgreementError, check_agreement, registered_infos
from shared.contracts.wire import Rollout, RolloutMessage, ScoredMessage, ScoreResult, WeightsVersion
from shared.queues.queue import Queue, WeightRegistry

pytestmark = pytest.mark.redis


def _config(tmp_path, tiny_dir, ns: str, **over) -> RLConfig:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+{a}=?", "ground_truth_answer": str(2 * a)}) + "\n"
                            for a in range(8)))  # fmt: skip
    shutil.copytree(tiny_dir, tmp_path / "start", dirs_exist_ok=True)
    return RLConfig.model_validate({
        "model": str(tmp_path / "start"), "output_dir": str(tmp_path / "run"), "data": str(data),
        "prompts_per_step": 1, "oversample": 1.0, "dynamic_sampling": False, "reward_weights": {"accuracy": 1.0},
        "rollout": {"group_size": 2, "max_new_tokens": 8}, "redis": {"namespace": ns, "claim_idle_ms": 1500}, **over,
    })  # fmt: skip


def _start(cfg: RLConfig, redis_url: str, name: str):
    """One worker process of `gtpo up`'s plan for `cfg` (``rollout-0`` or ``reward-0``), started."""
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    workers = plan(cfg, cfg.output_dir, 1, 1, resume=False)[0]
    proc = next(p for p in workers if p.name == name)
    proc.start({**os.environ, "REDIS_URL": redis_url, "OMP_NUM_THREADS": "1"})
    return proc


def _until(pred, proc, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert proc.alive(), f"{proc.name} exited while waiting for {what}:\n{proc.log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{proc.log.read_text()[-3000:]}"
        time.sleep(0.1)


def _collector(cfg, redis_client, keys, tiny) -> Collector:
    queue = Queue(redis_client, keys, codec=cfg.redis.codec)
    vocab = int(tiny.model.config.vocab_size)
    return Collector(cfg, queue, load_prompts(cfg.data), tiny.tokenizer, vocab, identity=new_identity(cfg.run_id))


def test_a_worker_left_from_an_earlier_run_never_feeds_the_new_run(tmp_path, tiny_dir, tiny, redis_url, redis_client,
                                                                   redis_ns):  # fmt: skip
    cfg = _config(tmp_path, tiny_dir, redis_ns.namespace)
    shutil.copytree(tiny_dir, tmp_path / "old" / "v4")
    registry = WeightRegistry(redis_client, redis_ns)
    old = WeightsVersion(version=4, path=str(tmp_path / "old" / "v4"), step=4, run="run.0ld0ld0ld0ld")
    registry.publish(old)  # the earlier run, at v4
    worker = _start(cfg, redis_url, "rollout-0")
    try:
        live = lambda: registry.live_workers("rollout").get("rollout-0")  # noqa: E731
        _until(lambda: getattr(live(), "version", None) == 4, worker, 120, "the worker to serve the earlier run's v4")

        delete_namespace(redis_client, redis_ns)  # Redis restarted empty; the worker lives on, serving v4
        c = _collector(cfg, redis_client, redis_ns, tiny)
        c.start(0, 0, None)
        v0 = WeightsVersion(version=0, path=str(cfg.model.resolve()), step=0, run=c.identity)
        publish(registry, v0, [], None)  # what the new trainer's start publishes (Driver._publish_current)
        c.admit(0, 0)

        # the test plays the reward stage: every rollout handed off, scored as the trainer wants it
        def score_rollouts() -> None:
            for d in c.queue.consume(redis_ns.rollouts, redis_ns.reward_group, "probe", RolloutMessage, block_ms=0):
                m = d.message
                res = ScoreResult(id=m.task.task_id, total=float(m.task.sample_index), components={}, status="ok")
                scored = ScoredMessage(task=m.task, rollout=m.rollout, score=res, reward_weights=cfg.reward_weights)
                c.queue.hand_off(redis_ns.rollouts, redis_ns.reward_group, d.entry_id, redis_ns.scored, scored,
                                 m.task.task_id)  # fmt: skip
            c.poll(0, 0, block_ms=0)

        _until(lambda: score_rollouts() or c.batch(), worker, 120, "the new run's group")
        (group,) = c.batch()
        identities = {(m.rollout.policy_run, m.rollout.policy_version) for m in group.samples.values()}
        assert identities == {(c.identity, 0)}  # generated with the new run's v0, not the earlier run's v4
        assert c.counts["foreign"] == 0
    finally:
        worker.stop(5)

    # a sample of the earlier run's v4 still on its way (an old worker's hand-off) reaches the new run at its v4
    c.finish_step([group], 1)
    c.admit(1, 4)
    task = c.task(1, c.open_groups()[0].prompt_index, 0, 0, 4)
    rollout = Rollout(prompt_ids=task.prompt_ids, token_ids=[5, 6], step_map=[1, 2], finish_reason="length",
                      policy_version=4, policy_run=old.run, params=task.params.model_copy(update={"block_size": 4}),
                      seed=0, logprobs=[-0.5, -0.5])  # fmt: skip
    res = ScoreResult(id=task.task_id, total=1.0, components={}, status="ok")
    msg = ScoredMessage(task=task, rollout=rollout, score=res, reward_weights=cfg.reward_weights)
    c.queue.publish(redis_ns.scored, msg, "old-run-hand-off")
    c.poll(1, 4, block_ms=0)
    assert c.counts["foreign"] == 1 and c.batch() == [] and not any(g.samples for g in c.open_groups())
    (dead,) = c.queue.dead_letters()
    assert f"of run {old.run}, not of this run ({c.identity})" in dead["reason"]


def test_a_reward_worker_with_other_weights_is_refused_sample_by_sample(tmp_path, tiny_dir, tiny, redis_url,
                                                                        redis_client, redis_ns):  # fmt: skip
    cfg = _config(tmp_path, tiny_dir, redis_ns.namespace)
    other = cfg.model_copy(update={"reward_weights": {"format": 1.0}})  # format only: joins mid-run
    scorer = _start(other, redis_url, "reward-0")
    try:
        c = _collector(cfg, redis_client, redis_ns, tiny)
        c.start(0, 0, None)
        c.admit(0, 0)
        # the test plays the rollout stage: each task generated by this run's v0
        for d in c.queue.consume(redis_ns.tasks, redis_ns.rollout_group, "probe", type(c.task(0, 0, 0, 0, 0)),
                                 block_ms=0):  # fmt: skip
            t = d.message
            rollout = Rollout(prompt_ids=t.prompt_ids, token_ids=[5, 6], step_map=[1, 2], finish_reason="length",
                              text=f"The answer is \\boxed{{{t.reference}}}.", policy_version=0, policy_run=c.identity,
                              params=t.params.model_copy(update={"block_size": 4}), seed=0, logprobs=[-0.5, -0.5])  # fmt: skip
            c.queue.hand_off(redis_ns.tasks, redis_ns.rollout_group, d.entry_id, redis_ns.rollouts,
                             RolloutMessage(task=t, rollout=rollout, worker="probe"), t.task_id)  # fmt: skip
        # poll until both scores are routed: the worker may hand them over one at a time
        _until(lambda: c.poll(0, 0, block_ms=0) >= 0 and c.counts["reward_mismatch"] >= 2, scorer, 120,
               "the reward worker's scores")  # fmt: skip
        assert c.counts["reward_mismatch"] == 2 and c.batch() == [] and not any(g.samples for g in c.open_groups())
        reasons = {d["reason"] for d in c.queue.dead_letters()}
        assert reasons == {"scored with reward weights {'format': 1.0}, not the trainer's {'accuracy': 1.0}"}

        # and the start-up check, had the worker been there at the start, names both weightings
        infos = registered_infos(WeightRegistry(redis_client, redis_ns).live_workers())
        with pytest.raises(AgreementError, match=r"reward_weights: trainer \{'accuracy': 1.0\}, reward reward-0"):
            check_agreement(cfg.trainer_side(None), infos)
    finally:
        scorer.stop(5)


def test_the_registry_moves_forward_within_a_run_and_another_run_takes_over(redis_client, redis_ns):
    reg = WeightRegistry(redis_client, redis_ns)
    reg.publish(WeightsVersion(version=4, path="a/v4", run="a.1"))
    with pytest.raises(ValueError, match="not newer"):
        reg.publish(WeightsVersion(version=3, path="a/v3", run="a.1"))
    new = WeightsVersion(version=0, path="b/v0", run="b.2")
    reg.publish(new)  # a new run: its numbers start again, the old run's versions are forgotten
    assert reg.current() == new and reg.versions() == [new]


def test_the_served_weights_move_to_another_runs_lower_version():
    from pathlib import Path

    from services.rollout.weights import Served, WeightsError, check_move

    served = Served(4, "/c/old-v4", "a.1")
    assert check_move(served, 0, Path("/c/start"), rollback=False, run="b.2")
    with pytest.raises(WeightsError, match="older than the served 4"):
        check_move(served, 0, Path("/c/start"), rollback=False, run="a.1")
