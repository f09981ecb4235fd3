"""The loop every stream worker runs (rollout, reward): connect, create groups, tick until stopped, survive Redis
restarts and bad batches. Subclasses implement `tick()` (one read of their stream).

The loop never gives up: Redis down at start-up or for hours is retried until it is back. What the worker cannot do
meanwhile is said by `problem()`, which the service's `/ready` reports (Redis unreachable for longer than
`redis.outage_s`, or the loop's thread gone), so a supervisor sees it instead of a process that looks fine."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from shared.config.settings import HEARTBEAT_TTL_S, RedisConfig
from shared.contracts.wire import HeartbeatInfo, ServiceInfo
from shared.queues.keys import Keys
from shared.queues.queue import TRANSIENT_ERRORS, Queue, WeightRegistry, connect, with_reconnect


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
        self.outage_s = rc.outage_s
        self.redis_down: tuple[float, str] | None = None
        """(monotonic time of the first failed call, its error) while Redis cannot be reached; None when it can."""
        self.thread: threading.Thread | None = None

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
        """What the worker runs with, for the trainer's start-up check (shared/contracts/agreement.py); None = nothing."""
        return None

    def heartbeat_info(self) -> HeartbeatInfo:
        """The busy and up seconds the trainer's busy fraction needs and the `service_info()` its start-up check
        reads; subclasses add what else the trainer must know."""
        return HeartbeatInfo(busy_s=round(self.busy_s, 3), up_s=round(time.monotonic() - self.started, 3),
                             service=self.service_info())  # fmt: skip

    def heartbeat(self) -> None:
        """Alive, serving `loaded_version()`, with `heartbeat_info()`."""
        self.registry.heartbeat(self.kind, self.id, self.loaded_version(), ttl_s=self.heartbeat_ttl_s,
                                info=self.heartbeat_info())  # fmt: skip

    def tick(self) -> int:
        """One read of the worker's stream; returns how many messages it completed."""
        raise NotImplementedError

    def problem(self) -> str | None:
        """Why this worker cannot do its work now (what `/ready` says), or None."""
        if self.thread is not None and not self.thread.is_alive():
            return f"the {self.kind} worker thread died"
        down = self.redis_down
        if down is not None and time.monotonic() - down[0] > self.outage_s:
            return (f"redis unreachable for {time.monotonic() - down[0]:.0f} s (over redis.outage_s={self.outage_s:g})"
                    f": {down[1]}; still retrying")  # fmt: skip
        return None

    def _redis_failed(self, line: str) -> None:
        """`with_reconnect`'s log: remember when the outage began (for `problem()`), and say it."""
        if self.redis_down is None:
            self.redis_down = (time.monotonic(), line)
        self.log.warning("%s: %s", self.id, line)

    def _redis_call(self, fn, what: str) -> None:
        # a short reconnect deadline: the loop re-checks `stop`, so SIGTERM works while Redis is down
        with_reconnect(fn, what=what, deadline_s=5, log=self._redis_failed)
        self.redis_down = None

    def run(self, stop: threading.Event) -> None:
        """Create the consumer groups, then tick until `stop` is set. No error ends the loop, Redis down at start-up
        included: a loop that gave up would leave a process that looks alive and consumes nothing."""
        started = False
        while not stop.is_set():
            try:
                if not started:
                    self._redis_call(self.queue.ensure_groups, "creating consumer groups")
                    started = True
                    self.log.info("%s worker %s started", self.kind, self.id)
                self._redis_call(self.tick, f"{self.kind} worker tick")
            except TRANSIENT_ERRORS as e:
                self.log.warning("%s: redis still unreachable (%s); retrying", self.id, e)
            except Exception:  # one bad batch must not kill the worker; its messages stay pending and are reclaimed
                self.redis_down = None  # whatever failed, Redis answered
                self.log.exception("%s: batch failed", self.id)
                stop.wait(1.0)

    def start(self, stop: threading.Event) -> threading.Thread:
        """Run in a daemon thread until `stop` is set (`problem()` says if the thread dies)."""
        self.thread = threading.Thread(target=self.run, args=(stop,), name=f"{self.kind}-worker", daemon=True)
        self.thread.start()
        return self.thread
