"""`gtpo demo`: the whole job on a laptop CPU. A tiny block-diffusion model learns arithmetic word problems by SFT,
then improves with GTPO through the real rollout / reward / trainer services on an embedded Redis.

Steps: write the task (train / held-out), build the tiny model, SFT, evaluate on the held-out split, run GTPO with
`gtpo up` (separate processes, Redis streams), evaluate again; print a before/after table and write PNG plots and
metrics into the run directory. With `speed`, more GTPO runs start from the same SFT checkpoint, one per method of
`speed_method` (`SPEED_METHODS`), so their effect is measured against GTPO, not against SFT; every speed arm's
rollout groups spread their confidence thresholds (fast and slow unmasking orders side by side). The speed arms
and GTPO are printed side by side, with a Pareto table and plot of tokens per step against accuracy.

With `reuse`, a stage whose results the run directory already holds, made with the same settings, is read back
instead of run again: the SFT checkpoint (`sft/done.json`) and each finished arm (its `eval.json`, written once its
last checkpoint is evaluated). So methods can be added one invocation at a time to the same SFT and GTPO runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.demo.speed_methods import DEFAULT_SPEED_METHOD, SPEED_METHODS
from services.eval.evaluate import EvalResult, evaluate, load_rows
from services.trainer.config import LoraSettings, TrackerNames
from shared.contracts.wire import SamplingParams

REASONING = {"boxed_rate": 1.0, "sft_steps": 400, "rl_steps": 100, "prompts_per_step": 32}
"""`gtpo demo --task reasoning`: the maths task with every SFT answer boxed (the format is learned before RL, so
an RL gain is accuracy) and SFT stopped at 400 steps, where the tiny model knows about a third of the sums but not
at its capacity (after 1000 steps it knows ~86%; on a larger table it is full, and RL can only trade facts),
and 100 RL steps of 32 prompts (README "Algorithms"; bench/algorithms.py runs the same task)."""


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: Path = Field(Path("runs/demo"), description="run directory")
    seed: int = Field(0, ge=0, description="model init, SFT and RL seeds")
    task: Literal["math", "code"] = Field(
        "math",
        description="math: word problems, accuracy reward; code: one-line functions (services/demo/code_task.py), "
        "code reward in the sandbox (boxed_rate is then the share of fenced SFT answers; set max_new_tokens >= 24)",
    )
    max_operand: int = Field(9, ge=2, description="task difficulty: operands in 0..max_operand")
    ops: str = Field("+", description="operations: any of + - *")
    max_second: int | None = Field(None, ge=1, description="second operand in 1..this (None: like the first)")
    split: Literal["questions", "pairs"] = Field(
        "questions", description="held out: question texts never seen in training, or whole operand pairs"
    )
    n_test: int = Field(200, ge=1, description="held-out questions (split=pairs: at most a fifth of the pairs)")
    boxed_rate: float = Field(
        0.65,
        ge=0,
        le=1,
        description="share of SFT answers in \\boxed{}; the rest are bare numbers, which the reward rejects",
    )
    block_size: int = Field(4, ge=1, description="diffusion block length of the tiny model")
    n_train: int = Field(4000, ge=10)
    sft_steps: int = Field(1000, ge=1)
    sft_batch: int = Field(32, ge=1)
    sft_lr: float = Field(3e-3, gt=0)
    rl_steps: int = Field(60, ge=1)
    prompts_per_step: int = Field(16, ge=1)
    group_size: int = Field(8, ge=2)
    rl_lr: float = Field(5e-4, gt=0)
    lora: LoraSettings | None = Field(
        None, description="GTPO with LoRA adapters (e.g. lora.r=16) on the fully fine-tuned SFT model; None = full"
    )
    lora_lr: float = Field(5e-3, gt=0, description="GTPO learning rate with lora: 10x rl_lr (see README, LoRA)")
    max_new_tokens: int = Field(16, ge=4)
    eval_k: int = Field(16, ge=1, description="samples per held-out question")
    speed: bool = Field(False, description="also run a speed arm per method of speed_method, from the same SFT model")
    speed_method: str = Field(
        DEFAULT_SPEED_METHOD,
        description=f"speed arms, comma-separated: {', '.join(SPEED_METHODS)} (each with the threshold spread)",
    )
    reuse: bool = Field(
        False, description="read back the stages the run directory already finished with the same settings"
    )
    threshold_spread: float = Field(
        0.2,
        ge=0,
        le=0.9,  # checked here, not minutes later when the first speed arm starts
        description="speed arms: a group's rollout thresholds spread from 0.9 down to 0.9 - this (see README)",
    )
    speed_weight: float = Field(1.0, ge=0, description="weight of the speed reward next to accuracy (1.0)")
    threads: int = Field(2, ge=1)
    overlap: bool = Field(
        False,
        description="also run GTPO with max_staleness=1 (rollout overlaps training) from the same SFT model; both "
        "GTPO arms then run their rollout worker and trainer on one thread each, so they share the same two cores",
    )
    in_flight: bool = Field(
        False,
        description="with overlap: also run GTPO k=1 with in-flight weight updates (rollout.swap_at_block: a new "
        "version is loaded between two blocks of the responses being generated)",
    )
    log_with: TrackerNames = Field(
        default_factory=list, description="experiment trackers of the SFT and every GTPO run (e.g. tensorboard)"
    )

    @model_validator(mode="after")
    def _in_flight_needs_overlap(self) -> DemoConfig:
        if self.in_flight and not self.overlap:
            raise ValueError("in_flight: needs overlap (it is a third arm beside GTPO k=0 and k=1; add --overlap)")
        return self

    @field_validator("speed_method")
    @classmethod
    def _check_methods(cls, v: str) -> str:
        names = [m.strip() for m in v.split(",") if m.strip()]
        unknown = [m for m in names if m not in SPEED_METHODS]
        if not names or unknown:
            raise ValueError(
                f"unknown method {', '.join(map(repr, unknown)) or repr(v)}; known: {', '.join(SPEED_METHODS)}"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"a method is named twice in {v!r}")
        return ",".join(names)

    @property
    def methods(self) -> list[str]:
        return self.speed_method.split(",") if self.speed else []


class Arm(NamedTuple):
    """One GTPO run of the demo: its label, run directory, reward weights, rollout threshold spread and whether
    correct answers keep a non-negative advantage (`loss.floor_correct`)."""

    label: str
    run_dir: Path
    weights: dict[str, float]
    spread: float
    floor_correct: bool = False
    max_staleness: int = 0
    one_thread: bool = False
    reward_norm: str = "total"
    swap_at_block: bool = False

    def settings(self) -> dict:
        """What the arm's training depends on beyond the demo's config (the reuse check)."""
        return {"weights": self.weights, "spread": self.spread, "floor_correct": self.floor_correct,
                "max_staleness": self.max_staleness, "reward_norm": self.reward_norm,
                "swap_at_block": self.swap_at_block}  # fmt: skip


def speed_arm(cfg: DemoConfig, method: str, out: Path) -> Arm:
    """The arm of one `SPEED_METHODS` entry: accuracy (+ its speed reward at `speed_weight`), the threshold spread."""
    m = SPEED_METHODS[method]
    weights = {"accuracy": 1.0} | ({m.speed_reward: cfg.speed_weight} if m.speed_reward else {})
    return Arm(m.label, out / f"rl_{method}", weights, cfg.threshold_spread, floor_correct=m.floor_correct,
               reward_norm=m.reward_norm)  # fmt: skip


SFT_FIELDS = ("seed", "task", "max_operand", "ops", "max_second", "split", "n_test", "boxed_rate", "block_size", "n_train",
              "sft_steps", "sft_batch", "sft_lr")  # fmt: skip
"""What the SFT checkpoint depends on."""
EVAL_FIELDS = (*SFT_FIELDS, "max_new_tokens", "eval_k")
"""What the SFT model's evaluation depends on."""
RL_FIELDS = (*EVAL_FIELDS, "rl_steps", "prompts_per_step", "group_size", "rl_lr")
"""What an arm's training and evaluation depend on (with the arm's own `Arm.settings`)."""


