"""Rollout service settings (env prefix `GTPO_ROLLOUT__`, nested with `__`, e.g. `GTPO_ROLLOUT__REDIS__URL`,
`GTPO_ROLLOUT__LMDEPLOY__TP=2`), and the LMDeploy engine's options, which its `lmdeploy` section sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import SettingsConfigDict

from shared.config.loader import command_prefix
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


class LMDeploySettings(BaseModel):
    """LMDeploy's engine-wide settings (`PytorchEngineConfig`; everything per request comes from `SamplingParams`):
    the rollout service's `lmdeploy` section (`gtpo serve rollout engine=lmdeploy lmdeploy.tp=2`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tp: int = Field(1, ge=1, description="tensor-parallel GPUs (behaviour log-probs need tp=1)")
    dtype: Literal["auto", "bfloat16", "float16"] = Field("bfloat16", description="weights and activations")
    cache_max_entry_count: float = Field(
        0.8, gt=0, le=1, description="share of the free GPU memory the KV cache takes (num_gpu_blocks=0)"
    )
    num_gpu_blocks: int = Field(0, ge=0, description="KV-cache pages; 0 = from cache_max_entry_count")
    session_len: int | None = Field(None, ge=1, description="tokens per sequence at most; None = the model's")
    eager_mode: bool = Field(False, description="no CUDA graphs: slower decoding, faster start, less memory")
    enable_metrics: bool = Field(False, description="LMDeploy's own scheduler metrics")
    paging_block_size: int = Field(64, ge=1, description="KV page size when the dLLM block size divides it")
    allow_untested_lmdeploy: bool = Field(False, description="run an LMDeploy version the patch was not tested on")


class LMDeployOptions(LMDeploySettings):
    """What `LMDeployEngine` is built with: the service's `lmdeploy` section and its rows decoded together."""

    max_batch_size: int = Field(32, ge=1, description="rows decoded together")


class RolloutSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix=command_prefix("rollout"), env_nested_delimiter="__", extra="forbid")
    legacy_env_prefix: ClassVar[str | None] = "GTPO_ROLLOUT_"

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
    weights_cache: Path | None = Field(
        None,
        description="weights.transport=http: where fetched versions are kept (the served one and the newest); "
        "None = <checkpoint root>/.weights-cache/<worker_id>",
    )
    weights_retry_s: float = Field(10.0, gt=0, description="after a failed weights fetch, try again this much later")
    weights_fetch_timeout_s: float = Field(
        60.0, gt=0, description="a weights transfer that sends nothing for this long is broken (then resumed)"
    )
    swap_at_block: bool = Field(
        False,
        description="worker: load a newer version of the run mid-generation and continue every in-flight response "
        "at its next block boundary with it (torch engine only; tokens record their version)",
    )
    swap_poll_ms: int = Field(
        200, ge=0, description="swap_at_block: read the registry's current version at most this often (ms)"
    )
    heartbeat_ttl_s: HeartbeatTtl = HEARTBEAT_TTL_S
    redis: RedisConfig = Field(default_factory=RedisConfig)
    lmdeploy: LMDeploySettings = Field(
        default_factory=LMDeploySettings, description="engine=lmdeploy: its engine-wide options (tp, dtype, KV cache)"
    )

    @model_validator(mode="after")
    def _check_swap(self) -> RolloutSettings:
        if self.swap_at_block and self.engine == "lmdeploy":
            raise ValueError(
                "swap_at_block: not supported by engine=lmdeploy: its scheduler owns the batch across denoising steps "
                "and a weights update needs the engine paused with no request running, so weights cannot change "
                "between two blocks of an in-flight response; use engine=torch or swap_at_block=false"
            )
        return self

    def engine_options(self) -> dict[str, Any]:
        """The keyword arguments of `create_engine` for this service's engine (the `lmdeploy` section with lmdeploy)."""
        options: dict[str, Any] = {"device": self.device, "max_batch_size": self.max_batch_size}
        return {**options, **self.lmdeploy.model_dump()} if self.engine == "lmdeploy" else options

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

    def cache(self) -> Path:
        """Where this worker keeps the versions it fetched over HTTP (its own folder: it deletes what it does not
        serve)."""
        return (self.weights_cache or self.root() / ".weights-cache" / self.worker_id).resolve()
