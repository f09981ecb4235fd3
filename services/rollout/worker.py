"""Rollout worker: consume the tasks stream, keep the weights current, hand rollouts to the rollouts stream.

A task names the policy version the trainer had when it enqueued it; the worker generates with that version or a
newer one (it loads the registry's current weights first). Each rollout is handed off atomically (XADD to rollouts
+ XACK of the task, keyed by the task id), so a worker killed mid-batch leaves its tasks pending, and another worker
reclaims them once they have been idle for `claim_idle_ms`.
"""

from __future__ import annotations

import logging
import threading
import time

from services.rollout.settings import RolloutSettings
from shared.contracts import GenerationRequest, RolloutMessage, TaskMessage
from shared.http import confine
from shared.worker import StreamWorker

log = logging.getLogger("gtpo.rollout.worker")


class RolloutWorker(StreamWorker):
    """The consume -> generate -> hand-off loop of one rollout process."""

    kind = "rollout"
    log = log

    def __init__(self, host, settings: RolloutSettings) -> None:
        super().__init__(settings.redis, settings.worker_id)
        self.host, self.settings = host, settings
        self.loaded: int | None = None  # version loaded from the registry; the start model counts as unknown

    def tick(self) -> int:
        """One read of the tasks stream; returns how many tasks were completed."""
        self.refresh_weights()
        self.registry.heartbeat("rollout", self.id, self.loaded, ttl_s=self.settings.heartbeat_ttl_s)
        deliveries = self.queue.consume(self.keys.tasks, self.keys.rollout_group, self.id, TaskMessage,
                                        count=self.settings.task_batch, block_ms=1000)  # fmt: skip
        if not deliveries:
            return 0
        needed = max(d.message.policy_version for d in deliveries)
        if self.loaded is None or needed > self.loaded:
            self.sync_weights(at_least=needed)
        requests = [GenerationRequest(prompt_ids=d.message.prompt_ids, params=d.message.params) for d in deliveries]
        out = self.host.generate(requests, "queue")
        for d, (rollout,) in zip(deliveries, out, strict=True):
            msg = RolloutMessage(task=d.message, rollout=rollout, worker=self.id)
            self.queue.hand_off(self.keys.tasks, self.keys.rollout_group, d.entry_id, self.keys.rollouts, msg,
                                d.message.task_id)  # fmt: skip
        return len(deliveries)

    def refresh_weights(self) -> None:
        """Load the registry's current weights if they are newer than what this worker serves."""
        cur = self.registry.current()
        if cur is None or (self.loaded is not None and cur.version <= self.loaded):
            return
        path = confine(cur.path, self.settings.root())
        secs = self.host.load(path, cur.version, "registry")
        self.loaded = cur.version
        self.registry.heartbeat("rollout", self.id, self.loaded, ttl_s=self.settings.heartbeat_ttl_s)
        log.info("rollout worker %s loaded v%d from %s in %.1fs", self.id, cur.version, path, secs)

    def sync_weights(self, at_least: int, wait_s: float = 120.0) -> None:
        """Serve version `at_least` or newer, waiting (bounded) for the trainer to publish it."""
        deadline = time.monotonic() + wait_s
        while True:
            self.refresh_weights()
            if self.loaded is not None and self.loaded >= at_least:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"weights v{at_least} were never published (serving {self.loaded})")
            time.sleep(0.2)


def start_worker(host, settings: RolloutSettings, stop: threading.Event) -> threading.Thread:
    """Run a RolloutWorker in a daemon thread until `stop` is set."""
    return RolloutWorker(host, settings).start(stop)