def fingerprint(cfg: DemoConfig, fields: tuple[str, ...]) -> dict:
    return {f: getattr(cfg, f) for f in fields}


class ReuseError(ValueError):
    """A finished stage in the run directory was made with other settings than asked for."""


def reusable(path: Path, expected: dict, what: str) -> dict | None:
    """The record at `path` when it was made with `expected` settings; None when there is none.

    Raises:
        ReuseError: the record was made with other settings (reusing it would mix runs; use another --out).
    """
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    got = record.get("settings", {})
    diff = {k: (got.get(k), v) for k, v in expected.items() if got.get(k) != v}
    if diff:
        named = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
        raise ReuseError(f"reuse: {path} holds {what} made with other settings ({named}); use another --out")
    return record


def set_aside(path: Path) -> None:
    """Move an unfinished stage's directory out of the way (kept, never deleted) so it can run again afresh."""
    if path.exists():
        path.rename(path.with_name(f"{path.name}.partial-{int(time.time())}"))


def sampling(cfg: DemoConfig) -> SamplingParams:
    """The RL sampling settings; evaluation uses the same ones (T=1, dynamic, threshold 0.9)."""
    return SamplingParams(max_new_tokens=cfg.max_new_tokens)


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage; returns (and writes to out/summary.json) the before/after numbers."""
    import torch
    from rich.console import Console

    from services.demo.tasks import TaskSpec, write_task
    from shared.model.tiny import init_tiny

    console = Console()
    torch.set_num_threads(cfg.threads)
    out = cfg.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    stage = lambda name: console.rule(f"[bold]{name}[/bold] ({time.time() - t0:.0f}s)")  # noqa: E731

    stage("task and tiny model")
    spec = TaskSpec(max_operand=cfg.max_operand, ops=cfg.ops, max_second=cfg.max_second, split=cfg.split,
                    boxed_rate=cfg.boxed_rate)  # fmt: skip
    data = write_task(out / "data", spec, cfg.n_train, cfg.n_test) if cfg.task == "math" else _code_task(cfg, out)
    test_rows = load_rows(str(data["test"]))
    init_dir = init_tiny(out / "init", seed=cfg.seed, block_size=cfg.block_size)
    console.print(f"{len(test_rows)} held-out questions ({cfg.split} split), model in {init_dir}")

    sft_model = _sft_stage(cfg, out, init_dir, data["sft"], stage)
    reward = {"accuracy": 1.0} if cfg.task == "math" else {"code": 1.0}
    arms = {"gtpo": Arm("GTPO", out / "rl", reward, 0.0, one_thread=cfg.overlap)}
    if cfg.overlap:
        arms["gtpo_async"] = Arm("GTPO k=1", out / "rl_async", reward, 0.0, max_staleness=1, one_thread=True)
    if cfg.overlap and cfg.in_flight:
        arms["gtpo_inflight"] = Arm("GTPO k=1 in-flight", out / "rl_inflight", reward, 0.0, max_staleness=1,
                                    one_thread=True, swap_at_block=True)  # fmt: skip
    for method in cfg.methods:
        arms[f"gtpo_{method}"] = speed_arm(cfg, method, out)
    stage("evaluate the SFT model")
    results = {"sft": _stage_eval(cfg, sft_model, test_rows, out / "sft" / "eval.json", {})}
    rl_seconds = {}
    for key, arm in arms.items():
        record = _finished(cfg, arm)
        if record is not None:
            stage(f"{arm.label}: reusing {arm.run_dir} (finished, evaluated)")
            results[key], rl_seconds[key] = EvalResult(**record["result"]), record["rl_seconds"]
            continue
        if cfg.reuse:
            set_aside(arm.run_dir)
        stage(f"{arm.label} through the rollout / reward / trainer services")
        start = time.time()
        model = _gtpo(cfg, sft_model, data["train"], arm)
        rl_seconds[key] = round(time.time() - start, 1)
        stage(f"evaluate the {arm.label} model")
        results[key] = _eval(model, test_rows, cfg, arm.run_dir / CARD)
        record = {"settings": {**fingerprint(cfg, RL_FIELDS), **arm.settings()}, "label": arm.label,
                  "model": str(model), "rl_seconds": rl_seconds[key], "result": results[key].row()}  # fmt: skip
        (arm.run_dir / "eval.json").write_text(json.dumps(record, indent=2))
    summary = {"config": json.loads(cfg.model_dump_json()), **{k: r.row() for k, r in results.items()},
               "rl_seconds": rl_seconds, "seconds": round(time.time() - t0, 1)}  # fmt: skip
    points = pareto_points(results, arms, _other_speed_arms(cfg, out, arms))
    summary["pareto"] = points
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _report(cfg, console, out, results, arms, points, rl_seconds)
    return summary


def _sft_stage(cfg: DemoConfig, out: Path, init_dir: Path, data: Path, stage) -> Path:
    """Train the SFT model (or reuse a finished one with the same settings); returns its model folder."""
    from services.trainer.config import OptimConfig, SFTConfig
    from services.trainer.learner.checkpoint import checkpoint_name
    from services.trainer.learner.sft import run_sft

    sft_model = out / "sft" / "checkpoints" / checkpoint_name(cfg.sft_steps) / "model"
    sft_done = out / "sft" / "done.json"
    if cfg.reuse and reusable(sft_done, fingerprint(cfg, SFT_FIELDS), "an SFT checkpoint") and sft_model.exists():
        stage(f"SFT: reusing {sft_model}")
        return sft_model
    stage("SFT")
    if cfg.reuse:
        set_aside(out / "sft")
    sft = SFTConfig(
        model=init_dir, output_dir=out / "sft", data=data, steps=cfg.sft_steps, batch_size=cfg.sft_batch,
        micro_batch_size=cfg.sft_batch, save_every=cfg.sft_steps, chat_template=False, seed=cfg.seed, log_with=cfg.log_with,
        optim=OptimConfig(lr=cfg.sft_lr, warmup_steps=20, schedule="cosine", total_updates=cfg.sft_steps, min_lr_ratio=0.1),
    )  # fmt: skip
    run_sft(sft)
    sft_done.write_text(json.dumps({"settings": fingerprint(cfg, SFT_FIELDS), "model": str(sft_model)}, indent=2))
    return sft_model


def _report(cfg: DemoConfig, console, out: Path, results: dict, arms: dict, points, rl_seconds: dict) -> None:
    """The plots, the results table and where everything was written."""
    from services.demo.plots import plot_pareto, plot_rl, plot_timing

    runs = {arm.label: arm.run_dir / "metrics.jsonl" for arm in arms.values()}
    plot = plot_rl(runs, out / "rl_curves.png", title=f"GTPO on the tiny model (seed {cfg.seed})")
    plot_timing(runs, out / "rl_timing.png", title=f"where the RL time goes (seed {cfg.seed})")
    plots = [plot, out / "rl_timing.png"]
    cards = {"sft": out / "sft" / CARD, **{key: arm.run_dir / CARD for key, arm in arms.items()}}
    _print_table(console, results, arms, cards)
    if cfg.speed:
        console.print(_pareto_table(points))
        plots.append(plot_pareto(points, out / "speed_pareto.png",
                                 title=f"tokens per step against held-out accuracy (seed {cfg.seed})"))  # fmt: skip
    if cfg.overlap:
        ratio = rl_seconds["gtpo"] / max(rl_seconds["gtpo_async"], 1e-9)
        console.print(f"RL wall time: k=0 {rl_seconds['gtpo']:.0f} s, k=1 {rl_seconds['gtpo_async']:.0f} s "
                      f"({ratio:.2f}x faster)")  # fmt: skip
        if "gtpo_inflight" in rl_seconds:
            ratio = rl_seconds["gtpo"] / max(rl_seconds["gtpo_inflight"], 1e-9)
            console.print(f"RL wall time: k=1 in-flight {rl_seconds['gtpo_inflight']:.0f} s ({ratio:.2f}x k=0)")
    metrics = ", ".join(str(arm.run_dir / "metrics.jsonl") for arm in arms.values())
    console.print(f"plots: {', '.join(map(str, plots))}\nmetrics: {metrics}\nsummary: {out / 'summary.json'}")


def _code_task(cfg: DemoConfig, out: Path) -> dict[str, Path]:
    from services.demo.code_task import CodeTaskError, CodeTaskSpec, write_code_task

    if cfg.speed:
        raise CodeTaskError("speed: the speed arms weigh accuracy; run them with task=math")
    spec = CodeTaskSpec(max_operand=cfg.max_operand, ops=cfg.ops, seed=cfg.seed, fence_rate=cfg.boxed_rate)
    return write_code_task(out / "data", spec, cfg.n_train, cfg.n_test)


def _finished(cfg: DemoConfig, arm: Arm) -> dict | None:
    """With `reuse`, the arm's evaluation record when it finished with the same settings (and its model is there)."""
    if not cfg.reuse:
        return None
    record = reusable(arm.run_dir / "eval.json", {**fingerprint(cfg, RL_FIELDS), **arm.settings()}, arm.label)
    return record if record is not None and Path(record["model"]).exists() else None


