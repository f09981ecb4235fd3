"""Asynchronous GTPO through the real stack (rollout, reward and trainer processes, a real Redis): k = 0 repeats a run
recorded with the synchronous driver; with k = 2 collection runs ahead of training, the staleness bound holds for
every trained sample (read off the audit trail), and every group is trained exactly once when each stage is
SIGKILLed or Redis restarts; one trainer per namespace."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import yaml
from test_services_e2e import Stack, _assert_exactly_once, _config, _trained, _wait

from services.stack import plan
from shared.queues.keys import Keys

pytestmark = pytest.mark.redis

RECORDED = Path(__file__).parent / "data" / "sync_run_k0.json"
DECOUPLED = {"objective": "decoupled", "tis_cap": 2.0}


class AsyncStack(Stack):
    """A stack with several reward workers too."""

    def __init__(self, cfg, url: str, rollout_workers: int = 2, reward_workers: int = 2):
        super().__init__(cfg, url, rollout_workers)
        self.workers, self.trainer, trainer_cfg, _ = plan(cfg, self.run, rollout_workers, reward_workers, resume=False)
        from shared.config.loader import dump_config

        self.cfg_path.write_text(dump_config(trainer_cfg))


def _holds(r: redis.Redis, stream: str, group: str, consumer: str) -> bool:
    try:
        return any(c["name"] == consumer.encode() and c["pending"] > 0 for c in r.xinfo_consumers(stream, group))
    except redis.ResponseError:
        return False


def _assert_within_bound(run: Path, k: int) -> list[int]:
    """Every trained sample was generated at most k versions before the trainer version that trained it."""
    staleness = [row["trainer_version"] - v for row in _trained(run) for v in row["versions"]]
    assert staleness and min(staleness) >= 0 and max(staleness) <= k, staleness
    return staleness


def test_k0_repeats_the_recorded_synchronous_run(tmp_path, redis_url):
    """Same seed, same tasks, same trained groups and the same metrics as the driver before asynchronous GTPO."""
    from shared.model.tiny import init_tiny

    rec = json.loads(RECORDED.read_text())
    c = rec["config"]
    tiny = init_tiny(tmp_path / "tiny", seed=c["tiny_seed"])
    ns = f"async-k0-{os.getpid()}-{time.time_ns()}"
    cfg = _config(tmp_path, tiny, ns, steps=c["steps"], dynamic_sampling=c["dynamic_sampling"],
                  oversample=c["oversample"], rollout=c["rollout"], optim=c["optim"], step_timeout_s=900,
                  reward_weights=c["reward_weights"])  # fmt: skip
    assert cfg.max_staleness == 0
    stack = Stack(cfg, redis_url)
    try:
        stack.start()
        assert stack.wait_trainer(900) == 0, stack.logs()
    finally:
        stack.stop()
    trained = [{k: row[k] for k in ("step", "prompt_index", "task_ids")} for row in _trained(cfg.output_dir)]
    assert trained == rec["trained"]
    metrics = [json.loads(x) for x in (cfg.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == len(rec["metrics"])
    for got, want in zip(metrics, rec["metrics"], strict=True):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (got["step"], key)


def test_k2_runs_ahead_within_the_bound_and_trains_once_through_sigkills(tmp_path, tiny_dir, embedded_redis):
    """Rollout worker, reward worker and trainer SIGKILLed in turn during a k = 2 run, then the trainer resumed."""
    ns = "async-kill"
    k, per_step, steps = 2, 2, 5
    cfg = _config(tmp_path, tiny_dir, ns, steps=steps, max_staleness=k, rollout={"max_new_tokens": 24},
                  loss=DECOUPLED)  # fmt: skip
    stack = AsyncStack(cfg, embedded_redis.url)
    r = redis.Redis.from_url(embedded_redis.url)
    keys = Keys(ns)
    ckpt = cfg.output_dir / "checkpoints"
    try:
        stack.start()
        _wait(lambda: _holds(r, keys.tasks, keys.rollout_group, "rollout-0"), 120, "rollout-0 to hold tasks")
        stack.worker("rollout-0").proc.send_signal(signal.SIGKILL)
        _wait(lambda: _holds(r, keys.rollouts, keys.reward_group, "reward-0") or (ckpt / "step-00000002").exists(),
              180, "reward-0 to hold rollouts")  # fmt: skip
        stack.worker("reward-0").proc.send_signal(signal.SIGKILL)
        _wait(lambda: (ckpt / "step-00000002" / "trainer_state.json").exists() or stack.trainer.proc.poll() is not None,
              240, "step 2")  # fmt: skip
        stack.trainer.proc.send_signal(signal.SIGKILL)
        stack.trainer.proc.wait(30)
        assert not (ckpt / "step-00000005").exists(), "the trainer finished before the kill"
        # the window ran ahead: the groups of the first k + 1 steps were all enqueued before step 0 was checkpointed
        first_ckpt_ms = int((ckpt / "step-00000001" / "trainer_state.json").stat().st_mtime * 1000)
        ahead = {f[b"id"].rsplit(b":", 1)[0] for _, f in r.xrange(keys.tasks, max=str(first_ckpt_ms))}
        # the killed rollout worker's port is free now and another test's server may hold it: the resumed trainer's
        # start-up check would rightly refuse that foreign service, so it lists the rollout service that is still up
        run_yaml = yaml.safe_load(stack.cfg_path.read_text())
        run_yaml["rollout_urls"] = [stack.worker("rollout-1").url]
        stack.cfg_path.write_text(yaml.safe_dump(run_yaml))
        stack.trainer.cmd = [*stack.trainer.cmd, "--resume"]
        stack.trainer.start(stack.env)
        assert stack.wait_trainer(300) == 0, stack.logs()
    finally:
        stack.stop()
    _assert_exactly_once(cfg.output_dir, steps, per_step)
    _assert_within_bound(cfg.output_dir, k)
    assert len(ahead) >= (k + 1) * per_step, ahead
    assert "resumed from" in stack.trainer.log.read_text()


def test_k2_survives_a_redis_restart(tmp_path, tiny_dir, embedded_redis):
    cfg = _config(tmp_path, tiny_dir, "async-restart", steps=4, max_staleness=2, loss=DECOUPLED)
    stack = AsyncStack(cfg, embedded_redis.url, rollout_workers=1, reward_workers=1)
    try:
        stack.start()
        marker = cfg.output_dir / "checkpoints" / "step-00000001" / "trainer_state.json"
        _wait(lambda: marker.exists() or stack.trainer.proc.poll() is not None, 180, "step 1")
        embedded_redis.restart()
        assert stack.wait_trainer(300) == 0, stack.logs()
        assert all(p.alive() for p in stack.workers), "a worker died instead of reconnecting"
    finally:
        stack.stop()
    _assert_exactly_once(cfg.output_dir, 4, 2)
    _assert_within_bound(cfg.output_dir, 2)


def test_a_second_trainer_for_the_namespace_refuses_to_start(tmp_path, tiny_dir, redis_url):
    ns = f"async-lease-{os.getpid()}-{time.time_ns()}"
    cfg = _config(tmp_path, tiny_dir, ns, steps=200, max_staleness=1, loss=DECOUPLED)  # still running when asked
    stack = Stack(cfg, redis_url)
    try:
        stack.start()
        _wait(lambda: (cfg.output_dir / "trainer.lock").exists() and b"run_id" in (cfg.output_dir / "trainer.lock").read_bytes(),
              120, "the first trainer's lease")  # fmt: skip
        second = subprocess.run(stack.trainer.cmd, env=stack.env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        assert "another trainer" in second.stderr
        assert f"pid {stack.trainer.proc.pid}" in second.stderr  # it names the holder
        assert stack.trainer.proc.poll() is None, "the first trainer was done before the second one asked"
        _wait(lambda: (cfg.output_dir / "metrics.jsonl").exists(), 180, "the first trainer's first step")
        stack.trainer.proc.send_signal(signal.SIGTERM)  # finishes its step and checkpoints
        assert stack.wait_trainer(120) == 0, stack.logs()
    finally:
        stack.stop()
    rows = _trained(cfg.output_dir)
    ids = [t for r in rows for t in r["task_ids"]]
    assert rows and len(ids) == len(set(ids))  # the refused trainer took nothing: no sample trained twice
    r = redis.Redis.from_url(redis_url)
    assert r.get(Keys(ns).trainer_lease) is None  # released at the end
    again = subprocess.run(stack.trainer.cmd, env=stack.env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--resume" in again.stderr  # a fresh run cannot start behind the served weights
    for key in r.scan_iter(match=Keys(ns).pattern, count=1000):
        r.delete(key)


def test_a_stalled_trainer_loses_its_lease_and_stops_without_writing(tmp_path, tiny_dir, redis_url):
    """A trainer that stops renewing (SIGSTOP: a hung node) past the TTL is replaced by one resuming from a copy of
    its output folder (another pod's volume); woken up, the old one writes nothing and exits."""
    import shutil

    ns = f"async-takeover-{os.getpid()}-{time.time_ns()}"
    cfg = _config(tmp_path, tiny_dir, ns, steps=4, lease_ttl_s=2, max_staleness=1, loss=DECOUPLED)
    stack = Stack(cfg, redis_url)
    keys = Keys(ns)
    r = redis.Redis.from_url(redis_url)
    marker = cfg.output_dir / "checkpoints" / "step-00000001" / "trainer_state.json"
    try:
        stack.start()
        _wait(lambda: marker.exists() or stack.trainer.proc.poll() is not None, 180, "step 1")
        old = stack.trainer.proc
        old.send_signal(signal.SIGSTOP)
        _wait(lambda: r.get(keys.trainer_lease) is None, 30, "the stalled trainer's lease to expire")
        run2 = tmp_path / "run2"
        shutil.copytree(cfg.output_dir, run2, ignore=shutil.ignore_patterns("logs", "trainer.lock"))
        from shared.config.loader import dump_config

        (run2 / "run.yaml").write_text(dump_config(cfg.model_copy(update={"output_dir": run2})))
        log2 = (run2 / "trainer2.log").open("wb")
        new = subprocess.Popen([sys.executable, "-m", "services", "train", "--config", str(run2 / "run.yaml"),
                                "--resume"], env=stack.env, stdout=log2, stderr=subprocess.STDOUT)  # fmt: skip
        _wait(lambda: json.loads(r.get(keys.trainer_lease) or b"{}").get("pid") == new.pid, 120, "the takeover")
        before = {p.name: p.read_bytes() for p in cfg.output_dir.glob("*.jsonl")}
        old.send_signal(signal.SIGCONT)
        assert old.wait(120) != 0  # it found its lease gone and stopped
        assert {p.name: p.read_bytes() for p in cfg.output_dir.glob("*.jsonl")} == before  # and wrote nothing
        assert new.wait(300) == 0, (run2 / "trainer2.log").read_text()[-3000:]
    finally:
        stack.stop()
        for key in r.scan_iter(match=keys.pattern, count=1000):
            r.delete(key)
    assert "lease" in stack.trainer.log.read_text()
    _assert_exactly_once(run2, 4, 2)
    _assert_within_bound(run2, 1)
