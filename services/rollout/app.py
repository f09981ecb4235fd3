"""The rollout service's FastAPI app: `create_app(settings)` and `serve(settings)` (docs/design.md section 4).

`POST /v1/generate`, `POST /v1/weights`, the OpenAI-compatible `/v1/models`, `/v1/completions` and
`/v1/chat/completions` (openai_routes.py), `GET /info` (what the trainer's start-up check reads), `/health`, `/ready`,
`/metrics`. The engine is loaded by the lifespan (so building the app loads nothing); in worker mode the lifespan also
runs the task worker (services/rollout/worker.py) in a background thread, sharing the engine host with the routes.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State

from services.rollout.engines import Engine, create_engine
from services.rollout.host import EngineHost, RolloutMetrics
from services.rollout.openai_routes import router as openai_router
from services.rollout.routes import router
from services.rollout.settings import RolloutSettings
from shared.http import health_router, install_error_handlers


def not_ready(state: State) -> str | None:
    """Why the service cannot do its work now, or None: no engine, or (worker mode) a task worker that cannot
    consume (its thread died, Redis down past `redis.outage_s`, no published weights version it can load)."""
    if state.host is None:
        return "the engine is not loaded yet"
    return None if state.worker is None else state.worker.problem()


def ready_info(state: State) -> dict[str, object]:
    """What a ready service says of itself: its engine, the version it serves, and a weights problem it serves
    through (a refused or unreadable newer version). `policy_version` is the engine's (0 for the start model too);
    `served_version` is the published version loaded, None while the start model serves."""
    host = state.host
    out: dict[str, object] = {"engine": host.engine.name, "policy_version": host.engine.policy_version,
                              "served_version": host.served_version}  # fmt: skip
    problem = None if state.worker is None else state.worker.weights_problem()
    if problem is not None:
        out["weights_problem"] = problem
    return out


def create_app(settings: RolloutSettings, engine: Engine | None = None) -> FastAPI:
    """The app; pass `engine` to serve an already built one (tests), else the lifespan builds (and closes) it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eng = engine or await run_in_threadpool(
            lambda: create_engine(settings.engine, settings.model, **settings.engine_options())
        )
        app.state.host = EngineHost(eng, app.state.metrics, start=settings.model)
        stop = threading.Event()
        try:
            if settings.worker:
                from services.rollout.worker import start_worker

                app.state.worker = start_worker(app.state.host, settings, stop)
            yield
        finally:
            stop.set()  # the worker abandons its batch at the next block boundary; its tasks stay pending
            if app.state.worker is not None:
                await run_in_threadpool(app.state.worker.thread.join, 30)
            app.state.host, app.state.worker = None, None
            if engine is None:
                await run_in_threadpool(eng.close)

    app = FastAPI(
        title="gtpo rollout",
        description="Block-diffusion rollouts with step maps; weight versions pushed by the trainer.",
        version="0.1.0",
        lifespan=lifespan,
        max_body_size=settings.max_body_bytes,
    )
    app.state.settings = settings
    app.state.metrics = RolloutMetrics()
    app.state.host, app.state.worker = None, None
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(openai_router)
    app.include_router(health_router(lambda: not_ready(app.state), lambda: ready_info(app.state)))
    return app


def serve(settings: RolloutSettings) -> None:
    """Run the service with uvicorn until interrupted (what `gtpo serve rollout` calls)."""
    from shared.http import serve as serve_app

    serve_app(create_app(settings), settings.host, settings.port)
