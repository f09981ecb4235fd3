"""FastAPI dependencies of the rollout service (anchors_style R8): what a route needs, from `app.state`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from services.rollout.host import EngineHost, RolloutMetrics
from services.rollout.settings import RolloutSettings
from shared.http import require_token


def get_settings(request: Request) -> RolloutSettings:
    return request.app.state.settings


def get_metrics(request: Request) -> RolloutMetrics:
    return request.app.state.metrics


def get_host(request: Request) -> EngineHost:
    host = request.app.state.host
    if host is None:
        raise HTTPException(503, "the engine is not loaded yet (the app's lifespan has not started)")
    return host


def check_token(request: Request, settings: Annotated[RolloutSettings, Depends(get_settings)]) -> None:
    """Mutating routes need the configured bearer token (checked before the body is looked at)."""
    require_token(request, settings.api_token)


SettingsDep = Annotated[RolloutSettings, Depends(get_settings)]
MetricsDep = Annotated[RolloutMetrics, Depends(get_metrics)]
HostDep = Annotated[EngineHost, Depends(get_host)]
