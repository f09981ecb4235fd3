"""Rollout worker: consume the tasks stream, keep the weights current, hand rollouts to the rollouts stream.

A task names the policy version the trainer had when it enqueued it; the worker generates with that version or a
newer one (it loads the registry's current weights first). Each rollout is handed off atomically (XADD to rollouts
+ XACK of the task, keyed by the task id), so a worker killed mid-batch leaves its tasks pending, and another worker
reclaims them once they have been idle for `claim_idle_ms`.

Each task stands alone: one that can never be generated (over a limit, token ids outside the vocabulary, a field
the next stage refuses) is dead-lettered at once with its reason, and its batch-mates go on. A batch the engine
refuses is retried one task at a time, so only the bad task is rejected; an error that is not the task's fault
(anything but a ValueError) leaves it pending, to be redelivered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from services.rollout.engines import GenerationCancelled
from services.rollout.fetch import Prefetcher, collect_garbage
from services.rollout.host import EngineHost, request_error
from services.rollout.settings import RolloutSettings
from services.rollout.weights import WeightsError
from shared.contracts.wire import (
    GenerationRequest,
    HeartbeatInfo,
    Rollout,
    RolloutMessage,
    ScoreItem,
    ServiceInfo,
    TaskMessage,
    WeightsRefusal,
    WeightsVersion,
    WorkerKind,
    brief_error,
)
from shared.queues.queue import Delivery
from shared.queues.worker import StreamWorker

log = logging.getLogger("gtpo.rollout.worker")

Task = Delivery[TaskMessage]


def task_error(task: TaskMessage, settings: RolloutSettings) -> str | None:
    """Why a decoded task can never be generated and handed on, or None.

    The engine's own checks (token ids in its vocabulary, settings that fit the model) are its to make: a task
    they refuse fails with a ValueError when generated alone.
    """
    if task.params.n != 1:
        return f"params.n: a task is one sample, got {task.params.n}"
    try:
        GenerationRequest(prompt_ids=task.prompt_ids, params=task.params)
    except ValidationError as e:
        return brief_error(e)
    reason = request_error(task.prompt_ids, task.params, settings, "prompt_ids")
    if reason is not None:
        return reason
    try:  # what the reward stage builds from it (services/reward/worker.py): refused there, it would fail there
        ScoreItem(id=task.task_id, response="", reference=task.reference)
    except ValidationError as e:
        return f"the reward stage would refuse it as a ScoreItem ({brief_error(e)}; from task_id / reference)"
    return None


class RolloutWorker(StreamWorker):
    """The consume -> generate -> hand-off loop of one rollout process."""

    kind = WorkerKind.rollout
    log = log

    def __init__(self, host: EngineHost, settings: RolloutSettings) -> None:
        super().__init__(settings.redis, settings.worker_id)
        self.host, self.settings = host, settings
        self.heartbeat_ttl_s = settings.heartbeat_ttl_s
        self.stop = threading.Event()
        self.handled: tuple[int, str, str | None] | None = None
        """The registry's last (version, path, run) loaded, found served, or refused: not looked at again."""
        self.refused: WeightsRefusal | None = None
        """The registry's current version when this worker refused it (its heartbeat tells the trainer)."""
        self.bad_current: str | None = None
        """Why the registry's current-weights value breaks its contract, while it does (skipped, counted once)."""
        self.prefetcher: Prefetcher | None = None
        """weights.transport=http: fetches versions into the worker's cache (made at the first such version)."""
        self.next_swap_check = 0.0
        """swap_at_block: monotonic time before which the block hook does not read the registry again."""
        self.swaps = 0
        """swap_at_block: versions loaded between two blocks of a running batch."""

    def run(self, stop: threading.Event) -> None:
        self.stop = stop  # also the engine's cancel event: on shutdown a batch ends at its next block boundary
        super().run(stop)

    def tick(self) -> int:
        """One read of the tasks stream; returns how many tasks were completed (handed off or dead-lettered)."""
        self.refresh_weights()
        self.heartbeat()
        deliveries = self.queue.consume(self.keys.tasks, self.keys.rollout_group, self.id, TaskMessage,
                                        count=self.settings.task_batch, block_ms=1000)  # fmt: skip
        good = []
        for d in deliveries:
            reason = task_error(d.message, self.settings)
            if reason is None:
                good.append(d)
            else:
                self.queue.reject(d, self.keys.rollout_group, reason)
        servable = self.servable(good)
        return len(deliveries) - len(good) + self.generate(servable)

    def loaded_version(self) -> int | None:
        return self.host.served_version

    def heartbeat_info(self) -> HeartbeatInfo:
        return super().heartbeat_info().model_copy(update={"weights_refused": self.refusal()})

    def refusal(self) -> WeightsRefusal | None:
        """The refused version, unless a newer (or the same) one is served since (pushed over HTTP)."""
        served, r = self.host.served_version, self.refused
        return r if r is not None and (served is None or r.version > served) else None

    def weights_problem(self) -> str | None:
        """Why the registry's current version is not served (a refused load, a value that is no version), or None."""
        if self.bad_current is not None:
            return f"the current-weights record in Redis is no weights version ({self.bad_current})"
        r = self.refusal()
        if r is not None:
            return f"weights v{r.version} from {r.path} refused (checkpoint root {r.root}): {r.reason}"
        return None

    def problem(self) -> str | None:
        """`StreamWorker.problem`, and a weights problem while no published version could be loaded: then no task
        can ever be served. With a version loaded, the worker keeps serving it (`/ready` shows the problem)."""
        found = super().problem()
        if found is None and self.host.served_version is None:
            found = self.weights_problem()
        return found

    def service_info(self) -> ServiceInfo | None:
        engine = getattr(self.host, "engine", None)  # a host without a model (bench/async_rl.py) has no spec to say
        if engine is None:
            return None
        return self.settings.info(engine.spec.block_size, engine.spec.mask_token_id)

    def servable(self, tasks: list[Task]) -> list[Task]:
        """The tasks the served weights may generate (their run's, at their version or newer), after waiting
        (bounded) for the trainer to publish what they need; the others stay pending, to be redelivered."""
        if not tasks:
            return []
        deadline = time.monotonic() + self.settings.weights_wait_s
        while (
            not all(_serves(self.host, d.message) for d in tasks)
            and time.monotonic() < deadline
            and not self.stop.is_set()
        ):
            time.sleep(0.2)
            self.refresh_weights()
            self.heartbeat()
        ready = [d for d in tasks if _serves(self.host, d.message)]
        if len(ready) < len(tasks):
            log.warning("%s: %d tasks need weights other than v%s of run %s, never published within %.0f s; left "
                        "pending", self.id, len(tasks) - len(ready), self.host.served_version,
                        self.host.served_run, self.settings.weights_wait_s)  # fmt: skip
        return ready

    def generate(self, tasks: Sequence[Task]) -> int:
        """Generate and hand off `tasks` in one batch, or one by one when the batch fails; returns how many."""
        if not tasks:
            return 0
        try:
            with self.busy():
                out = self.host.generate([_request(d) for d in tasks], "queue", self.stop, self.block_hook())
        except GenerationCancelled:
            return 0
        except Exception as e:
            log.warning("%s: a batch of %d tasks failed (%s: %s); generating them one by one",
                        self.id, len(tasks), type(e).__name__, e)  # fmt: skip
            return sum(self.generate_alone(d) for d in tasks)
        for d, (rollout,) in zip(tasks, out, strict=True):
            self.hand_off(d, rollout)
        return len(tasks)

    def generate_alone(self, d: Task) -> int:
        """One task: handed off (1), rejected for a ValueError of its own (1), or left pending (0)."""
        if self.stop.is_set():
            return 0
        try:
            with self.busy():
                ((rollout,),) = self.host.generate([_request(d)], "queue", self.stop, self.block_hook())
        except GenerationCancelled:
            return 0
        except ValueError as e:  # the engine refuses this task (its ids, its settings): it always will
            self.queue.reject(d, self.keys.rollout_group, f"cannot be generated: {brief_error(e)}")
            return 1
        except Exception:  # not the task's fault (a device error...): redelivered later, dead after max_deliveries
            log.exception("%s: task %s failed; left pending", self.id, d.message.task_id)
            return 0
        self.hand_off(d, rollout)
        return 1

    def hand_off(self, d: Task, rollout: Rollout) -> None:
        msg = RolloutMessage(task=d.message, rollout=rollout, worker=self.id)
        self.queue.hand_off(self.keys.tasks, self.keys.rollout_group, d.entry_id, self.keys.rollouts, msg,
                            d.message.task_id)  # fmt: skip

    def refresh_weights(self) -> None:
        """Load the registry's current weights if they are newer than what this process serves, or another run's.

        The same rule as `/v1/weights` without rollback within one run: never an older version, nor the served
        version from another folder. When the registry names another run (a new run took the namespace over, its
        versions start again), its weights replace the served ones whatever their numbers: a version number means
        nothing across runs. A version that fails to load is logged once, the old weights stay served, and the
        heartbeat says it was refused. A current-weights value that is no `WeightsVersion` is skipped the same way
        (counted once per value), so the worker keeps consuming with what it serves.
        """
        try:
            cur = self.registry.current(strict=True)
        except ValueError as e:  # pydantic's ValidationError: garbage at the key, written by anything but the trainer
            self._skip_bad_current(brief_error(e))
            return
        self.bad_current = None
        if cur is not None:
            self._serve(cur)

    def block_hook(self) -> Callable[[], None] | None:
        """What the engine calls between two blocks of a batch: `swap_at_block`, else nothing."""
        return self.swap_at_block if self.settings.swap_at_block else None

    def swap_at_block(self) -> None:
        """Between two blocks of a running batch: load the registry's current version if it is a newer one of the
        served run (never another run's: a response does not change runs). Reads Redis at most once per
        `swap_poll_ms`; a failure to read or load keeps the served weights (the next tick logs and reports it)."""
        now = time.monotonic()
        if now < self.next_swap_check:
            return
        self.next_swap_check = now + self.settings.swap_poll_ms / 1000
        try:
            cur = self.registry.current(strict=True)
            served = self.host.served_version
            if cur is None or served is None or cur.run != self.host.served_run or cur.version <= served:
                return
            self._serve(cur, "swap")  # a refused version is logged and reported there; the batch goes on with the old
        except Exception as e:  # garbage at the key, Redis away: no reason to lose a batch; the next tick says it
            log.warning("%s: no weights swap between blocks: %s: %s", self.id, type(e).__name__, str(e)[:300])
            return
        if self.host.served_version == cur.version:
            self.swaps += 1

    def _serve(self, cur: WeightsVersion, source: str = "registry") -> None:
        """Load `cur` (the registry's current version) unless handled already or older than the served one; `source`
        labels the load's metrics (`swap`: between two blocks, generation paused for its seconds)."""
        if (cur.version, cur.path, cur.run) == self.handled:
            return
        served, same_run = self.host.served_version, self.host.served_run == cur.run
        if served is not None and same_run and cur.version < served:
            return  # pushed over HTTP ahead of the registry
        where = self._source(cur)
        if where is None:
            return  # being fetched while the old weights keep serving, or a failed fetch waiting for its retry
        path, root = where
        self.handled = (cur.version, cur.path, cur.run)
        try:
            done = self.host.load(path, root, cur.version, source, rollback=not same_run, run=cur.run)
        except WeightsError as e:
            log.error("%s: cannot serve v%d from %s (checkpoint root %s), still serving v%s: %s",
                      self.id, cur.version, path, root, served, e)  # fmt: skip
            self.refused = WeightsRefusal(version=cur.version, path=cur.path, root=str(root), reason=str(e)[:1000])
            self.heartbeat()
            return
        self.refused = None
        self.heartbeat()
        if self.prefetcher is not None:  # the cache keeps the served version (the newest is being fetched meanwhile)
            collect_garbage(self.prefetcher.cache, {Path(done.path)})
        how = f"in {done.seconds:.1f}s" if done.seconds else "(already served: pushed over HTTP first)"
        log.info("rollout worker %s loaded v%d of run %s from %s %s", self.id, cur.version, cur.run, done.path, how)

    def _source(self, cur: WeightsVersion) -> tuple[str, Path] | None:
        """(folder, root) to load `cur` from: the shared volume under the checkpoint root, or (weights.transport=
        http) the worker's verified copy, fetched in the background; None until that copy is there. A failed fetch
        shows in the heartbeat as a refusal until a version loads; it is retried after `weights_retry_s`."""
        if cur.url is None:
            return cur.path, self.settings.root()
        if self.prefetcher is None:
            s = self.settings
            self.prefetcher = Prefetcher(s.cache(), s.api_token, s.weights_retry_s, s.weights_fetch_timeout_s)
        folder = self.prefetcher.ready(cur)
        if folder is not None:
            return str(folder), self.prefetcher.cache
        why = self.prefetcher.failure(cur)
        if why is not None:
            self.refused = WeightsRefusal(version=cur.version, path=cur.url, root=str(self.prefetcher.cache),
                                          reason=f"fetch failed (retried every {self.settings.weights_retry_s:.0f} "
                                          f"s): {why}"[:1000])  # fmt: skip
        return None

    def _skip_bad_current(self, reason: str) -> None:
        if reason != self.bad_current:
            self.host.metrics.bad_records.labels("weights_current").inc()
            log.warning("%s: the current-weights record %s is no weights version (%s); skipped, still serving v%s",
                        self.id, self.keys.weights_current, reason, self.host.served_version)  # fmt: skip
        self.bad_current = reason


def _serves(host, task: TaskMessage) -> bool:
    """Whether the weights `host` serves may generate `task`: a published version (the start model is none), at
    least the task's, of the task's run when it names one."""
    served = host.served_version
    if served is None or served < task.policy_version:
        return False
    return task.policy_run is None or task.policy_run == host.served_run


def _request(d: Task) -> GenerationRequest:
    return GenerationRequest(prompt_ids=d.message.prompt_ids, params=d.message.params)


def start_worker(host: EngineHost, settings: RolloutSettings, stop: threading.Event) -> RolloutWorker:
    """Run a RolloutWorker in a daemon thread until `stop` is set; its `thread` is the thread."""
    worker = RolloutWorker(host, settings)
    worker.start(stop)
    return worker
