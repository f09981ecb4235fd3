"""Wire contracts shared by every producer and consumer (design.md section 2).

Pure pydantic: importing this module never imports torch.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Strategy(str, Enum):
    """Which masked positions a denoising forward unmasks."""

    low_confidence_dynamic = "low_confidence_dynamic"
    """The most confident masked position plus every masked position with confidence >= threshold."""
    low_confidence_static = "low_confidence_static"
    """The `max(1, block_size // denoising_steps)` most confident masked positions."""
    sequential = "sequential"
    """The `max(1, block_size // denoising_steps)` left-most masked positions."""


class SamplingParams(BaseModel):
    """How one request is decoded. Defaults are the RL defaults (T=1, no top-k, top-p 1: unbiased)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: int | None = Field(None, ge=1, le=256, description="tokens per block; None = the model's block size")
    strategy: Strategy = Field(Strategy.low_confidence_dynamic, description="unmasking strategy")
    confidence_threshold: float = Field(0.9, ge=0.0, le=1.0, description="dynamic strategy: unmask when p >= this")
    denoising_steps: int | None = Field(
        None, ge=1, le=256, description="static/sequential: steps per block; None = block_size (one token per step)"
    )
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 = greedy")
    top_k: int = Field(0, ge=0, description="0 = disabled")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="1 = disabled")
    max_new_tokens: int = Field(256, ge=1, le=131072, description="response tokens at most")
    stop_token_ids: list[int] | None = Field(
        None, description="the response ends at the first of these (kept); None = the model's end tokens, [] = none"
    )
    n: int = Field(1, ge=1, le=1024, description="samples per prompt")
    seed: int | None = Field(None, ge=0, le=2**62, description="same seed, same output; None = random")
    logprobs: bool = Field(False, description="return each token's log-prob under the sampling distribution")

    @model_validator(mode="after")
    def _check(self) -> SamplingParams:
        if any(t < 0 for t in self.stop_token_ids or []):
            raise ValueError(f"stop_token_ids: every id must be >= 0, got {self.stop_token_ids}")
        if self.block_size is not None and self.denoising_steps is not None and self.denoising_steps > self.block_size:
            raise ValueError(
                f"denoising_steps: must be between 1 and block_size={self.block_size}, got {self.denoising_steps}"
            )
        return self

    def resolved(self, model_block_size: int, default_stop_ids: list[int]) -> SamplingParams:
        """Fill the model-dependent defaults (block size, denoising steps, stop tokens)."""
        b = self.block_size or model_block_size
        stops = list(default_stop_ids) if self.stop_token_ids is None else self.stop_token_ids
        # validate again: denoising_steps must fit the model's block size
        return SamplingParams.model_validate(
            {
                **self.model_dump(),
                "block_size": b,
                "denoising_steps": self.denoising_steps or b,
                "stop_token_ids": stops,
            }
        )

    def tokens_per_step(self) -> int:
        """Static / sequential: positions unmasked per forward (LMDeploy's `max(1, B // steps)`)."""
        assert self.block_size is not None and self.denoising_steps is not None, "call resolved() first"
        return max(1, self.block_size // self.denoising_steps)


class GenerationRequest(BaseModel):
    """One prompt (already tokenised) with its sampling settings."""

    model_config = ConfigDict(extra="forbid")

    prompt_ids: list[int] = Field(min_length=1)
    params: SamplingParams = Field(default_factory=SamplingParams)


class Rollout(BaseModel):
    """One sampled response with its trajectory (design.md section 2).

    `step_map[i]` is the 1-based denoising step (global over the response) at which `token_ids[i]` was
    unmasked. `tail_ids` / `tail_steps` are the positions of the last block after the cut (stop token or
    `max_new_tokens`): they were sampled and attended to, so the trainer must place them, never train them.
    """

    model_config = ConfigDict(extra="forbid")

    prompt_ids: list[int]
    token_ids: list[int]
    step_map: list[int]
    tail_ids: list[int] = Field(default_factory=list)
    tail_steps: list[int] = Field(default_factory=list)
    text: str = ""
    finish_reason: Literal["stop", "length"]
    policy_version: int = Field(0, ge=0)
    params: SamplingParams
    seed: int = Field(ge=0, description="the seed of this sample's generator (reproduces it)")
    logprobs: list[float] | None = None

    @model_validator(mode="after")
    def _check(self) -> Rollout:
        if self.params.block_size is None:
            raise ValueError("params.block_size: a rollout records the block size it was decoded with")
        if len(self.step_map) != len(self.token_ids):
            raise ValueError(f"step_map: needs one step per token ({len(self.token_ids)}), got {len(self.step_map)}")
        if len(self.tail_steps) != len(self.tail_ids):
            raise ValueError(
                f"tail_steps: needs one step per tail token ({len(self.tail_ids)}), got {len(self.tail_steps)}"
            )
        if self.logprobs is not None and len(self.logprobs) != len(self.token_ids):
            raise ValueError(f"logprobs: needs one value per token ({len(self.token_ids)}), got {len(self.logprobs)}")
        check_step_map(len(self.prompt_ids), self.step_map + self.tail_steps, self.params.block_size)
        return self


def check_step_map(prompt_len: int, steps: list[int], block_size: int) -> None:
    """Raise ValueError unless `steps` is 1-based and every block's steps come after the previous block's.

    Args:
        prompt_len: P; response token i sits at absolute position P + i, in block (P + i) // block_size.
        steps: one step per response position (response then tail).
    """
    if any(s < 1 for s in steps):
        raise ValueError(f"step_map: steps are 1-based, got {min(steps)}")
    prev_max, cur_block, cur_min, cur_max = 0, None, 0, 0
    for i, s in enumerate(steps):
        b = (prompt_len + i) // block_size
        if b != cur_block:
            prev_max, cur_block, cur_min, cur_max = max(prev_max, cur_max), b, s, s
        cur_min, cur_max = min(cur_min, s), max(cur_max, s)
        if cur_min <= prev_max:
            raise ValueError(f"step_map: block {b} has step {cur_min}, not after the previous block's {prev_max}")


def describe_validation_error(err: ValidationError) -> str:
    """One line per bad field: `field: message (got value)`, for CLI and HTTP errors."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "value"
        lines.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)
