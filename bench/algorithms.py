"""Does exactness matter? GTPO against the approximate objectives of other diffusion-LM RL methods, everything else
held equal (issue 29).

    python bench/algorithms.py [--seeds 0,1,2] [--arms gtpo,gtpo_value,...] [--out runs/algorithms] [--quick]

Per seed: one tiny model, one SFT checkpoint (the demo's task and SFT recipe as `gtpo demo --task reasoning`: answers
always boxed, so the format is learned before RL and an RL gain is accuracy, and SFT stopped at 400 steps, short of
the model's capacity), then one RL run per arm from that checkpoint, in-process:
the torch engine samples from the trainer's own weights (on-policy, no weight transfer), the reward service's
answer checking scores, `Learner.rl_step` trains. Every arm gets the same prompts in the same order, the same
engine seeds, the same number of steps, rollouts and samples, the same learning rate and normalisation; the first
step's rollouts are identical across arms. No group is dropped or refilled (zero-variance groups get advantage 0),
so the budget is equal by construction. Only ``loss.estimator`` / ``shrink`` / ``value`` differ:

  gtpo         exact trajectory (shrink 1)           tracerl_s2 / tracerl_s4  TraceRL, steps merged by 2 / 4
  gtpo_value   gtpo + TraceRL's value model (GAE)    random_mask              d1 / diffu-GRPO
  coupled      DiffuCoder's coupled-GRPO             sft                      the SFT checkpoint itself (0 RL steps)

Reported per arm (mean over seeds): held-out avg@k with a 95% bootstrap interval over (seed, question) pairs,
accuracy of the boxed answers (correct / boxed samples), eval tokens per denoising step, trained target tokens per
RL step, wall seconds per RL step (generation and training), the advantage variance over target tokens (and, for
the value arm, the group baseline's on the same samples), and the gradient norm's mean and variance over steps
(the per-step gradient's spread; per-sample gradient variance would need a backward per sample). Writes
results.json, table.md and curves.png under --out. `--outcome-share` measures instead what any critic of the
denoising states could see of the outcome (`oracle_share`). `--quick`: one seed, 40 SFT and 2 RL steps, a small eval: a
smoke run of the plumbing, not a result (932 s on 2 cores shared with four other jobs; not timed on a quiet machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from services.demo.pipeline import REASONING  # noqa: E402  (the preset `gtpo demo --task reasoning` runs)

ARMS: dict[str, tuple[str, dict]] = {
    "sft": ("SFT (no RL)", {}),
    "gtpo": ("GTPO (exact)", {}),
    "gtpo_value": ("GTPO + value model", {"value": True}),
    "tracerl_s2": ("TraceRL shrink 2", {"loss": {"estimator": "tracerl_shrink"}, "shrink": 2}),
    "tracerl_s4": ("TraceRL shrink 4", {"loss": {"estimator": "tracerl_shrink"}, "shrink": 4}),
    "random_mask": ("random-mask (d1)", {"loss": {"estimator": "random_mask"}}),
    "coupled": ("coupled (DiffuCoder)", {"loss": {"estimator": "coupled"}}),
}
"""key -> (label, what the arm changes in the TrainerConfig); `sft` is the SFT checkpoint evaluated (0 RL steps)."""


@dataclass
class Setup:
    """The budget and task every arm shares."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    max_operand: int = 9
    ops: str = "+"
    boxed_rate: float = REASONING["boxed_rate"]
    n_train: int = 4000
    n_test: int = 200
    sft_steps: int = REASONING["sft_steps"]
    """stopped early on purpose: after 1000 steps the tiny model knows ~86% of these sums, and on a larger table
    (+ and -, or operands to 14) it is at capacity, where RL can only trade one fact for another (README)"""
    sft_lr: float = 3e-3
    rl_steps: int = REASONING["rl_steps"]
    prompts_per_step: int = REASONING["prompts_per_step"]
    """32 x 8 samples a step: with 16 the same 100 steps moved seed 1 by +0.6 points, with 200 steps of 16 by +10.3,
    with 100 of 32 by +15.7 (README)"""
    group_size: int = 8
    rl_lr: float = 5e-4
    rl_warmup: int = 0
    """linear warm-up of the RL learning rate, in steps (AdamW's first updates are ~lr per weight whatever the
    gradient's size)"""
    value_lr_ratio: float = 5.0  # TraceRL: value 5e-6 against policy 1e-6
    max_new_tokens: int = 16
    eval_k: int = 8
    threads: int = 2

    @classmethod
    def quick(cls) -> Setup:
        return cls(seeds=[0], n_train=500, n_test=24, sft_steps=40, rl_steps=2, prompts_per_step=4, group_size=4,
                   eval_k=2)  # fmt: skip


