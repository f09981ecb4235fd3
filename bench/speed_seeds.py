"""The speed methods over seeds: tokens per step and held-out avg@k of each arm against GTPO from the same SFT
checkpoint, per seed and as a mean, from the run folders `gtpo demo --speed --seed N --out DIR` wrote.

    python bench/speed_seeds.py runs/b4_s0 runs/b4_s1 runs/b4_s2 [--plot speed_seeds.png] [--json out.json]

Reads each folder's `rl/eval.json` (GTPO) and `rl_<method>/eval.json` (every finished arm); an arm missing in a
seed is shown as missing, not dropped silently. Prints a markdown table: per method and seed, the tokens per step
(gain against that seed's GTPO) and avg@k (points against GTPO), then the mean gain, the worst accuracy change and
how many seeds met a target (gain >= --gain, accuracy >= GTPO - --points).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def read_arms(run: Path) -> dict[str, dict]:
    """{"gtpo" | method: the eval record's result} of one run folder."""
    arms = {}
    for folder in sorted(run.glob("rl*")):
        record = folder / "eval.json"
        if not record.exists():
            continue
        name = "gtpo" if folder.name == "rl" else folder.name.removeprefix("rl_")
        arms[name] = json.loads(record.read_text())["result"]
    if "gtpo" not in arms:
        raise SystemExit(f"{run}: no rl/eval.json (GTPO arm); is it a `gtpo demo` folder?")
    return arms


def changes(arms: dict[str, dict]) -> dict[str, tuple[float, float, float, float]]:
    """method -> (tokens per step, gain against GTPO, avg@k, points against GTPO)."""
    base = arms["gtpo"]
    out = {}
    for name, r in arms.items():
        tps, acc = r["tokens_per_step"], r["avg_at_k"]
        out[name] = (tps, tps / base["tokens_per_step"] - 1, acc, 100 * (acc - base["avg_at_k"]))
    return out


def table(runs: list[Path], gain: float, points: float) -> tuple[str, dict]:
    per_seed = {run: changes(read_arms(run)) for run in runs}
    methods = ["gtpo"] + sorted({m for c in per_seed.values() for m in c} - {"gtpo"})
    head = "| method | " + " | ".join(run.name for run in runs) + " | mean gain | worst change | seeds on target |"
    lines = [head, "|---|" + "---:|" * (len(runs) + 3)]
    summary = {}
    for m in methods:
        cells, gains, deltas = [], [], []
        for run in runs:
            c = per_seed[run].get(m)
            if c is None:
                cells.append("-")
                continue
            tps, g, acc, d = c
            cells.append(f"{tps:.2f} ({g:+.1%}), {acc:.1%} ({d:+.1f})" if m != "gtpo" else f"{tps:.2f}, {acc:.1%}")
            gains.append(g)
            deltas.append(d)
        ok = sum(g >= gain and d >= -points for g, d in zip(gains, deltas, strict=True))
        mean = f"{statistics.fmean(gains):+.1%}" if gains and m != "gtpo" else ""
        worst = f"{min(deltas):+.1f}" if deltas and m != "gtpo" else ""
        target = f"{ok} of {len(gains)}" if m != "gtpo" else ""
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {mean} | {worst} | {target} |")
        summary[m] = {"gains": gains, "points": deltas, "on_target": ok}
    return "\n".join(lines), {"runs": [str(r) for r in runs], "per_seed": {str(k): v for k, v in per_seed.items()},
                              "summary": summary}  # fmt: skip


def plot(result: dict, path: Path) -> None:
    """Tokens per step against avg@k, one marker per method, one point per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    methods = sorted({m for c in result["per_seed"].values() for m in c})
    for i, m in enumerate(methods):
        pts = [c[m] for c in result["per_seed"].values() if m in c]
        ax.scatter([p[0] for p in pts], [100 * p[2] for p in pts], label=m, marker="os^vD<>p*"[i % 9])
    ax.set_xlabel("tokens per denoising step")
    ax.set_ylabel("held-out avg@k (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--gain", type=float, default=0.10, help="target tokens-per-step gain (0.10 = +10%%)")
    ap.add_argument("--points", type=float, default=2.0, help="allowed accuracy loss against GTPO, points")
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    text, result = table(a.runs, a.gain, a.points)
    print(f"tokens per step (gain vs GTPO), avg@k (points vs GTPO); target: >= {a.gain:+.0%}, >= -{a.points} points")
    print(text)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    if a.plot:
        plot(result, a.plot)


if __name__ == "__main__":
    main()
