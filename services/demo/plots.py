"""Training curves as PNG (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (
    ("reward_mean", "mean reward (trained groups)"),
    ("accuracy", "rollout accuracy (all groups)"),
    ("tokens_per_step", "tokens per denoising step"),
)


def read_metrics(path: Path) -> list[dict]:
    """The last record of every step (a resumed run may have rewritten some)."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            m = json.loads(line)
            by_step[int(m["step"])] = m
    return [by_step[s] for s in sorted(by_step)]


def rl_figure(runs: dict[str, list[dict]], title: str = "GTPO"):
    """One panel per metric (reward, accuracy, tokens per denoising step) against the RL step; one curve per run
    (`runs`: label -> metric rows), with a legend when there are several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for ax, (key, label) in zip(axes, PANELS, strict=True):
        for name, rows in runs.items():
            ax.plot([r["step"] for r in rows], [r.get(key, float("nan")) for r in rows], marker="o", markersize=3,
                    label=name)  # fmt: skip
        ax.set_xlabel("RL step")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


TIMING_PANELS = (
    ("seconds per step", (("time_wait_s", "waiting for data", "-"), ("time_train_s", "training", "--"),
                          ("time_checkpoint_s", "checkpoint + publish", ":"))),
    ("staleness of trained samples (versions)", (("staleness_mean", "mean", "-"), ("staleness_max", "max", "--"))),
    ("busy fraction", (("busy_rollout", "rollout workers", "-"), ("busy_reward", "reward workers", "--"))),
)  # fmt: skip
"""Where a run's time goes: per panel, (metric, label, line style). One run: one colour per series, so the legend
tells the series apart; several runs: one colour per run and the line style tells the series apart."""


def timing_figure(runs: dict[str, list[dict]], title: str = "GTPO"):
    """The step's phases, the staleness of what it trained and the workers' busy fractions against the RL step:
    what shows whether rollout and training overlap (`max_staleness`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TIMING_PANELS), figsize=(4.2 * len(TIMING_PANELS), 3.4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (label, series) in zip(axes, TIMING_PANELS, strict=True):
        for i, (name, rows) in enumerate(runs.items()):
            for j, (key, what, style) in enumerate(series):
                if any(key in r for r in rows):
                    colour = colours[(i if len(runs) > 1 else j) % len(colours)]
                    ax.plot([r["step"] for r in rows], [r.get(key, float("nan")) for r in rows], style,
                            marker="o", markersize=2, color=colour, label=f"{name}: {what}" if len(runs) > 1 else what)  # fmt: skip
        ax.set_xlabel("RL step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _save(fig, out: Path) -> Path:
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_timing(metrics: dict[str, Path], out: Path, title: str = "GTPO") -> Path:
    """Write the timing curves of one or more runs (label -> metrics.jsonl) as a PNG."""
    return _save(timing_figure({name: read_metrics(path) for name, path in metrics.items()}, title), out)


def plot_rl(metrics: dict[str, Path], out: Path, title: str = "GTPO") -> Path:
    """Write the RL curves of one or more runs (label -> metrics.jsonl) as a PNG."""
    return _save(rl_figure({name: read_metrics(path) for name, path in metrics.items()}, title), out)


def pareto_figure(points: list[dict], title: str = "speed against accuracy"):
    """Held-out accuracy (avg@k) against tokens per denoising step, one labelled point per arm; the Pareto front
    (arms no other arm beats on both) is joined by a line. `points`: dicts with label, tokens_per_step, avg_at_k
    and pareto (`services.demo.pipeline.pareto_points`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    for p in points:
        ax.scatter([p["tokens_per_step"]], [100 * p["avg_at_k"]], s=36, label=p["label"],
                   marker="o" if p["pareto"] else "x")  # fmt: skip
        ax.annotate(p["label"], (p["tokens_per_step"], 100 * p["avg_at_k"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
    front = sorted((p["tokens_per_step"], 100 * p["avg_at_k"]) for p in points if p["pareto"])
    if len(front) > 1:
        ax.plot(*zip(*front, strict=True), "--", color="grey", linewidth=1, label="Pareto front")
    ax.set_xlabel("tokens per denoising step")
    ax.set_ylabel("held-out avg@k (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_pareto(points: list[dict], out: Path, title: str = "speed against accuracy") -> Path:
    """Write `pareto_figure` as a PNG."""
    return _save(pareto_figure(points, title), out)