def trainer_config(setup: Setup, arm: str, model: Path, out: Path, seed: int):
    """The arm's TrainerConfig: the shared settings plus the arm's own (``ARMS``)."""
    from services.trainer.config import OptimConfig, TrainerConfig, ValueConfig

    change = dict(ARMS[arm][1])
    value = ValueConfig(lr=setup.rl_lr * setup.value_lr_ratio) if change.pop("value", False) else None
    return TrainerConfig(model=model, output_dir=out, seed=seed, optim=OptimConfig(lr=setup.rl_lr, warmup_steps=setup.rl_warmup),
                         micro_batch_size=64, keep_last=1, value=value, **change)  # fmt: skip


def prepare_seed(setup: Setup, seed: int, out: Path) -> tuple[Path, list[dict], list[dict]]:
    """The seed's task files and SFT checkpoint (reused when already there); returns (SFT model, train, test)."""
    from services.demo.tasks import TaskSpec, write_task
    from services.trainer.config import OptimConfig, SFTConfig
    from services.trainer.learner.checkpoint import checkpoint_name
    from services.trainer.learner.sft import run_sft
    from shared.model.tiny import init_tiny

    spec = TaskSpec(max_operand=setup.max_operand, ops=setup.ops, seed=seed, boxed_rate=setup.boxed_rate)
    data = write_task(out / "data", spec, setup.n_train, setup.n_test)
    model = out / "sft" / "checkpoints" / checkpoint_name(setup.sft_steps) / "model"
    if not model.exists():
        init_dir = init_tiny(out / "init", seed=seed)
        run_sft(SFTConfig(
            model=init_dir, output_dir=out / "sft", data=str(data["sft"]), steps=setup.sft_steps, batch_size=32,
            micro_batch_size=32, save_every=setup.sft_steps, chat_template=False, seed=seed,
            optim=OptimConfig(lr=setup.sft_lr, warmup_steps=20, schedule="cosine", total_updates=setup.sft_steps,
                              min_lr_ratio=0.1),
        ), progress=False)  # fmt: skip
    return model, json.loads(data["train"].read_text()), json.loads(data["test"].read_text())


def generate(engine, tokenizer, rows: list[dict], n: int, max_new_tokens: int, seed: int):
    """n samples per row (T=1, the demo's dynamic decoding), seeded per (seed, row)."""
    from shared.contracts.wire import GenerationRequest, SamplingParams
    from shared.prompts import encode_prompt

    reqs = [GenerationRequest(prompt_ids=encode_prompt(tokenizer, r["question"], chat=False),
                              params=SamplingParams(max_new_tokens=max_new_tokens, n=n, seed=seed * 100_003 + i))
            for i, r in enumerate(rows)]  # fmt: skip
    return engine.generate(reqs)


def held_out(engine, tokenizer, rows: list[dict], setup: Setup, pool, seed: int) -> dict:
    """Held-out metrics of the engine's current weights, with each question's accuracy and boxed / correct counts."""
    from services.eval.evaluate import result_of, score_questions

    questions, errors = score_questions(rows, generate(engine, tokenizer, rows, setup.eval_k, setup.max_new_tokens,
                                                       seed=10_000 + seed), pool)  # fmt: skip
    samples = [s for q in questions for s in q.samples]
    return {**result_of(questions, errors).row(), "per_question": [q.value("avg_at_k") for q in questions],
            "boxed": sum(s.boxed for s in samples), "correct": sum(s.correct for s in samples)}  # fmt: skip


def step_rows(setup: Setup, train: list[dict], step: int) -> list[dict]:
    """The prompts of RL step `step`: the same for every arm (and for `outcome_share`)."""
    start = (step * setup.prompts_per_step) % max(1, len(train) - setup.prompts_per_step)
    return train[start : start + setup.prompts_per_step]


def correctness(questions) -> list[list[float]]:
    """Per scored question, each sample's 0/1 reward (the maths answer right or not)."""
    return [[1.0 if s.correct else 0.0 for s in q.samples] for q in questions]


