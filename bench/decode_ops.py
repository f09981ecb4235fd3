"""Torch ops per forward of the cached engine's decoding loop, today's against the frozen pre-optimisation loop
(tests/oracles/engine_reference.py): a cost measure no load on the machine can blur.

    python bench/decode_ops.py [--prompt-len 128] [--new-tokens 64] [--batches 1,16]

Counts every ATen op dispatched during `generate` (decoder layers included), tiny preset, no stop tokens.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from decode_step import _requests
from oracles.engine_reference import ReferenceEngine

from services.rollout.engines.torch_engine import DecodeStats, TorchEngine
from shared.model.sdar import load_model
from shared.model.tiny import init_tiny


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--batches", default="1,16")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        init_tiny(tmp, seed=0)
        loaded = load_model(tmp)
        print(f"{'loop':<20}{'batch':>6}{'forwards':>10}{'ops/forward':>13}{'old/new':>9}")
        for batch in [int(b) for b in args.batches.split(",")]:
            reqs = _requests(batch, args.prompt_len, args.new_tokens)
            per_fwd = {}
            for name, cls in (("old (frozen loop)", ReferenceEngine), ("new", TorchEngine)):
                engine = cls(loaded, max_batch_size=64)
                engine.stats = DecodeStats()
                with _CountOps() as count:
                    engine.generate(reqs)
                per_fwd[name] = count.ops / engine.stats.forwards
                ratio = per_fwd["old (frozen loop)"] / per_fwd[name]
                print(f"{name:<20}{batch:>6}{engine.stats.forwards:>10}{per_fwd[name]:>13.1f}{ratio:>9.3f}")


if __name__ == "__main__":
    main()