def _stage_eval(cfg: DemoConfig, model: Path, rows: list[dict], path: Path, settings: dict) -> EvalResult:
    """Evaluate `model`, or with `reuse` read back the evaluation `path` holds from the same settings."""
    expected = {**fingerprint(cfg, EVAL_FIELDS), **settings}
    record = reusable(path, expected, "an evaluation") if cfg.reuse else None
    if record is not None:
        return EvalResult(**record["result"])
    result = _eval(model, rows, cfg, path.with_name(CARD))
    path.write_text(json.dumps({"settings": expected, "model": str(model), "result": result.row()}, indent=2))
    return result


def _other_speed_arms(cfg: DemoConfig, out: Path, arms: dict[str, Arm]) -> dict[str, tuple[str, EvalResult]]:
    """With `reuse`, the speed arms an earlier invocation finished in `out` with the same settings (not rerun now),
    so the Pareto table holds every method measured from this SFT checkpoint."""
    if not cfg.speed or not cfg.reuse:
        return {}
    found = {}
    for method in SPEED_METHODS:
        key, arm = f"gtpo_{method}", speed_arm(cfg, method, out)
        if key in arms:
            continue
        try:
            record = _finished(cfg, arm)
        except ReuseError:
            continue  # made with other settings: not comparable, and not in the way of this run
        if record is not None:
            found[key] = (arm.label, EvalResult(**record["result"]))
    return found


