"""`gtpo status` when Redis is not there, is not Redis, or holds garbage: one line and a non-zero exit, or the
view with `invalid (<key>)` where the bad key's part would be, never a traceback or a hang."""

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from rich.console import Console
from typer.testing import CliRunner

from services.cli import app
from services.status_view import TIMEOUT_S, show
from tests.procs import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gtpo_status(*args: str) -> subprocess.CompletedProcess:
    # the timeout only guards against the hang this file is about; no test asserts a duration
    return subprocess.run([sys.executable, "-m", "services", "status", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})  # fmt: skip


@pytest.mark.parametrize("watch", [False, True])
def test_status_with_redis_down_says_so_in_one_line_naming_the_url(watch):
    url = f"redis://:hunter2@127.0.0.1:{_free_port()}/0"  # nothing listens there
    res = _gtpo_status("--redis-url", url, *(["--watch"] if watch else []))
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    line = res.stderr.strip()
    assert line.startswith("gtpo status: redis redis://:***@127.0.0.1:") and "refused" in line
    assert "hunter2" not in res.stderr + res.stdout


@pytest.fixture
def http_port():
    """A real HTTP server (uvicorn, as the services' ports are) on 127.0.0.1: it waits for the rest of a request
    that a Redis client never sends."""
    import uvicorn
    from fastapi import FastAPI

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(FastAPI(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(10)


def test_status_pointed_at_an_http_port_fails_fast_with_a_message(http_port):
    res = _gtpo_status("--redis-url", f"redis://127.0.0.1:{http_port}/0")
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert f"127.0.0.1:{http_port}" in res.stderr and f"no reply within {TIMEOUT_S:g} s" in res.stderr


@pytest.fixture
def wide(monkeypatch):
    """`gtpo status` prints through services.cli's console, whose width was fixed when the module was first imported
    (by whichever test came first): widen it, so no key is wrapped inside a table cell."""
    from services import cli

    monkeypatch.setattr(cli, "console", Console(width=300))


@pytest.mark.redis
def test_garbage_in_any_key_shows_as_invalid_and_the_rest_still_shows(redis_url, redis_client, redis_ns, wide):
    k = redis_ns
    good = {"kind": "rollout", "id": "rollout-ok", "version": 2, "info": {"busy_s": 1.0, "up_s": 4.0},
            "ts": time.time()}  # fmt: skip
    redis_client.set(f"{k.prefix}worker:rollout:rollout-ok", json.dumps(good), ex=60)
    redis_client.set(f"{k.prefix}worker:rollout:junk", b"\xff not json", ex=60)
    redis_client.set(f"{k.prefix}worker:reward:shape", json.dumps({"kind": 5, "ts": "later"}), ex=60)
    redis_client.sadd(k.workers, "rollout:rollout-ok", "rollout:junk", "reward:shape")
    redis_client.set(k.trainer_status, json.dumps({"step": "three", "last": [1, 2]}))
    redis_client.set(k.weights_current, b"{]")
    redis_client.hset(k.weights_meta, mapping={"2": json.dumps({"version": 2, "path": "/ckpt/2", "step": 2}),
                                               "9": b"\x00\x01"})  # fmt: skip
    redis_client.set(k.tasks, "a string where a stream belongs")  # WRONGTYPE for every stream command
    redis_client.rpush(k.dead, "a list where a stream belongs")

    res = CliRunner().invoke(app, ["status", "--redis-url", redis_url, "--namespace", k.namespace],
                             env={"COLUMNS": "300"})  # fmt: skip
    assert res.exit_code == 0, res.output
    out = res.output
    for key in (k.tasks, k.dead, k.trainer_status, k.weights_current, f"{k.weights_meta}[9]",
                f"{k.prefix}worker:rollout:junk", f"{k.prefix}worker:reward:shape"):  # fmt: skip
        assert f"invalid ({key})" in out, key
    assert "rollout-ok" in out and "v2" in out and "25%" in out  # the good worker
    assert "published [2]" in out

    buf = io.StringIO()  # --watch draws the same view and keeps going
    show(redis_url, k.namespace, Console(file=buf, width=300, force_terminal=True), watch=True, interval_s=0.05,
         iterations=2)  # fmt: skip
    assert f"invalid ({k.trainer_status})" in buf.getvalue() and "rollout-ok" in buf.getvalue()


@pytest.mark.redis
def test_a_workers_index_of_the_wrong_type_is_invalid_not_fatal(redis_url, redis_client, redis_ns, wide):
    redis_client.set(redis_ns.workers, "not a set")
    redis_client.set(redis_ns.trainer_status, "null")
    res = CliRunner().invoke(app, ["status", "--redis-url", redis_url, "--namespace", redis_ns.namespace],
                             env={"COLUMNS": "300"})  # fmt: skip
    assert res.exit_code == 0, res.output
    assert f"invalid ({redis_ns.workers})" in res.output and f"invalid ({redis_ns.trainer_status})" in res.output


def test_watch_says_when_redis_goes_away_and_recovers_when_it_is_back(embedded_redis):
    """A Redis restart under `--watch`: the view says it cannot reach it and keeps trying, no traceback."""
    buf = io.StringIO()
    console = Console(file=buf, width=300, force_terminal=True)
    errors = []

    def watch():
        try:
            show(embedded_redis.url, "gtpo-watch-test", console, watch=True, interval_s=0.05, iterations=1200)
        except Exception as e:  # what the old view did: the first failed read ended it
            errors.append(e)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while "queues (gtpo-watch-test)" not in buf.getvalue():
        assert time.monotonic() < deadline and thread.is_alive(), errors
        time.sleep(0.05)
    embedded_redis.stop()
    while "retrying every 0.05 s" not in buf.getvalue():
        assert time.monotonic() < deadline and thread.is_alive(), errors
        time.sleep(0.05)
    assert f"redis {embedded_redis.url}: ConnectionError" in buf.getvalue()
    embedded_redis.start()
    deadline = time.monotonic() + 30
    while "queues (gtpo-watch-test)" not in buf.getvalue().rpartition("retrying every")[2]:  # drawn again
        assert time.monotonic() < deadline and thread.is_alive(), errors
        time.sleep(0.05)
    assert not errors  # the thread ends by itself after its iterations
