"""The collector's threading contract (issue 33, item 9): the trainer's `/status` and `/metrics` read the collector on
the server's threads while the collect thread adds and removes groups; no read may fail or see a torn state."""

import sys
import threading
import types

import pytest
from fastapi.testclient import TestClient
from test_collect import _answer, _collector

from services.trainer.orchestrator.driver import Driver
from services.trainer.orchestrator.status_server import TrainerMetrics, create_app
from shared.contracts.wire import TrainerPhase

pytestmark = pytest.mark.redis


def _driver(collector) -> Driver:
    """A driver with only what `Driver.status` reads: the real status and metrics code on a real collector."""
    d = Driver.__new__(Driver)
    d.cfg, d.collector, d.identity, d.waiting, d.history = collector.cfg, collector, "run.0123456789ab", "", []
    d.phase = TrainerPhase.collecting
    d.trainer = types.SimpleNamespace(state=types.SimpleNamespace(step=0, policy_version=0))
    return d


def _collect(c, rounds: int, done: threading.Event, errors: list) -> None:
    """Play whole steps: admit, answer every task, route the scores, train the batch (drop it from the buffer)."""
    try:
        for step in range(rounds):
            c.admit(step, 0)
            _answer(c, 0)
            while len(c.kept_groups()) < c.cfg.prompts_per_step:
                c.poll(step, 0, block_ms=50)
            c.finish_step(c.batch(), step + 1)
    except Exception as e:  # reported by the test, not lost in the thread
        errors.append(e)
    finally:
        done.set()


def test_status_and_metrics_hammered_while_collecting(redis_client, redis_ns, tmp_path):
    c = _collector(redis_client, redis_ns, tmp_path, k=2, prompts_per_step=4)
    c.start(0, 0, None)
    driver = _driver(c)
    client = TestClient(create_app(driver.status, lambda: None, TrainerMetrics(driver.status)))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can: a race shows up at once
    try:
        done, errors, reads = threading.Event(), [], 0
        threading.Thread(target=_collect, args=(c, 30, done, errors), daemon=True).start()
        while not done.is_set():
            for path in ("/status", "/metrics"):
                r = client.get(path)
                assert r.status_code == 200, r.text
            body = client.get("/status").json()
            assert body["groups_open"] >= 0 and body["samples_in_flight"] >= 0 and body["groups_buffered"] >= 0
            reads += 1
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    assert reads > 5
    assert c.counts_now() == {"groups_buffered": 0, "groups_open": 8, "samples_in_flight": 16}


def test_a_reader_waits_for_a_change_in_progress(redis_client, redis_ns, tmp_path):
    """Deterministic form of the contract: while a writer holds the lock between two halves of a change (a group
    taken out and not yet put back), `counts_now` from another thread waits and then sees the whole change."""
    c = _collector(redis_client, redis_ns, tmp_path, k=0)
    c.start(0, 0, None)
    c.admit(0, 0)
    before = c.counts_now()
    mid, seen = threading.Event(), []

    def writer():
        with c.lock:
            key, g = c.groups.popitem()
            mid.set()
            threading.Event().wait(0.3)
            c.groups[key] = g

    t = threading.Thread(target=writer)
    t.start()
    mid.wait(5)
    seen.append(c.counts_now())
    t.join()
    assert seen == [before]
