# ruff: noqa: T201 - a report printed to the terminal
"""Sharded checkpoints on CUDA: FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 with the configs of deploy/accelerate/.

    python scripts/sharded_check.py [--out DIR]     # on a GPU box; DeepSpeed configs need `deepspeed` installed

For each config, on every visible GPU: an uninterrupted SFT run of the tiny model (fp32, a checkpoint every step),
then a run resumed from its step-2 checkpoint; the losses and the final weights must be identical. FSDP2 also
resumes that checkpoint on one process (resharding) within 1e-5. Writes DIR/sharded_check.json (DIR: $OUT, else
build/sharded_check_out) and prints one line per check. The CPU tests (tests/test_sharded.py) check FSDP2 with gloo;
this is the part that needs NCCL and DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STEPS, RESUME_AT = 4, 2


def _losses(run: Path) -> dict[int, float]:
    rows = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    return {int(m["step"]): m["loss"] for m in rows}


def _weights(run: Path):
    from safetensors.torch import load_file

    return load_file(run / "checkpoints" / f"step-{STEPS:08d}" / "model" / "model.safetensors")


def _sft(config: str, processes: int, cfg: Path, *extra: str) -> subprocess.CompletedProcess:
    from shared.process import free_port

    launcher = [sys.executable]
    if processes > 1 or config != "fsdp":  # DeepSpeed needs its launcher even on one GPU
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(REPO / "deploy" / "accelerate" / f"{config}.yaml"), "--num_processes", str(processes),
                    "--mixed_precision", "no", "--main_process_port", str(free_port())]  # fmt: skip
    cmd = [*launcher, "-m", "services", "sft", "--config", str(cfg), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=REPO)


def check(config: str, gpus: int, work: Path, model: Path, data: Path) -> dict:
    """Straight run, resume from step 2 (same count), and for FSDP2 a resume on one process."""
    base = {"model": str(model), "data": str(data), "steps": STEPS, "batch_size": 8, "save_every": 1,
            "micro_batch_size": 4, "keep_last": 10, "optim": {"lr": 1e-3}}  # fmt: skip
    result: dict = {"config": config, "processes": gpus}

    def run(name: str, processes: int, resume_from: Path | None) -> Path:
        out = work / config / name
        if resume_from is not None:
            (out / "checkpoints").mkdir(parents=True)
            shutil.copytree(resume_from, out / "checkpoints" / resume_from.name)
        cfg = out.with_suffix(".yaml")
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(json.dumps({**base, "output_dir": str(out)}))
        t0 = time.monotonic()
        proc = _sft(config, processes, cfg, *(["--resume"] if resume_from else []))
        result[f"{name}_s"] = round(time.monotonic() - t0, 1)
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: exit {proc.returncode}: {proc.stderr[-2500:]}")
        return out

    try:
        straight = run("straight", gpus, None)
        step = straight / "checkpoints" / f"step-{RESUME_AT:08d}"
        result["layout"] = sorted(p.name for p in step.iterdir())
        resumed = run("resumed", gpus, step)
        a, b = _weights(straight), _weights(resumed)
        la, lb = _losses(straight), _losses(resumed)
        result["losses"] = la
        result["resume_exact"] = la == lb and all(bool((a[k] == b[k]).all()) for k in a)
        if config == "fsdp":
            one = run("resharded_1", 1, step)
            c = _weights(one)
            result["reshard_max_diff"] = max(float((a[k] - c[k]).abs().max()) for k in a)
        result["ok"] = result["resume_exact"] and result.get("reshard_max_diff", 0.0) <= 1e-5
    except Exception as exc:  # every failure goes into the JSON, and the next config still runs
        result.update(ok=False, error=str(exc)[-3000:])
    return result


def main() -> None:
    import torch

    from shared.model.tiny import init_tiny

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "build/sharded_check_out")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    report: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": gpus, "checks": []}
    if gpus == 0:
        report["error"] = "no CUDA device"
    else:
        report["gpu"] = torch.cuda.get_device_name(0)
        work = args.out / "runs"
        model = init_tiny(work / "tiny", seed=0)
        data = work / "data.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "response": str(2 * a)}) + "\n" for a in range(40)))
        has_ds = importlib.util.find_spec("deepspeed") is not None
        for config in ("fsdp", "zero2", "zero3"):
            if config != "fsdp" and not has_ds:
                report["checks"].append({"config": config, "ok": False, "error": "deepspeed is not installed"})
                continue
            res = check(config, gpus, work, model, data)
            report["checks"].append(res)
            print(f"{config}: {'ok' if res['ok'] else 'FAILED'} {res.get('error', '')[:300]}", flush=True)
    (args.out / "sharded_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "checks"}))


if __name__ == "__main__":
    main()
