"""Weight transport: publish-to-served time and per-worker pause, shared volume against weights.transport=http.

    nice -n 5 python bench/weights.py [--layers 7] [--workers 1 4] [--repeats 3]

Models: (a) the tiny preset; (b) SDAR-1.7B-shaped random bf16 weights (Qwen3-1.7B: hidden 2048, intermediate 6144,
16 heads / 8 KV heads of 128, vocabulary 151936, tied embeddings; 28 layers = 3.44 GB), written with `--layers` of
its 28 layers (default 7, a quarter of the layers: 1.33 GB) so that 4 workers fit this machine's memory and disk;
every cost here is linear in the bytes, so the full model's times are these x (bytes ratio), printed.

Per version and worker:
* volume: the worker checks the trainer's folder (`checkpoint_folder`) and loads it into CPU tensors
  (`safetensors.load_file`): that load is the pause, and publish-to-served is the slowest worker's load. Here the
  "volume" is this machine's local disk with the file in the page cache: the best case of a shared volume.
* http: the trainer process (a subprocess running the trainer's weights routes) hashes the folder (the publish),
  each worker (a thread) fetches every file, verifies size + sha256, fsyncs and renames it into its own cache
  (`services.rollout.fetch.fetch_version`) while its old weights would keep serving, then checks and loads the
  cached folder: only that load is the pause. Publish-to-served runs from the start of the hash to the last load.

Prints the medians of `--repeats` versions per configuration and the ratio to the volume baseline of the same model
and worker count, measured in the same process. Bytes moved: what leaves the volume / the trainer per version.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import load_file, save_file

from services.rollout.fetch import fetch_version
from services.rollout.weights import checkpoint_folder
from shared.contracts.wire import WeightsVersion

REPO = Path(__file__).resolve().parents[1]
SDAR_1_7B = {"hidden_size": 2048, "intermediate_size": 6144, "num_attention_heads": 16, "num_key_value_heads": 8,
             "head_dim": 128, "vocab_size": 151936, "num_hidden_layers": 28, "tie_word_embeddings": True,
             "model_type": "sdar", "torch_dtype": "bfloat16", "block_size": 4, "mask_token_id": 151669}  # fmt: skip


def layer_shapes(c: dict, i: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of decoder layer `i` of a Qwen3-style config `c`."""
    h, f, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv, p = c["num_attention_heads"] * d, c["num_key_value_heads"] * d, f"model.layers.{i}."
    return {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}  # fmt: skip


def model_shapes(c: dict, layers: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Qwen3-style model with `layers` decoder layers (tied embeddings: no lm_head)."""
    out = {"model.embed_tokens.weight": (c["vocab_size"], c["hidden_size"]), "model.norm.weight": (c["hidden_size"],)}
    for i in range(layers):
        out.update(layer_shapes(c, i))
    return out


def write_sdar_shaped(folder: Path, layers: int) -> Path:
    """A checkpoint folder of SDAR-1.7B shape with `layers` layers of random bf16 weights (config + safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {
        n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in model_shapes(SDAR_1_7B, layers).items()
    }
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**SDAR_1_7B, "num_hidden_layers": layers}, indent=1))
    return folder


def full_bytes(layers: int) -> tuple[int, int]:
    """Weight bytes (bf16) of the model with `layers` layers and of the full 28-layer SDAR-1.7B shape."""
    size = lambda n: sum(2 * torch.Size(s).numel() for s in model_shapes(SDAR_1_7B, n).values())  # noqa: E731
    return size(layers), size(SDAR_1_7B["num_hidden_layers"])


SERVE = """
import sys, uvicorn
from pathlib import Path
from fastapi import FastAPI
from services.trainer.orchestrator.weights_server import WeightStore, weights_router
from shared.contracts.wire import WeightsVersion

store, app = WeightStore(), FastAPI()
app.include_router(weights_router(store, None))

@app.post('/bench/publish')
def publish(version: int, path: str) -> dict:  # what the trainer's publish does: hash once, serve
    return store.add(WeightsVersion(version=version, path=path), 'http://127.0.0.1:' + sys.argv[1]).model_dump()

@app.post('/bench/drop')
def drop(version: int) -> None:
    store.drop(version)

uvicorn.run(app, host='127.0.0.1', port=int(sys.argv[1]), log_level='warning')
"""


