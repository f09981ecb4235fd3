"""HTTP pieces every service shares: bearer-token auth, path confinement, the health router, error handlers that
render any input, Prometheus exposition, uvicorn."""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import SecretStr
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

T = TypeVar("T")

DISCONNECT_POLL_S = 0.2
"""How often a long request checks whether its client is still there."""
ECHO_CHARS = 200
"""An error echoes at most this many characters of a bad value (an input can be megabytes)."""
ECHO_ITEMS = 20
"""... and at most this many items of a bad list or object."""


def bearer_headers(token: SecretStr | None) -> dict[str, str]:
    """The `Authorization` header a client sends to a route behind `require_token` (none without a token)."""
    return {"Authorization": f"Bearer {token.get_secret_value()}"} if token is not None else {}


def require_token(request: Request, expected: SecretStr | None) -> None:
    """Refuse a mutating call without `Authorization: Bearer <token>`; with no token configured, refuse all."""
    if expected is None:
        raise HTTPException(403, "this endpoint is disabled: the service has no API token configured")
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(token.encode(), expected.get_secret_value().encode()):
        raise HTTPException(403, "wrong bearer token")


def confine(path: str | Path, root: Path) -> Path:
    """`path` resolved, if it lies inside `root` (symlinks resolved too); else ValueError naming both."""
    root_r = root.resolve()
    p = Path(path)
    resolved = (p if p.is_absolute() else root_r / p).resolve()
    if not resolved.is_relative_to(root_r):
        raise ValueError(f"path: {path} is outside the checkpoint root {root_r}")
    return resolved


# --------------------------------------------------------------------------- responses that render any value


def safe_jsonable(value: Any, depth: int = 0) -> Any:
    """`value` as data `SafeJSONResponse` renders, whatever it holds: non-finite floats and huge integers as
    strings, long strings, lists and objects cut short, anything else as its repr. Lone surrogates stay (the
    response escapes them: `"\\udcff"`), so an echoed input reads back as it was sent.

    >>> safe_jsonable({"t": float("nan"), "seed": 10**40, "s": "a" * 300})["seed"]
    '<integer of 133 bits>'
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        # str() of an integer over 4300 digits raises; anything past 64 bits is no id or count of ours anyway
        return value if value.bit_length() <= 64 else f"<integer of {value.bit_length()} bits>"
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return _clip(value)
    if isinstance(value, bytes | bytearray):
        return _clip(bytes(value[: 4 * ECHO_CHARS]).decode("utf-8", "backslashreplace"))
    if depth >= 8:
        return "..."
    if isinstance(value, dict):
        items = list(value.items())
        out = {str(safe_jsonable(k, depth + 1)): safe_jsonable(v, depth + 1) for k, v in items[:ECHO_ITEMS]}
        if len(items) > ECHO_ITEMS:
            out["..."] = f"{len(items) - ECHO_ITEMS} more"
        return out
    if isinstance(value, list | tuple | set | frozenset):
        seq = list(value)
        out_list = [safe_jsonable(v, depth + 1) for v in seq[:ECHO_ITEMS]]
        if len(seq) > ECHO_ITEMS:
            out_list.append(f"... {len(seq) - ECHO_ITEMS} more")
        return out_list
    if isinstance(value, BaseException):
        return _clip(f"{type(value).__name__}: {value}")
    try:
        return _clip(repr(value))
    except Exception:  # a repr that raises still must not turn a 4xx into a 500
        return f"<{type(value).__name__}>"


def _clip(text: str) -> str:
    return text if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS]}... ({len(text)} characters)"


class SafeJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped and no NaN: a body holding a lone surrogate (valid JSON
    `"\\udcff"`) stays valid JSON instead of failing UTF-8 encoding with a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


async def _http_error(request: Request, exc: Exception) -> SafeJSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else safe_jsonable(exc.detail)  # our own messages: whole
    return SafeJSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> SafeJSONResponse:
    assert isinstance(exc, RequestValidationError)
    return SafeJSONResponse({"detail": [_error_entry(e) for e in exc.errors()[:ECHO_ITEMS]]}, status_code=422)


def _error_entry(error: dict[str, Any]) -> dict[str, Any]:
    """One pydantic error as JSON: its `loc`, `msg`, `type`, the (clipped) `input` and `ctx`."""
    return {key: safe_jsonable(error[key]) for key in ("type", "loc", "msg", "input", "ctx") if key in error}


def install_error_handlers(app: FastAPI) -> None:
    """Render HTTP errors and request validation errors (422, one entry per bad field with its `loc`) as JSON
    whatever the request held: NaN, integers of any size, lone surrogates, megabyte strings."""
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


# --------------------------------------------------------------------------- long requests, health, metrics, serving


async def until_disconnected(request: Request, work: Callable[[threading.Event], T]) -> T:
    """`work(cancel)` in a worker thread; `cancel` is set when the client disconnects (or this call is cancelled),
    so work that checks it stops early instead of holding the service for a client that is gone.

    Args:
        request: the request being served.
        work: blocking work that returns early (or raises) once `cancel` is set.
    """
    cancel = threading.Event()
    task = asyncio.ensure_future(run_in_threadpool(work, cancel))
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                cancel.set()
                break
        return await task
    finally:
        cancel.set()


def health_router(ready: Callable[[], str | None], info: Callable[[], dict[str, Any]] | None = None) -> APIRouter:
    """`GET /health` (liveness: always 200 `{"status": "ok"}`) and `GET /ready` (readiness: 200
    `{"status": "ready", **info()}` when `ready()` returns None, else 503 `{"status": "not ready", "reason": ...}`).

    Args:
        ready: says why the process cannot serve yet, or None; called in a thread (it may block briefly).
        info: what a ready process adds to its answer (engine, version, pool size...); called when ready.
    """
    router = APIRouter(tags=["health"])

    @router.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process serves HTTP."""
        return {"status": "ok"}

    @router.get("/ready", responses={503: {"description": "not ready, with the reason"}})
    async def readiness() -> SafeJSONResponse:
        """Readiness: what the process needs to do its work is up."""
        reason = await run_in_threadpool(ready)
        if reason is not None:
            return SafeJSONResponse({"status": "not ready", "reason": reason}, status_code=503)
        extra = await run_in_threadpool(info) if info is not None else {}
        return SafeJSONResponse(safe_jsonable({**extra, "status": "ready"}))

    return router


def metrics_response(registry):
    """A Starlette response with the registry in Prometheus text format."""
    from fastapi.responses import Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def serve(app, host: str, port: int, log_level: str = "info") -> None:
    """Run an ASGI app with uvicorn until SIGTERM/SIGINT."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
