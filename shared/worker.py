"""The loop every stream worker runs (rollout, reward): connect, create groups, tick until stopped, survive Redis
restarts and bad batches. Subclasses implement `tick()` (one read of their stream)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from shared.contracts import ServiceInfo
from shared.keys import Keys
from shared.queue import TRANSIENT_ERRORS, Queue, WeightRegistry, connect, with_reconnect
from shared.settings import HEARTBEAT_TTL_S, RedisConfig


class StreamWorker:
    """Queue, weights registry and the run loop of one worker process."""

    kind = "worker"
    log = logging.getLogger("gtpo.worker")

    def __init__(self, redis_config: RedisConfig, worker_id: str) -> None:
        rc = redis_config
        self.keys = Keys(rc.namespace)
        self.redis = connect(rc.resolved_url())
        self.queue = Queue(self.redis, self.keys, codec=rc.codec, claim_idle_ms=rc.claim_idle_ms,
                           max_deliveries=rc.max_deliveries)  # fmt: skip
        self.registry = WeightRegistry(self.redis, self.keys)
        self.id = worker_id
        self.heartbeat_ttl_s = HEARTBEAT_TTL_S
        self.started = time.monotonic()
        self.busy_s = 0.0
        """Seconds spent working (inside `busy()`): the trainer reports each kind's busy fraction from it."""

    @contextlib.contextmanager
    def busy(self):
        """Count the time of the block as work (generating, scoring), not the time spent waiting for it."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.busy_s += time.monotonic() - start

    def loaded_version(self) -> int | None:
        """The weights version this worker serves (rollout workers), None for workers without weights."""
        return None

    def service_info(self) -> ServiceInfo | None:
        """What the worker runs with, for the trainer's start-up check (shared/agreement.py); None = nothing."""
        return None

    def heartbeat(self) -> None:
        """Alive, serving `loaded_version()`, with the busy and up seconds the trainer's busy fraction needs and
        the `service_info()` its start-up check reads."""
        info = {"busy_s": round(self.busy_s, 3), "up_s": round(time.monotonic() - self.started, 3)}
        said = self.service_info()
        if said is not None:
            info["service"] = said.model_dump(mode="json")
        self.registry.heartbeat(self.kind, self.id, self.loaded_version(), ttl_s=self.heartbeat_ttl_s, info=info)

    def tick(self) -> int:
        """One read of the worker's stream; returns how many messages it completed."""
        raise NotImplementedError

    def run(self, stop: threading.Event) -> None:
        with_reconnect(self.queue.ensure_groups, what="creating consumer groups")
        self.log.info("%s worker %s started", self.kind, self.id)
        while not stop.is_set():
            try:
                # a short reconnect deadline: the loop re-checks `stop`, so SIGTERM works while Redis is down
                with_reconnect(self.tick, what=f"{self.kind} worker tick", deadline_s=5)
            except TRANSIENT_ERRORS as e:
                self.log.warning("%s: redis still unreachable (%s); retrying", self.id, e)
            except Exception:  # one bad batch must not kill the worker; its messages stay pending and are reclaimed
                self.log.exception("%s: batch failed", self.id)
                time.sleep(1.0)

    def start(self, stop: threading.Event) -> threading.Thread:
        """Run in a daemon thread until `stop` is set."""
        thread = threading.Thread(target=self.run, args=(stop,), name=f"{self.kind}-worker", daemon=True)
        thread.start()
        return thread