def start_trainer() -> tuple[subprocess.Popen, str]:
    """The trainer's weights routes in a process of their own (as in `gtpo train`, not sharing this GIL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(url + "/docs", timeout=2)
            return proc, url
        except httpx.HTTPError:
            assert time.monotonic() < deadline and proc.poll() is None, "the trainer did not start"
            time.sleep(0.1)


def load(folder: Path, root: Path) -> float:
    """The pause: check the folder as the rollout service does and load its tensors; returns seconds."""
    t0 = time.perf_counter()
    ckpt = checkpoint_folder(folder, root)
    for f in sorted(ckpt.folder.glob("*.safetensors")):
        {k: t.clone() for k, t in load_file(f).items()}  # into memory of its own, as a model's parameters
    return time.perf_counter() - t0


def run_workers(n: int, work) -> list:
    """`work(i)` in `n` threads at once; their results in order."""
    out: list = [None] * n

    def one(i: int) -> None:
        out[i] = work(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def volume_round(folder: Path, workers: int) -> dict:
    """One version over the shared volume: every worker loads the trainer's folder itself."""
    t0 = time.perf_counter()
    pauses = run_workers(workers, lambda i: load(folder, folder.parent))
    return {"served_s": time.perf_counter() - t0, "pause_s": statistics.median(pauses), "fetch_s": 0.0}


def http_round(trainer: str, folder: Path, version: int, workers: int, caches: Path) -> dict:
    """One version over HTTP: the trainer hashes and serves it, every worker fetches, verifies, then loads."""
    t0 = time.perf_counter()
    r = httpx.post(f"{trainer}/bench/publish", params={"version": version, "path": str(folder)}, timeout=600)
    published = WeightsVersion.model_validate(r.raise_for_status().json())
    t_hash = time.perf_counter() - t0

    def worker(i: int) -> tuple[float, float]:
        cache = caches / f"w{i}"
        t = time.perf_counter()
        got = fetch_version(published, cache, timeout_s=120)
        fetched = time.perf_counter() - t
        return fetched, load(got, cache)

    done = run_workers(workers, worker)
    served = time.perf_counter() - t0
    httpx.post(f"{trainer}/bench/drop", params={"version": version}, timeout=60)
    for i in range(workers):  # the worker's GC: the served version only (here: none kept between rounds)
        shutil.rmtree(caches / f"w{i}", ignore_errors=True)
    return {"served_s": served, "pause_s": statistics.median(p for _, p in done),
            "fetch_s": statistics.median(f for f, _ in done), "hash_s": t_hash}  # fmt: skip


def measure(name: str, folder: Path, trainer: str, workers: int, repeats: int, caches: Path) -> list[dict]:
    """Medians of `repeats` versions per transport for one model and worker count."""
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    rows, version = [], [0]

    def next_version() -> int:
        version[0] += 1
        return version[0]

    for transport in ("volume", "http"):
        runs = []
        for _ in range(repeats):
            if transport == "volume":
                runs.append(volume_round(folder, workers))
            else:
                runs.append(http_round(trainer, folder, workers * 1000 + next_version(), workers, caches))
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rows.append({"model": name, "workers": workers, "transport": transport, "bytes": size * workers, **med})
    return rows


def print_table(rows: list[dict]) -> None:
    print("| model | workers | transport | GB moved / version | trainer hash s | fetch s (per worker, background) "
          "| pause s (per worker) | publish-to-served s | served / volume |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    base = {(r["model"], r["workers"]): r["served_s"] for r in rows if r["transport"] == "volume"}
    for r in rows:
        ratio = r["served_s"] / base[(r["model"], r["workers"])]
        print(f"| {r['model']} | {r['workers']} | {r['transport']} | {r['bytes'] / 1e9:.3f} | "
              f"{r.get('hash_s', 0.0):.2f} | {r['fetch_s']:.2f} | {r['pause_s']:.2f} | {r['served_s']:.2f} | "
              f"{ratio:.2f}x |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=7, help="layers of the SDAR-1.7B-shaped model (28 = full size)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from shared.model.tiny import init_tiny

    trainer_proc, trainer = start_trainer()
    work = Path(tempfile.mkdtemp(prefix="gtpo-bench-weights-"))
    try:
        models = {"tiny": init_tiny(work / "trainer" / "tiny", seed=0),
                  f"sdar-1.7b-shape ({args.layers}/28 layers)": write_sdar_shaped(work / "trainer" / "sdar", args.layers)}  # fmt: skip
        rows = [row for name, folder in models.items() for n in args.workers
                for row in measure(name, folder, trainer, n, args.repeats, work / "caches")]  # fmt: skip
        print_table(rows)
        part, full = full_bytes(args.layers)
        print(f"\nSDAR-1.7B-shaped: {part / 1e9:.2f} GB of weights here, {full / 1e9:.2f} GB at 28 layers "
              f"(x{full / part:.2f}); every time above but the tiny model's scales with the bytes.")  # fmt: skip
    finally:
        trainer_proc.terminate()
        trainer_proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
