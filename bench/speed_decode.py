"""Wall-clock of a speed-trained model: decode the held-out prompts with two checkpoints in the same process.

    python bench/speed_decode.py --base runs/x/rl/checkpoints/step-00000060/model \
        --fast runs/x/rl_gated/checkpoints/step-00000060/model --data runs/x/data/test.json \
        [--k 16] [--max-new-tokens 16] [--repeats 3] [--threads 2] [--raw] [--device auto]

Tokens per denoising step is a proxy; this measures what the user buys: generated tokens per second (median of the
repeats; the two models alternate within each repeat so drift hits both) and (batched) model forwards per generated token,
with the fast model's ratio against the base. Same prompts, same sampling (the evaluation's: T = 1, dynamic
unmasking at threshold 0.9), same seeds, same batch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from services.eval.evaluate import load_rows
from services.rollout.engines.torch_engine import DecodeStats, TorchEngine
from shared.contracts.wire import GenerationRequest, SamplingParams
from shared.model.step_map import tokens_per_step
from shared.prompts import encode_prompt


def _requests(engine: TorchEngine, rows: list[dict], template: str, chat: bool, params: SamplingParams):
    return [GenerationRequest(prompt_ids=encode_prompt(engine.tokenizer, template.format(question=r["question"]),
                                                       chat=chat), params=params) for r in rows]  # fmt: skip


def _decode(engine: TorchEngine, reqs: list[GenerationRequest]) -> tuple[float, DecodeStats, float]:
    """Seconds, counters and mean tokens per denoising step of one pass over `reqs`."""
    engine.stats = DecodeStats()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    groups = engine.generate(reqs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    tps = [tokens_per_step(len(r.token_ids), r.step_map) for g in groups for r in g if r.token_ids]
    return secs, engine.stats, statistics.fmean(tps) if tps else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, required=True, help="the reference model (e.g. GTPO's last checkpoint)")
    ap.add_argument("--fast", type=Path, required=True, help="the speed-trained model")
    ap.add_argument("--data", required=True, help="held-out rows {question, ground_truth_answer} (JSON / JSONL)")
    ap.add_argument("--k", type=int, default=16, help="samples per question (the evaluation's avg@k)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None, help="first N questions only")
    ap.add_argument("--template", default="{question}")
    ap.add_argument("--raw", action="store_true", help="no chat template (the demo's models)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto", help="auto|cpu|cuda")
    ap.add_argument(
        "--batch",
        type=int,
        default=64,
        help="sequences decoded together (1: a lone request's latency, where "
        "forwards per token = 1 / tokens per step; a batch steps until its slowest sequence finishes a block)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = load_rows(args.data)[: args.limit]
    params = SamplingParams(n=args.k, max_new_tokens=args.max_new_tokens, seed=1)
    engines = {name: TorchEngine.from_pretrained(path, max_batch_size=args.batch, device=args.device)
               for name, path in (("base", args.base), ("fast", args.fast))}  # fmt: skip
    reqs = {name: _requests(e, rows, args.template, not args.raw, params) for name, e in engines.items()}
    for name, e in engines.items():  # warm-up: allocator, kernels, caches
        _decode(e, reqs[name][:2])
    runs: dict[str, list[tuple[float, DecodeStats, float]]] = {name: [] for name in engines}
    for i in range(args.repeats):
        order = list(engines) if i % 2 == 0 else list(reversed(engines))
        for name in order:
            runs[name].append(_decode(engines[name], reqs[name]))
    table = {}
    for name, rs in runs.items():
        secs = statistics.median(r[0] for r in rs)
        stats = rs[-1][1]  # same seeds: every repeat decodes the same tokens
        table[name] = (stats.tokens / secs, stats.forwards / max(stats.tokens, 1), rs[-1][2], stats.tokens)
    b = table["base"]
    print(f"{len(rows)} questions x {args.k} samples, {args.max_new_tokens} new tokens, batch {args.batch}, device "
          f"{args.device}, {args.threads} threads, median of {args.repeats}")  # fmt: skip
    print(
        f"{'model':<6}{'tokens':>9}{'tokens/s':>11}{'fwd/token':>11}{'tok/step':>10}{'x tokens/s':>12}{'x fwd/token':>13}"
    )
    for name, (tps, fpt, tpstep, tokens) in table.items():
        print(f"{name:<6}{tokens:>9}{tps:>11.1f}{fpt:>11.3f}{tpstep:>10.2f}{tps / b[0]:>12.2f}{fpt / b[1]:>13.3f}")


if __name__ == "__main__":
    main()
