"""The trainer's HTTP side: `/health`, `/ready`, `/status` and Prometheus `/metrics`, served from a background thread
(the training loop blocks)."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily

from shared.contracts.wire import TrainerStatus

PHASES = ("wait", "train", "checkpoint")
"""A step's phases: waiting for scored groups, training, checkpoint + publish + acknowledge."""


class TrainerMetrics:
    """The Prometheus registry of one trainer: step-phase and staleness histograms, and gauges read from the
    driver's status at scrape time."""

    def __init__(self, status: Callable[[], TrainerStatus]) -> None:
        self.registry = CollectorRegistry()
        self.phase_seconds = Histogram(
            "gtpo_trainer_phase_seconds", "seconds per RL step in each phase", ["phase"], registry=self.registry,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, float("inf")),
        )  # fmt: skip
        self.staleness = Histogram(
            "gtpo_trainer_sample_staleness", "policy versions between a trained sample's weights and the trainer's",
            registry=self.registry, buckets=(0, 1, 2, 3, 4, 6, 8, 16, float("inf")),
        )  # fmt: skip
        self.registry.register(_StatusGauges(status))

    def observe_step(self, timings: dict[str, float], staleness: list[int]) -> None:
        for phase in PHASES:
            if phase in timings:
                self.phase_seconds.labels(phase).observe(timings[phase])
        for s in staleness:
            self.staleness.observe(s)


class _StatusGauges:
    """A custom collector: the driver's status as gauges, fresh at every scrape."""

    def __init__(self, status: Callable[[], TrainerStatus]) -> None:
        self.status = status

    def describe(self):
        return []

    def collect(self):
        s = self.status()
        for name in ("step", "policy_version", "groups_buffered", "samples_in_flight", "groups_open"):
            yield GaugeMetricFamily(f"gtpo_trainer_{name}", name.replace("_", " "), value=float(getattr(s, name)))
        for k, v in (s.last or {}).items():
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("time", "step"):
                yield GaugeMetricFamily(f"gtpo_trainer_last_{k}", f"last step's {k}", value=float(v))


def json_safe(value):
    """`value` with every non-finite float as its name ("nan", "inf", "-inf"): JSON has no such numbers, and a
    diverged loss must not turn the status page into a 500.

    >>> json_safe({"loss": float("nan"), "xs": [1.0, float("-inf")]})
    {'loss': 'nan', 'xs': [1.0, '-inf']}
    """
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def create_app(status: Callable[[], TrainerStatus], ready, metrics: TrainerMetrics, weights=None, token=None):
    """The trainer's FastAPI app.

    Args:
        status: what `/status` shows.
        ready: () -> None when the trainer is collecting or training, else why not.
        metrics: its Prometheus registry.
        weights: weights.transport=http: the `WeightStore` whose versions `/v1/weights/...` serves; None = off.
        token: the bearer token those routes require (the run's `api_token`); None = open, like `/status`.
    """
    from fastapi import FastAPI

    from shared.http import SafeJSONResponse, health_router, install_error_handlers, metrics_response

    app = FastAPI(title="gtpo trainer", default_response_class=SafeJSONResponse)
    install_error_handlers(app)
    app.include_router(health_router(ready))

    @app.get("/status")
    def get_status() -> dict:
        return json_safe(status().model_dump(mode="python"))

    @app.get("/metrics")
    def get_metrics():
        return metrics_response(metrics.registry)

    if weights is not None:
        from services.trainer.orchestrator.weights_server import weights_router

        app.include_router(weights_router(weights, token))
    return app


def start_server(app, port: int) -> threading.Thread:
    """Serve `app` on `port` (all interfaces) from a daemon thread."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="0.0.0.0", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="trainer-status", daemon=True)
    thread.start()
    return thread
