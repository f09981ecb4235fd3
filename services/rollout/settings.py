"""Rollout service settings (env prefix `GTPO_ROLLOUT_`, nested with `__`, e.g. `GTPO_ROLLOUT_REDIS__URL`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.config.settings import (
    HEARTBEAT_TTL_S,
    BearerToken,
    HeartbeatTtl,
    RedisConfig,
    ServiceSettings,
    default_worker_id,
)
from shared.contracts.wire import ServiceInfo, WorkerKind
from shared.prompts import MAX_PROMPT_TOKENS


class RolloutSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="GTPO_ROLLOUT_", env_nested_delimiter="__", extra="forbid")

    model: Path = Field(description="SDAR-layout checkpoint to serve first")
    served_model_name: str | None = Field(
        None, min_length=1, max_length=512, description="the model id /v1/models lists; None = the model folder's name"
    )
    engine: Literal["torch", "lmdeploy"] = Field("torch", description="decoding engine")
    device: str = Field("auto", description="torch engine: auto | cpu | cuda[:N]")
    checkpoint_root: Path | None = Field(None, description="weights may load only from here; None = model's parent")
    api_token: BearerToken | None = Field(None, description="bearer token for /v1/weights; unset = endpoint disabled")
    host: str = "127.0.0.1"
    port: int = Field(8001, ge=0, le=65535)
    max_batch_size: int = Field(32, ge=1, description="rows decoded together")
    max_prompts: int = Field(256, ge=1, description="prompts x n per HTTP request, at most")
    max_prompt_tokens: int = Field(
        MAX_PROMPT_TOKENS,
        ge=1,
        description="a prompt longer than this is refused: 422 over HTTP, dead-lettered from the stream",
    )
    max_new_tokens: int = Field(
        16384, ge=1, description="a request asking for more is refused: 422 over HTTP, dead-lettered from the stream"
    )
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="request body size limit (413 above)")
    worker: bool = Field(False, description="also consume the tasks stream")
    worker_id: str = Field(default_factory=lambda: default_worker_id("rollout"))
    task_batch: int = Field(16, ge=1, description="tasks read from the stream at once")
    weights_wait_s: float = Field(
        120.0, gt=0, description="how long a task waits for the weights version it needs before it is left pending"
    )
    heartbeat_ttl_s: HeartbeatTtl = HEARTBEAT_TTL_S
    redis: RedisConfig = Field(default_factory=RedisConfig)

    def info(self, block_size: int, mask_token_id: int) -> ServiceInfo:
        """What `GET /info` and the worker's heartbeat say, with the served model's block size and mask id."""
        return ServiceInfo(kind=WorkerKind.rollout, worker_id=self.worker_id, namespace=self.redis.namespace,
                           codec=self.redis.codec, block_size=block_size, mask_token_id=mask_token_id,
                           checkpoint_root=str(self.root()))  # fmt: skip

    def model_id(self) -> str:
        """The id OpenAI-style clients name the served model by."""
        return self.served_model_name or self.model.name or "gtpo"

    def root(self) -> Path:
        return (self.checkpoint_root or self.model.parent).resolve()
