"""The reward service's FastAPI app: `create_app(settings)` and `serve(settings)` (design.md section 4).

The verifier pool lives for the app's lifespan: started (and warmed) before the first request, closed after
the last. Run it with `python -m services.reward` (settings from `GTPO_REWARD_*`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.reward.metrics import RewardMetrics
from services.reward.routes import router
from services.reward.settings import RewardSettings
from services.reward.verify import VerifierPool

log = logging.getLogger(__name__)


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: an echoed id holding a lone surrogate (valid JSON
    `"\\udcff"`) stays valid JSON instead of failing UTF-8 encoding with a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


async def _http_error(request: Request, exc: Exception) -> AsciiJSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return AsciiJSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> AsciiJSONResponse:
    assert isinstance(exc, RequestValidationError)
    return AsciiJSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)


def create_app(settings: RewardSettings | None = None) -> FastAPI:
    """The app, with its pool started by the lifespan (so building the app starts nothing)."""
    settings = settings or RewardSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = VerifierPool(settings.workers, settings.timeout_s, memory_mb=settings.memory_mb)
        app.state.pool = pool
        stop, thread = threading.Event(), None
        try:
            if not await run_in_threadpool(pool.wait_ready):
                log.warning("verifier workers are not all warm yet; /ready reports the pool's health")
            if settings.worker:
                from services.reward.worker import start_worker

                thread = start_worker(pool, settings, stop)
            yield
        finally:
            stop.set()
            if thread is not None:
                await run_in_threadpool(thread.join, 30)
            app.state.pool = None
            await run_in_threadpool(pool.close)

    app = FastAPI(
        title="gtpo reward",
        description="Scores responses: math-verify accuracy in a killable process pool, format, length, speed.",
        lifespan=lifespan,
        default_response_class=AsciiJSONResponse,
        max_body_size=settings.max_body_bytes,
    )
    app.state.settings = settings
    app.state.pool = None
    app.state.metrics = RewardMetrics(lambda: app.state.pool)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.include_router(router)
    return app


def serve(settings: RewardSettings | None = None) -> None:
    """Run the service with uvicorn until interrupted (what `gtpo serve reward` calls)."""
    from shared.http import serve as serve_app

    settings = settings or RewardSettings()
    serve_app(create_app(settings), settings.host, settings.port)
