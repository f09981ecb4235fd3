"""Decoding throughput: the cached, batched torch engine against the naive recompute-everything baseline.

    python bench/decode.py [--prompt-len 128] [--new-tokens 256] [--batches 1,16] [--repeats 3] [--threads 2]

Builds the tiny preset in a temp dir (random weights: about one token per denoising step, so every engine does
the same number of denoising steps), decodes `--new-tokens` tokens after prompts of about `--prompt-len` tokens (no stop tokens) and prints tokens/s
(median of the repeats), forward passes per generated token and the ratios against the baseline measured in
the same process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test oracles

from services.rollout.engines.reference import naive_generate
from services.rollout.engines.torch_engine import DecodeStats, TorchEngine
from shared.contracts.wire import GenerationRequest, SamplingParams
from shared.model.sdar import load_model
from shared.model.tiny import init_tiny


def _requests(batch: int, prompt_len: int, new_tokens: int) -> list[GenerationRequest]:
    # prompt lengths differ and are not block multiples, as in real batches
    params = [SamplingParams(seed=i, max_new_tokens=new_tokens, stop_token_ids=[]) for i in range(batch)]
    prompts = [[10 + (j % 200) for j in range(prompt_len + i % 5)] for i in range(batch)]
    return [GenerationRequest(prompt_ids=pr, params=p) for pr, p in zip(prompts, params, strict=True)]


def _run(fn, repeats: int) -> tuple[float, DecodeStats]:
    times, stats = [], DecodeStats()
    for _ in range(repeats):
        stats = DecodeStats()
        t0 = time.perf_counter()
        fn(stats)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128, help="about a chat-templated math problem")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        init_tiny(tmp, seed=0)
        loaded = load_model(tmp)
        engine = TorchEngine(loaded, max_batch_size=64)

        def cached(reqs):
            def go(stats: DecodeStats) -> None:
                engine.stats = stats
                engine.generate(reqs)

            return go

        def naive(reqs):
            return lambda stats: naive_generate(loaded, reqs, stats)

        rows = []
        for batch in [int(b) for b in args.batches.split(",")]:
            reqs = _requests(batch, args.prompt_len, args.new_tokens)
            for name, fn in (("naive (recompute, one by one)", naive), ("cached engine", cached)):
                secs, stats = _run(fn(reqs), args.repeats)
                rows.append((name, batch, stats.tokens / secs, stats.forwards / stats.tokens))
    base = {b: tps for name, b, tps, _ in rows if name.startswith("naive")}
    cached_b1 = next(tps for name, b, tps, _ in rows if name == "cached engine" and b == 1)
    print(
        f"tiny preset, {args.prompt_len}-token prompts, {args.new_tokens} new tokens, {args.threads} threads, median of {args.repeats}"
    )
    print(f"{'engine':<32}{'batch':>6}{'tokens/s':>11}{'fwd/token':>11}{'x naive':>9}{'x cached b1':>13}")
    for name, b, tps, fpt in rows:
        print(f"{name:<32}{b:>6}{tps:>11.1f}{fpt:>11.3f}{tps / base[b]:>9.2f}{tps / cached_b1:>13.2f}")


if __name__ == "__main__":
    main()