def run_arm(setup: Setup, arm: str, model: Path, train: list[dict], test: list[dict], out: Path, seed: int,
            pool) -> dict:  # fmt: skip
    """One RL run from the SFT checkpoint; returns its per-step metrics and final held-out evaluation."""
    import torch

    from services.eval.evaluate import score_questions
    from services.rollout.engines.torch_engine import TorchEngine
    from services.trainer.learner.trainer import Learner
    from shared.contracts.wire import StepBatch

    torch.manual_seed(seed)
    trainer = Learner(trainer_config(setup, arm, model, out, seed))
    engine = TorchEngine(trainer.loaded)  # the trainer's own module: every step samples the current weights
    tok = trainer.loaded.tokenizer
    steps = []
    for step in range(setup.rl_steps):
        rows = step_rows(setup, train, step)
        t0 = time.perf_counter()
        groups = generate(engine, tok, rows, setup.group_size, setup.max_new_tokens, seed=seed * 1_000 + step)
        t1 = time.perf_counter()
        questions, _ = score_questions(rows, groups, pool)
        rewards = correctness(questions)
        t2 = time.perf_counter()
        m = trainer.rl_step(StepBatch.of(groups, rewards))
        t3 = time.perf_counter()
        steps.append({k: m.get(k) for k in ("reward_mean", "loss", "tokens", "grad_norm", "adv_var", "adv_var_group",
                                            "value_loss", "clip_frac")}  # fmt: skip
                     | {"generate_s": t1 - t0, "score_s": t2 - t1, "train_s": t3 - t2})
    return {"arm": arm, "seed": seed, "steps": steps, "eval": held_out(engine, tok, test, setup, pool, seed)}


def cached_arm(setup: Setup, arm: str, model: Path, train: list[dict], test: list[dict], out: Path, seed: int,
               pool) -> dict:  # fmt: skip
    """`run_arm`, or its record when `out` holds one made with the same setup (seeds aside): a run split over
    processes (one `--seeds` each, same `--out`) is summarised by a last call naming every seed."""
    record = out / "arm.json"
    same = {k: v for k, v in asdict(setup).items() if k not in ("seeds", "arms", "threads")}
    if record.exists():
        saved = json.loads(record.read_text())
        if saved.get("setup") == same:
            print(f"seed {seed}: {ARMS[arm][0]} (finished: {record})", flush=True)
            return saved["run"]
    print(f"seed {seed}: {ARMS[arm][0]}", flush=True)
    budget = replace(setup, rl_steps=0) if arm == "sft" else setup
    result = run_arm(budget, arm, model, train, test, out, seed, pool)
    record.write_text(json.dumps({"setup": same, "run": result}))
    return result


def decided_after(rollouts, tokenizer) -> list[tuple[int, int]]:
    """Per rollout, (response tokens unmasked at a later denoising step than the response's last answer digit, all
    response tokens): only the states of the first kind can tell a critic whether the answer is right (README)."""
    out = []
    for r in rollouts:
        steps = [s for t, s in zip(r.token_ids, r.step_map, strict=True) if tokenizer.decode([t]).strip().isdigit()]
        after = sum(1 for s in r.step_map if s > max(steps)) if steps else 0
        out.append((after, len(r.step_map)))
    return out


def oracle_share(counts: list[tuple[int, int]], advantages: list[float]) -> float:
    """The share of the token advantage variance an oracle critic removes when it knows each response's advantage
    exactly from the moment its answer is complete (V = A on the `after` tokens, 0 before, as E[A] = 0 is all a
    state without the answer knows): sum(after * A^2) / sum(all * A^2), the group advantages having mean 0."""
    num = sum(a * x * x for (a, _), x in zip(counts, advantages, strict=True))
    den = sum(n * x * x for (_, n), x in zip(counts, advantages, strict=True))
    return num / den if den else 0.0


def outcome_share(setup: Setup, out: Path, steps: int = 10) -> dict[int, tuple[float, float]]:
    """Per seed, on the SFT model's samples of the first `steps` RL steps' prompts: (share of response tokens
    unmasked after the answer's last digit, `oracle_share` under the trainer's group advantage)."""
    import torch

    from services.eval.evaluate import score_questions
    from services.rollout.engines.torch_engine import TorchEngine
    from services.trainer.learner.objective import group_advantages
    from shared.model.sdar import load_model

    shares = {}
    with scorer(setup) as pool:
        for seed in setup.seeds:
            model, train, _ = prepare_seed(setup, seed, out / f"seed{seed}")
            loaded = load_model(model)
            engine, counts, advantages = TorchEngine(loaded), [], []
            for step in range(steps):
                rows = step_rows(setup, train, step)
                groups = generate(engine, loaded.tokenizer, rows, setup.group_size, setup.max_new_tokens,
                                  seed=seed * 1_000 + step)  # fmt: skip
                questions, _ = score_questions(rows, groups, pool)
                for g, reward in zip(groups, correctness(questions), strict=True):
                    advantages += group_advantages(torch.tensor([reward]))[0].tolist()
                    counts += decided_after(g, loaded.tokenizer)
            share = sum(a for a, _ in counts) / max(1, sum(n for _, n in counts))
            shares[seed] = (share, oracle_share(counts, advantages))
    return shares


