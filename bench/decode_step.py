"""Per-step cost of the cached torch engine's decoding loop, today's against the frozen pre-optimisation loop
(tests/oracles/engine_reference.py), in one process, interleaved, so a noisy machine weighs on both alike.

    python bench/decode_step.py [--prompt-len 128] [--new-tokens 256] [--batches 1,16] [--repeats 5] [--threads 2]

Tiny preset, random weights (about one token per denoising step), no stop tokens. Prints per engine and batch the
median wall and CPU time per denoising step (a forward), and the old / new ratio (> 1: the new loop is faster).
Both loops return the same rollouts (checked here too; tests/test_engine_step.py checks it bit for bit).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from oracles.engine_reference import ReferenceEngine

from services.rollout.engines.torch_engine import DecodeStats, TorchEngine
from shared.contracts import GenerationRequest, SamplingParams
from shared.model import load_model
from shared.tiny import init_tiny


def _requests(batch: int, prompt_len: int, new_tokens: int) -> list[GenerationRequest]:
    params = [SamplingParams(seed=i, max_new_tokens=new_tokens, stop_token_ids=[]) for i in range(batch)]
    prompts = [[10 + (j % 200) for j in range(prompt_len + i % 5)] for i in range(batch)]
    return [GenerationRequest(prompt_ids=pr, params=p) for pr, p in zip(prompts, params, strict=True)]


def _once(engine: TorchEngine, reqs) -> tuple[float, float, int, list]:
    engine.stats = DecodeStats()
    w0, c0 = time.perf_counter(), time.process_time()
    out = engine.generate(reqs)
    return time.perf_counter() - w0, time.process_time() - c0, engine.stats.forwards, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        init_tiny(tmp, seed=0)
        loaded = load_model(tmp)
        engines = {
            "old (frozen loop)": ReferenceEngine(loaded, max_batch_size=64),
            "new": TorchEngine(loaded, max_batch_size=64),
        }
        print(
            f"tiny preset, {args.prompt_len}-token prompts, {args.new_tokens} new tokens, {args.threads} threads, "
            f"median of {args.repeats} interleaved runs"
        )
        print(
            f"{'loop':<20}{'batch':>6}{'forwards':>10}{'wall us/step':>14}{'cpu us/step':>13}{'old/new wall':>14}{'old/new cpu':>13}"
        )
        for batch in [int(b) for b in args.batches.split(",")]:
            reqs = _requests(batch, args.prompt_len, args.new_tokens)
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
            outs, fwd = {}, {}
            for engine in engines.values():  # warm-up
                _once(engine, reqs)
            for _ in range(args.repeats):
                for name, engine in engines.items():
                    wall, cpu, fwd[name], outs[name] = _once(engine, reqs)
                    times[name].append((wall, cpu))
            same = [[r.model_dump() for r in g] for g in outs["new"]] == [
                [r.model_dump() for r in g] for g in outs["old (frozen loop)"]
            ]
            med = {
                n: (statistics.median(w for w, _ in ts), statistics.median(c for _, c in ts)) for n, ts in times.items()
            }
            old = med["old (frozen loop)"]
            for name, (wall, cpu) in med.items():
                print(
                    f"{name:<20}{batch:>6}{fwd[name]:>10}{wall / fwd[name] * 1e6:>14.0f}{cpu / fwd[name] * 1e6:>13.0f}"
                    f"{old[0] / wall:>14.3f}{old[1] / cpu:>13.3f}"
                )
            if not same:
                raise SystemExit("the new loop's rollouts differ from the frozen loop's")


if __name__ == "__main__":
    main()
