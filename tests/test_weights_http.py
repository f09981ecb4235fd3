"""weights.transport=http (issue 30, part 2): the trainer serves each version's files, a rollout worker fetches,
verifies and loads them. A version fetched over HTTP equals the trainer's files bit for bit and loads the same
tensors; a corrupt or cut transfer is refused with the old weights kept and nothing left behind; a SIGKILLed
server mid-transfer loses nothing; the real rollout worker loads a published version, acknowledges it, and the
trainer's prune and the worker's cache GC keep working."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI
from procs import serve_app
from safetensors.torch import load_file, save_file

from services.rollout.engines.torch_engine import TorchEngine
from services.rollout.fetch import FetchError, Prefetcher, fetch_version
from services.rollout.host import EngineHost, RolloutMetrics
from services.rollout.settings import RolloutSettings
from services.rollout.worker import RolloutWorker
from services.trainer.config import RLConfig
from services.trainer.orchestrator.publish import prune, publish
from services.trainer.orchestrator.status_server import TrainerMetrics, create_app
from services.trainer.orchestrator.weights_server import WeightStore, weights_router
from shared.config.settings import RedisConfig
from shared.contracts.wire import TrainerStatus, WeightsVersion

REPO = Path(__file__).resolve().parents[1]


def perturbed(src: Path, dest: Path, seed: int) -> Path:
    """A copy of the checkpoint `src` with every floating tensor moved by a little noise (another version)."""
    shutil.copytree(src, dest)
    tensors = load_file(dest / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    out = {k: (t + 0.01 * torch.randn(t.shape, generator=g).to(t.dtype)) if t.is_floating_point() else t
           for k, t in tensors.items()}  # fmt: skip
    save_file(out, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_dir):
    """The trainer's checkpoint root: v0 (the tiny model), v1 and v2 (perturbed copies)."""
    root = tmp_path_factory.mktemp("trainer") / "checkpoints"
    shutil.copytree(tiny_dir, root / "v0")
    for v in (1, 2):
        perturbed(tiny_dir, root / f"v{v}", seed=v)
    return root


@pytest.fixture
def trainer(ckpts):
    """A WeightStore behind the trainer's weights routes, under uvicorn on 127.0.0.1."""
    store = WeightStore()
    app = FastAPI()
    app.include_router(weights_router(store, None))
    server, thread, url = serve_app(app)
    yield store, url
    server.should_exit = True
    thread.join(10)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_a_fetched_version_is_the_trainers_files_bit_for_bit_and_loads_the_same_tensors(trainer, ckpts, tiny, tmp_path):
    store, url = trainer
    version = store.add(WeightsVersion(version=1, path=str(ckpts / "v1"), run="r"), url)
    folder = fetch_version(version, tmp_path / "cache")
    names = sorted(p.relative_to(ckpts / "v1") for p in (ckpts / "v1").rglob("*") if p.is_file())
    assert sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file()) == names
    assert all((folder / n).read_bytes() == (ckpts / "v1" / n).read_bytes() for n in names)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]  # no temporary folder left
    host = EngineHost(TorchEngine(tiny), RolloutMetrics(), start=ckpts / "v0")
    host.load(folder, tmp_path / "cache", 1, "test", run="r")
    served = host.engine.model.state_dict()
    trainer_side = _state(ckpts / "v1")
    assert all(torch.equal(served[k], t) for k, t in trainer_side.items())


