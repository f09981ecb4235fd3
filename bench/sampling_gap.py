"""What the sampling mismatch did: trainer vs engine log-probs at DiRL's setting (temperature 1, top-k 50).

    python bench/sampling_gap.py [--model DIR] [--prompts 8] [--n 4] [--max-new-tokens 32] [--sharpen 1,4,16]

The torch engine samples with logprobs on and records each token's log-prob under its sampling distribution.
The trainer then computes the same tokens' log-probs on the same weights two ways: the old one (temperature 1
over the whole vocabulary, what ``TokenLogProbs`` did before ``shared.model.sampling``) and the new one (each sample's
own settings through the shared transform). Per token, gap = trainer - engine and w = exp(gap) is the importance
weight pi_prox / pi_behav the decoupled objective would apply on-policy (it should be 1). The table shows, per
model and way, the mean and max |gap| and the spread of w (mean, std, min, max, share outside DiRL's clip range
[0.8, 1.2]). ``--sharpen`` multiplies the LM head by each factor (random weights are nearly uniform; a trained
model is peakier, so less mass falls outside the top 50). Without ``--model`` the tiny preset is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import tempfile
from pathlib import Path

import torch

from services.rollout.engines.torch_engine import TorchEngine
from services.trainer.learner.policy import TokenLogProbs
from services.trainer.learner.trajectory import build_batch, rollout_trajectory
from shared.contracts.wire import GenerationRequest, SamplingParams
from shared.model.sdar import load_model
from shared.model.tiny import init_tiny

DIRL = {"temperature": 1.0, "top_k": 50}


def gaps(loaded, prompts: int, n: int, max_new_tokens: int, settings: dict) -> dict[str, list[float]]:
    """Per way ("old", "new"), trainer - engine log-prob of every sampled response token."""
    reqs = [
        GenerationRequest(prompt_ids=list(range(20 + 3 * i, 28 + 3 * i)),
                          params=SamplingParams(seed=i, n=n, max_new_tokens=max_new_tokens, stop_token_ids=[],
                                                logprobs=True, **settings))
        for i in range(prompts)
    ]  # fmt: skip
    rollouts = [r for g in TorchEngine(loaded).generate(reqs) for r in g]
    engine = [lp for r in rollouts for lp in r.logprobs]
    batch = build_batch([rollout_trajectory(r) for r in rollouts], loaded.spec.mask_token_id)
    starts = [0]
    for r in rollouts[:-1]:
        starts.append(starts[-1] + len(r.token_ids))
    at = torch.tensor(starts)[batch.response_index] + batch.token_index
    policy = TokenLogProbs(loaded.model).eval()
    out = {}
    for way in ("old", "new"):
        b = batch
        if way == "old":
            b = dataclasses.replace(batch, temperature=torch.ones_like(batch.temperature),
                                    top_k=torch.zeros_like(batch.top_k), top_p=torch.ones_like(batch.top_p))  # fmt: skip
        with torch.no_grad():
            lp = policy(b).double()
        flat = torch.empty(len(engine), dtype=torch.float64)
        flat[at] = lp
        out[way] = [t - e for t, e in zip(flat.tolist(), engine, strict=True)]
    return out


def summary(gap: list[float]) -> dict[str, float]:
    w = [math.exp(g) for g in gap]
    return {
        "tokens": len(gap),
        "gap_mean": statistics.fmean(abs(g) for g in gap),
        "gap_max": max(abs(g) for g in gap),
        "w_mean": statistics.fmean(w),
        "w_std": statistics.pstdev(w),
        "w_min": min(w),
        "w_max": max(w),
        "w_out_clip": sum(not 0.8 <= x <= 1.2 for x in w) / len(w),
    }


def table(rows: list[tuple[str, str, dict[str, float]]]) -> str:
    head = (f"{'model':<14} {'trainer':<26} {'tokens':>6} {'mean|gap|':>10} {'max|gap|':>10} {'w mean':>8} "
            f"{'w std':>9} {'w min':>8} {'w max':>8} {'w out [.8,1.2]':>14}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for model, way, s in rows:
        lines.append(f"{model:<14} {way:<26} {s['tokens']:>6} {s['gap_mean']:>10.2e} {s['gap_max']:>10.2e} "
                     f"{s['w_mean']:>8.4f} {s['w_std']:>9.2e} {s['w_min']:>8.4f} {s['w_max']:>8.4f} "
                     f"{s['w_out_clip']:>14.1%}")  # fmt: skip
    return "\n".join(lines)


WAYS = {"old": "old: T 1, whole vocabulary", "new": "new: shared transform"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="an SDAR-layout model folder; default: the tiny preset")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--sharpen", default="1,4,16", help="comma-separated LM-head factors")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or init_tiny(Path(tmp), seed=0)
        rows = []
        for factor in (float(x) for x in args.sharpen.split(",")):
            loaded = load_model(model_dir)
            with torch.no_grad():
                loaded.model.lm_head.weight.mul_(factor)
            g = gaps(loaded, args.prompts, args.n, args.max_new_tokens, DIRL)
            name = "tiny" if args.model is None else args.model.name
            rows += [(f"{name} x{factor:g}", WAYS[way], summary(g[way])) for way in ("old", "new")]
    print(f"DiRL's setting: temperature {DIRL['temperature']}, top-k {DIRL['top_k']}; w = exp(trainer - engine)")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
