"""Reward service settings: `GTPO_REWARD__*` environment variables (e.g. `GTPO_REWARD__WEIGHTS='{"accuracy": 1}'`)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.reward.scoring import REWARDS, check_weights
from shared.config.loader import command_prefix
from shared.config.settings import (
    HEARTBEAT_TTL_S,
    HeartbeatTtl,
    RedisConfig,
    ServiceSettings,
    default_reward_weights,
    default_worker_id,
)
from shared.contracts.wire import ServiceInfo, WorkerKind


class RewardSettings(ServiceSettings):
    """What `gtpo serve reward` runs with."""

    model_config = SettingsConfigDict(env_prefix=command_prefix("reward"), env_nested_delimiter="__", extra="forbid")
    legacy_env_prefix: ClassVar[str | None] = "GTPO_REWARD_"

    weights: dict[str, float] = Field(
        default_factory=default_reward_weights, description="reward name -> weight, when a request names none"
    )
    zero_truncated: bool = Field(
        False,
        description="DiRL: a response that hit the token limit scores 0 in every component (total 0), whatever "
        "the weights; the trainer's RLConfig.zero_truncated sets it for the workers `gtpo up` starts",
    )
    workers: int = Field(2, ge=1, le=256, description="math-verify worker processes")
    timeout_s: float = Field(5.0, gt=0.0, le=600.0, description="hard wall-clock limit per answer check")
    deadline_s: float = Field(
        30.0,
        gt=0.0,
        le=3600.0,
        description="POST /v1/score: items whose answer check is not done this long after the request began come "
        "back as timeout (a check still queued then never runs)",
    )
    memory_mb: int = Field(1024, ge=0, description="address-space cap per worker (RLIMIT_AS); 0 = none")
    sandbox: Literal["auto", "bwrap", "unshare", "insecure"] = Field(
        "auto",
        description="the code reward's sandbox: auto = bubblewrap, else unshare (namespaces); 'insecure' runs programs "
        "as plain processes with limits only (no network, filesystem or process isolation: trusted code only)",
    )
    code_workers: int = Field(4, ge=1, le=256, description="code reward: programs run at once (one sandbox each)")
    code_unit_s: float = Field(2.0, gt=0.0, le=120.0, description="code reward: time for one test or stdin case")
    code_memory_mb: int = Field(512, ge=64, description="code reward: address-space cap per sandboxed process")
    code_block: Literal["last", "first", "all"] = Field("last", description="code reward: which fenced block is run")
    code_all_or_nothing: bool = Field(False, description="code reward: 1 only when every test passes, else 0")
    max_items: int = Field(1024, ge=1, le=4096, description="items per request at most")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="request body size limit (413 above)")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8002, ge=1, le=65535, description="bind port")
    worker: bool = Field(False, description="also consume the rollouts stream and hand scores to the scored stream")
    worker_id: str = Field(default_factory=lambda: default_worker_id("reward"))
    batch: int = Field(32, ge=1, le=4096, description="rollouts read from the stream at once")
    heartbeat_ttl_s: HeartbeatTtl = HEARTBEAT_TTL_S
    redis: RedisConfig = Field(default_factory=RedisConfig)

    def info(self) -> ServiceInfo:
        """What `GET /info` and the worker's heartbeat say (the trainer's start-up check reads it)."""
        return ServiceInfo(kind=WorkerKind.reward, worker_id=self.worker_id, namespace=self.redis.namespace,
                           codec=self.redis.codec, rewards=sorted(REWARDS), weights=self.weights)  # fmt: skip

    @field_validator("weights")
    @classmethod
    def _known_rewards(cls, weights: dict[str, float]) -> dict[str, float]:
        check_weights(weights)
        return weights
