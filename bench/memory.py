"""Peak memory and step time of a GTPO step: full vs LoRA x gradient checkpointing x copies_per_forward, each
configuration in its own process, with `gtpo plan-memory`'s estimate beside each measurement.

    python bench/memory.py [--layers 8 --hidden 512 --prompt 256 --gen 1024 --block 4] [--out docs/memory_bench.json]
    python bench/memory.py --replan docs/memory_bench.json     # the planner's columns again, no new measurement

Every configuration runs the real trainer (Learner.rl_step) on one group of 2 synthetic responses whose
blocks each took R = block denoising steps (so the packed layout has R noisy copies), micro-batch 1, fp32, sdpa
(CPU). Memory is the process's resident set (VmRSS / VmHWM, reset through /proc/self/clear_refs), with glibc's mmap
threshold fixed so freed tensors leave it: "kept" is the resident growth over the largest forward (what autograd
keeps for the backward), "peak" the high-water mark of a whole step (after a first step, so the optimizer state
exists) above the process's baseline (its resident set before the step less the weights and optimizer state).
Optimizer and gradient bytes are counted from the tensors; checkpoint and weight-version bytes from the files
`Learner.save` writes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from train_step import synthetic_rollout

GIB = 2**30
MIB = 2**20


class Meter:
    """Current and peak memory of this process: resident set on CPU (VmRSS / VmHWM), the caching allocator's
    allocated bytes on CUDA (memory_allocated / max_memory_allocated)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def current(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else proc_bytes("VmRSS")

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else proc_bytes("VmHWM")

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS


def proc_bytes(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def model_overrides(a: dict) -> dict:
    """The bench model's config.json fields from the command's size arguments (for init_tiny and the planner)."""
    return {"vocab_size": a["vocab"], "hidden_size": a["hidden"], "intermediate_size": a["intermediate"],
            "num_hidden_layers": a["layers"], "num_attention_heads": a["heads"], "num_key_value_heads": a["kv_heads"],
            "head_dim": a["hidden"] // a["heads"],
            "max_position_embeddings": a["prompt"] + a["gen"] * (a["block"] + 1) + 64}  # fmt: skip


def configurations(block: int, only: str | None = None) -> list[dict]:
    """full / LoRA r=16 x checkpointing off / on x c in {1, 2, R}; `only`: comma-separated names (`lora-on-2`)."""
    copies = sorted({1, min(2, block), block})
    confs = [{"lora": lora, "checkpointing": ckpt, "c": c}
             for lora in (False, True) for ckpt in (False, True) for c in copies]  # fmt: skip
    if only is None:
        return confs
    named = {conf_name(c): c for c in confs}
    if unknown := sorted(set(only.split(",")) - set(named)):
        sys.exit(f"--only: unknown configurations {unknown}; choose from {', '.join(named)}")
    return [named[n] for n in only.split(",")]


def conf_name(conf: dict) -> str:
    return f"{'lora' if conf['lora'] else 'full'}-{'on' if conf['checkpointing'] else 'off'}-{conf['c']}"


# ----------------------------------------------------------------------------------------------- one configuration


def measure(job: dict) -> dict:
    """Run one configuration in this process (the child) and return its measurements."""
    from services.trainer.config import LoraSettings, TrainerConfig
    from services.trainer.learner.trainer import Learner
    from shared.contracts.wire import StepBatch

    torch.set_num_threads(job["threads"])
    cuda = job["device"] == "cuda"
    meter = Meter(cuda)
    out = Path(job["tmp"]) / f"run-{os.getpid()}"
    cfg = TrainerConfig(
        model=job["model"], output_dir=out, micro_batch_size=1, mixed_precision="bf16" if cuda else "no",
        attention="flex" if cuda else "sdpa",
        gradient_checkpointing=job["checkpointing"], copies_per_forward=job["c"],
        lora=LoraSettings(r=16, alpha=32) if job["lora"] else None,
    )  # fmt: skip
    trainer = Learner(cfg)
    gen = torch.Generator().manual_seed(0)
    group = [synthetic_rollout(job["prompt"], job["gen"], gen, job["block"], job["block"]) for _ in range(2)]
    step = lambda: trainer.rl_step(StepBatch.of([group], [[1.0, 0.0]]))  # noqa: E731
    step()  # the first step allocates the optimizer state and warms the kernels' workspaces
    params = list(trainer.policy.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    optim = sum(t.numel() * t.element_size() for st in trainer.optimizer.state.values() for t in st.values()
                if torch.is_tensor(t) and t.dim() > 0)  # fmt: skip
    kept, grads = forward_kept(trainer, group, meter)
    times = []
    peak = 0
    for _ in range(job["repeats"]):
        meter.reset()
        base = meter.current() - weights - optim
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        peak = max(peak, meter.peak() - base)
    row = {**{k: job[k] for k in ("lora", "checkpointing", "c")}, "weights": weights, "optimizer": optim,
           "gradients": grads, "kept": kept, "peak": peak, "step_s": statistics.median(times)}  # fmt: skip
    if job["save"]:
        ckpt = trainer.save()
        row["checkpoint_bytes"] = folder_bytes(ckpt)
        row["version_bytes"] = folder_bytes(trainer.weights_path(ckpt))
    return row


def forward_kept(trainer, group, meter: Meter) -> tuple[int, int]:
    """(bytes the largest forward keeps for its backward, gradient bytes after that backward)."""
    from services.trainer.learner.trajectory import forward_rounds, rollout_trajectory

    traj = rollout_trajectory(group[0])
    c = trainer.cfg.copies_per_forward
    batch, _ = trainer._forward_batch([traj], forward_rounds(len(traj.rounds), c)[0] if c else None)
    before = meter.current()
    logp = trainer.policy(batch)
    kept = meter.current() - before
    logp.sum().backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trainer.policy.parameters() if p.grad is not None)
    trainer.optimizer.zero_grad(set_to_none=True)
    return kept, grads


# ----------------------------------------------------------------------------------------------- the planner beside


def planned(a: dict, row: dict) -> dict:
    """`gtpo plan-memory`'s estimate for a measured configuration (CPU: fp32, sdpa; CUDA: bf16, flex)."""
    from services.trainer.learner.memory_plan import MemorySettings, ModelShape, plan

    shape = ModelShape.from_config(model_overrides(a))
    s = MemorySettings(prompt_len=a["prompt"], gen_len=a["gen"], block_size=a["block"], copies_per_forward=row["c"],
                       responses_per_update=2, lora_r=16 if row["lora"] else None,
                       checkpointing=row["checkpointing"], **device_settings(a.get("device", "cpu")))  # fmt: skip
    p = plan(shape, s)
    return {"plan_peak": p.peak, "plan_kept": p.activations, "plan_optimizer": p.optimizer,
            "plan_gradients": p.gradients, "plan_weights": p.weights}  # fmt: skip


def device_settings(device: str) -> dict:
    """The precision and attention the trainer uses on this device (its `auto` choices)."""
    return (
        {"precision": "bf16", "attention": "flex"} if device == "cuda" else {"precision": "fp32", "attention": "sdpa"}
    )


def table(result: dict) -> str:
    """The results as a markdown table with the ratios the issue asks for."""
    rows = result["rows"]
    block = result["args"]["block"]
    pick = {conf_name(r): r for r in rows}
    base = pick.get(f"full-off-{block}")  # the baseline of the ratios: full fine-tuning, the packed layout
    full = base or rows[0]
    lines = [
        "| weights | ckpt | c | step s | x time | kept MiB | plan kept | peak MiB | plan peak | plan / measured "
        "| optim + grad MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        og = (r["optimizer"] + r["gradients"]) / MIB
        lines.append(
            f"| {'LoRA r=16' if r['lora'] else 'full'} | {'on' if r['checkpointing'] else 'off'} | {r['c']} "
            f"| {r['step_s']:.2f} | {r['step_s'] / full['step_s']:.2f} | {r['kept'] / MIB:.0f} "
            f"| {r['plan_kept'] / MIB:.0f} | {r['peak'] / MIB:.0f} | {r['plan_peak'] / MIB:.0f} "
            f"| {r['plan_peak'] / r['peak']:.2f} | {og:.1f} |"
        )
    worst = max(abs(r["plan_peak"] / r["peak"] - 1) for r in rows)
    lines += ["", f"- the planner's peak is within {100 * worst:.1f}% of the measured peak in every configuration"]
    lora, ckpt = pick.get(f"lora-off-{block}"), pick.get(f"full-on-{block}")
    if base is None or lora is None or ckpt is None:
        return "\n".join(lines)
    lines += [
        f"- LoRA r=16 cuts optimizer + gradient memory {(full['optimizer'] + full['gradients']) / (lora['optimizer'] + lora['gradients']):.0f}x "
        f"({(full['optimizer'] + full['gradients']) / MIB:.1f} -> {(lora['optimizer'] + lora['gradients']) / MIB:.2f} MiB)",
        f"- checkpointing cuts the forward's kept activations {full['kept'] / ckpt['kept']:.1f}x "
        f"({full['kept'] / MIB:.0f} -> {ckpt['kept'] / MIB:.0f} MiB) and the step's peak {full['peak'] / ckpt['peak']:.1f}x",
    ]  # fmt: skip
    for r in rows:
        if "checkpoint_bytes" in r:
            kind = "LoRA" if r["lora"] else "full"
            lines.append(f"- {kind}: checkpoint {r['checkpoint_bytes'] / MIB:.1f} MiB, weight version "
                         f"{r['version_bytes'] / MIB:.2f} MiB")  # fmt: skip
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--gen", type=int, default=1024)
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="timed steps per configuration (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda: bf16 + FlexAttention, allocator stats"
    )
    ap.add_argument("--only", default=None, help="comma-separated configurations, e.g. full-off-4,lora-on-2")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here (and a .md beside it)")
    ap.add_argument("--replan", type=Path, default=None, help="recompute the planner's columns of this JSON")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(json.loads(a.child))))
        return
    if a.replan:
        result = json.loads(a.replan.read_text())
        result["rows"] = [{**r, **planned(result["args"], r)} for r in result["rows"]]
        a.replan.write_text(json.dumps(result, indent=2))
        a.replan.with_suffix(".md").write_text(table(result) + "\n")
        print(table(result))
        return
    run_all(a)


