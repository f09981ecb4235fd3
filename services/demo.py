"""`gtpo demo`: the whole job on a laptop CPU. A tiny block-diffusion model learns arithmetic word problems by SFT,
then improves with GTPO through the real rollout / reward / trainer services on an embedded Redis.

Steps: write the task (train / held-out), build the tiny model, SFT, evaluate on the held-out split, run GTPO with
`gtpo up` (separate processes, Redis streams), evaluate again; print a before/after table and write PNG plots and
metrics into the run directory. With `speed`, two more GTPO runs start from the same SFT checkpoint, so their
effect is measured against GTPO, not against SFT: one whose rollout groups spread their confidence thresholds
(fast and slow unmasking orders side by side), and one that adds the speed reward to that, with correct answers'
advantages floored at 0 (`loss.floor_correct`), so the reward pulls fast correct answers up rather than pushing
slow correct ones down.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from services.evaluate import EvalResult, evaluate, load_rows
from services.trainer.config import LoraSettings
from shared.contracts import SamplingParams


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: Path = Field(Path("runs/demo"), description="run directory")
    seed: int = Field(0, ge=0, description="model init, SFT and RL seeds")
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
    speed: bool = Field(
        False, description="also run GTPO with spread rollout thresholds, and with spread + the speed reward"
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


def sampling(cfg: DemoConfig) -> SamplingParams:
    """The RL sampling settings; evaluation uses the same ones (T=1, dynamic, threshold 0.9)."""
    return SamplingParams(max_new_tokens=cfg.max_new_tokens)


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage; returns (and writes to out/summary.json) the before/after numbers."""
    import torch
    from rich.console import Console

    from services.trainer.checkpoint import checkpoint_name
    from services.trainer.config import OptimConfig, SFTConfig
    from services.trainer.sft import run_sft
    from shared.tasks import TaskSpec, write_task
    from shared.tiny import init_tiny

    console = Console()
    torch.set_num_threads(cfg.threads)
    out = cfg.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    stage = lambda name: console.rule(f"[bold]{name}[/bold] ({time.time() - t0:.0f}s)")  # noqa: E731

    stage("task and tiny model")
    spec = TaskSpec(max_operand=cfg.max_operand, ops=cfg.ops, max_second=cfg.max_second, split=cfg.split,
                    boxed_rate=cfg.boxed_rate)  # fmt: skip
    data = write_task(out / "data", spec, cfg.n_train, cfg.n_test)
    test_rows = load_rows(str(data["test"]))
    init_dir = init_tiny(out / "init", seed=cfg.seed, block_size=cfg.block_size)
    console.print(f"{len(test_rows)} held-out questions ({cfg.split} split), model in {init_dir}")

    stage("SFT")
    sft = SFTConfig(
        model=init_dir, output_dir=out / "sft", data=data["sft"], steps=cfg.sft_steps, batch_size=cfg.sft_batch,
        micro_batch_size=cfg.sft_batch, save_every=cfg.sft_steps, chat_template=False, seed=cfg.seed,
        optim=OptimConfig(lr=cfg.sft_lr, warmup_steps=20, schedule="cosine", total_updates=cfg.sft_steps, min_lr_ratio=0.1),
    )  # fmt: skip
    run_sft(sft)
    sft_model = out / "sft" / "checkpoints" / checkpoint_name(cfg.sft_steps) / "model"

    stage("evaluate the SFT model")
    results = {"sft": _eval(sft_model, test_rows, cfg)}
    arms = {"gtpo": Arm("GTPO", out / "rl", {"accuracy": 1.0}, 0.0, one_thread=cfg.overlap)}
    if cfg.overlap:
        arms["gtpo_async"] = Arm("GTPO k=1", out / "rl_async", {"accuracy": 1.0}, 0.0, max_staleness=1, one_thread=True)
    if cfg.speed:
        spread, fast = cfg.threshold_spread, {"accuracy": 1.0, "speed": cfg.speed_weight}
        arms["gtpo_spread"] = Arm("GTPO + spread", out / "rl_spread", {"accuracy": 1.0}, spread)
        arms["gtpo_speed"] = Arm("GTPO + spread + speed", out / "rl_speed", fast, spread, floor_correct=True)
    rl_seconds = {}
    for key, arm in arms.items():
        stage(f"{arm.label} through the rollout / reward / trainer services")
        start = time.time()
        model = _gtpo(cfg, sft_model, data["train"], arm)
        rl_seconds[key] = round(time.time() - start, 1)
        stage(f"evaluate the {arm.label} model")
        results[key] = _eval(model, test_rows, cfg)
    summary = {"config": json.loads(cfg.model_dump_json()), **{k: r.row() for k, r in results.items()},
               "rl_seconds": rl_seconds, "seconds": round(time.time() - t0, 1)}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    from services.plots import plot_rl, plot_timing

    runs = {arm.label: arm.run_dir / "metrics.jsonl" for arm in arms.values()}
    plot = plot_rl(runs, out / "rl_curves.png", title=f"GTPO on the tiny model (seed {cfg.seed})")
    plot_timing(runs, out / "rl_timing.png", title=f"where the RL time goes (seed {cfg.seed})")
    _print_table(console, results)
    if cfg.overlap:
        ratio = rl_seconds["gtpo"] / max(rl_seconds["gtpo_async"], 1e-9)
        console.print(f"RL wall time: k=0 {rl_seconds['gtpo']:.0f} s, k=1 {rl_seconds['gtpo_async']:.0f} s "
                      f"({ratio:.2f}x faster)")  # fmt: skip
    metrics = ", ".join(str(arm.run_dir / "metrics.jsonl") for arm in arms.values())
    console.print(f"plots: {plot}, {out / 'rl_timing.png'}\nmetrics: {metrics}\nsummary: {out / 'summary.json'}")
    return summary


