"""Routes of the rollout service: validate, call the engine host, return a contract model (anchors_style R8)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from services.rollout.deps import HostDep, MetricsDep, SettingsDep, check_token
from services.rollout.engines import GenerationCancelled
from services.rollout.host import prompt_ids_of
from services.rollout.weights import WeightsError
from shared.contracts.wire import (
    GenerateRequest,
    GenerateResponse,
    GenerationRequest,
    ServiceInfo,
    WeightsRequest,
    WeightsResponse,
    brief_error,
)
from shared.http import metrics_response, until_disconnected

router = APIRouter()

CLIENT_CLOSED = 499
"""What a generate whose client left ends with (nginx's code; nobody reads it)."""


@router.post(
    "/v1/generate",
    response_model=GenerateResponse,
    responses={422: {"description": "a bad prompt or setting, or over a limit"}, 503: {"description": "no engine"}},
)
async def generate(body: GenerateRequest, request: Request, host: HostDep, settings: SettingsDep) -> Response:
    """Sample `params.n` rollouts per prompt; abandoned at the next block boundary if the client disconnects."""
    try:
        prompts = await run_in_threadpool(prompt_ids_of, body, host.engine.tokenizer, settings)
        reqs = [GenerationRequest(prompt_ids=p, params=body.params) for p in prompts]
        out = await until_disconnected(request, lambda cancel: host.generate(reqs, "http", cancel))
    except GenerationCancelled:
        return Response(status_code=CLIENT_CLOSED)
    except ValueError as e:  # the message names the field: token ids outside the vocabulary, settings, limits
        raise HTTPException(422, brief_error(e)) from e
    result = GenerateResponse(rollouts=out, policy_version=out[0][0].policy_version)
    return Response(result.model_dump_json(), media_type="application/json")


@router.post(
    "/v1/weights",
    response_model=WeightsResponse,
    dependencies=[Depends(check_token)],
    responses={
        401: {"description": "no bearer token"},
        403: {"description": "wrong token, endpoint disabled, or a file outside the checkpoint root"},
        409: {"description": "an older version, or the served version from another folder (without rollback)"},
        422: {"description": "the folder cannot be loaded; the old weights are still served"},
    },
)
async def weights(body: WeightsRequest, host: HostDep, settings: SettingsDep) -> WeightsResponse:
    """Load weights version `version` from a checkpoint folder under the checkpoint root."""
    try:
        done = await run_in_threadpool(host.load, body.path, settings.root(), body.version, "http", body.rollback,
                                       body.run)  # fmt: skip
    except WeightsError as e:
        raise HTTPException(e.status, str(e)) from e
    previous = None if done.previous is None else done.previous.version
    return WeightsResponse(version=done.version, path=done.path, seconds=done.seconds, previous=previous)


@router.get("/info", response_model=ServiceInfo, responses={503: {"description": "the engine is not loaded yet"}})
async def info(host: HostDep, settings: SettingsDep) -> ServiceInfo:
    """What the trainer checks before its first step: namespace, codec, the served model's block size and mask id."""
    spec = host.engine.spec
    return settings.info(spec.block_size, spec.mask_token_id)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus text format."""
    return metrics_response(metrics.registry)
