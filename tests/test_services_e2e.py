"""The real stack: separate processes for rollout, reward and trainer over HTTP and a real Redis; faults are real
(SIGKILL of a worker or the trainer, a Redis restart). Every group must be trained exactly once."""

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import redis
from procs import run_gtpo_up

from services.stack import plan
from services.trainer.config import RLConfig
from services.trainer.orchestrator.weights_server import build_manifest
from shared.config.loader import dump_config
from shared.contracts.wire import WeightsVersion
from shared.process import free_port
from shared.queues.keys import Keys

pytestmark = pytest.mark.redis


def _config(tmp: Path, tiny_dir: Path, ns: str, **over) -> RLConfig:
    data = tmp / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"{a}+{a}=?", "ground_truth_answer": str(2 * a)}) + "\n" for a in range(50))
    )
    base = {
        "model": str(tiny_dir), "output_dir": str(tmp / "run"), "data": str(data), "steps": 3,
        "prompts_per_step": 2, "dynamic_sampling": False, "micro_batch_size": 4,
        "rollout": {"group_size": 4, "max_new_tokens": 12}, "reward_weights": {"accuracy": 1.0, "cosine": 0.5},
        "redis": {"namespace": ns, "claim_idle_ms": 1500}, "step_timeout_s": 120, "keep_last": 2,
    }  # fmt: skip
    for k, v in over.items():
        if isinstance(v, dict):
            base[k] = {**base.get(k, {}), **v}
        else:
            base[k] = v
    return RLConfig.model_validate(base)


class Stack:
    """The processes `gtpo up` would start, under the test's control."""

    def __init__(self, cfg: RLConfig, url: str, rollout_workers: int = 1):
        self.cfg, self.run = cfg, cfg.output_dir
        self.run.mkdir(parents=True, exist_ok=True)
        self.workers, self.trainer, trainer_cfg, cfg_path = plan(cfg, self.run, rollout_workers, 1, resume=False)
        cfg_path.write_text(dump_config(trainer_cfg))
        self.cfg_path = cfg_path
        self.env = {**os.environ, "REDIS_URL": url, "GTPO_API_TOKEN": "t", "GTPO_ROLLOUT_API_TOKEN": "t",
                    "OMP_NUM_THREADS": "1"}  # fmt: skip

    def start(self) -> None:
        for p in self.workers:
            p.start(self.env)
        self.trainer.start(self.env)

    def worker(self, name: str):
        return next(p for p in self.workers if p.name == name)

    def wait_trainer(self, timeout: float = 240) -> int:
        assert self.trainer.proc is not None
        return self.trainer.proc.wait(timeout)

    def stop(self) -> None:
        self.trainer.stop(5)
        for p in self.workers:
            p.stop(5)

    def logs(self) -> str:
        return "\n".join(
            f"== {p.log.name}\n{p.log.read_text()[-3000:]}" for p in [*self.workers, self.trainer] if p.log.exists()
        )


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _trained(run: Path) -> list[dict]:
    path = run / "trained_groups.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _assert_exactly_once(run: Path, steps: int, per_step: int) -> None:
    rows = _trained(run)
    by_step: dict[int, list[int]] = {}
    for r in rows:
        by_step.setdefault(r["step"], []).append(r["prompt_index"])
    assert sorted(by_step) == list(range(steps)), by_step
    assert all(len(v) == per_step for v in by_step.values()), by_step
    task_ids = [t for r in rows for t in r["task_ids"]]
    assert len(task_ids) == len(set(task_ids)), "a sample was trained twice"
    prompts = [(r["step"], r["prompt_index"]) for r in rows]
    assert len(prompts) == len(set(prompts)), "a group was trained twice"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted({int(m["step"]) for m in metrics}) == list(range(1, steps + 1))


def test_two_step_run_through_gtpo_up(tmp_path, tiny_dir, redis_url):
    ns = f"e2e-up-{os.getpid()}-{time.time_ns()}"
    cfg = _config(tmp_path, tiny_dir, ns, steps=2, health_port=0)
    run_gtpo_up(cfg, redis_url)
    run = cfg.output_dir
    _assert_exactly_once(run, 2, 2)
    rollout_log = (run / "logs" / "rollout-0.log").read_text()
    assert '"POST /v1/weights HTTP/1.1" 200' in rollout_log  # new weights pushed over HTTP
    assert "loaded v2" in rollout_log  # and announced through the Redis registry
    r = redis.Redis.from_url(redis_url)
    keys = Keys(ns)
    assert r.xinfo_groups(keys.scored)[0]["pending"] == 0  # everything consumed was acknowledged
    for k in r.scan_iter(match=keys.pattern, count=1000):
        r.delete(k)


