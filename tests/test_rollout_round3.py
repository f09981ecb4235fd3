"""Rollout service hardening, round 3 (issue 32, items 8-10 and 12-14), through the ASGI app and a real Redis:
a current-weights value that is no version is skipped (the worker keeps consuming), a refused version is reported
(heartbeat, /ready, the trainer's agreement check), a first LoRA adapter that does not fit is rolled back, weights
holding NaN or inf are refused naming the tensor, and an over-long path is a 4xx."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from services.rollout.app import create_app
from services.rollout.engines.torch_engine import TorchEngine
from services.rollout.settings import RolloutSettings
from services.trainer.config import LoraSettings
from services.trainer.learner import lora
from shared.config.settings import RedisConfig
from shared.contracts.agreement import AgreementError, TrainerSide, check_agreement, refusals, registered_infos
from shared.contracts.wire import RolloutMessage, SamplingParams, TaskMessage, WeightsVersion
from shared.model import adapter as adapter_format
from shared.model.sdar import load_model
from shared.queues.queue import Codec, Queue, WeightRegistry

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY = {"prompt_ids": [[5, 6, 7]], "params": {"seed": 3, "max_new_tokens": 8, "stop_token_ids": []}}
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_dir) -> Path:
    root = tmp_path_factory.mktemp("ckpts")
    shutil.copytree(tiny_dir, root / "v0")
    return root


def until(done, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def worker_app(root: Path, tiny, redis_url: str, namespace: str, **kw) -> TestClient:
    settings = RolloutSettings(model=root / "v0", checkpoint_root=root, worker=True, weights_wait_s=0.5,
                               worker_id="rollout-r3", redis=RedisConfig(url=redis_url, namespace=namespace),
                               **kw)  # fmt: skip
    return TestClient(create_app(settings, engine=TorchEngine(tiny)))


def task(i: int, version: int = 0) -> TaskMessage:
    return TaskMessage(task_id=f"run:0:{i}:0", run_id="run", train_by=0, prompt_index=i, sample_index=0, group_size=1,
                       prompt_ids=[5, 6, 7 + i], reference="3", params=SamplingParams(seed=i, max_new_tokens=6),
                       policy_version=version)  # fmt: skip


def handed_off(redis_client, keys) -> list[str]:
    entries = redis_client.xrange(keys.rollouts)
    msgs = [Codec.get(f[b"v"].decode()).decode(f[b"d"], RolloutMessage) for _, f in entries]
    return [m.task.task_id for m in msgs]


# --------------------------------------------------------------------------- item 8: garbage at the weights key


def test_a_garbage_current_weights_value_is_skipped_and_the_worker_keeps_consuming(
    root, tiny, redis_url, redis_client, redis_ns
):
    registry, queue = WeightRegistry(redis_client, redis_ns), Queue(redis_client, redis_ns)
    registry.publish(WeightsVersion(version=0, path=str(root / "v0")))
    with worker_app(root, tiny, redis_url, redis_ns.namespace) as c:
        # served_version, not policy_version: the start model is policy version 0 too, before v0 is loaded
        until(lambda: c.get("/ready").json().get("served_version") == 0)
        redis_client.set(redis_ns.weights_current, b"\xff not json {")
        # a read already under way may take the first task; every later read sees the garbage first
        queue.publish(redis_ns.tasks, task(0), task(0).task_id)
        until(lambda: len(handed_off(redis_client, redis_ns)) == 1)
        for i in (1, 2):
            queue.publish(redis_ns.tasks, task(i), task(i).task_id)
        until(lambda: len(handed_off(redis_client, redis_ns)) == 3)
        ready = c.get("/ready")
        assert ready.status_code == 200 and "current-weights record" in ready.json()["weights_problem"]
        # counted once per bad value, not once per read
        assert 'gtpo_rollout_bad_records_total{key="weights_current"} 1.0' in c.get("/metrics").text


def test_a_worker_that_can_load_no_version_is_not_ready_naming_the_cause(root, tiny, redis_url, redis_client, redis_ns):
    redis_client.set(redis_ns.weights_current, json.dumps({"version": -3, "path": ""}))
    with worker_app(root, tiny, redis_url, redis_ns.namespace) as c:
        until(lambda: c.get("/ready").status_code == 503)
        assert "current-weights record in Redis is no weights version" in c.get("/ready").json()["reason"]
        # a good version published later is loaded: ready again
        redis_client.delete(redis_ns.weights_current)
        WeightRegistry(redis_client, redis_ns).publish(WeightsVersion(version=0, path=str(root / "v0")))
        until(lambda: c.get("/ready").status_code == 200)


# --------------------------------------------------------------------------- item 10: weights outside the root


def test_a_version_outside_the_root_is_refused_and_reported(root, tiny, tiny_dir, tmp_path, redis_url, redis_client,
                                                            redis_ns, caplog):  # fmt: skip
    elsewhere = tmp_path / "run" / "checkpoints" / "step-1"
    shutil.copytree(tiny_dir, elsewhere)
    registry = WeightRegistry(redis_client, redis_ns)
    with worker_app(root, tiny, redis_url, redis_ns.namespace) as c:
        until(lambda: "rollout-r3" in registry.live_workers())
        # the start-up check: the trainer's weights folder is not under the worker's root
        trainer = TrainerSide(redis_ns.namespace, "msgpack", weights_dir=str(elsewhere.parent))
        with pytest.raises(AgreementError, match=f"outside rollout rollout-r3's checkpoint root {root.resolve()}"):
            check_agreement(trainer, registered_infos(registry.live_workers()))
        inside = TrainerSide(redis_ns.namespace, "msgpack", weights_dir=str(root / "run"))
        check_agreement(inside, registered_infos(registry.live_workers()))
        # the version published anyway is refused, and the refusal is in the heartbeat the trainer reads
        registry.publish(WeightsVersion(version=1, path=str(elsewhere)))
        until(lambda: refusals(registry.live_workers(), 1))
        (line,) = refusals(registry.live_workers(), 1)
        assert str(elsewhere) in line and str(root.resolve()) in line and "outside the checkpoint root" in line
        assert refusals(registry.live_workers(), 2) == []
        # the trainer, waiting for rollouts of v1, says it loudly (and in its status line)
        from types import SimpleNamespace

        from services.trainer.orchestrator.driver import Driver

        driver = SimpleNamespace(registry=registry, waiting="waiting for 4 groups", stop=threading.Event(), solo=True,
                                 cfg=SimpleNamespace(redis=SimpleNamespace(reconnect_s=5.0)))  # fmt: skip
        driver._redis = functools.partial(Driver._redis, driver)  # the driver's own Redis wrapper, as it runs
        with caplog.at_level(logging.ERROR, logger="gtpo"):
            Driver._warn_refusals(driver, 3, 1)
        assert any(str(elsewhere) in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
        assert "1 rollout workers refused weights v1" in driver.waiting
        ready = c.get("/ready")  # it serves no published version, so it can serve no task
        assert ready.status_code == 503 and str(elsewhere) in ready.json()["reason"]


# --------------------------------------------------------------------------- items 12-14: POST /v1/weights


@pytest.fixture
def client(root, tiny_dir):
    settings = RolloutSettings(model=root / "v0", checkpoint_root=root, api_token=TOKEN)
    with TestClient(create_app(settings, engine=TorchEngine(load_model(tiny_dir)))) as c:
        yield c


def push(client, path, version):
    return client.post("/v1/weights", json={"version": version, "path": str(path)}, headers=AUTH)


def sample(client) -> dict:
    r = client.post("/v1/generate", json=BODY)
    assert r.status_code == 200, r.text
    return r.json()


def adapter(tiny_dir, out: Path, seed: int) -> Path:
    base = load_model(tiny_dir)
    model = lora.apply_lora(base.model, LoraSettings(r=4, alpha=8))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_format.adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return lora.save_adapter(model, out, base.spec)


def test_a_first_adapter_that_does_not_fit_its_layers_is_rolled_back(client, root, tiny_dir):
    good = adapter(tiny_dir, root / "ad-good", seed=1)
    liar = root / "ad-liar"  # its config says r=8, its tensors are r=4: refused only once the layers are injected
    shutil.copytree(good, liar, dirs_exist_ok=True)
    config = json.loads((liar / adapter_format.ADAPTER_CONFIG).read_text())
    (liar / adapter_format.ADAPTER_CONFIG).write_text(json.dumps({**config, "r": 8, "lora_alpha": 16}))
    before = sample(client)
    r = push(client, liar, 1)
    assert r.status_code == 422 and "wrong shape" in r.json()["detail"], r.text
    assert sample(client) == before
    r = push(client, good, 2)
    assert r.status_code == 200, r.text
    assert sample(client)["policy_version"] == 2


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_full_weights_are_refused_naming_the_tensor(client, root, value):
    bad = root / f"nonfinite-{value}"
    shutil.copytree(root / "v0", bad, dirs_exist_ok=True)
    w = load_file(bad / "model.safetensors")
    w[Q_PROJ][0, 0] = value
    save_file(w, bad / "model.safetensors", metadata={"format": "pt"})
    before = sample(client)
    r = push(client, bad, 1)
    assert r.status_code == 422 and Q_PROJ in r.json()["detail"] and "NaN or inf" in r.json()["detail"], r.text
    assert sample(client) == before
    # the LMDeploy engine reads the files before it reloads (refused before any engine is touched)
    from services.rollout.engines.lmdeploy_engine import LMDeployEngine

    engine = LMDeployEngine.__new__(LMDeployEngine)
    engine._spec = load_model(root / "v0").spec
    with pytest.raises(ValueError, match=f"model.safetensors: {Q_PROJ} holds NaN or inf"):
        engine.load_weights(bad, 1)


def test_non_finite_adapter_weights_are_refused_naming_the_tensor(client, root, tiny_dir):
    good = adapter(tiny_dir, root / "ad-ok", seed=2)
    bad = root / "ad-nan"
    shutil.copytree(good, bad, dirs_exist_ok=True)
    t = load_file(bad / adapter_format.ADAPTER_WEIGHTS)
    key = sorted(t)[0]
    t[key][0, 0] = float("nan")
    save_file(t, bad / adapter_format.ADAPTER_WEIGHTS)
    before = sample(client)
    r = push(client, bad, 1)
    assert r.status_code == 422 and key in r.json()["detail"], r.text
    assert sample(client) == before
    assert push(client, good, 2).status_code == 200 and sample(client)["policy_version"] == 2


def test_a_path_too_long_for_the_file_system_is_4xx(client, root):
    # real folders under the root whose path (under the request's 4096-character limit) is over PATH_MAX once
    # the root is joined, and names over 255 bytes
    first = "e" * (4090 - 16 * 251)
    fd = os.open(root, os.O_RDONLY)
    rel = Path(first)
    try:
        for name in [first] + ["d" * 250] * 16:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, dir_fd=fd)
            nxt = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)
    rel = Path(first, *["d" * 250] * 16)
    assert len(str(rel)) <= 4096 < len(str(root / rel))
    before = sample(client)
    for path in ["a" * 300, f"v0/{'b' * 256}/x", str(rel)]:
        r = push(client, path, 1)
        assert 400 <= r.status_code < 500 and "too long" in r.text, (path[:50], r.text)
    assert sample(client) == before


# --------------------------------------------------------------------------- item 9: started while Redis is down


def test_a_worker_started_while_redis_is_down_reports_it_and_becomes_ready_once_redis_is_up(root, tmp_path):
    """A real `gtpo serve rollout --worker` process started with no Redis: past `redis.outage_s` its /ready says
    Redis is unreachable (the process neither looks healthy nor gives up), and once a server comes up on that port
    it creates its groups, serves v0 and is ready."""
    import subprocess
    import sys

    import httpx

    from shared.process import free_port
    from shared.queues.keys import Keys
    from shared.queues.queue import connect
    from shared.queues.redis_server import EmbeddedRedis

    ports: set[int] = set()
    redis_port, http_port = free_port(ports), free_port(ports)
    server = EmbeddedRedis(tmp_path / "redis", port=redis_port, start=False)
    keys = Keys("round3-outage")
    env = {**os.environ, "REDIS_URL": server.url, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "services", "serve", "rollout", "--worker", f"model={root / 'v0'}",
           f"checkpoint_root={root}", f"port={http_port}", "worker_id=rollout-outage", "weights_wait_s=0.5",
           f"redis.namespace={keys.namespace}", "redis.outage_s=0.5"]  # fmt: skip
    log = (tmp_path / "rollout.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1])
    url = f"http://127.0.0.1:{http_port}/ready"

    def ready() -> httpx.Response | None:
        assert proc.poll() is None, (tmp_path / "rollout.log").read_text()[-3000:]
        try:
            return httpx.get(url, timeout=5)
        except httpx.TransportError:
            return None

    try:
        until(lambda: (r := ready()) is not None and "redis unreachable" in r.text, timeout_s=120)
        assert ready().status_code == 503
        server.start()
        client = connect(server.url)
        WeightRegistry(client, keys).publish(WeightsVersion(version=0, path=str(root / "v0")))
        until(lambda: (r := ready()) is not None and r.status_code == 200 and r.json()["policy_version"] == 0, 60)
        Queue(client, keys).publish(keys.tasks, task(0), task(0).task_id)
        until(lambda: handed_off(client, keys) == [task(0).task_id], 60)
        client.close()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        server.stop()