def scorer(setup: Setup):
    """The answer checker every measurement here scores with; sets torch's threads first (one per process when
    seeds run side by side)."""
    import torch

    from services.reward.verify import VerifierPool

    torch.set_num_threads(setup.threads)
    return VerifierPool(workers=1, timeout_s=5.0)


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per arm over its seeds: held-out accuracy with a bootstrap interval over (seed, question), boxed accuracy,
    speed and variance figures (see the module docstring)."""
    from services.eval.metrics import bootstrap_ci

    out: dict[str, dict] = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == arm]
        steps = [s for r in mine for s in r["steps"]]
        per_q = [a for r in mine for a in r["eval"]["per_question"]]
        boxed = sum(r["eval"]["boxed"] for r in mine)
        grad = [s["grad_norm"] for s in steps if s["grad_norm"] is not None]
        group_var = [s["adv_var_group"] for s in steps if s.get("adv_var_group") is not None]
        mean = _mean_or_none
        out[arm] = {
            "label": ARMS[arm][0], "seeds": len(mine),
            "avg_at_k": statistics.fmean(per_q) if per_q else 0.0, "avg_at_k_ci": list(bootstrap_ci(per_q)),
            "avg_at_k_per_seed": [r["eval"]["avg_at_k"] for r in mine],
            "boxed_rate": statistics.fmean(r["eval"]["boxed_rate"] for r in mine),
            "boxed_accuracy": sum(r["eval"]["correct"] for r in mine) / boxed if boxed else 0.0,
            "eval_tokens_per_step": statistics.fmean(r["eval"]["tokens_per_step"] for r in mine),
            "train_tokens_per_step": mean([s["tokens"] for s in steps]),
            "train_s_per_step": mean([s["train_s"] for s in steps]),
            "rl_s_per_step": mean([s["generate_s"] + s["score_s"] + s["train_s"] for s in steps]),
            "adv_var": mean([s["adv_var"] for s in steps]),
            "adv_var_group": mean(group_var),
            "grad_norm_mean": mean(grad),
            "grad_norm_var": statistics.pvariance(grad) if len(grad) > 1 else None,
        }  # fmt: skip
    for arm, row in out.items():
        row["vs_gtpo"] = paired_change(runs, arm) if arm != "gtpo" else None
    return out


def paired_change(runs: list[dict], arm: str, base: str = "gtpo") -> dict | None:
    """`arm` - `base` held-out accuracy over the (seed, question) pairs both were evaluated on (each seed's arms share
    its held-out questions, in order), with a bootstrap interval of the paired differences; None without `base`."""
    mine = {r["seed"]: r["eval"]["per_question"] for r in runs if r["arm"] == arm}
    theirs = {r["seed"]: r["eval"]["per_question"] for r in runs if r["arm"] == base}
    diffs = [a - b for s in sorted(mine.keys() & theirs.keys()) for a, b in zip(mine[s], theirs[s], strict=True)]
    if not diffs:
        return None
    from services.eval.metrics import bootstrap_ci

    return {"mean": statistics.fmean(diffs), "ci": list(bootstrap_ci(diffs))}


def _mean_or_none(xs: list[float]) -> float | None:
    """The mean, or None for no values (the SFT row has no RL step)."""
    return statistics.fmean(xs) if xs else None


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(summary: dict[str, dict]) -> str:
    """The ablation table as Markdown."""
    head = ("| arm | seeds | avg@k (95% CI) | vs GTPO (paired 95% CI) | boxed acc. | boxed rate | eval tok/step "
            "| trained tok/step | train s/step | RL s/step | adv var (group) | grad norm mean / var |")  # fmt: skip
    lines = [head, "|" + "|".join(["---"] * 12) + "|"]
    for s in summary.values():
        lo, hi = s["avg_at_k_ci"]
        group = f" ({s['adv_var_group']:.3f})" if s["adv_var_group"] is not None else ""
        vs = s.get("vs_gtpo")
        vs = "-" if vs is None else f"{100 * vs['mean']:+.1f} [{100 * vs['ci'][0]:+.1f}, {100 * vs['ci'][1]:+.1f}]"
        lines.append(f"| {s['label']} | {s['seeds']} | {100 * s['avg_at_k']:.1f} ({100 * lo:.1f}-{100 * hi:.1f}) | {vs} "
                     f"| {100 * s['boxed_accuracy']:.1f} | {100 * s['boxed_rate']:.1f} | {s['eval_tokens_per_step']:.2f} "
                     f"| {_f(s['train_tokens_per_step'], '.0f')} | {_f(s['train_s_per_step'], '.2f')} "
                     f"| {_f(s['rl_s_per_step'], '.2f')} | {_f(s['adv_var'], '.3f')}{group} "
                     f"| {_f(s['grad_norm_mean'], '.3f')} / {_f(s['grad_norm_var'], '.4f')} |")  # fmt: skip
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> Path:
    """Training reward, advantage variance and gradient norm per step, mean over seeds, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("reward_mean", "training reward"), ("adv_var", "advantage variance"), ("grad_norm", "gradient norm"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = [r["steps"] for r in runs if r["arm"] == arm]
        if not all(mine):  # the SFT row: no RL step to draw
            continue
        for ax, (key, title) in zip(axes, keys, strict=True):
            n = min(len(s) for s in mine)
            ys = [statistics.fmean(s[i][key] or 0.0 for s in mine) for i in range(n)]
            ax.plot(range(1, n + 1), ys, label=ARMS[arm][0])
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("RL step")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(setup: Setup, out: Path) -> dict:
    """Every seed and arm; writes results.json, table.md, curves.png under `out` and returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    with scorer(setup) as pool:
        for seed in setup.seeds:
            model, train, test = prepare_seed(setup, seed, out / f"seed{seed}")
            for arm in setup.arms:
                runs.append(cached_arm(setup, arm, model, train, test, out / f"seed{seed}" / arm, seed, pool))
    summary = summarize(runs)
    (out / "results.json").write_text(json.dumps({"setup": asdict(setup), "summary": summary, "runs": runs}, indent=1))
    (out / "table.md").write_text(table(summary) + "\n")
    plot(runs, out / "curves.png")
    return summary


def set_field(setup: Setup, item: str) -> None:
    """Apply one ``FIELD=VALUE`` to `setup`, the value converted to the field's type (ValueError names the field)."""
    name, sep, value = item.partition("=")
    kinds = {f.name: type(getattr(setup, f.name)) for f in fields(setup) if f.name not in ("seeds", "arms")}
    if not sep or name not in kinds:
        raise ValueError(f"expected FIELD=VALUE with FIELD one of {', '.join(kinds)}")
    try:
        setattr(setup, name, kinds[name](value))
    except ValueError as e:
        raise ValueError(f"{name}: {value!r} is not a {kinds[name].__name__}") from e


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 40 SFT and 2 RL steps, a small eval: a smoke run of the plumbing, not a result")
    p.add_argument("--seeds", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--arms", help=f"comma-separated arms of {', '.join(ARMS)} (default all)")
    p.add_argument("--rl-steps", type=int)
    p.add_argument("--n-test", type=int, help="held-out questions (default 200)")
    p.add_argument("--eval-k", type=int, help="samples per held-out question (default 8)")
    p.add_argument("--threads", type=int, help="torch threads (default 2; 1 when running seeds as parallel processes)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other Setup field for every arm, e.g. --set max_operand=9 --set ops=+ (repeatable)")
    p.add_argument("--outcome-share", action="store_true",
                   help="only measure, per seed, the share of response tokens unmasked after the answer's last digit "
                   "(the SFT model's samples of the first 10 RL steps): what a critic of the states can see")
    p.add_argument("--out", type=Path, default=Path("runs/algorithms"))
    args = p.parse_args(argv)
    setup = Setup.quick() if args.quick else Setup()
    if args.seeds:
        setup.seeds = [int(s) for s in args.seeds.split(",")]
    if args.arms:
        unknown = [a for a in args.arms.split(",") if a not in ARMS]
        if unknown:
            p.error(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
        setup.arms = args.arms.split(",")
    for name in ("rl_steps", "n_test", "eval_k", "threads"):
        if getattr(args, name):
            setattr(setup, name, getattr(args, name))
    for item in args.set:
        try:
            set_field(setup, item)
        except ValueError as e:
            p.error(f"--set {item}: {e}")
    t0 = time.time()
    if args.outcome_share:
        for seed, (tokens, oracle) in outcome_share(setup, args.out).items():
            print(f"seed {seed}: {100 * tokens:.1f}% of response tokens are unmasked after the answer's last digit; "
                  f"a critic knowing the advantage from then on removes {100 * oracle:.1f}% of its variance")
        return 0
    summary = run(setup, args.out)
    print(table(summary))
    print(f"{time.time() - t0:.0f} s; results in {args.out}/results.json, curves in {args.out}/curves.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
