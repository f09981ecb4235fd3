"""The rollout service: `POST /v1/generate`, `POST /v1/weights`, `/health`, `/ready`, `/metrics`; in worker mode it
also consumes the tasks stream (services/rollout/worker.py) from a background thread.

The engine is not thread-safe: generation and weight loads take one lock, and run in a worker thread so the
event loop keeps answering health checks during a long batch.
"""

from __future__ import annotations

import threading
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool

from services.rollout.engines import Engine, create_engine
from services.rollout.settings import RolloutSettings
from shared.contracts import (
    GenerateRequest,
    GenerateResponse,
    GenerationRequest,
    WeightsRequest,
    WeightsResponse,
)
from shared.http import confine, metrics_response, require_token


class RolloutMetrics:
    """Prometheus counters of one app (own registry: several apps may live in one test process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("gtpo_rollout_requests", "generate requests", ["source"], registry=self.registry)
        self.tokens = Counter("gtpo_rollout_tokens", "response tokens generated", registry=self.registry)
        self.seconds = Histogram("gtpo_rollout_batch_seconds", "seconds per generate batch", registry=self.registry)
        self.version = Gauge("gtpo_rollout_policy_version", "loaded policy version", registry=self.registry)
        self.weight_loads = Counter("gtpo_rollout_weight_loads", "weight loads", ["source"], registry=self.registry)


class EngineHost:
    """The engine behind a lock, with metrics."""

    def __init__(self, engine: Engine, metrics: RolloutMetrics) -> None:
        self.engine, self.metrics = engine, metrics
        self.lock = threading.Lock()
        self.loaded: tuple[int, str] | None = None  # (version, path) of the last load; None = the start model
        metrics.version.set(engine.policy_version)

    def generate(self, requests: list[GenerationRequest], source: str):
        t0 = time.perf_counter()
        with self.lock:
            out = self.engine.generate(requests)
        self.metrics.seconds.observe(time.perf_counter() - t0)
        self.metrics.requests.labels(source).inc()
        self.metrics.tokens.inc(sum(len(r.token_ids) for group in out for r in group))
        return out

    def load(self, path, version: int, source: str) -> float:
        t0 = time.perf_counter()
        with self.lock:
            if self.loaded == (version, str(path)):
                return 0.0  # already served (pushed over HTTP and announced in the registry)
            self.engine.load_weights(path, version)
            self.loaded = (version, str(path))
        self.metrics.version.set(version)
        self.metrics.weight_loads.labels(source).inc()
        return time.perf_counter() - t0


def _settings(request: Request) -> RolloutSettings:
    return request.app.state.settings


def _host(request: Request) -> EngineHost:
    host = getattr(request.app.state, "host", None)
    if host is None:
        raise HTTPException(503, "engine not loaded yet")
    return host


def _encode_prompts(req: GenerateRequest, engine: Engine, settings: RolloutSettings) -> list[list[int]]:
    if req.prompt_ids is not None:
        prompts = req.prompt_ids
    else:
        tok = engine.tokenizer  # type: ignore[attr-defined]
        if req.chat:
            prompts = [
                list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)["input_ids"])
                for p in req.prompts or []
            ]
        else:
            prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in req.prompts or []]
    if req.params.max_new_tokens > settings.max_new_tokens:
        raise HTTPException(422, f"params.max_new_tokens: at most {settings.max_new_tokens} on this service")
    if len(prompts) * req.params.n > settings.max_prompts:
        raise HTTPException(422, f"prompts x n: at most {settings.max_prompts} rollouts per request")
    for i, p in enumerate(prompts):
        if not p or len(p) > settings.max_prompt_tokens:
            raise HTTPException(422, f"prompts[{i}]: needs 1 to {settings.max_prompt_tokens} tokens, got {len(p)}")
    return prompts


def _lifespan(settings: RolloutSettings, engine: Engine | None):
    """Load the engine (in a thread), start the task worker in worker mode, stop it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.settings = settings
        metrics = RolloutMetrics()
        app.state.metrics = metrics
        eng = engine or await run_in_threadpool(
            create_engine,
            settings.engine,
            settings.model,
            device=settings.device,
            max_batch_size=settings.max_batch_size,
        )
        app.state.host = EngineHost(eng, metrics)
        stop = threading.Event()
        thread = None
        if settings.worker:
            from services.rollout.worker import start_worker

            thread = start_worker(app.state.host, settings, stop)
        app.state.worker_thread = thread
        yield
        stop.set()
        if thread is not None:
            thread.join(timeout=30)

    return lifespan


def create_app(settings: RolloutSettings, engine: Engine | None = None) -> FastAPI:
    """The rollout app; pass `engine` to serve an already built one (tests)."""
    app = FastAPI(title="gtpo rollout", version="0.1.0", lifespan=_lifespan(settings, engine))

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(req: GenerateRequest, host: EngineHost = Depends(_host)) -> GenerateResponse:
        prompts = _encode_prompts(req, host.engine, settings)
        reqs = [GenerationRequest(prompt_ids=p, params=req.params) for p in prompts]
        try:
            out = await run_in_threadpool(host.generate, reqs, "http")
        except ValueError as e:  # bad token ids, bad sampling settings for this model
            raise HTTPException(422, str(e)) from e
        return GenerateResponse(rollouts=out, policy_version=host.engine.policy_version)

    @app.post("/v1/weights", response_model=WeightsResponse)
    async def weights(req: WeightsRequest, request: Request, host: EngineHost = Depends(_host)) -> WeightsResponse:
        require_token(request, settings.api_token)
        try:
            path = confine(req.path, settings.root())
        except ValueError as e:
            raise HTTPException(403, str(e)) from e
        if not (path / "config.json").is_file():
            raise HTTPException(422, f"path: {req.path} holds no SDAR checkpoint (no config.json)")
        try:
            secs = await run_in_threadpool(host.load, path, req.version, "http")
        except (ValueError, FileNotFoundError) as e:
            raise HTTPException(422, str(e)) from e
        return WeightsResponse(version=req.version, path=str(path), seconds=secs)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> dict[str, object]:
        host = getattr(request.app.state, "host", None)
        if host is None:
            raise HTTPException(503, "engine not loaded")
        thread = request.app.state.worker_thread
        if thread is not None and not thread.is_alive():
            raise HTTPException(503, "the task worker thread died")
        return {"status": "ready", "policy_version": host.engine.policy_version, "engine": host.engine.name}

    @app.get("/metrics")
    async def metrics(request: Request):
        return metrics_response(request.app.state.metrics.registry)

    return app