def run_all(a: argparse.Namespace) -> None:
    from rich.progress import track

    from shared.model.tiny import init_tiny

    args = {k: v for k, v in vars(a).items() if k not in ("out", "replan", "child", "only")}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(a.threads)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = init_tiny(Path(tmp) / "model", seed=0, block_size=a.block, **model_overrides(args))
        saved = set()
        for conf in track(configurations(a.block, a.only), description="configurations"):
            save = conf["c"] == a.block and not conf["checkpointing"] and conf["lora"] not in saved
            saved |= {conf["lora"]} if save else set()
            job = {**args, **conf, "model": str(model), "tmp": tmp, "save": save}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], env=env,
                                  capture_output=True, text=True)  # fmt: skip
            if proc.returncode != 0:
                sys.exit(f"configuration {conf} failed:\n{proc.stderr[-4000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({**row, **planned(args, row)})
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU, {a.threads} threads"
    result = {"args": args, "torch": torch.__version__, "device": where, "rows": rows}
    print(f"{a.layers} layers, hidden {a.hidden}, vocab {a.vocab}, P={a.prompt}, L={a.gen}, block {a.block} "
          f"(R={a.block} copies), 2 responses per update, {device_settings(a.device)}, {where}")  # fmt: skip
    print(table(result))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2))
        a.out.with_suffix(".md").write_text(table(result) + "\n")


if __name__ == "__main__":
    main()
