"""`gtpo train`: the round driver. Per step: admit and collect scored groups (`collect`), train (every process),
checkpoint, publish the next weights version (`weights`), acknowledge what the step consumed.

With `max_staleness` k >= 1 the collection runs ahead of training by up to k steps (docs/design.md section 7), so the
rollout workers generate while the trainer trains; k = 0 is the synchronous loop.

Exactly-once training of groups rests on four facts:

* task ids are ``run:train_by:prompt:sample`` and publishing is idempotent, so a resumed run re-enqueues nothing new;
* every enqueued group is in a Redis ledger until the step that trains (or drops) it is checkpointed;
* scored messages are acknowledged only after that checkpoint; a trainer killed before it gets them back (its own
  pending entries, read first on restart) and trains them once;
* the checkpoint holds the step, the data cursor and the groups the step trained, so a resumed run continues with
  the same prompts and never trains a group twice.

One trainer drives a namespace at a time (`lease`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from services.trainer.config import RLConfig
from services.trainer.learner.checkpoint import TrainerState
from services.trainer.learner.tracking import keep_rows
from services.trainer.orchestrator.collect import Collector, Group, Prompt
from shared.contracts.wire import ScoredMessage, StepBatch, StepSample, TrainerPhase, TrainerStatus, WeightsVersion
from shared.model.step_map import tokens_per_step

log = logging.getLogger("gtpo.trainer")

PREFETCH_PERIOD_S = 0.25
"""How often scored groups are read (and dropped ones refilled) while the trainer trains, with k >= 1."""
INFO_WAIT_S = 60.0
"""How long the start-up check waits for each of `rollout_urls` to answer `GET /info` (it may still be loading)."""


class Processes(Protocol):
    """What the driver asks of an Accelerator."""

    num_processes: int
    is_main_process: bool

    def wait_for_everyone(self) -> None: ...


class DrivenLearner(Protocol):
    """What the round driver drives: `services.trainer.learner.trainer.Learner`, or the async benchmark's simulated one
    (bench/async_rl.py). Every process holds one; only the main process's driver talks to Redis."""

    state: TrainerState
    accelerator: Processes
    checkpoint_root: Path

    @property
    def tokenizer(self) -> Any: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def spec(self) -> Any:
        """The model's DiffusionSpec (block size, mask id) for the start-up check; None where no model is loaded."""

    def resume(self) -> bool: ...

    def start_fresh(self) -> None: ...

    def rl_step(self, batch: StepBatch) -> dict[str, float]: ...

    def save(self) -> Path: ...

    def weights_path(self, checkpoint: Path) -> Path: ...


def real_learner(cfg: RLConfig) -> DrivenLearner:
    """The model-backed `Learner` of `cfg` (loads the model: called once the lease is held)."""
    from services.trainer.learner.trainer import Learner

    return Learner(cfg)


def load_prompts(source, **columns) -> list[Prompt]:
    """The RL prompts of a data source (shared/data.py); `columns`: question_field, answer_field, answer_extract,
    max_row_bytes."""
    from shared.data import load_qa

    return [Prompt(r["question"], r["ground_truth_answer"]) for r in load_qa(source, **columns)]


