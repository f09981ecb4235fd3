"""Bounded work over real HTTP (uvicorn on a free port, httpx clients): a generate whose client disconnected is
abandoned at the next block boundary, requests queued behind it whose clients left never decode, and the engine
serves the next request."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import pytest
import uvicorn

from services.rollout.app import create_app
from services.rollout.engines.torch_engine import TorchEngine
from services.rollout.settings import RolloutSettings

MAX_NEW = 131072
LONG = {"prompt_ids": [[5, 6, 7]], "params": {"max_new_tokens": MAX_NEW, "stop_token_ids": [], "seed": 0}}
SHORT = {"prompt_ids": [[5, 6, 7]], "params": {"max_new_tokens": 8, "stop_token_ids": [], "seed": 1}}


@pytest.fixture
def served(tiny_dir, tiny):
    """The service under uvicorn in this process (so the test can read the engine's forward counter)."""
    engine = TorchEngine(tiny)
    app = create_app(RolloutSettings(model=tiny_dir, max_new_tokens=MAX_NEW), engine=engine)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", engine
    server.should_exit = True
    thread.join(30)


def wait_until(done: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def cancelled(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith('gtpo_rollout_cancelled_total{source="http"}'):
            return float(line.split()[-1])
    return 0.0


def leave_early(url: str) -> None:
    """Ask for the longest generation the service allows, then hang up (the read timeout closes the socket)."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/generate", json=LONG, timeout=httpx.Timeout(30, read=1.0))


def test_a_generate_whose_client_left_is_abandoned_and_the_engine_serves_the_next(served):
    url, engine = served
    clients = [threading.Thread(target=leave_early, args=(url,)) for _ in range(2)]  # one decodes, one waits
    for c in clients:
        c.start()
    for c in clients:
        c.join()

    wait_until(lambda: cancelled(url) == 2)
    stopped_at = engine.stats.forwards
    # the decoding one stopped at a block boundary, far short of its 131072 tokens (at least one forward a block)
    assert 0 < stopped_at < MAX_NEW // engine.spec.block_size

    r = httpx.post(f"{url}/v1/generate", json=SHORT, timeout=60)
    assert r.status_code == 200 and len(r.json()["rollouts"][0][0]["token_ids"]) == 8
    # only the short request decoded since: a prefill and at most 4 forwards per block, 3 blocks
    assert engine.stats.forwards - stopped_at <= 1 + 3 * engine.spec.block_size
    assert 'gtpo_rollout_requests_total{source="http"} 1.0' in httpx.get(f"{url}/metrics").text