def test_a_manifest_other_than_the_published_one_is_refused(trainer, ckpts, tmp_path):
    store, url = trainer
    version = store.add(WeightsVersion(version=1, path=str(ckpts / "v1")), url)
    lie = version.model_copy(update={"digest": "0" * 64})
    with pytest.raises(FetchError, match="is not the published one"):
        fetch_version(lie, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_byte_flipped_on_the_trainer_is_refused_and_nothing_is_left(trainer, ckpts, tmp_path):
    store, url = trainer
    shutil.copytree(ckpts / "v1", tmp_path / "v7")
    version = store.add(WeightsVersion(version=7, path=str(tmp_path / "v7")), url)
    f = tmp_path / "v7" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # after the manifest was hashed: what a bad disk or a bad copy does
    f.write_bytes(bytes(data))
    with pytest.raises(FetchError, match="sha256 .* corrupt transfer"):
        fetch_version(version, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def _cutting_server(body: bytes, manifest: bytes) -> tuple[socket.socket, str]:
    """A server that answers the manifest, then every file request with the full Content-Length but only half the
    bytes before it closes the connection (a torn transfer, every time)."""
    sock = socket.create_server(("127.0.0.1", 0))

    def answer(conn: socket.socket) -> None:
        with conn:
            head = conn.recv(65536).decode()
            if "/manifest" in head.split("\r\n")[0]:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(manifest))
                conn.sendall(manifest)
                return
            start = int(head.split("bytes=")[1].split("-")[0]) if "bytes=" in head else 0
            rest = body[start:]
            status = b"206 Partial Content" if start else b"200 OK"
            conn.sendall(b"HTTP/1.1 %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (status, len(rest)))
            conn.sendall(rest[: len(rest) // 2])

    def loop() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            answer(conn)

    threading.Thread(target=loop, daemon=True).start()
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_a_stream_cut_every_time_is_refused_after_resuming_and_nothing_is_left(ckpts, tmp_path):
    from services.trainer.orchestrator.weights_server import build_manifest

    manifest = build_manifest(ckpts / "v1", 1, None)
    sock, url = _cutting_server(
        (ckpts / "v1" / manifest.files[0].name).read_bytes(), manifest.model_dump_json().encode()
    )
    try:
        version = WeightsVersion(version=1, path="v1", url=url + "/v1/weights/1", digest=manifest.digest())
        with pytest.raises(FetchError, match="short read"):
            fetch_version(version, tmp_path / "cache", timeout_s=5)
    finally:
        sock.close()
    assert list((tmp_path / "cache").iterdir()) == []


SERVE = """
import sys, time, uvicorn
from fastapi import FastAPI
from services.trainer.orchestrator.weights_server import WeightStore, WeightsFileResponse, weights_router
from shared.contracts.wire import WeightsVersion

WeightsFileResponse.chunk_size = 64 * 1024
store = WeightStore()
v = store.add(WeightsVersion(version=int(sys.argv[2]), path=sys.argv[1], run='r'), 'http://127.0.0.1:' + sys.argv[3])
app = FastAPI()
app.include_router(weights_router(store, None))

async def slow(scope, receive, send):  # about 1 s per tiny checkpoint: time to kill it mid-stream
    async def paced(message):
        if message['type'] == 'http.response.body':
            time.sleep(0.02)
        await send(message)
    await app(scope, receive, paced)

print(v.model_dump_json(), flush=True)
uvicorn.run(slow, host='127.0.0.1', port=int(sys.argv[3]), log_level='warning')
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(folder: Path, version: int, port: int) -> tuple[subprocess.Popen, WeightsVersion]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(folder), str(version), str(port)], env=env,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    published = WeightsVersion.model_validate_json(proc.stdout.readline())
    deadline = time.monotonic() + 20
    while True:  # until it listens
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, published
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)


@pytest.fixture
def worker(ckpts, tiny, redis_url, redis_ns, tmp_path):
    settings = RolloutSettings(
        model=ckpts / "v0", checkpoint_root=ckpts, weights_cache=tmp_path / "cache", weights_retry_s=0.3,
        weights_fetch_timeout_s=5, redis=RedisConfig(url=redis_url, namespace=redis_ns.namespace),
    )  # fmt: skip
    w = RolloutWorker(EngineHost(TorchEngine(tiny), RolloutMetrics(), start=ckpts / "v0"), settings)
    w.queue.ensure_groups()
    yield w
    w.redis.close()


def _refresh_until(worker, done, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        worker.refresh_weights()
        time.sleep(0.05)


def test_sigkill_of_the_serving_process_mid_transfer_loses_nothing(worker, ckpts, tmp_path):
    cache, port = tmp_path / "cache", _free_port()
    worker.registry.publish(WeightsVersion(version=0, path=str(ckpts / "v0"), run="r"))
    _refresh_until(worker, lambda: worker.host.served_version == 0)
    proc, version = _start_server(ckpts / "v1", 1, port)
    worker.registry.publish(version)
    worker.refresh_weights()  # starts the fetch in the background: the worker goes on serving v0
    partial = lambda: [p for p in cache.glob(".partial-*/model.safetensors") if p.stat().st_size > 0]  # noqa: E731
    _refresh_until(worker, lambda: bool(partial()))
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    _refresh_until(worker, lambda: worker.prefetcher.failure(version) is not None)
    worker.refresh_weights()
    assert worker.host.served_version == 0
    assert "fetch failed" in worker.refusal().reason
    time.sleep(0.5)  # any retry against the dead server has failed and cleaned up by now
    assert not list(cache.glob(".partial-*")) and not list(cache.glob("v*"))
    proc, again = _start_server(ckpts / "v1", 1, port)  # the trainer is back: the same files, the same digest
    try:
        assert again == version
        _refresh_until(worker, lambda: worker.host.served_version == 1)
    finally:
        proc.kill()
        proc.wait(10)
    served = worker.host.engine.model.state_dict()
    assert all(torch.equal(served[k], t) for k, t in _state(ckpts / "v1").items())
    assert worker.refusal() is None and [p.name for p in cache.iterdir()] == [Path(worker.host.served.path).name]


def test_the_rollout_worker_loads_a_version_published_over_http_acks_it_and_prune_and_gc_follow(
    worker, ckpts, tmp_path
):
    store, status = WeightStore(), lambda: TrainerStatus(run_id="r", step=0, policy_version=0)
    app = create_app(status, lambda: None, TrainerMetrics(status), weights=store)
    server, thread, url = serve_app(app)
    root = tmp_path / "run"  # the trainer's layout: <checkpoint root>/<checkpoint>/model
    for v in (0, 1):
        shutil.copytree(ckpts / f"v{v}", root / f"step-{v}" / "model")
    try:
        for v in (0, 1):
            published = WeightsVersion(version=v, path=str(root / f"step-{v}" / "model"), run="r")
            publish(worker.registry, store.add(published, url), [], None)
            _refresh_until(worker, lambda v=v: worker.host.served_version == v)
            worker.heartbeat()
        assert worker.registry.live_workers("rollout")[worker.id].version == 1  # the ack the trainer waits for
        assert [v.version for v in worker.registry.deletable_versions()] == [0]
        assert prune(worker.registry, root, keep=set()) == [0] and not (root / "step-0").exists()
        store.drop(0)
        assert store.versions() == [1]
        cache = worker.prefetcher.cache
        assert [p.name for p in cache.iterdir()] == [Path(worker.host.served.path).name]  # GC: the served one only
        assert Path(worker.host.served.path).parent == cache
    finally:
        server.should_exit = True
        thread.join(10)


def test_transport_http_needs_the_trainers_http_port(tmp_path):
    base = {"model": str(tmp_path), "data": str(tmp_path / "d.jsonl"), "output_dir": str(tmp_path / "o")}
    with pytest.raises(ValueError, match="weights.transport: http"):
        RLConfig(**base, weights={"transport": "http"})
    cfg = RLConfig(**base, weights={"transport": "http"}, health_port=8100)
    assert cfg.weights.base_url(cfg.health_port) == "http://127.0.0.1:8100"


def test_a_prefetcher_retries_a_failed_version_only_after_its_pause(tmp_path):
    version = WeightsVersion(version=3, path="v3", url="http://127.0.0.1:1/v1/weights/3", digest="a" * 64)
    p = Prefetcher(tmp_path / "cache", retry_s=60)
    assert p.ready(version) is None
    deadline = time.monotonic() + 10
    while p.failure(version) is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert "unreachable" in p.failure(version)
    assert p.ready(version) is None and not p._running  # no new attempt within retry_s


def test_a_lora_version_sends_the_adapter_only(trainer, tiny_dir, tiny, tmp_path):
    from services.trainer.config import LoraSettings
    from services.trainer.learner import lora
    from shared.model import adapter
    from shared.model.sdar import load_model

    base = load_model(tiny_dir)
    peft_model = lora.apply_lora(base.model, LoraSettings(r=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lora_B starts at 0: draw it, or the adapter would change nothing
        for p in adapter.adapter_parameters(peft_model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ckpt = tmp_path / "step-1"
    lora.save_adapter(peft_model, ckpt / lora.ADAPTER_DIR, base.spec)
    store, url = trainer
    version = store.add(WeightsVersion(version=1, path=str(lora.published_weights(ckpt)), run="r"), url)
    names = {f.name for f in store.lookup(1)[1].files}
    assert names <= {adapter.ADAPTER_CONFIG, adapter.ADAPTER_WEIGHTS, adapter.BASE_FILE, "README.md"}, names
    assert store.lookup(1)[1].total_bytes() < (tiny_dir / "model.safetensors").stat().st_size / 10
    folder = fetch_version(version, tmp_path / "cache")
    host = EngineHost(TorchEngine(load_model(tiny_dir)), RolloutMetrics(), start=tiny_dir)
    host.load(folder, tmp_path / "cache", 1, "test", run="r")
    assert host.served_version == 1 and host.engine.adapter_bytes > 0
