"""Experiment trackers (TensorBoard, Weights & Biases, MLflow, trackio) through Accelerate's tracking API.

`log_with` names the trackers (none by default). Each one's package is imported only when it is named; a named
tracker whose package is missing is a `TrackerError` naming the extra that installs it. The trackers write next to
`metrics.jsonl` where they write files at all: TensorBoard to `output_dir/tensorboard/`, W&B's run folder to
`output_dir/wandb/` (offline with `WANDB_MODE=offline`), MLflow to `output_dir/mlruns/` unless
`MLFLOW_TRACKING_URI` says otherwise; trackio keeps its local database where trackio keeps it.

`Trackers` is the one writer of `metrics.jsonl` (main process): every row the training loops log goes there and
to every tracker at its `step`, and the resolved config (secrets as stars, Redis URLs without passwords) is the
run's hyper-parameters, flattened to dotted keys. The loops own the step (the RL row is complete only after its
checkpoint), so the learner only computes a row and never writes one.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
"""One JSON row per step in the run's output folder."""

# tracker -> (module that must import, pip extra that installs it)
REQUIREMENTS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}


class TrackerError(ValueError):
    """A named tracker cannot run here (its package is missing); the message names the extra to install."""


def check_installed(names: Iterable[str]) -> None:
    """Raise TrackerError for the first tracker in `names` whose package is not installed (nothing is imported)."""
    for name in names:
        module, extra = REQUIREMENTS[name]
        if importlib.util.find_spec(module) is None:
            raise TrackerError(
                f"log_with: {name} needs the {module} package; install it with `pip install 'gtpo[{extra}]'` "
                f"(or `pip install {module}`)"
            )


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested config -> `{"optim.lr": 1e-3, ...}` with values every tracker stores (lists and None as text).

    >>> flatten({"optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "ref_model": None, "steps": 3})
    {'optim.lr': 0.1, 'optim.betas': '[0.9, 0.99]', 'ref_model': 'None', 'steps': 3}
    """
    out: dict[str, bool | int | float | str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = "None" if value is None else json.dumps(value)
    return out


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics row (the step is the x-axis, not a curve; bools become 0/1)."""
    return {k: float(v) for k, v in metrics.items() if k != "step" and isinstance(v, (bool, int, float))}


def build(names: Iterable[str], output_dir: Path, project: str, run_name: str) -> list:
    """Accelerate tracker objects for `names`, pointed at `output_dir` (their packages import when they start)."""
    from accelerate import tracking

    out = []
    for name in names:
        if name == "tensorboard":
            out.append(tracking.TensorBoardTracker("tensorboard", str(output_dir)))
        elif name == "wandb":
            out.append(tracking.WandBTracker(project, dir=str(output_dir), name=run_name))
        elif name == "mlflow":
            import mlflow

            # MLflow's own default is ./mlruns of whatever directory the trainer started in
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                mlflow.set_tracking_uri((output_dir / "mlruns").resolve().as_uri())
            out.append(tracking.MLflowTracker(experiment_name=project, logging_dir=None, run_name=run_name))
        elif name == "trackio":
            out.append(tracking.TrackioTracker(project, name=run_name))
    return out


class Trackers:
    """The run's trackers: `log` a metrics row, `close` at the end; with none named every call is a no-op, so the
    training loops call them unconditionally. Accelerate's tracker objects act on the main process only.

    Args:
        cfg: a TrainerConfig (`log_with`, `tracker_project`, `output_dir`); its resolved config is logged once as
            the run's hyper-parameters.
    """

    def __init__(self, cfg) -> None:
        from accelerate import PartialState

        self.main = PartialState().is_main_process
        self.path = Path(cfg.output_dir) / METRICS_FILE
        names = list(dict.fromkeys(cfg.log_with))
        check_installed(names)
        self.trackers = build(names, Path(cfg.output_dir), cfg.tracker_project, run_name(cfg))
        config = flatten(cfg.model_dump(mode="json"))  # secrets as stars, Redis URLs without passwords
        for t in self.trackers:
            t.start()
            t.store_init_configuration(config)

    def log(self, metrics: Mapping[str, Any]) -> None:
        """One metrics row (it carries its `step`) to `metrics.jsonl` and every tracker."""
        if self.main:
            with self.path.open("a") as f:
                f.write(json.dumps(dict(metrics)) + "\n")
        values = scalars(metrics)
        for t in self.trackers:
            t.log(values, step=int(metrics["step"]))

    def rewind(self, step: int, row: Mapping[str, Any] | None) -> None:
        """On resume from the checkpoint of `step`: drop the rows of later steps (never made durable) and put back
        the checkpointed step's `row` if a crash came between its checkpoint and its row (main process)."""
        if not self.main:
            return
        keep_rows(self.path, lambda r: r["step"] <= step)
        if not row or step == 0:
            return
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        if step not in {json.loads(x)["step"] for x in lines if x.strip()}:
            with self.path.open("a") as f:
                f.write(json.dumps(dict(row)) + "\n")

    def close(self) -> None:
        for t in self.trackers:
            t.finish()
        self.trackers = []


def run_name(cfg) -> str:
    """The run's name in the trackers: `run_id` for RL, else the output folder's name."""
    return getattr(cfg, "run_id", None) or Path(cfg.output_dir).name


def keep_rows(path: Path, keep) -> None:
    """Rewrite a JSONL file with only the rows `keep(row)` accepts (atomically)."""
    if not path.exists():
        return
    rows = [x for x in path.read_text().splitlines() if x.strip() and keep(json.loads(x))]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    tmp.replace(path)
