"""HTTP pieces every service shares: bearer-token auth, path confinement, Prometheus exposition, uvicorn."""

from __future__ import annotations

import hmac
from pathlib import Path

from fastapi import HTTPException, Request
from pydantic import SecretStr


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


def metrics_response(registry):
    """A Starlette response with the registry in Prometheus text format."""
    from fastapi.responses import Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def serve(app, host: str, port: int, log_level: str = "info") -> None:
    """Run an ASGI app with uvicorn until SIGTERM/SIGINT."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
