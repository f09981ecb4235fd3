"""Reward worker: consume the rollouts stream, score each rollout, hand it to the scored stream.

Scores go through the same code as `POST /v1/score` (`scoring.score_items` and the killable verifier pool), and each
hand-off is atomic (XADD scored + XACK rollouts, keyed by the task id), so a worker killed mid-batch loses nothing.

Each entry stands alone: one that decodes but can never be scored (a task id or reference over the `ScoreItem`
limits, anything its item cannot be built from) is dead-lettered at once with its reason (`Queue.reject`), and its
batch-mates are scored and handed off as if it had not been there. Entries that do not decode at all never reach
the worker: `Queue.consume` dead-letters them.
"""

from __future__ import annotations

import logging
import threading

from services.reward.code import CodeRunner
from services.reward.scoring import item_from_rollout, score_items
from services.reward.settings import RewardSettings
from services.reward.verify import VerifierPool
from shared.contracts.wire import RolloutMessage, ScoredMessage, ScoreItem, ServiceInfo, WorkerKind, brief_error
from shared.queues.queue import Delivery
from shared.queues.worker import StreamWorker

log = logging.getLogger("gtpo.reward.worker")


class RewardWorker(StreamWorker):
    kind = WorkerKind.reward
    log = log

    def __init__(self, pool: VerifierPool, settings: RewardSettings, code: CodeRunner | None = None) -> None:
        super().__init__(settings.redis, settings.worker_id)
        self.pool, self.settings, self.code = pool, settings, code
        self.heartbeat_ttl_s = settings.heartbeat_ttl_s

    def service_info(self) -> ServiceInfo:
        return self.settings.info()

    def tick(self) -> int:
        """Read one batch; score what can be scored, dead-letter what cannot. Returns entries completed."""
        self.heartbeat()
        deliveries = self.queue.consume(self.keys.rollouts, self.keys.reward_group, self.id, RolloutMessage,
                                        count=self.settings.batch, block_ms=1000)  # fmt: skip
        batch: list[tuple[Delivery[RolloutMessage], ScoreItem]] = []
        for d in deliveries:
            task = d.message.task
            try:
                batch.append((d, item_from_rollout(task.task_id, d.message.rollout, task.reference)))
            except Exception as e:  # built from this entry alone: whatever fails is the entry's fault
                self.queue.reject(d, self.keys.reward_group, f"cannot be scored: {brief_error(e)}")
        with self.busy():
            results = score_items(
                [item for _, item in batch],
                self.settings.weights,
                self.pool,
                zero_truncated=self.settings.zero_truncated,
                code=self.code,
                code_block=self.settings.code_block,
            )
        for (d, _), res in zip(batch, results, strict=True):
            msg = ScoredMessage(task=d.message.task, rollout=d.message.rollout, score=res,
                                reward_weights=self.settings.weights)  # fmt: skip
            self.queue.hand_off(self.keys.rollouts, self.keys.reward_group, d.entry_id, self.keys.scored, msg,
                                d.message.task.task_id)  # fmt: skip
        return len(deliveries)


def start_worker(
    pool: VerifierPool, settings: RewardSettings, stop: threading.Event, code: CodeRunner | None = None
) -> RewardWorker:
    """Run a RewardWorker in a daemon thread until `stop` is set; its `thread` is the thread."""
    worker = RewardWorker(pool, settings, code)
    worker.start(stop)
    return worker
