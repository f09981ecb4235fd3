"""The OpenAI-compatible wire of the rollout service (`/v1/models`, `/v1/completions`, `/v1/chat/completions`):
what the `openai` SDK, lm-evaluation-harness's `local-completions` and OpenCompass-style API evaluators send and read.

Requests take the OpenAI fields gtpo can honour plus the diffusion settings as extensions (`top_k`, `block_size`,
`strategy`, `confidence_threshold`, `denoising_steps`; the SDK sends them through `extra_body`). OpenAI fields
gtpo has no use for (penalties, `user`, ...) are ignored, as OpenAI-compatible servers do; the ones that would
change the answer and that gtpo cannot honour (`stream`, `echo`, `logprobs`, `logit_bias`) are refused by name.
Each choice carries a `gtpo` field: the step map and tokens per step, what a diffusion model adds to a completion.

Pure pydantic: importing this module never imports torch.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.contracts.wire import MAX_ID, MAX_SEED, SamplingParams, Strategy, TokenId

Text = Annotated[str, Field(max_length=1_000_000)]


class DiffusionExtensions(BaseModel):
    """The sampling settings both endpoints share, OpenAI's and gtpo's."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = Field(max_length=512, description="an id from /v1/models")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1024, description="choices per prompt")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="same seed, same choices; None = random")
    stop: Annotated[str, Field(min_length=1, max_length=1000)] | list[
        Annotated[str, Field(min_length=1, max_length=1000)]
    ] | None = Field(None, description="up to 4 strings; the text ends before the first (OpenAI semantics)")
    stream: bool = Field(False, description="not offered: must be false")
    logit_bias: dict[str, float] | None = Field(None, description="not offered: must be absent")
    # gtpo extensions
    top_k: int = Field(0, ge=0, le=MAX_ID, description="gtpo: keep the k most likely tokens (0 = off)")
    block_size: int | None = Field(None, ge=1, le=256, description="gtpo: tokens per block; None = the model's")
    strategy: Strategy = Field(Strategy.low_confidence_dynamic, description="gtpo: unmasking strategy")
    confidence_threshold: float = Field(0.9, ge=0.0, le=1.0, description="gtpo: dynamic strategy threshold")
    denoising_steps: int | None = Field(None, ge=1, le=256, description="gtpo: static strategy steps per block")

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        if self.stream:
            raise ValueError("stream: not supported by the gtpo rollout service; send stream=false")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported by the gtpo rollout service")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError(f"stop: at most 4 strings, got {len(self.stop)}")
        return self

    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling(self, max_tokens: int) -> SamplingParams:
        """The engine's settings (raises ValidationError naming the field, e.g. denoising_steps > block_size)."""
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, n=self.n, seed=self.seed,
            max_new_tokens=max_tokens, block_size=self.block_size, strategy=self.strategy,
            confidence_threshold=self.confidence_threshold, denoising_steps=self.denoising_steps,
        )  # fmt: skip


class CompletionRequest(DiffusionExtensions):
    """`POST /v1/completions`: raw text (no chat template) or token ids."""

    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]] = Field(
        description="a text, several texts, one token-id list or several"
    )
    max_tokens: int = Field(16, ge=1, le=131072, description="OpenAI's default: 16")
    echo: bool = Field(False, description="not offered: must be false")
    logprobs: int | None = Field(None, description="not offered: must be absent")

    @model_validator(mode="after")
    def _refuse_completion_extras(self):
        if self.echo:
            raise ValueError("echo: not supported by the gtpo rollout service (no prompt log-probs)")
        if self.logprobs is not None:
            raise ValueError("logprobs: not supported on /v1/completions; /v1/generate returns token log-probs")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: needs at least one prompt")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Text


class ChatCompletionRequest(DiffusionExtensions):
    """`POST /v1/chat/completions`: messages rendered with the served model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(None, ge=1, le=131072, description="None = max_completion_tokens, else 256")
    max_completion_tokens: int | None = Field(None, ge=1, le=131072)
    logprobs: bool = Field(False, description="not offered: must be false")

    @model_validator(mode="after")
    def _refuse_chat_extras(self):
        if self.logprobs:
            raise ValueError("logprobs: not supported on /v1/chat/completions; /v1/generate returns token log-probs")
        return self

    def budget(self) -> int:
        return self.max_tokens or self.max_completion_tokens or SamplingParams().max_new_tokens


class GtpoChoice(BaseModel):
    """What a diffusion model adds to a choice: how its tokens were unmasked."""

    token_ids: list[int]
    step_map: list[int] = Field(description="per response token, the denoising step that unmasked it")
    tokens_per_step: float = Field(description="response tokens per denoising forward")
    seed: int = Field(description="this choice's generator seed (reproduces it with n=1)")
    policy_version: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None
    gtpo: GtpoChoice


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None
    gtpo: GtpoChoice


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gtpo"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
