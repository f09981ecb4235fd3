"""Settings blocks shared by the services (docs/design.md section 5): each service's BaseSettings nests these."""

from __future__ import annotations

import os
import socket
from typing import Annotated, ClassVar, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, field_serializer
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from shared.config.loader import LayeredSource

MASK = "***"
HEARTBEAT_TTL_S = 15.0
"""A worker whose last heartbeat is older than this counts as dead (it beats every third of it)."""
DEFAULT_CODEC = "msgpack"
"""How new queue messages are encoded unless `redis.codec` says otherwise (consumers decode either codec)."""
DEFAULT_NAMESPACE = "gtpo"
"""The Redis key prefix of a run unless `redis.namespace` says otherwise."""
CLAIM_IDLE_MS = 60_000
"""A message a consumer has held this long is reclaimed (the consumer died)."""
MAX_DELIVERIES = 5
"""After this many deliveries a message goes to the dead stream."""
RECONNECT_S = 120.0
"""How long the trainer's loops retry an unreachable Redis (restart, failover) before stopping with an error."""
_SECRET_QUERY_KEYS = ("pass", "token", "secret", "auth")


def redact_url(url: str) -> str:
    """`url` with its password (and password-like query values) replaced by `***`, for logs and printed configs.

    >>> redact_url("redis://:hunter2@redis:6379/0")
    'redis://:***@redis:6379/0'
    >>> redact_url("rediss://app:hunter2@redis:6380/1?password=x&ssl_cert_reqs=none")
    'rediss://app:***@redis:6380/1?password=%2A%2A%2A&ssl_cert_reqs=none'
    >>> redact_url("redis://127.0.0.1:6379/0")
    'redis://127.0.0.1:6379/0'
    """
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        netloc = parts.netloc
        if parts.password is not None:
            netloc = f"{parts.username or ''}:{MASK}@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            hidden = [(k, MASK if any(s in k.lower() for s in _SECRET_QUERY_KEYS) else v) for k, v in pairs]
            query = urlencode(hidden)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:  # not a URL the parser understands: show nothing of it
        return MASK


def _check_token(token: SecretStr) -> SecretStr:
    value = token.get_secret_value()
    if not value or value != value.strip() or not all(" " <= c <= "~" for c in value):
        # the message never quotes the value: it would end up in logs
        raise ValueError(
            "must be printable ASCII, not empty, with no space at either end (it is sent as an HTTP header)"
        )
    return token


BearerToken = Annotated[SecretStr, AfterValidator(_check_token)]
"""An API token: a SecretStr that an `Authorization: Bearer` header can carry as it is (checked when the settings
load, not when the first request fails)."""


class RedisUrl(SecretStr):
    """A Redis URL that never prints its password: `str()`, `repr()` and JSON dumps show `redact_url(url)`.

    `get_secret_value()` is the URL itself, for the client.
    """

    def _display(self) -> str:
        return redact_url(self.get_secret_value())


class RedisConfig(BaseModel):
    """Where the queues live and how messages are encoded."""

    model_config = ConfigDict(extra="forbid")

    url: RedisUrl | None = Field(
        None,
        description="redis://[user:password@]host:port/db; None = $REDIS_URL, else redis://127.0.0.1:6379/0 "
        "(`gtpo up` instead starts an embedded server when neither is set)",
    )
    namespace: str = Field(DEFAULT_NAMESPACE, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    codec: Literal["json", "msgpack"] = Field(DEFAULT_CODEC, description="payload encoding of new messages")
    claim_idle_ms: int = Field(
        CLAIM_IDLE_MS, ge=100, description="reclaim a message a consumer held this long (it died)"
    )
    max_deliveries: int = Field(
        MAX_DELIVERIES, ge=1, description="after this many deliveries a message goes to the dead stream"
    )
    reconnect_s: float = Field(
        RECONNECT_S, gt=0, description="the trainer retries an unreachable Redis this long, then stops with an error"
    )
    outage_s: float = Field(
        120.0,
        gt=0,
        description="a worker that cannot reach Redis this long reports it (/ready 503) and keeps retrying",
    )

    @field_serializer("url", when_used="json")
    def _show_url(self, url: RedisUrl | None) -> str | None:
        # pydantic dumps every SecretStr as stars; the host and database stay useful in a printed config
        return None if url is None else str(url)

    def resolved_url(self) -> str | None:
        """The configured URL, else $REDIS_URL, else None (the client then connects to 127.0.0.1:6379)."""
        return (self.url.get_secret_value() if self.url else None) or os.environ.get("REDIS_URL") or None


HeartbeatTtl = Annotated[float, Field(gt=0, description="a worker silent this long counts as dead")]


def default_reward_weights() -> dict[str, float]:
    """The reward when none is named: accuracy alone (the reward service's and `gtpo up`'s default)."""
    return {"accuracy": 1.0}


def default_worker_id(kind: str) -> str:
    """`kind@host:pid`: unique per process, readable in `gtpo status`."""
    return f"{kind}@{socket.gethostname()}:{os.getpid()}"


class ServiceSettings(BaseSettings):
    """Base of each service's settings (`env_prefix` `GTPO_<SERVICE>__`, nested with `__`; `legacy_env_prefix` the
    name before it, `GTPO_<SERVICE>_`, read for one release with a warning).

    `gtpo serve` loads them with `shared.config.loader.load_config` (defaults < YAML < environment < `key=value`); built
    directly (`RewardSettings()`, tests), they read the environment through the same source, below the keyword
    arguments, so a variable means the same either way and a misspelt one is refused, naming the nearest.
    """

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, LayeredSource(settings_cls)

    legacy_env_prefix: ClassVar[str | None] = None