class Driver:
    """Owns the loop; the learner owns the maths, the collector owns the queues.

    Args:
        cfg: the run.
        resume: continue from the latest checkpoint under `cfg.output_dir`.
        fresh: start at step 0 even where an earlier run wrote to `cfg.output_dir` (its files are moved aside).
        learner: builds the learner to drive, called once the lease is held (nothing touches the output folder
            before); the async benchmark passes its simulated one.
    """

    def __init__(
        self,
        cfg: RLConfig,
        *,
        resume: bool = False,
        fresh: bool = False,
        learner: Callable[[RLConfig], DrivenLearner] = real_learner,
    ) -> None:
        from accelerate import PartialState

        self.cfg = cfg
        self.main = PartialState().is_main_process
        self.solo = PartialState().num_processes == 1
        self.stop = threading.Event()
        self.phase = TrainerPhase.starting
        self.waiting = ""
        """What the driver waits for, in words (status pages, the log)."""
        self.history: list[dict] = []
        self._busy_prev: dict[str, tuple[float, float]] = {}  # worker -> (busy_s, up_s) at the last step
        self.lease = None
        if resume and fresh:
            raise ValueError("--resume and --fresh: choose one (continue the run, or start it again at step 0)")
        if self.main:  # one consumer per trainer, however many processes train
            self._connect()  # the lease first: nothing in the output folder is touched while another trainer runs
            if fresh:
                self._check_fresh_namespace()
        self.trainer = learner(cfg)
        if fresh:
            self.trainer.start_fresh()
        resumed = resume and self.trainer.resume()
        # what names this run's weight versions, kept by every checkpoint: a version number alone names weights
        # of any run that ever used the namespace
        self.identity: str = self.trainer.state.extra.get("run") or new_identity(cfg.run_id)
        self.trainer.state.extra["run"] = self.identity
        from services.trainer.learner.tracking import Trackers

        self.trackers = Trackers(cfg)
        if resumed and self.main:
            done = self.trainer.state.step
            # rows of a step that never reached its checkpoint are not durable: that step runs again
            keep_rows(cfg.output_dir / "trained_groups.jsonl", lambda row: row["step"] < done)
            self.trackers.rewind(done, self.trainer.state.extra.get("metrics"))
        self.prompts = load_prompts(cfg.data, question_field=cfg.question_field, answer_field=cfg.answer_field,
                                    answer_extract=cfg.answer_extract, max_row_bytes=cfg.max_row_bytes)  # fmt: skip
        self.weight_store = None
        if self.main:
            t = self.trainer
            self.collector = Collector(cfg, self.queue, self.prompts, t.tokenizer, t.vocab_size, identity=self.identity)
            from services.trainer.orchestrator.status_server import TrainerMetrics
            from services.trainer.orchestrator.weights_server import WeightStore

            self.metrics = TrainerMetrics(self.status)
            # weights.transport=http: the versions this process serves over its HTTP server
            self.weight_store = WeightStore() if cfg.weights.transport == "http" else None

    def _connect(self) -> None:
        from services.trainer.orchestrator.lease import RunLease
        from shared.queues.keys import Keys
        from shared.queues.queue import Queue, WeightRegistry, connect

        rc = self.cfg.redis
        self.keys = Keys(rc.namespace)
        self.redis = connect(rc.resolved_url())
        self.queue = Queue(self.redis, self.keys, codec=rc.codec, claim_idle_ms=rc.claim_idle_ms,
                           max_deliveries=rc.max_deliveries)  # fmt: skip
        self.registry = WeightRegistry(self.redis, self.keys)
        self.lease = RunLease(self.redis, self.keys.trainer_lease, self.cfg.run_id, self.cfg.output_dir,
                              ttl_s=self.cfg.lease_ttl_s)  # fmt: skip
        self._redis(self.lease.acquire, "taking the trainer lease")
        self.lease.start_renewing(on_lost=self.stop.set)

    def _check_fresh_namespace(self) -> None:
        """`--fresh` needs a namespace no earlier run trained in: its workers would keep serving that run's newer
        weights (checked before anything is moved aside)."""
        cur = self.registry.current()
        if cur is not None and cur.version > 0:
            raise ValueError(
                f"--fresh: redis.namespace {self.cfg.redis.namespace!r} already serves weights v{cur.version} of an "
                "earlier run: use a new namespace (or delete that one's keys) for a fresh run"
            )

    def check_agreement(self) -> None:
        """Before the first step: the rollout services of `rollout_urls` (`GET /info`) and the workers registered in
        Redis (their heartbeats) agree with this trainer (shared/contracts/agreement.py); one that does not answer is logged
        and left unchecked.

        Raises:
            AgreementError: every mismatch, naming both values.
        """
        from shared.contracts.agreement import ServiceUnreachable, check_agreement, fetch_info, registered_infos

        found = {}
        for url in self.cfg.rollout_urls:
            try:
                # a SIGTERM ends the wait for a service still loading
                found[url] = fetch_info(url, INFO_WAIT_S, alive=lambda: not self.stop.is_set())
            except ServiceUnreachable as e:
                log.warning("%s", e)
        seen = {info.worker_id for info in found.values()}
        live = registered_infos(self._redis(self.registry.live_workers, "reading worker heartbeats"))
        found.update({wid: info for wid, info in live.items() if wid not in seen})
        check_agreement(self.cfg.trainer_side(self.trainer.spec), found)
        log.info("start-up check: %d services agree (%s)", len(found), ", ".join(found) or "none seen yet")

    # ------------------------------------------------------------------ the loop

    def _redis(self, fn, what: str, *, in_step: bool = False):
        """`fn()` (Redis work, safe to repeat) through a Redis restart: retried with backoff for `redis.reconnect_s`,
        then `RedisUnavailable`; `StopRequested` at once when a stop comes meanwhile.

        Args:
            in_step: called after the step's batch went to every rank: with several processes a stop does not cut
                the wait short there (the other ranks are in the step's collectives and would hang).
        """
        from shared.queues.queue import with_reconnect

        stop = self.stop if self.solo or not in_step else None
        return with_reconnect(fn, what=what, deadline_s=self.cfg.redis.reconnect_s, stop=stop)

    def _check_lease(self) -> None:
        """`lease.check()` (after the batch went out) through a Redis restart (renewing is idempotent; `LeaseLost`
        is not retried)."""
        self._redis(self.lease.check, "renewing the trainer lease", in_step=True)

    def run(self) -> list[dict]:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from shared.queues.queue import StopRequested

        state = self.trainer.state
        try:
            if self.main:
                self.check_agreement()
                saved = state.extra.get("collector") if state.step > 0 else None
                self._redis(lambda: self.collector.start(state.step, state.data_cursor, saved), "rebuilding the buffer")
                self._redis(self._publish_current, "publishing weights")
            cols = (
                TextColumn("gtpo"),
                BarColumn(),
                TextColumn("step {task.completed}/{task.total} {task.fields[info]}"),
            )
            with Progress(*cols, TimeElapsedColumn(), disable=not self.main) as bar:
                task = bar.add_task("rl", total=self.cfg.steps, completed=state.step, info="")
                # the main process decides when to stop, so every rank stops after the same step
                while (
                    state.step < self.cfg.steps
                    and broadcast_text(self.trainer.accelerator, str(self.stop.is_set())) == "False"
                ):
                    metrics = self.one_step()
                    if metrics is None:  # stopped while waiting for groups: nothing of the step was trained
                        break
                    bar.update(task, completed=state.step, info=f"reward {metrics.get('reward_mean', 0):.3f}")
            if self.main and state.step >= self.cfg.steps:
                self._redis(self._linger_for_fetches, "waiting for workers to fetch the last weights")
        except StopRequested as e:  # stopped while Redis was away: the last checkpoint stands, as after a crash
            log.info("%s", e)
        finally:
            self.trackers.close()
            if self.lease is not None and not self.lease.lost.is_set():
                self.lease.release()
        if self.lease is not None and self.lease.lost.is_set():
            from services.trainer.orchestrator.lease import LeaseLost

            raise LeaseLost("the trainer lease was taken over by another trainer; stopped without writing")
        if self.stop.is_set():
            log.info("stopped by signal after step %d (its checkpoint is the last one)", state.step)
        return self.history

    def one_step(self) -> dict | None:
        """Collect (main process), train (every process), checkpoint, publish, acknowledge: one RL step; None when a
        stop came while it waited for groups (nothing trained, nothing acknowledged: a resume collects them again).

        Only the main process talks to Redis; the others get the step's `StepBatch` by broadcast, so a multi-GPU or
        multi-node trainer is one consumer, not one per rank.
        """
        t0 = time.monotonic()
        step, version = self.trainer.state.step, self.trainer.state.policy_version
        groups: list[Group] = []
        payload = None
        if self.main:
            collected = self._collect_step()
            payload = "" if collected is None else self.step_batch(collected).model_dump_json()
            groups = collected or []
        text = broadcast_text(self.trainer.accelerator, payload)
        if not text:  # every rank stops together
            self.phase = TrainerPhase.stopped
            return None
        t1 = time.monotonic()
        self.phase, self.waiting = TrainerPhase.training, ""
        with self._collecting_meanwhile():
            metrics = self.trainer.rl_step(StepBatch.model_validate_json(text))
        t2 = time.monotonic()
        metrics.update(time_wait_s=t1 - t0, time_train_s=t2 - t1)
        self._checkpoint(step, version, groups, metrics)
        metrics["time_checkpoint_s"] = time.monotonic() - t2
        if self.main:
            self._check_lease()
            self.trackers.log(metrics)
            timings = {"wait": t1 - t0, "train": t2 - t1, "checkpoint": metrics["time_checkpoint_s"]}
            staleness = [version - m.rollout.policy_version for g in groups for m in g.samples.values()]
            self.metrics.observe_step(timings, staleness)
        self.history.append(metrics)
        self.phase = TrainerPhase.idle
        return metrics

    def _checkpoint(self, step: int, version: int, groups: list[Group], metrics: dict) -> None:
        """Save the trained step with its data cursor, buffer and metrics row (every process); then, main process,
        publish its weights and acknowledge what it consumed."""
        state = self.trainer.state
        if self.main:  # only the main process writes the checkpoint; read after training (refills moved the cursor)
            state.data_cursor = self.collector.cursor
            state.extra["collector"] = self.collector.resume_record(groups)
        state.extra["metrics"] = metrics  # a crash between the checkpoint and the metrics row loses no row
        if self.main:
            self._check_lease()
            self._record_trained(step, version, groups)
        self.phase = TrainerPhase.checkpointing
        path = self.trainer.save()
        if self.main:
            self._check_lease()  # a trainer replaced while it saved must not publish its version over the new one's
            self._after_checkpoint(path, groups)
        self.trainer.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def _collecting_meanwhile(self):
        """With k >= 1, keep reading scored groups and refilling dropped ones while the trainer trains (main process,
        a background thread), so the next step finds its groups complete instead of waiting for refills.

        The trainer's version does not change until the checkpoint, so admission stays within the bound; the
        step's own batch still counts in the window, so nothing is admitted that could only expire. k = 0 is the
        synchronous loop: nothing runs meanwhile.
        """
        if not (self.main and self.cfg.max_staleness > 0):
            yield
            return
        from shared.queues.queue import TRANSIENT_ERRORS

        c, state, done = self.collector, self.trainer.state, threading.Event()
        step, version, errors = state.step, state.policy_version, []

        def loop() -> None:
            # a few reads a second: enough to refill drops in time, little enough not to slow the training thread
            while not done.wait(PREFETCH_PERIOD_S) and not self.lease.lost.is_set():
                try:
                    c.poll(step, version, block_ms=0)
                    c.admit(step, version)
                except TRANSIENT_ERRORS as e:  # Redis away: the loop after training reconnects
                    log.warning("collecting while training: %s", e)
                    done.wait(1.0)
                except Exception as e:
                    errors.append(e)
                    return

        thread = threading.Thread(target=loop, name="collect-while-training", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
        if errors:
            raise errors[0]

    def _after_checkpoint(self, path: Path, batch: list[Group]) -> None:
        from services.trainer.learner.checkpoint import list_checkpoints
        from services.trainer.orchestrator.publish import prune

        state = self.trainer.state
        # absolute: a worker resolves a relative path against its own checkpoint root, not the trainer's folder
        version = WeightsVersion(version=state.policy_version, path=str(self.trainer.weights_path(path).resolve()),
                                 step=state.step, run=self.identity)  # fmt: skip
        self._redis(lambda: self._publish(version), "publishing weights", in_step=True)
        self._redis(lambda: self.collector.finish_step(batch, state.step), "acknowledging the step", in_step=True)
        keep = set(list_checkpoints(self.trainer.checkpoint_root)[-self.cfg.keep_last :])
        gone = self._redis(lambda: prune(self.registry, self.trainer.checkpoint_root, keep), "pruning weights",
                           in_step=True)  # fmt: skip
        for v in gone if self.weight_store is not None else []:
            self.weight_store.drop(v)
        self._write_status()

    def _collect_step(self) -> list[Group] | None:
        """Admit and collect until `prompts_per_step` groups are complete and kept (or the budget / time runs out);
        None when a stop (SIGTERM) comes first: it is honoured within one poll, not after `step_timeout_s`."""
        c, state = self.collector, self.trainer.state
        step, version = state.step, state.policy_version
        give_up_at = time.monotonic() + self.cfg.step_timeout_s
        last_log = 0.0
        self.phase = TrainerPhase.collecting
        self._redis(lambda: c.admit(step, version), "enqueueing tasks")
        while len(c.kept_groups()) < self.cfg.prompts_per_step and time.monotonic() < give_up_at and not c.exhausted():
            if self.stop.is_set():
                log.info("step %d: stopped while %s; the last checkpoint stands", step, self.waiting or self.phase)
                return None
            # a trainer replaced while it stalled must not read (and so hide) entries meant for its successor
            self._redis(self.lease.check, "renewing the trainer lease")
            self._redis(lambda: c.poll(step, version), "collecting scored rollouts")
            self._redis(lambda: c.admit(step, version), "enqueueing refills")
            missing = self.cfg.prompts_per_step - len(c.kept_groups())
            self.waiting = f"waiting for {max(0, missing)} groups, {c.in_flight()} samples in flight"
            if time.monotonic() - last_log > 10:
                log.info("step %d: %s", step, self.waiting)
                self._warn_refusals(step, version)
                self._write_status()
                last_log = time.monotonic()
        batch = c.batch()
        if len(batch) < self.cfg.prompts_per_step:
            log.warning("step %d: training on %d of %d groups (%s)", step, len(batch), self.cfg.prompts_per_step,
                        "budget spent" if c.exhausted() else "timeout")  # fmt: skip
        return batch

    def _warn_refusals(self, step: int, version: int) -> None:
        """Say loudly which rollout workers refused the published version: they will never make its rollouts."""
        from shared.contracts.agreement import refusals

        try:
            lines = refusals(self._redis(self.registry.live_workers, "reading heartbeats"), version)
        except ValueError as e:  # a heartbeat that is no JSON: the check is skipped, the step goes on
            log.warning("step %d: cannot read the workers' heartbeats (%s)", step, e)
            return
        for line in lines:
            log.error("step %d: %s; it makes no rollouts of this version", step, line)
        if lines:
            self.waiting += f"; {len(lines)} rollout workers refused weights v{version} (see the log)"

    # ------------------------------------------------------------------ the step's batch

    def step_batch(self, groups: list[Group]) -> StepBatch:
        """The step's `StepBatch`: each group's samples in sample order with their scores, and the step's collection
        metrics (every rank trains on the same batch)."""
        size = self.cfg.rollout.group_size
        return StepBatch(
            groups=[[step_sample(g.samples[i]) for i in range(size)] for g in groups],
            reward_weights=self.cfg.reward_weights,
            metrics=self._collection_metrics(groups),
        )

    def _collection_metrics(self, groups: list[Group]) -> dict[str, float]:
        """What the collection saw since the run started: rollout statistics, drops and redispatches, busy shares."""
        c = self.collector
        out = rollout_metrics([m for g in c.completed for m in g.samples.values()])
        out.update({f"dropped_{k}": c.counts[k] for k in ("zero_variance", "reward_error", "stale", "tpf_filtered")})
        out.update(
            groups_enqueued=c.enqueued, groups_buffered=len(c.kept_groups()) - len(groups),
            samples_in_flight=c.in_flight(), groups_expired=c.counts["expired"], samples_rejected=c.counts["rejected"],
            samples_resampled_dead=c.counts["resampled_dead"], groups_dead_lettered=c.counts["dead_lettered"],
            samples_foreign=c.counts["foreign"], samples_reward_mismatch=c.counts["reward_mismatch"],
            groups_redispatched=c.counts["redispatched"], redis_values_skipped=sum(self.registry.skipped.values()),
            **self._redis(self._worker_busy, "reading worker heartbeats"),
        )  # fmt: skip
        return out

    def _worker_busy(self) -> dict[str, float]:
        """Each kind's busy fraction since the last step, from the workers' heartbeats (cumulative busy seconds)."""
        now = {wid: w for wid, w in self.registry.live_workers().items()
               if w.info.busy_s is not None and w.info.up_s is not None}  # fmt: skip
        prev = self._busy_prev
        self._busy_prev = {wid: (w.info.busy_s, w.info.up_s) for wid, w in now.items()}
        out: dict[str, list[float]] = {}
        for wid, w in now.items():
            if wid in prev:
                busy, up = w.info.busy_s - prev[wid][0], w.info.up_s - prev[wid][1]
                if up > 0:
                    out.setdefault(w.kind, []).append(min(1.0, max(0.0, busy / up)))
        return {f"busy_{kind}": sum(v) / len(v) for kind, v in out.items()}

    # ------------------------------------------------------------------ weights, audit, status

    def _publish_current(self) -> None:
        """Make the trainer's weights the ones rollout workers serve (on start and on resume)."""
        from services.trainer.learner.checkpoint import checkpoint_dir

        # the checkpoint the trainer resumed from (not `latest`, which may lag behind it after a crash)
        ckpt = checkpoint_dir(self.trainer.checkpoint_root, self.trainer.state.step)
        path = self.trainer.weights_path(ckpt) if self.trainer.state.step > 0 and ckpt.is_dir() else self.cfg.model
        version = WeightsVersion(version=self.trainer.state.policy_version, path=str(Path(path).resolve()),
                                 step=self.trainer.state.step, run=self.identity)  # fmt: skip
        cur = self.registry.current()
        if cur is not None and cur.version > version.version:
            # workers would keep serving those newer weights and every sample would come from a policy this trainer
            # never had
            raise ValueError(
                f"redis.namespace: {self.cfg.redis.namespace!r} already serves weights v{cur.version} ({cur.path}), "
                f"newer than this trainer's v{version.version}: continue that run with --resume, or use a new namespace"
            )
        if cur is None or cur.version < version.version or cur.run != version.run:
            self._publish(version)
        else:  # published by this run before a restart: workers that have not fetched it yet fetch it from here
            self._served(version)

    def _publish(self, version: WeightsVersion) -> None:
        from services.trainer.orchestrator.publish import publish

        version = self._served(version)
        # an HTTP push names a path on the trainer's disk: with transport http the rollout services have no such path
        urls = [] if version.url is not None else self.cfg.rollout_urls
        publish(self.registry, version, urls, self.cfg.api_token)

    def _linger_for_fetches(self) -> None:
        """weights.transport=http: the last version is served from this process only; keep serving it until every
        live rollout worker serves it, at most `weights.final_wait_s`."""
        cur = self.registry.current()
        if self.weight_store is None or cur is None or cur.run != self.identity:
            return
        deadline = time.monotonic() + self.cfg.weights.final_wait_s
        while not self.stop.is_set():
            behind = sorted(i for i, w in self.registry.live_workers("rollout").items() if w.version != cur.version)
            if not behind:
                return
            if time.monotonic() >= deadline:
                log.warning("stopping with rollout workers %s not serving the last weights v%d (weights.final_wait_s"
                            " = %.0f s passed): they keep their version", ", ".join(behind), cur.version,
                            self.cfg.weights.final_wait_s)  # fmt: skip
                return
            time.sleep(0.2)

    def _served(self, version: WeightsVersion) -> WeightsVersion:
        """`version`, served by this process with its URL and manifest digest (weights.transport=http); as it is
        with the shared volume."""
        if self.weight_store is None:
            return version
        return self.weight_store.add(version, self.cfg.weights.base_url(self.cfg.health_port))

    def _record_trained(self, step: int, version: int, batch: list[Group]) -> None:
        """Append the step's trained groups, trained at policy `version`, to trained_groups.jsonl (the audit trail;
        a resume drops the rows of steps that never reached their checkpoint)."""
        with (self.cfg.output_dir / "trained_groups.jsonl").open("a") as f:
            for g in batch:
                msgs = g.samples.values()
                row = {"step": step, "prompt_index": g.prompt_index, "train_by": g.train_by, "trainer_version": version,
                       "task_ids": sorted(m.task.task_id for m in msgs),
                       "versions": sorted(m.rollout.policy_version for m in msgs)}  # fmt: skip
                f.write(json.dumps(row) + "\n")

    def _write_status(self) -> None:
        """The status at `Keys.trainer_status` (for `gtpo status`), kept a minute past the last write."""
        try:
            body = self.status().model_copy(update={"ts": time.time()}).model_dump_json()
            self.redis.set(self.keys.trainer_status, body, ex=60)
        except Exception as e:  # a status page must never stop training
            log.warning("could not write the trainer status: %s", e)

    def status(self) -> TrainerStatus:
        return TrainerStatus(
            run_id=self.cfg.run_id, run=self.identity, step=self.trainer.state.step,
            policy_version=self.trainer.state.policy_version, max_staleness=self.cfg.max_staleness,
            phase=self.phase, waiting=self.waiting or str(self.phase), **self.collector.counts_now(),
            last=self.history[-1] if self.history else None,
        )  # fmt: skip

    def ready(self) -> str | None:
        return "starting" if self.phase == TrainerPhase.starting else None


def new_identity(run_id: str) -> str:
    """A fresh run's identity: its name and 12 random hex digits (two runs of one name never share it)."""
    import secrets

    return f"{run_id}.{secrets.token_hex(6)}"


def broadcast_text(accelerator, text: str | None) -> str:
    """The main process's text on every process (a no-op with one process)."""
    if accelerator.num_processes == 1:
        assert text is not None
        return text
    from accelerate.utils import broadcast_object_list

    box = [text]
    broadcast_object_list(box, from_process=0)
    return box[0]


CORRECTNESS = ("accuracy", "code")
"""The reward components that say whether an answer is right: the maths verdict, the share of code tests passed."""


def correctness(components: dict[str, float]) -> float | None:
    """The sample's correctness score in [0, 1] (the first of `CORRECTNESS` it was scored with), or None."""
    return next((components[k] for k in CORRECTNESS if k in components), None)


def step_sample(m: ScoredMessage) -> StepSample:
    """One scored sample as the learner takes it; its verdict is None when no correctness reward scored it."""
    acc = correctness(m.score.components)
    return StepSample(rollout=m.rollout, reward=m.score.total, components=m.score.components,
                      correct=None if acc is None else acc >= 1.0)  # fmt: skip


def rollout_metrics(msgs: list[ScoredMessage]) -> dict[str, float]:
    """Accuracy, tokens per denoising step, length and truncation over the collected samples."""
    if not msgs:
        return {}
    n = len(msgs)
    return {
        "accuracy": sum(correctness(m.score.components) or 0.0 for m in msgs) / n,
        "tokens_per_step": sum(tokens_per_step(len(m.rollout.token_ids), m.rollout.step_map) for m in msgs) / n,
        "response_length": sum(len(m.rollout.token_ids) for m in msgs) / n,
        "truncated": sum(m.rollout.finish_reason == "length" for m in msgs) / n,
        "reward_errors": sum(m.score.status != "ok" for m in msgs),
    }


def install_signals(driver: Driver) -> None:
    """SIGTERM and SIGINT (Ctrl-C): a step that is training finishes and is checkpointed; a wait (for groups, for
    Redis, for a service's /info) ends within a poll; then the trainer exits 0."""

    def handler(signum, frame):
        log.info("signal %d: stopping (step %d: %s)", signum, driver.trainer.state.step, driver.waiting or driver.phase)
        driver.stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def run_rl(cfg: RLConfig, *, resume: bool = False, fresh: bool = False) -> list[dict]:
    """`gtpo train`: build the driver, serve its status, run until `cfg.steps` (or SIGTERM / SIGINT)."""
    from services.trainer.orchestrator.status_server import create_app, start_server

    driver = Driver(cfg, resume=resume, fresh=fresh)
    install_signals(driver)
    if cfg.health_port is not None and driver.main:
        app = create_app(driver.status, driver.ready, driver.metrics, weights=driver.weight_store, token=cfg.api_token)
        start_server(app, cfg.health_port)
    return driver.run()
