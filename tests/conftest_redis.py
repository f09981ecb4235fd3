"""Redis fixtures (a pytest plugin: ``pytest_plugins = ["tests.conftest_redis"]`` in tests/conftest.py).

Tests use $REDIS_URL when set, else one embedded real Redis for the session. Each test gets its own key
namespace and deletes only that namespace's keys: a shared Redis is never flushed.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from shared.queues.keys import Keys
from shared.queues.queue import connect
from shared.queues.redis_server import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """$REDIS_URL, else the URL of an embedded server that lives for the session."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client as the services build it (`shared.queues.queue.connect`)."""
    client = connect(redis_url)
    yield client
    client.close()


@pytest.fixture
def redis_ns(redis_client: redis.Redis) -> Iterator[Keys]:
    """Key names under a namespace unique to this test; its keys are deleted afterwards."""
    keys = Keys(namespace=f"test-{uuid.uuid4().hex[:12]}")
    yield keys
    delete_namespace(redis_client, keys)


def delete_namespace(client: redis.Redis, keys: Keys) -> int:
    """UNLINK every key of `keys`' namespace (SCAN, never FLUSHALL); returns how many.

    Args:
        client: any client of the server.
        keys: the namespace.
    """
    names = list(client.scan_iter(match=keys.pattern, count=1000))
    for i in range(0, len(names), 500):
        client.unlink(*names[i : i + 500])
    return len(names)


@pytest.fixture
def embedded_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A private embedded server for this test alone (restart and outage tests)."""
    server = EmbeddedRedis(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()
