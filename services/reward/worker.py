"""Reward worker: consume the rollouts stream, score each rollout, hand it to the scored stream.

Scores go through the same code as `POST /v1/score` (`scoring.score_items` and the killable verifier pool), and each
hand-off is atomic (XADD scored + XACK rollouts, keyed by the task id), so a worker killed mid-batch loses nothing.
"""

from __future__ import annotations

import logging
import threading

from services.reward.scoring import score_items
from services.reward.settings import RewardSettings
from shared.contracts import RolloutMessage, ScoredMessage, ScoreItem
from shared.worker import StreamWorker

log = logging.getLogger("gtpo.reward.worker")


def score_item_of(msg: RolloutMessage) -> ScoreItem:
    """What the reward functions see of a rollout: its text, reference, length and denoising steps."""
    r = msg.rollout
    return ScoreItem(
        id=msg.task.task_id,
        response=r.text,
        reference=msg.task.reference,
        token_count=len(r.token_ids),
        steps=len(set(r.step_map)),  # forwards that unmasked response tokens (DiRL's speed denominator)
        block_size=r.params.block_size or 4,
        max_new_tokens=r.params.max_new_tokens,
        finish_reason=r.finish_reason,
    )


class RewardWorker(StreamWorker):
    kind = "reward"
    log = log

    def __init__(self, pool, settings: RewardSettings) -> None:
        super().__init__(settings.redis, settings.worker_id)
        self.pool, self.settings = pool, settings

    def tick(self) -> int:
        self.registry.heartbeat("reward", self.id, None, ttl_s=self.settings.heartbeat_ttl_s)
        deliveries = self.queue.consume(self.keys.rollouts, self.keys.reward_group, self.id, RolloutMessage,
                                        count=self.settings.batch, block_ms=1000)  # fmt: skip
        if not deliveries:
            return 0
        results = score_items([score_item_of(d.message) for d in deliveries], self.settings.weights, self.pool)
        for d, res in zip(deliveries, results, strict=True):
            msg = ScoredMessage(task=d.message.task, rollout=d.message.rollout, score=res)
            self.queue.hand_off(self.keys.rollouts, self.keys.reward_group, d.entry_id, self.keys.scored, msg,
                                d.message.task.task_id)  # fmt: skip
        return len(deliveries)


def start_worker(pool, settings: RewardSettings, stop: threading.Event) -> threading.Thread:
    """Run a RewardWorker in a daemon thread until `stop` is set."""
    return RewardWorker(pool, settings).start(stop)
