"""FastAPI dependencies of the reward service (anchors_style R8): what a route needs, from `app.state`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from services.reward.code import CodeRunner
from services.reward.metrics import RewardMetrics
from services.reward.settings import RewardSettings
from services.reward.verify import VerifierPool


def get_settings(request: Request) -> RewardSettings:
    return request.app.state.settings


def get_metrics(request: Request) -> RewardMetrics:
    return request.app.state.metrics


def get_code(request: Request) -> CodeRunner | None:
    """The code sandbox runner; None where no sandbox can run (code items then score `error`)."""
    return request.app.state.code


def get_pool(request: Request) -> VerifierPool:
    pool = request.app.state.pool
    if pool is None:
        raise HTTPException(503, "the verifier pool is not running (the app's lifespan has not started)")
    return pool


SettingsDep = Annotated[RewardSettings, Depends(get_settings)]
MetricsDep = Annotated[RewardMetrics, Depends(get_metrics)]
PoolDep = Annotated[VerifierPool, Depends(get_pool)]
CodeDep = Annotated[CodeRunner | None, Depends(get_code)]