def _gtpo(cfg: DemoConfig, sft_model: Path, train: Path, arm: Arm) -> Path:
    """One GTPO run from the SFT checkpoint through `gtpo up`; returns the last checkpoint's model directory."""
    from services.launcher import run_stack
    from services.trainer.checkpoint import latest_checkpoint
    from services.trainer.config import OptimConfig, RLConfig

    rl = RLConfig(
        model=sft_model, output_dir=arm.run_dir, data=train, steps=cfg.rl_steps, seed=cfg.seed,
        prompts_per_step=cfg.prompts_per_step, prompt_template="{question}", chat_template=False,
        rollout={"group_size": cfg.group_size, "max_new_tokens": cfg.max_new_tokens,
                 "threshold_spread": arm.spread}, reward_weights=arm.weights, loss={"floor_correct": arm.floor_correct, "objective": "decoupled" if arm.max_staleness else "standard"},
        micro_batch_size=64, optim=OptimConfig(lr=cfg.rl_lr if cfg.lora is None else cfg.lora_lr), keep_last=2,
        step_timeout_s=600, lora=cfg.lora,
        redis={"namespace": f"demo-{cfg.seed}-{arm.run_dir.name}-{int(time.time())}"}, oversample=3.0,
        max_staleness=arm.max_staleness,
    )  # fmt: skip

    code = run_stack(rl, threads=1 if arm.one_thread else None)
    if code != 0:
        raise RuntimeError(f"the GTPO run failed (exit {code}); logs in {arm.run_dir / 'logs'}")
    ckpt = latest_checkpoint(arm.run_dir / "checkpoints")
    if cfg.lora is None:
        return ckpt / "model"
    from services.trainer.lora import merge_lora

    return merge_lora(ckpt, arm.run_dir / "merged")  # the evaluation decodes the merged weights


def _eval(model: Path, rows: list[dict], cfg: DemoConfig) -> EvalResult:
    return evaluate(
        model, rows, k=cfg.eval_k, params=sampling(cfg), template="{question}", chat=False, seed=cfg.seed + 1
    )


METRICS = (("avg_at_k", "{:.1%}"), ("pass_at_k", "{:.1%}"), ("boxed_rate", "{:.1%}"), ("tokens_per_step", "{:.2f}"),
           ("mean_length", "{:.1f}"), ("truncation_rate", "{:.1%}"))  # fmt: skip


def _print_table(console, results: dict[str, EvalResult]) -> None:
    """SFT -> GTPO; with the speed arms, a second table of GTPO + spread and GTPO + spread + speed against GTPO."""
    title = "held-out evaluation (avg@k at T=1, dynamic decoding, threshold 0.9)"
    console.print(_table(title, results, "sft", [("SFT", "sft"), ("GTPO", "gtpo")]))
    if "gtpo_async" in results:
        arms = [("GTPO k=0", "gtpo"), ("GTPO k=1", "gtpo_async")]
        console.print(_table("rollout overlapping training (max_staleness=1) against k=0", results, "gtpo", arms))
    if "gtpo_speed" in results:
        arms = [("GTPO", "gtpo"), ("+ spread", "gtpo_spread"), ("+ spread + speed", "gtpo_speed")]
        console.print(_table("speed arms against GTPO (same SFT start, same evaluation)", results, "gtpo", arms))


def _table(title: str, results: dict[str, EvalResult], base: str, arms: list[tuple[str, str]]):
    """One column per arm, each followed by its change against `base` (the first arm has none)."""
    from rich.table import Table

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
            row += [fmt.format(value)] + ([f"{value - ref:+.3f}"] if i else [])
        t.add_row(*row)
    return t
