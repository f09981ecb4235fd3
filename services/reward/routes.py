"""Routes of the reward service: validate, call `scoring`, return a contract model (anchors_style R8)."""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException, Response
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from services.reward.deps import CodeDep, MetricsDep, PoolDep, SettingsDep
from services.reward.scoring import check_weights, score_items
from shared.contracts.wire import ScoreRequest, ScoreResponse, ServiceInfo
from shared.http import metrics_response

router = APIRouter()


@router.post(
    "/v1/score",
    response_model=ScoreResponse,
    responses={422: {"description": "unknown reward, bad weight or too many items"}, 503: {"description": "pool down"}},
)
async def score(
    body: ScoreRequest, settings: SettingsDep, pool: PoolDep, metrics: MetricsDep, code: CodeDep
) -> ScoreResponse:
    """Score a batch; each result has a total, its components and an explicit status."""
    deadline = time.monotonic() + settings.deadline_s  # now: the wait for a threadpool thread counts too
    if len(body.items) > settings.max_items:
        raise HTTPException(422, f"items: at most {settings.max_items} per request, got {len(body.items)}")
    weights = settings.weights if body.weights is None else body.weights
    try:
        check_weights(weights)
    except ValueError as e:
        raise HTTPException(422, str(e)) from e
    if not pool.healthy():
        raise HTTPException(503, "the verifier pool is not healthy")
    with metrics.latency.time():
        # the pool call blocks: keep it off the event loop so /health and /metrics stay responsive
        results = await run_in_threadpool(
            score_items, body.items, weights, pool, deadline=deadline, zero_truncated=settings.zero_truncated,
            code=code, code_block=settings.code_block,
        )  # fmt: skip
    metrics.observe(results)
    return ScoreResponse(results=results)


@router.get("/info", response_model=ServiceInfo)
async def info(settings: SettingsDep) -> ServiceInfo:
    """What the trainer checks before its first step: namespace, codec, the reward names known, the weights."""
    return settings.info()


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus text format."""
    return metrics_response(metrics.registry)
