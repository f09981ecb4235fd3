"""Training forward+backward: the packed layout (one forward per response) against the per-round layout (one forward
per round, as TraceRL / DiRL do), with equal gradients checked in the same run.

    python bench/train_step.py [--lengths 128,512] [--responses 4] [--repeats 3] [--threads 2]

Trajectories are synthetic (tiny preset, B=4): prompt and response of the given length, each block decoded in a
random number (1-4) of steps, as the dynamic strategy does. Prints the median forward+backward time, the tokens
each layout processes per response, the speed-up and the relative gradient difference.
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

from oracles.per_round import per_round_batch

from services.trainer.learner.policy import TokenLogProbs
from services.trainer.learner.trajectory import build_batch, rollout_trajectory
from shared.contracts.wire import Rollout, SamplingParams
from shared.model.sdar import load_model
from shared.model.tiny import init_tiny

B = 4


def synthetic_rollout(
    prompt_len: int, response_len: int, gen: torch.Generator, block: int = B, steps_per_block: int | None = None
) -> Rollout:
    """A rollout whose blocks each took 1-`block` denoising steps at random, or `steps_per_block` each (capped by
    the block's width), on the absolute block grid (prompt tail included)."""
    prompt = torch.randint(0, 250, (prompt_len,), generator=gen).tolist()
    tokens = torch.randint(0, 250, (response_len,), generator=gen).tolist()
    steps, step, pos = [], 0, prompt_len
    while len(steps) < response_len:
        width = min(block - pos % block, response_len - len(steps))
        if steps_per_block is None:
            n_steps = int(torch.randint(1, width + 1, (1,), generator=gen))
        else:
            n_steps = min(width, steps_per_block)
        # each of the block's steps unmasks at least one token, in a random order
        assign = torch.cat([torch.arange(n_steps), torch.randint(0, n_steps, (width - n_steps,), generator=gen)])
        assign = assign[torch.randperm(width, generator=gen)]
        steps += (step + 1 + assign).tolist()
        step += n_steps
        pos += width
    params = SamplingParams(block_size=block, max_new_tokens=response_len, stop_token_ids=[]).resolved(block, [])
    return Rollout(prompt_ids=prompt, token_ids=tokens, step_map=steps, finish_reason="length", params=params, seed=0)


def fwd_bwd(policy: TokenLogProbs, batch, adv: torch.Tensor) -> tuple[float, torch.Tensor]:
    policy.zero_grad()
    t0 = time.perf_counter()
    logp = policy(batch)
    (-(adv[batch.response_index] * logp).sum() / len(logp)).backward()
    secs = time.perf_counter() - t0
    return secs, torch.cat([p.grad.flatten() for p in policy.parameters()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="128,512", help="prompt = response length, comma separated")
    ap.add_argument("--responses", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        init_tiny(tmp, seed=0)
        loaded = load_model(tmp)
        policy = TokenLogProbs(loaded.model)
        for length in [int(x) for x in args.lengths.split(",")]:
            trajs = [rollout_trajectory(synthetic_rollout(length, length, gen)) for _ in range(args.responses)]
            adv = torch.randn(args.responses, generator=gen)
            res = {}
            for layout in ("per_round", "packed"):
                batch = (build_batch if layout == "packed" else per_round_batch)(trajs, loaded.spec.mask_token_id)
                times, grad = [], None
                for _ in range(args.repeats):
                    secs, grad = fwd_bwd(policy, batch, adv)
                    times.append(secs)
                res[layout] = (statistics.median(times), int(batch.valid.sum()) / args.responses, grad)
            diff = float((res["packed"][2] - res["per_round"][2]).norm() / res["per_round"][2].norm())
            rounds = sum(len(t.rounds) for t in trajs) / len(trajs)
            rows.append((length, rounds, res, diff))
    print(f"tiny preset, B={B}, {args.responses} responses, {args.threads} threads, median of {args.repeats}")
    print(
        f"{'prompt=resp':>11}{'rounds':>8}{'layout':>11}{'fwd+bwd s':>11}{'tokens/resp':>13}{'speed-up':>10}{'grad rel diff':>15}"
    )
    for length, rounds, res, diff in rows:
        base = res["per_round"][0]
        for layout in ("per_round", "packed"):
            secs, toks, _ = res[layout]
            extra = f"{diff:>15.1e}" if layout == "packed" else ""
            print(f"{length:>11}{rounds:>8.1f}{layout:>11}{secs:>11.3f}{toks:>13.0f}{base / secs:>10.2f}{extra}")


if __name__ == "__main__":
    main()