def test_two_step_run_with_weights_over_http(tmp_path, tiny_dir, redis_url):
    """weights.transport=http through `gtpo up`: the trainer serves each version from its health port behind the
    run's token, the worker fetches it into its cache and generates the next step's tasks with it."""
    ns = f"e2e-http-{os.getpid()}-{time.time_ns()}"
    port = free_port()
    cfg = _config(tmp_path, tiny_dir, ns, steps=2, health_port=port, weights={"transport": "http"})
    run_gtpo_up(cfg, redis_url)
    run = cfg.output_dir
    _assert_exactly_once(run, 2, 2)
    # a step's tasks need its version: step 1's samples were generated by v1, which only HTTP could deliver
    assert all(min(r["versions"]) >= r["step"] for r in _trained(run)), _trained(run)
    rollout_log = (run / "logs" / "rollout-0.log").read_text()
    assert "POST /v1/weights" not in rollout_log  # no push naming a path on the trainer's disk
    url = f"http://127.0.0.1:{port}/v1/weights"
    assert f"fetched weights v1 from {url}/1 in" in rollout_log, rollout_log[-3000:]
    cache = run.resolve() / "weights-cache" / "rollout-0"  # the run's own, not one other runs share
    assert re.search(rf"loaded v1 of run \S+ from {re.escape(str(cache))}/v1-[0-9a-f]{{16}} ", rollout_log)
    # the trainer served the last version until the worker had it (weights.final_wait_s): the run ends on v2
    assert f"fetched weights v2 from {url}/2 in" in rollout_log, rollout_log[-3000:]
    kept = sorted(p.name[:3] for p in cache.glob("v*"))
    assert "v0-" not in kept and "v2-" in kept, list(cache.iterdir())  # v1's removal may race the stack's stop
    r = redis.Redis.from_url(redis_url)
    keys = Keys(ns)
    current = WeightsVersion.model_validate_json(r.get(keys.weights_current))
    assert (current.version, current.url) == (2, f"{url}/2")
    assert current.digest == build_manifest(Path(current.path), 2, current.run).digest()  # what was served
    assert r.xinfo_groups(keys.scored)[0]["pending"] == 0
    for k in r.scan_iter(match=keys.pattern, count=1000):
        r.delete(k)


def test_sigkill_rollout_worker_holding_tasks(tmp_path, tiny_dir, embedded_redis):
    cfg = _config(tmp_path, tiny_dir, "kill-rollout", rollout={"max_new_tokens": 40})
    stack = Stack(cfg, embedded_redis.url, rollout_workers=2)
    r = redis.Redis.from_url(embedded_redis.url)
    keys = Keys("kill-rollout")
    try:
        stack.start()

        def holds_tasks() -> bool:
            try:
                return any(
                    c["name"] == b"rollout-0" and c["pending"] > 0
                    for c in r.xinfo_consumers(keys.tasks, keys.rollout_group)
                )
            except redis.ResponseError:
                return False

        _wait(holds_tasks, 120, "rollout-0 to hold tasks")
        held = [e["message_id"] for e in r.xpending_range(keys.tasks, keys.rollout_group, "-", "+", 100, "rollout-0")]
        stack.worker("rollout-0").proc.send_signal(signal.SIGKILL)
        assert stack.wait_trainer() == 0, stack.logs()
    finally:
        stack.stop()
    _assert_exactly_once(cfg.output_dir, 3, 2)
    # the tasks the dead worker held were completed (handed off) by the other one: nothing is pending any more
    assert held and r.xpending(keys.tasks, keys.rollout_group)["pending"] == 0
    handed = [json.loads(e[1][b"d"]) if e[1].get(b"v") == b"json" else None for e in r.xrange(keys.rollouts)]
    assert handed  # the rollouts stream holds the hand-offs


def test_sigkill_trainer_then_resume(tmp_path, tiny_dir, embedded_redis):
    cfg = _config(tmp_path, tiny_dir, "kill-trainer", steps=4)
    stack = Stack(cfg, embedded_redis.url)
    try:
        stack.start()
        marker = cfg.output_dir / "checkpoints" / "step-00000002" / "trainer_state.json"
        _wait(lambda: marker.exists() or stack.trainer.proc.poll() is not None, 180, "step 2")
        stack.trainer.proc.send_signal(signal.SIGKILL)
        stack.trainer.proc.wait(30)
        assert not (cfg.output_dir / "checkpoints" / "step-00000004").exists(), "the trainer finished before the kill"
        stack.trainer.cmd = [*stack.trainer.cmd, "--resume"]
        stack.trainer.start(stack.env)
        assert stack.wait_trainer() == 0, stack.logs()
    finally:
        stack.stop()
    _assert_exactly_once(cfg.output_dir, 4, 2)
    assert "resumed from" in stack.trainer.log.read_text()


def test_redis_restart_mid_run(tmp_path, tiny_dir, embedded_redis):
    cfg = _config(tmp_path, tiny_dir, "restart-redis", steps=3)
    stack = Stack(cfg, embedded_redis.url)
    try:
        stack.start()
        marker = cfg.output_dir / "checkpoints" / "step-00000001" / "trainer_state.json"
        _wait(lambda: marker.exists() or stack.trainer.proc.poll() is not None, 180, "step 1")
        embedded_redis.restart()
        assert stack.wait_trainer() == 0, stack.logs()
        assert all(p.alive() for p in stack.workers), "a worker died instead of reconnecting"
    finally:
        stack.stop()
    _assert_exactly_once(cfg.output_dir, 3, 2)


def test_a_group_decodes_at_spread_thresholds(tmp_path, tiny_dir, tiny, redis_client, redis_ns):
    from services.trainer.orchestrator.collect import Collector
    from services.trainer.orchestrator.driver import load_prompts
    from shared.queues.queue import Queue

    def collector(**over) -> Collector:
        cfg = _config(tmp_path, tiny_dir, redis_ns.namespace, **over)
        return Collector(cfg, Queue(redis_client, redis_ns), load_prompts(cfg.data), tiny.tokenizer, 512,
                         identity="run.test")  # fmt: skip

    spread = collector(rollout={"threshold_spread": 0.3})
    got = [spread.task(0, 0, j, 0, 0).params.confidence_threshold for j in range(4)]
    assert got == pytest.approx([0.9, 0.8, 0.7, 0.6])  # sample 0 decodes as evaluation does
    flat = collector()
    assert {flat.task(0, 0, j, 0, 0).params.confidence_threshold for j in range(4)} == {0.9}