def pareto_points(results: dict[str, EvalResult], arms: dict[str, Arm],
                  others: dict[str, tuple[str, EvalResult]] | None = None) -> list[dict]:  # fmt: skip
    """One point per RL arm (GTPO first): tokens per step and avg@k, their change against GTPO, and whether no other
    arm is at least as fast and as accurate and better in one (the Pareto front)."""
    rows = [(key, arm.label, results[key]) for key, arm in arms.items() if key in results]
    rows += [(key, label, r) for key, (label, r) in (others or {}).items()]
    base = results["gtpo"]
    points = []
    for key, label, r in rows:
        tps, acc = r.tokens_per_step, r.avg_at_k
        dominated = any(o.tokens_per_step >= tps and o.avg_at_k >= acc and (o.tokens_per_step > tps or o.avg_at_k > acc)
                        for _, _, o in rows)  # fmt: skip
        points.append({"arm": key, "label": label, "tokens_per_step": tps, "avg_at_k": acc,
                       "tokens_per_step_gain": tps / base.tokens_per_step - 1 if base.tokens_per_step else 0.0,
                       "accuracy_change": acc - base.avg_at_k, "pareto": not dominated})  # fmt: skip
    return points


def _pareto_table(points: list[dict]):
    from rich.table import Table

    t = Table(title="speed against accuracy (Pareto: no other arm both faster and more accurate)")
    for name in ("arm", "tokens/step", "vs GTPO", "avg@k", "vs GTPO (points)", "Pareto"):
        t.add_column(name, justify="left" if name == "arm" else "right")
    for p in points:
        t.add_row(p["label"], f"{p['tokens_per_step']:.2f}", f"{p['tokens_per_step_gain']:+.1%}", f"{p['avg_at_k']:.1%}",
                  f"{100 * p['accuracy_change']:+.1f}", "*" if p["pareto"] else "")  # fmt: skip
    return t


