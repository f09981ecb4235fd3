# ruff: noqa: T201 - a report printed to the terminal
"""CUDA check of the torch reference engine and the trainer: one prepared call on a GPU box (< 4 min).

Stages, each PASS / FAIL / SKIP, saved to OUT/cuda_check.json as they finish:

  engine     the cached, batched engine on CUDA (fp32) == the naive recompute decoder on CUDA: tokens and step
             maps identical, log-probs within 1e-4, for 20 mixed requests (P % B != 0, stops, tails)
  cpu_cuda   the same requests on CPU: share of rollouts identical to the CUDA run (sampling draws its uniforms
             on the CPU, so only float rounding can split them)
  flex       FlexAttention training masks on CUDA: packed flex == packed sdpa == per-round sdpa == the engine's
             unmask-time log-probs (fp32, 1e-4), and flex gradients == sdpa gradients (relative 1e-4)
  learn      the whole loop on CUDA with the trainer's defaults (bf16, flex): engine rollouts -> GTPO steps raise
             the share of even token ids (the CPU test test_gtpo_learns_a_reward_the_model_can_reach)
  speed      engine tokens/s on CUDA: naive vs cached batch 1 vs cached batch 64; packed vs per-round training
             step (forward + backward); medians of 3

Run: `PYTHONPATH=. python scripts/cuda_check.py --out OUT` (pydantic must be importable).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test oracles

from scripts.check_report import Report, finish
from services.rollout.engines.reference import naive_generate
from services.rollout.engines.torch_engine import TorchEngine
from services.trainer.learner.policy import TokenLogProbs
from services.trainer.learner.trajectory import build_batch, rollout_trajectory
from shared.contracts.wire import GenerationRequest, SamplingParams, StepBatch
from shared.model.sdar import load_model
from shared.model.tiny import init_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from oracles.per_round import per_round_batch


def sharpened(path: Path, device: str, dtype=torch.float32):
    """The tiny model with logits x8, so the dynamic rule unmasks several tokens per step (as in the CPU tests)."""
    loaded = load_model(path, dtype=dtype, device=device)
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(8.0)
    return loaded


def requests() -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(20):
        prompt = torch.randint(0, 250, (int(torch.randint(1, 15, (1,), generator=g)),), generator=g).tolist()
        params = SamplingParams(seed=i, max_new_tokens=int(torch.randint(5, 23, (1,), generator=g)),
                                confidence_threshold=0.02, stop_token_ids=[257], logprobs=True)  # fmt: skip
        out.append(GenerationRequest(prompt_ids=prompt, params=params))
    return out


def same_rollouts(a, b, tol: float) -> tuple[int, float]:
    """(identical rollouts by tokens and steps, max log-prob gap among them)."""
    n, gap = 0, 0.0
    for x, y in zip(a, b, strict=True):
        if (x.token_ids, x.step_map, x.tail_ids, x.tail_steps) == (y.token_ids, y.step_map, y.tail_ids, y.tail_steps):
            n += 1
            gap = max([gap] + [abs(p - q) for p, q in zip(x.logprobs, y.logprobs, strict=True)])
    return n, gap


def logprobs(model, trajs, mask_id: int, layout: str, attention: str) -> torch.Tensor:
    dev = next(model.parameters()).device
    batch = (build_batch if layout == "packed" else per_round_batch)(trajs, mask_id).to(dev)
    lp = TokenLogProbs(model, attention=attention)(batch)
    return lp[batch.canonical_order().to(dev)]


def median_s(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def flex_stage(rep: Report, cuda, cached, dev: str) -> bool:
    trajs = [rollout_trajectory(r) for r in cached]
    mask_id = cuda.spec.mask_token_id
    model = cuda.model
    with torch.no_grad():
        flex = logprobs(model, trajs, mask_id, "packed", "flex")
        model.set_attn_implementation("sdpa")
        sdpa = logprobs(model, trajs, mask_id, "packed", "sdpa")
        per_round = logprobs(model, trajs, mask_id, "per_round", "sdpa")
    engine_lp = torch.tensor([x for r in cached for x in r.logprobs], device=dev)
    gaps = {"flex_vs_sdpa": (flex - sdpa).abs().max().item(), "packed_vs_per_round": (sdpa - per_round).abs().max().item(),
            "flex_vs_engine": (flex - engine_lp).abs().max().item()}  # fmt: skip
    adv = torch.randn(len(cached), generator=torch.Generator().manual_seed(1)).to(dev)
    grads = {}
    for attention in ("flex", "sdpa") if dev == "cuda" else ():  # FlexAttention has no CPU backward
        model.zero_grad()
        dev_batch = build_batch(trajs, mask_id).to(dev)
        lp = TokenLogProbs(model, attention=attention)(dev_batch)
        (-(adv[dev_batch.response_index] * lp).mean()).backward()
        grads[attention] = torch.cat([p.grad.flatten() for p in model.parameters()])
        model.set_attn_implementation("sdpa")
    model.zero_grad()
    grad_rel = ((grads["flex"] - grads["sdpa"]).norm() / grads["sdpa"].norm()).item() if grads else 0.0
    ok = max(gaps.values()) <= 1e-4 and grad_rel <= 1e-4
    rep.stage("flex", ok, targets=len(flex), grad_relative=grad_rel, **gaps)
    return ok


def run(args) -> Report:
    rep = Report(Path(args.out), "cuda_check")
    dev = args.device
    rep.data["env"] = {
        "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    import transformers

    rep.data["env"]["transformers"] = transformers.__version__
    print("env", rep.data["env"], flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="gtpo-cuda-check-"))
    path = init_tiny(tmp / "tiny", seed=0)
    reqs = requests()

    # engine: cached == naive on CUDA
    cuda = sharpened(path, dev)
    t = time.monotonic()
    cached = [r for (r,) in TorchEngine(cuda).generate(reqs)]
    naive = [r for (r,) in naive_generate(cuda, reqs)]
    n, gap = same_rollouts(cached, naive, 1e-4)
    tokens = sum(len(r.step_map) + len(r.tail_steps) for r in cached)
    steps = sum(max(r.step_map + r.tail_steps) for r in cached)
    rep.stage("engine", n == len(reqs) and gap <= 1e-4, identical=f"{n}/{len(reqs)}", max_logprob_gap=gap,
              tokens_per_step=round(tokens / steps, 3), stops=sum(r.finish_reason == "stop" for r in cached),
              seconds=round(time.monotonic() - t, 1))  # fmt: skip

    # cpu_cuda: same seeds on the CPU
    cpu = [r for (r,) in TorchEngine(sharpened(path, "cpu")).generate(reqs)]
    n_cpu, gap_cpu = same_rollouts(cpu, cached, 1e-4)
    rep.stage("cpu_cuda", n_cpu >= len(reqs) - 2, identical=f"{n_cpu}/{len(reqs)}", max_logprob_gap=gap_cpu)

    # flex: training masks on CUDA
    flex_ok = False
    try:
        flex_ok = flex_stage(rep, cuda, cached, dev)
    except Exception as exc:  # reported; the trainer check below then falls back to sdpa
        traceback.print_exc()
        rep.stage("flex", False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    cuda.model.set_attn_implementation("sdpa")

    # learn: the trainer's CUDA defaults (bf16 autocast, flex) learn a reachable reward
    from services.trainer.config import OptimConfig, TrainerConfig
    from services.trainer.learner.trainer import Learner

    t = time.monotonic()
    attention = "auto" if flex_ok or dev != "cuda" else "sdpa"
    trainer = Learner(TrainerConfig(model=path, output_dir=tmp / "run", micro_batch_size=64, attention=attention,
                                        optim=OptimConfig(lr=1e-3)))  # fmt: skip
    engine = TorchEngine(trainer.loaded)
    means = []
    for step in range(10):
        batch = [GenerationRequest(prompt_ids=list(range(30 + i, 40 + i)),
                                   params=SamplingParams(seed=100 * step + i, n=8, max_new_tokens=8, stop_token_ids=[]))
                 for i in range(8)]  # fmt: skip
        trainer.policy.eval()
        groups = engine.generate(batch)
        rewards = [[sum(tok % 2 == 0 for tok in r.token_ids) / len(r.token_ids) for r in g] for g in groups]
        means.append(round(sum(map(sum, rewards)) / 64, 3))
        trainer.policy.train()
        metrics = trainer.rl_step(StepBatch.of(groups, rewards))
    saved = trainer.save()
    rep.stage("learn", sum(means[-3:]) / 3 > means[0] + 0.2, reward_by_step=means, last_loss=metrics.get("loss"),
              mixed_precision=trainer.accelerator.mixed_precision, attention=trainer.unwrapped.attention,
              checkpoint=saved.name, seconds=round(time.monotonic() - t, 1))  # fmt: skip

    if dev != "cuda":
        rep.stage("speed", None, reason="CUDA only")
        return rep

    # speed: decoding and the packed training step
    plain = load_model(path, dtype=torch.bfloat16, device="cuda")
    prompt = list(range(3, 131))
    gen = lambda n: [GenerationRequest(prompt_ids=prompt, params=SamplingParams(seed=i, max_new_tokens=128,  # noqa: E731
                                       stop_token_ids=[])) for i in range(n)]  # fmt: skip
    eng = TorchEngine(plain, max_batch_size=64)
    eng.generate(gen(2))  # warm-up
    naive_s = median_s(lambda: naive_generate(plain, gen(1)))
    one_s = median_s(lambda: eng.generate(gen(1)))
    many_s = median_s(lambda: eng.generate(gen(64)))
    train = load_model(path, device="cuda")
    trajs = [rollout_trajectory(r) for (r,) in TorchEngine(train).generate(gen(16))]

    def step(layout: str) -> None:
        lp = logprobs(train.model, trajs, train.spec.mask_token_id, layout, "flex" if flex_ok else "sdpa")
        lp.mean().backward()

    step("packed"), step("per_round")  # compile / warm-up
    packed_s, per_round_s = median_s(lambda: step("packed")), median_s(lambda: step("per_round"))
    rep.stage("speed", True, naive_tok_s=round(128 / naive_s, 1),
              cached_b1_tok_s=round(128 / one_s, 1), cached_b64_tok_s=round(64 * 128 / many_s, 1),
              cached_b1_x_naive=round(naive_s / one_s, 2), b64_x_b1=round(one_s * 64 / many_s, 2),
              train_packed_ms=round(packed_s * 1e3, 1), train_per_round_ms=round(per_round_s * 1e3, 1),
              packed_x_per_round=round(per_round_s / packed_s, 2))  # fmt: skip
    return rep


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="build/cuda_check_out")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the first four stages")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    return finish(run, args)


if __name__ == "__main__":
    sys.exit(main())
