"""Per-step cost of the cached torch engine's decoding loop, today's against the frozen pre-optimisation loop
(tests/oracles/engine_reference.py), in one process, interleaved, so a noisy machine weighs on both alike.

    python bench/decode_step.py [--prompt-len 128] [--new-tokens 256] [--batches 1,16] [--repeats 5] [--threads 2]

Tiny preset, random weights (about one token per denoising step), no stop tokens. Prints per engine and batch the
median wall and CPU time per denoising step (a forward), the old / new ratio (> 1: the new loop is faster) and,
with ``--naive``, each loop's speed-up over the recompute baseline measured in the same runs (bench/decode.py's
"x naive" at that batch).
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

from services.rollout.engines.reference import naive_generate
from services.rollout.engines.torch_engine import DecodeStats, TorchEngine
from shared.contracts.wire import GenerationRequest, SamplingParams
from shared.model.sdar import load_model
from shared.model.tiny import init_tiny


def _requests(batch: int, prompt_len: int, new_tokens: int) -> list[GenerationRequest]:
    params = [SamplingParams(seed=i, max_new_tokens=new_tokens, stop_token_ids=[]) for i in range(batch)]
    prompts = [[10 + (j % 200) for j in range(prompt_len + i % 5)] for i in range(batch)]
    return [GenerationRequest(prompt_ids=pr, params=p) for pr, p in zip(prompts, params, strict=True)]


def _once(engine: TorchEngine, reqs) -> tuple[float, float, int, list]:
    engine.stats = DecodeStats()
    w0, c0 = time.perf_counter(), time.process_time()
    out = engine.generate(reqs)
    return time.perf_counter() - w0, time.process_time() - c0, engine.stats.forwards, out


class _Naive:
    """The recompute baseline behind the engine calls `_once` makes."""

    def __init__(self, loaded):
        self.loaded, self.stats = loaded, DecodeStats()

    def generate(self, reqs):
        return naive_generate(self.loaded, reqs, self.stats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--naive", action="store_true", help="also time the recompute baseline, for x naive")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        init_tiny(tmp, seed=0)
        loaded = load_model(tmp)
        engines: dict = {
            "old (frozen loop)": ReferenceEngine(loaded, max_batch_size=64),
            "new": TorchEngine(loaded, max_batch_size=64),
        }
        if args.naive:
            engines["naive (recompute)"] = _Naive(loaded)
        print(
            f"tiny preset, {args.prompt_len}-token prompts, {args.new_tokens} new tokens, {args.threads} threads, "
            f"median of {args.repeats} interleaved runs"
        )
        head = f"{'loop':<20}{'batch':>6}{'forwards':>10}{'wall us/fwd':>13}{'cpu us/fwd':>12}"
        head += f"{'old/new wall':>14}{'old/new cpu':>13}"
        print(head + (f"{'x naive wall':>14}{'x naive cpu':>13}" if args.naive else ""))
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
            dumps = {name: [[r.model_dump() for r in g] for g in out] for name, out in outs.items()}
            med = {
                n: (statistics.median(w for w, _ in ts), statistics.median(c for _, c in ts)) for n, ts in times.items()
            }
            old, naive = med["old (frozen loop)"], med.get("naive (recompute)")
            for name, (wall, cpu) in med.items():
                line = (
                    f"{name:<20}{batch:>6}{fwd[name]:>10}{wall / fwd[name] * 1e6:>13.0f}{cpu / fwd[name] * 1e6:>12.0f}"
                )
                line += f"{old[0] / wall:>14.3f}{old[1] / cpu:>13.3f}" if not name.startswith("naive") else " " * 27
                print(line + (f"{naive[0] / wall:>14.2f}{naive[1] / cpu:>13.2f}" if naive else ""))
            if dumps["new"] != dumps["old (frozen loop)"]:
                raise SystemExit("the new loop's rollouts differ from the frozen loop's")


if __name__ == "__main__":
    main()