def rl_config(cfg: DemoConfig, sft_model: Path, train: Path, arm: Arm):
    """The `RLConfig` of one arm's GTPO run from the SFT checkpoint."""
    from services.trainer.config import OptimConfig, RLConfig

    loss = {"floor_correct": arm.floor_correct, "objective": "decoupled" if arm.max_staleness else "standard",
            "reward_norm": arm.reward_norm}  # fmt: skip
    return RLConfig(
        model=sft_model, output_dir=arm.run_dir, data=train, steps=cfg.rl_steps, seed=cfg.seed,
        prompts_per_step=cfg.prompts_per_step, prompt_template="{question}", chat_template=False,
        rollout={"group_size": cfg.group_size, "max_new_tokens": cfg.max_new_tokens,
                 "threshold_spread": arm.spread}, reward_weights=arm.weights, loss=loss,
        micro_batch_size=64, optim=OptimConfig(lr=cfg.rl_lr if cfg.lora is None else cfg.lora_lr), keep_last=2,
        step_timeout_s=600, lora=cfg.lora,
        redis={"namespace": f"demo-{cfg.seed}-{arm.run_dir.name}-{int(time.time())}"}, oversample=3.0,
        max_staleness=arm.max_staleness, log_with=cfg.log_with,
    )  # fmt: skip


