"""OpenAI-compatible routes of the rollout service: `/v1/models`, `/v1/completions`, `/v1/chat/completions`
(contracts in shared/contracts/openai_api.py). They decode through the same engine host, limits and error shapes as
`/v1/generate` (422 `{"detail": ...}` naming the field; 503 before the engine is loaded), so a standard harness can
evaluate a gtpo-served model unchanged.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from services.rollout.deps import HostDep, SettingsDep
from services.rollout.engines import GenerationCancelled
from services.rollout.host import request_error
from services.rollout.routes import CLIENT_CLOSED
from shared.contracts.openai_api import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DiffusionExtensions,
    GtpoChoice,
    ModelCard,
    ModelList,
    Usage,
)
from shared.contracts.wire import GenerationRequest, Rollout, SamplingParams, brief_error
from shared.http import until_disconnected
from shared.model.step_map import tokens_per_step
from shared.prompts import encode_prompt

router = APIRouter()
STARTED = int(time.time())

ERRORS = {
    404: {"description": "a model this service does not serve"},
    422: {"description": "a bad prompt or setting, an unsupported option, or over a limit"},
    503: {"description": "no engine"},
}


@router.get("/v1/models", response_model=ModelList)
async def models(settings: SettingsDep) -> ModelList:
    """The one model this service serves."""
    return ModelList(data=[ModelCard(id=settings.model_id(), created=STARTED)])


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the first stop string (OpenAI leaves it out), and whether one was found.

    >>> cut_at_stop("a=2\\nb=3", ["\\n"])
    ('a=2', True)
    """
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def _gtpo(r: Rollout) -> GtpoChoice:
    return GtpoChoice(token_ids=r.token_ids, step_map=r.step_map, policy_version=r.policy_version, seed=r.seed,
                      tokens_per_step=tokens_per_step(len(r.token_ids), r.step_map))  # fmt: skip


def _checked(body: DiffusionExtensions, prompts: list[list[int]], max_tokens: int, settings, field: str):
    """The engine requests of `prompts`, within the service's limits (ValueError naming the field)."""
    if body.model != settings.model_id():
        raise HTTPException(404, f"model: {body.model!r} is not served here; GET /v1/models lists {settings.model_id()!r}")
    try:
        params: SamplingParams = body.sampling(max_tokens)
    except ValidationError as e:
        raise ValueError(brief_error(e)) from None
    if len(prompts) * params.n > settings.max_prompts:
        raise ValueError(f"prompts x n: at most {settings.max_prompts} choices per request, got {len(prompts) * params.n}")
    for i, ids in enumerate(prompts):
        reason = request_error(ids, params, settings, field if len(prompts) == 1 else f"{field}[{i}]")
        if reason is not None:
            raise ValueError(reason.replace("params.max_new_tokens", "max_tokens"))
    return [GenerationRequest(prompt_ids=p, params=params) for p in prompts]


async def _decode(request: Request, host, reqs: list[GenerationRequest]) -> list[list[Rollout]] | Response:
    try:
        return await until_disconnected(request, lambda cancel: host.generate(reqs, "openai", cancel))
    except GenerationCancelled:
        return Response(status_code=CLIENT_CLOSED)
    except ValueError as e:  # token ids outside the vocabulary, settings the engine refuses
        raise HTTPException(422, brief_error(e)) from e


def _encode(tokenizer, prompt, chat: bool, field: str) -> list[int]:
    try:
        return encode_prompt(tokenizer, prompt, chat=chat)
    except Exception as e:  # a template or tokenizer refusing this text is the text's fault, not a 500
        raise ValueError(f"{field}: cannot be tokenised: {type(e).__name__}: {str(e)[:200]}") from e


def _completion_prompts(body: CompletionRequest, tokenizer) -> list[list[int]]:
    p = body.prompt
    if isinstance(p, str):
        return [_encode(tokenizer, p, False, "prompt")]
    if all(isinstance(x, int) for x in p):
        return [list(p)]  # type: ignore[arg-type]
    return [list(x) if isinstance(x, list) else _encode(tokenizer, x, False, f"prompt[{i}]") for i, x in enumerate(p)]


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
async def completions(body: CompletionRequest, request: Request, host: HostDep, settings: SettingsDep) -> Response:
    """Text completion of raw prompts (no chat template): `n` choices per prompt, prompt-major."""
    try:
        prompts = await run_in_threadpool(_completion_prompts, body, host.engine.tokenizer)
        reqs = _checked(body, prompts, body.max_tokens, settings, "prompt")
    except ValueError as e:
        raise HTTPException(422, brief_error(e)) from e
    out = await _decode(request, host, reqs)
    if isinstance(out, Response):
        return out
    choices = []
    for r in (r for group in out for r in group):
        text, stopped = cut_at_stop(r.text, body.stops())
        reason = "stop" if stopped else r.finish_reason
        choices.append(CompletionChoice(index=len(choices), text=text, finish_reason=reason, gtpo=_gtpo(r)))
    res = CompletionResponse(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=settings.model_id(),
                             choices=choices, usage=_usage(prompts, out))  # fmt: skip
    return Response(res.model_dump_json(), media_type="application/json")


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request, host: HostDep, settings: SettingsDep) -> Response:
    """A chat rendered with the served model's chat template (assistant header added): `n` choices."""
    messages = [m.model_dump() for m in body.messages]
    try:
        prompt = await run_in_threadpool(_encode, host.engine.tokenizer, messages, True, "messages")
        reqs = _checked(body, [prompt], body.budget(), settings, "messages")
    except ValueError as e:
        raise HTTPException(422, brief_error(e)) from e
    out = await _decode(request, host, reqs)
    if isinstance(out, Response):
        return out
    choices = []
    for i, r in enumerate(out[0]):
        text, stopped = cut_at_stop(r.text, body.stops())
        choices.append(ChatChoice(index=i, message=AssistantMessage(content=text), gtpo=_gtpo(r),
                                  finish_reason="stop" if stopped else r.finish_reason))  # fmt: skip
    res = ChatCompletionResponse(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
                                 model=settings.model_id(), choices=choices, usage=_usage([prompt], out))  # fmt: skip
    return Response(res.model_dump_json(), media_type="application/json")


def _usage(prompts: list[list[int]], out: list[list[Rollout]]) -> Usage:
    prompt_tokens = sum(len(p) * len(g) for p, g in zip(prompts, out, strict=True))
    completion = sum(len(r.token_ids) for g in out for r in g)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)
