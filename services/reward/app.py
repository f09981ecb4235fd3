"""The reward service's FastAPI app: `create_app(settings)` and `serve(settings)` (docs/design.md section 4).

The verifier pool lives for the app's lifespan: started (and warmed) before the first request, closed after
the last. Run it with `python -m services.reward` (settings from `GTPO_REWARD_*`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from services.reward.code import CodeRunner
from services.reward.metrics import RewardMetrics
from services.reward.routes import router
from services.reward.sandbox import Limits, SandboxUnavailable
from services.reward.settings import RewardSettings
from services.reward.verify import CheckFn, VerifierPool, check_pair
from shared.http import SafeJSONResponse, health_router, install_error_handlers

log = logging.getLogger(__name__)


def create_app(settings: RewardSettings | None = None, *, check: CheckFn = check_pair) -> FastAPI:
    """The app, with its pool started by the lifespan (so building the app starts nothing).

    Args:
        settings: the service's settings; None = from `GTPO_REWARD_*`.
        check: what the verifier workers run per answer (`check_pair`; tests pass checks that hang or crash).
    """
    settings = settings or RewardSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = VerifierPool(settings.workers, settings.timeout_s, memory_mb=settings.memory_mb, check=check)
        app.state.pool, app.state.code = pool, _code_runner(settings)
        stop, thread = threading.Event(), None
        try:
            if not await run_in_threadpool(pool.wait_ready):
                log.warning("verifier workers are not all warm yet; /ready reports the pool's health")
            if settings.worker:
                from services.reward.worker import start_worker

                app.state.worker = start_worker(pool, settings, stop, app.state.code)
                thread = app.state.worker.thread
            yield
        finally:
            stop.set()
            if thread is not None:
                await run_in_threadpool(thread.join, 30)
            code, app.state.pool, app.state.worker, app.state.code = app.state.code, None, None, None
            await run_in_threadpool(pool.close)
            if code is not None:
                await run_in_threadpool(code.close)

    app = FastAPI(
        title="gtpo reward",
        description="Scores responses: math-verify accuracy in a killable process pool, format, length, speed.",
        lifespan=lifespan,
        default_response_class=SafeJSONResponse,
        max_body_size=settings.max_body_bytes,
    )
    app.state.settings = settings
    app.state.pool, app.state.worker, app.state.code = None, None, None
    app.state.metrics = RewardMetrics(lambda: app.state.pool)
    install_error_handlers(app)
    app.include_router(health_router(lambda: _pool_problem(app), lambda: app.state.pool.stats()))
    app.include_router(router)
    return app


def _code_runner(settings: RewardSettings) -> CodeRunner | None:
    """The code reward's sandbox pool, or None (logged) where no sandbox can run: code items then score `error`."""
    try:
        runner = CodeRunner(settings.sandbox, settings.code_workers, settings.code_unit_s,
                            limits=Limits(memory_mb=settings.code_memory_mb),
                            all_or_nothing=settings.code_all_or_nothing)  # fmt: skip
    except SandboxUnavailable as e:
        log.warning("the code reward cannot run: %s", e)
        return None
    if runner.backend == "insecure":
        log.warning("the code reward runs programs WITHOUT isolation (sandbox=insecure): trusted code only")
    return runner


def _pool_problem(app: FastAPI) -> str | None:
    """Why the service cannot score now (None when it can): the verifier pool's health, and in worker mode the
    stream worker's (its thread alive, Redis reachable)."""
    pool = app.state.pool
    if pool is None or not pool.healthy():
        return "the verifier pool is not healthy"
    return None if app.state.worker is None else app.state.worker.problem()


def serve(settings: RewardSettings | None = None) -> None:
    """Run the service with uvicorn until interrupted (what `gtpo serve reward` calls)."""
    from shared.http import serve as serve_app

    settings = settings or RewardSettings()
    serve_app(create_app(settings), settings.host, settings.port)