def _gtpo(cfg: DemoConfig, sft_model: Path, train: Path, arm: Arm) -> Path:
    """One GTPO run from the SFT checkpoint through `gtpo up`; returns the last checkpoint's model directory."""
    from services.stack import run_stack
    from services.trainer.learner.checkpoint import latest_checkpoint

    rl = rl_config(cfg, sft_model, train, arm)
    code = run_stack(rl, threads=1 if arm.one_thread else None,
                     rollout_args=["swap_at_block=true"] if arm.swap_at_block else ())  # fmt: skip
    if code != 0:
        raise RuntimeError(f"the GTPO run failed (exit {code}); logs in {arm.run_dir / 'logs'}")
    ckpt = latest_checkpoint(arm.run_dir / "checkpoints")
    if cfg.lora is None:
        return ckpt / "model"
    from services.trainer.learner.lora import merge_lora

    return merge_lora(ckpt, arm.run_dir / "merged")  # the evaluation decodes the merged weights


CARD = "eval_card.json"
"""Beside each evaluation record: its eval card (services/eval/card.py), which the tables' intervals come from."""


def _eval(model: Path, rows: list[dict], cfg: DemoConfig, card: Path) -> EvalResult:
    return evaluate(
        model, rows, k=cfg.eval_k, params=sampling(cfg), template="{question}", chat=False, seed=cfg.seed + 1,
        card_path=card,
    )


METRICS = (("avg_at_k", "{:.1%}"), ("pass_at_k", "{:.1%}"), ("boxed_rate", "{:.1%}"), ("tokens_per_step", "{:.2f}"),
           ("mean_length", "{:.1f}"), ("truncation_rate", "{:.1%}"))  # fmt: skip


def _print_table(
    console, results: dict[str, EvalResult], arms: dict[str, Arm], cards: dict[str, Path] | None = None
) -> None:
    """SFT -> GTPO; with the speed arms, a second table of every speed arm against GTPO."""
    title = "held-out evaluation (avg@k at T=1, dynamic decoding, threshold 0.9; [95% bootstrap interval])"
    console.print(_table(title, results, "sft", [("SFT", "sft"), ("GTPO", "gtpo")], cards))
    if "gtpo_async" in results:
        pair = [("GTPO k=0", "gtpo"), ("GTPO k=1", "gtpo_async")]
        pair += [("GTPO k=1 in-flight", "gtpo_inflight")] if "gtpo_inflight" in results else []
        console.print(_table("rollout overlapping training (max_staleness=1) against k=0", results, "gtpo", pair,
                             cards))  # fmt: skip
    speed = [(arm.label, key) for key, arm in arms.items() if key.removeprefix("gtpo_") in SPEED_METHODS]
    if speed:
        console.print(_table("speed arms against GTPO (same SFT start, same evaluation)", results, "gtpo",
                             [("GTPO", "gtpo"), *speed], cards))  # fmt: skip


def paired_changes(base: Path | None, other: Path | None) -> dict[str, tuple[float, float, float]]:
    """Per metric, (change, low, high) of `other` against `base` with the paired bootstrap over questions; empty
    when either card is missing (an arm evaluated before cards existed) or the cards cannot be paired."""
    from services.eval.card import EvalCard, compare_cards

    if base is None or other is None or not base.exists() or not other.exists():
        return {}
    try:
        rows = compare_cards(EvalCard.read(base), EvalCard.read(other))
    except ValueError:
        return {}
    return {r.metric: (r.difference, r.low, r.high) for r in rows if r.low is not None}


def _table(title: str, results: dict[str, EvalResult], base: str, arms: list[tuple[str, str]],
           cards: dict[str, Path] | None = None):  # fmt: skip
    """One column per arm, each followed by its change against `base` (the first arm has none); accuracies carry
    their 95% interval, changes their paired interval when both arms have eval cards."""
    from rich.table import Table

    cards = cards or {}
    changes = {key: paired_changes(cards.get(base), cards.get(key)) for _, key in arms}

    t = Table(title=title)
    t.add_column("metric")
    for i, (label, _) in enumerate(arms):
        t.add_column(label, justify="right")
        if i:
            t.add_column("change", justify="right")
    for name, fmt in METRICS:
        ref = getattr(results[base], name)
        row = [name]
        for i, (_, key) in enumerate(arms):
            value = getattr(results[key], name)
            ci = getattr(results[key], f"{name}_ci", None)
            cell = fmt.format(value) + (f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]" if ci else "")
            paired = changes[key].get(name)
            change = f"{value - ref:+.3f}" + (f" [{paired[1]:+.3f}, {paired[2]:+.3f}]" if paired else "")
            row += [cell] + ([change] if i else [])
        t.add_row(*row)
    return t
