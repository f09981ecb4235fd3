"""Settings blocks shared by the services (design.md section 5): each service's BaseSettings nests these."""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import BaseModel, Field


class RedisConfig(BaseModel):
    """Where the queues live and how messages are encoded."""

    url: str | None = Field(None, description="redis://...; None = $REDIS_URL, else an embedded server")
    namespace: str = Field("gtpo", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    codec: Literal["json", "msgpack"] = Field("msgpack", description="payload encoding of new messages")
    claim_idle_ms: int = Field(60_000, ge=100, description="reclaim a message a consumer held this long (it died)")
    max_deliveries: int = Field(5, ge=1, description="after this many deliveries a message goes to the dead stream")

    def resolved_url(self) -> str | None:
        return self.url or os.environ.get("REDIS_URL") or None


def default_worker_id(kind: str) -> str:
    """`kind@host:pid`: unique per process, readable in `gtpo status`."""
    return f"{kind}@{socket.gethostname()}:{os.getpid()}"
