# ruff: noqa: T201 - a report printed to the terminal
"""LMDeploy GPU check: step maps from LMDeploy's dLLM engine on a tiny SDAR, checked against the trainer.

Run by scripts/gpu_check.sh on a CUDA box (one call, < 10 min). Stages, each reported PASS / FAIL / SKIP and
saved to OUT/gpu_check.json as it finishes (a timeout still leaves the finished stages):

  rl        dynamic 0.9, T=1, n=4, mixed prompt lengths (len % 4 = 0, 1, 3): contract (len(step_map) = tokens,
            steps >= 1, monotone by block, tail inside the last block) and sample diversity per prompt
  greedy    T=0: the trainer's packed forward recomputes every token at its step; argmax agreement and log-probs
  stop      a stop id seen in the greedy run: cut at its first occurrence, consistent with the greedy run
  weights   v1 in place (or rebuilt), then v0 again: greedy output back to the first run's
  sequential  strategy sequential, 4 steps per block of 4: steps are 1..n
  tau0      dynamic with threshold 0: step = block ordinal (the KV-store pass is not counted)
  graphs    rl, greedy and weights again with CUDA graphs (eager_mode=False), if time is left

`--engine torch` runs the same stages with the torch reference engine on CPU: a dry run of this script.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test oracles

from oracles import lmdeploy_sim

from scripts.check_report import Report, finish
from services.rollout.engines import lmdeploy_patch as lp
from services.rollout.engines.lmdeploy_engine import LMDeployEngine, LMDeployOptions
from services.trainer.learner.policy import TokenLogProbs
from services.trainer.learner.trajectory import build_batch, rollout_trajectory
from shared.contracts.wire import GenerationRequest, SamplingParams
from shared.model.masks import square_mask, to_additive
from shared.model.sdar import load_model, save_model
from shared.model.tiny import init_tiny_sdar

B = 4
PROMPT_LENGTHS = [8, 9, 11, 4, 5, 7, 12, 15]  # len % 4 = 0, 1, 3, 0, 1, 3, 0, 3
SHARPEN = 30.0  # LM head scale: confident enough for multi-token steps and stable argmax, still diverse at T=1


def make_checkpoint(out: Path, seed: int) -> Path:
    """tiny-sdar (byte tokenizer, mask 259 via our patch), LM head sharpened, saved in bf16."""
    init_tiny_sdar(out, seed=seed, block_size=B)
    loaded = load_model(out)
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(SHARPEN)
    loaded.model.to(torch.bfloat16)
    return save_model(loaded.model, loaded.tokenizer, loaded.spec, out)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 250, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def contract_problems(rollouts) -> list[str]:
    bad = []
    for r in rollouts:
        p, b = r.params, r.params.block_size
        if len(r.step_map) != len(r.token_ids) or min(r.step_map) < 1:
            bad.append(f"lengths/steps {r.token_ids} {r.step_map}")
        if (len(r.prompt_ids) + len(r.token_ids) + len(r.tail_ids)) % b or len(r.tail_ids) >= b:
            bad.append(f"tail {len(r.prompt_ids)} + {len(r.token_ids)} + {len(r.tail_ids)}")
        stops = set(p.stop_token_ids)
        if stops & set(r.token_ids[:-1]) or (r.finish_reason == "stop") != (r.token_ids[-1] in stops):
            bad.append(f"stop cut {r.token_ids} {r.finish_reason}")
        if r.finish_reason == "length" and len(r.token_ids) != p.max_new_tokens:
            bad.append(f"length {len(r.token_ids)} != {p.max_new_tokens}")
    return bad  # monotone-by-block is enforced by Rollout validation itself


@torch.no_grad()
def trainer_agreement(trainer, rollouts) -> dict:
    """The trainer's packed forward at each token's step: argmax == the greedy token? and its log-prob."""
    dev = next(trainer.model.parameters()).device
    trajs = [rollout_trajectory(r) for r in rollouts]
    batch = build_batch(trajs, trainer.spec.mask_token_id).to(dev)
    logp = TokenLogProbs(trainer.model)(batch)
    body = trainer.model.model
    mask = to_additive(square_mask(batch.position_ids, batch.copy_ids, batch.block_size, batch.valid), torch.float32)
    hidden = body(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask, use_cache=False)
    h = hidden.last_hidden_state.reshape(-1, hidden.last_hidden_state.shape[-1])[batch.target_index]
    logits = trainer.model.lm_head(h).float()
    best = logits.log_softmax(-1).max(-1).values
    agree = (logits.argmax(-1) == batch.labels).float()
    return {
        "targets": len(batch.labels),
        "argmax_agreement": round(float(agree.mean()), 4),
        "mean_logprob": round(float(logp.mean()), 4),
        "max_gap_to_best_logprob": round(float((best - logp).max()), 4),
        "rounds": sum(len(t.rounds) for t in trajs),
        "tokens_per_step": round(
            sum(len(r.step_map) + len(r.tail_steps) for r in rollouts)
            / sum(max(r.step_map + r.tail_steps) for r in rollouts),
            3,
        ),
    }


def make_engine(kind: str, path: Path, eager: bool = True):
    if kind == "torch":
        from services.rollout.engines.torch_engine import TorchEngine

        return TorchEngine.from_pretrained(path, max_batch_size=16)
    opts = LMDeployOptions(max_batch_size=16, eager_mode=eager, num_gpu_blocks=512, session_len=2048)
    return LMDeployEngine(path, options=opts)


def run(args) -> Report:
    rep = Report(Path(args.out), "gpu_check")
    t0 = time.monotonic()
    left = lambda: args.budget_s - (time.monotonic() - t0)  # noqa: E731
    import lmdeploy

    rep.data["env"] = {
        "engine": args.engine,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lmdeploy": lmdeploy.__version__,
        "python": sys.version.split()[0],
    }
    print("env", rep.data["env"], flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="gtpo-gpu-check-"))
    v0, v1 = make_checkpoint(tmp / "v0", 0), make_checkpoint(tmp / "v1", 1)
    t = time.monotonic()
    info = lp.apply_patch()
    lmdeploy_sim.self_check()
    rep.stage("patch", True, fixes=info.fixes, self_check_s=round(time.monotonic() - t, 2))

    t = time.monotonic()
    eng = make_engine(args.engine, v0)
    rep.stage("build", True, seconds=round(time.monotonic() - t, 1), settings=str(getattr(eng, "settings", None)))
    trainer = load_model(v0, dtype=torch.float32, device="cuda" if torch.cuda.is_available() else "cpu")
    ps = prompts()
    try:
        # rl: the RL default
        t = time.monotonic()
        params = SamplingParams(n=4, seed=7, max_new_tokens=30, stop_token_ids=[])
        out = eng.generate([GenerationRequest(prompt_ids=p, params=params) for p in ps])
        flat = [r for g in out for r in g]
        distinct = [len({tuple(r.token_ids) for r in g}) for g in out]
        tokens = sum(len(r.step_map) + len(r.tail_steps) for r in flat)
        steps = sum(max(r.step_map + r.tail_steps) for r in flat)
        bad = contract_problems(flat)
        rep.stage(
            "rl",
            not bad and sum(d > 1 for d in distinct) >= len(distinct) - 2,  # shared seeds: every group identical
            rollouts=len(flat),
            seconds=round(time.monotonic() - t, 1),
            tokens_per_step=round(tokens / steps, 3),
            distinct_samples_per_prompt=distinct,
            problems=bad[:5],
        )

        # greedy + the trainer's packed forward
        greedy = SamplingParams(temperature=0, max_new_tokens=24, stop_token_ids=[])
        reqs = [GenerationRequest(prompt_ids=p, params=greedy) for p in ps]
        g0 = [g[0] for g in eng.generate(reqs)]
        agreement = trainer_agreement(trainer, g0)
        rep.stage("greedy", agreement["argmax_agreement"] >= 0.95 and not contract_problems(g0), **agreement)

        # stop: the most common generated id, then the same greedy requests cut at its first occurrence
        counts: dict[int, int] = {}
        for r in g0:
            for tok in r.token_ids:
                counts[tok] = counts.get(tok, 0) + 1
        stop_id = max(counts, key=counts.get)
        stop_params = greedy.model_copy(update={"stop_token_ids": [stop_id]})
        cut = [g[0] for g in eng.generate([GenerationRequest(prompt_ids=p, params=stop_params) for p in ps])]
        consistent = 0
        for full, c in zip(g0, cut, strict=True):
            if stop_id in full.token_ids:
                k = full.token_ids.index(stop_id) + 1
                end = (len(full.prompt_ids) + k + B - 1) // B * B - len(full.prompt_ids)
                seq, steps_ = full.token_ids + full.tail_ids, full.step_map + full.tail_steps
                consistent += (c.token_ids, c.step_map, c.tail_ids, c.tail_steps, c.finish_reason) == (
                    seq[:k],
                    steps_[:k],
                    seq[k:end],
                    steps_[k:end],
                    "stop",
                )
            else:
                consistent += c.token_ids == full.token_ids and c.finish_reason == "length"
        bad = contract_problems(cut)
        rep.stage(
            "stop",
            not bad and sum(c.finish_reason == "stop" for c in cut) > 0,
            stop_id=stop_id,
            stopped=sum(c.finish_reason == "stop" for c in cut),
            consistent_with_greedy_run=f"{consistent}/{len(cut)}",
            problems=bad[:5],
        )

        # weights: v1, then v0 again
        t = time.monotonic()
        before = getattr(eng, "_ae", None)
        eng.load_weights(v1, 1)
        in_place = before is not None and getattr(eng, "_ae", None) is before
        g1 = [g[0] for g in eng.generate(reqs)]
        eng.load_weights(v0, 2)
        g2 = [g[0] for g in eng.generate(reqs)]
        same = sum(a.token_ids == b.token_ids and a.step_map == b.step_map for a, b in zip(g0, g2, strict=True))
        changed = sum(a.token_ids != b.token_ids for a, b in zip(g0, g1, strict=True))
        rep.stage(
            "weights",
            same == len(g0) and changed > 0 and g2[0].policy_version == 2 and g1[0].policy_version == 1,
            in_place=in_place,
            seconds=round(time.monotonic() - t, 1),
            v1_changed=f"{changed}/{len(g0)}",
            v0_again_identical=f"{same}/{len(g0)}",
        )

        # sequential: 1..n
        if left() > 120:
            t = time.monotonic()
            seq_params = SamplingParams(strategy="sequential", seed=3, max_new_tokens=21, stop_token_ids=[])
            rs = [g[0] for g in eng.generate([GenerationRequest(prompt_ids=p, params=seq_params) for p in ps])]
            ok = all(r.step_map + r.tail_steps == list(range(1, len(r.step_map) + len(r.tail_steps) + 1)) for r in rs)
            rep.stage("sequential", ok and not contract_problems(rs), seconds=round(time.monotonic() - t, 1))
        else:
            rep.stage("sequential", None, reason="time")

        # tau0: block ordinal
        if left() > 100:
            t = time.monotonic()
            tau0 = SamplingParams(confidence_threshold=0.0, seed=4, max_new_tokens=21, stop_token_ids=[])
            rs = [g[0] for g in eng.generate([GenerationRequest(prompt_ids=p, params=tau0) for p in ps])]
            ok = all(
                r.step_map + r.tail_steps
                == [
                    (len(r.prompt_ids) + j) // B - len(r.prompt_ids) // B + 1
                    for j in range(len(r.step_map) + len(r.tail_steps))
                ]
                for r in rs
            )
            rep.stage("tau0", ok and not contract_problems(rs), seconds=round(time.monotonic() - t, 1))
        else:
            rep.stage("tau0", None, reason="time")
    finally:
        eng.close()

    # graphs: production runs with CUDA graphs
    if left() > 150 and not args.skip_graphs:
        t = time.monotonic()
        geng = make_engine(args.engine, v0, eager=False)
        try:
            out = geng.generate([GenerationRequest(prompt_ids=p, params=params) for p in ps])
            flat = [r for g in out for r in g]
            gg = [g[0] for g in geng.generate(reqs)]
            agreement = trainer_agreement(trainer, gg)
            bad = contract_problems(flat) + contract_problems(gg)
            # captured graphs must see weights loaded in place
            geng.load_weights(v1, 1)
            gv1 = [g[0] for g in geng.generate(reqs)]
            geng.load_weights(v0, 2)
            gv0 = [g[0] for g in geng.generate(reqs)]
            changed = sum(a.token_ids != b.token_ids for a, b in zip(gg, gv1, strict=True))
            same = sum(a.token_ids == b.token_ids for a, b in zip(gg, gv0, strict=True))
            rep.stage(
                "graphs",
                not bad and agreement["argmax_agreement"] >= 0.95 and changed > 0 and same == len(gg),
                seconds=round(time.monotonic() - t, 1),
                greedy_identical_to_eager=sum(a.token_ids == b.token_ids for a, b in zip(g0, gg, strict=True)),
                v1_changed=f"{changed}/{len(gg)}",
                v0_again_identical=f"{same}/{len(gg)}",
                **agreement,
            )
        finally:
            geng.close()
    else:
        rep.stage("graphs", None, reason="time or --skip-graphs")
    rep.data["seconds"] = round(time.monotonic() - t0, 1)
    rep.save()
    return rep


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="build/gpu_check_out")
    ap.add_argument("--budget-s", type=float, default=500.0, help="skip later stages past this many seconds")
    ap.add_argument("--skip-graphs", action="store_true")
    ap.add_argument("--engine", choices=["lmdeploy", "torch"], default="lmdeploy", help="torch: CPU dry run")
    args = ap.parse_args()
    if args.engine == "lmdeploy" and not torch.cuda.is_available():
        print("no CUDA device: the LMDeploy GPU check needs one", file=sys.stderr)
        return 2
    return finish(run, args)


if __name__ == "__main__":
    sys.exit(main())
