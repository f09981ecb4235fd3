"""The reward service's FastAPI app: `create_app(settings)` and `serve(settings)` (design.md section 4).

The verifier pool lives for the app's lifespan: started (and warmed) before the first request, closed after
the last. Run it with `python -m services.reward` (settings from `GTPO_REWARD_*`).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.reward.metrics import RewardMetrics
from services.reward.routes import router
from services.reward.settings import RewardSettings
from services.reward.verify import CheckFn, VerifierPool, check_pair

log = logging.getLogger(__name__)


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: an echoed id holding a lone surrogate (valid JSON
    `"\\udcff"`) stays valid JSON instead of failing UTF-8 encoding with a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


ECHO_CHARS = 200
"""An input echoed in an error is cut to this many characters (a 4 MB response is not worth sending back)."""
ECHO_ITEMS = 20
"""A list or object echoed in an error keeps this many entries..."""
ECHO_DEPTH = 6
"""... and this many levels of nesting."""


def _cut(text: str) -> str:
    return text if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS]}... ({len(text)} characters)"


def _echo_int(value: int) -> int | str:
    if value.bit_length() <= 63:
        return value
    try:
        return _cut(str(value))
    except ValueError:  # past Python's digit limit for int -> str
        return f"<an integer of {value.bit_length()} bits>"


def echo(value: Any, depth: int = 0) -> Any:
    """`value` as JSON data that always encodes (strict JSON, ASCII): what an error may echo of an input.

    Non-finite floats become `"nan"` / `"inf"`, integers beyond 63 bits and bytes become text, long strings and
    containers are cut, anything else is shown by its `str`.

    >>> echo({"token_count": float("inf"), "big": 2**70, "raw": b"\\xff"})
    {'token_count': 'inf', 'big': '1180591620717411303424', 'raw': '\\\\xff'}
    """
    if value is None or isinstance(value, bool | str):
        return _cut(value) if isinstance(value, str) else value
    if isinstance(value, int):
        return _echo_int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, bytes | bytearray):
        return _cut(bytes(value[: ECHO_CHARS * 4]).decode("utf-8", errors="backslashreplace"))
    if depth >= ECHO_DEPTH:
        return f"<{type(value).__name__}>"
    if isinstance(value, dict):
        items = list(value.items())
        return {_cut(str(echo(k, depth + 1))): echo(v, depth + 1) for k, v in items[:ECHO_ITEMS]}
    if isinstance(value, list | tuple | set | frozenset):
        return [echo(v, depth + 1) for v in list(value)[:ECHO_ITEMS]]
    try:
        return _cut(str(value))
    except Exception:  # a __str__ that raises: the type is all we can say
        return f"<{type(value).__name__}>"


async def _http_error(request: Request, exc: Exception) -> AsciiJSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return AsciiJSONResponse({"detail": echo(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> AsciiJSONResponse:
    """422 with pydantic's errors (field, message, input), whatever the input holds."""
    assert isinstance(exc, RequestValidationError)
    errors = [{k: echo(v) for k, v in e.items()} if isinstance(e, dict) else echo(e) for e in exc.errors()]
    return AsciiJSONResponse({"detail": errors}, status_code=422)


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
