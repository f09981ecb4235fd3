"""`gtpo train`: the round driver. Per step: enqueue prompt groups, collect scored groups, filter, train, checkpoint,
publish the next weights version, acknowledge what was consumed.

Exactly-once training of groups rests on three facts:

* task ids are ``run:step:prompt:sample`` and publishing is idempotent, so a resumed step re-enqueues nothing new;
* scored messages are acknowledged only after the step's checkpoint is written; a trainer killed before that gets
  them back (its own pending entries, read first on restart) and trains the step once;
* the checkpoint holds the step and the data cursor, so a resumed run picks the same prompts for the same step.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.trainer.config import RLConfig
from shared.contracts import SamplingParams, ScoredMessage, TaskMessage, WeightsVersion

log = logging.getLogger("gtpo.trainer")


@dataclass
class Prompt:
    question: str
    answer: str


def load_prompts(path: Path) -> list[Prompt]:
    """A JSON list or JSONL of `{question, ground_truth_answer}` (the format of the RL datasets)."""
    text = Path(path).read_text()
    try:
        rows = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
    except json.JSONDecodeError as e:
        raise ValueError(f"data: {path} is neither a JSON list nor JSONL ({e.msg}, line {e.lineno})") from e
    out = []
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or "question" not in row or "ground_truth_answer" not in row:
            raise ValueError(f"data: {path} row {i} needs 'question' and 'ground_truth_answer'")
        out.append(Prompt(str(row["question"]), str(row["ground_truth_answer"])))
    if not out:
        raise ValueError(f"data: {path} has no rows")
    return out


def task_seed(seed: int, step: int, prompt_index: int, sample: int, attempt: int) -> int:
    """The seed of one sample: reproducible from the run's seed and the task's coordinates."""
    return (((seed * 1_000_003 + step) * 1_000_033 + prompt_index) * 1_009 + sample) * 31 + attempt


def sample_threshold(threshold: float, spread: float, sample: int, group_size: int) -> float:
    """Sample `sample`'s confidence threshold: evenly spaced from `threshold` (sample 0) to `threshold - spread`.

    Dynamic decoding is deterministic given the model's confidences, so without a spread every sample of a group
    unmasks in the same order and a speed reward sees no difference to learn from.

    >>> [round(sample_threshold(0.9, 0.3, j, 4), 2) for j in range(4)]
    [0.9, 0.8, 0.7, 0.6]
    """
    return max(0.0, threshold - spread * sample / max(1, group_size - 1))


@dataclass
class StepState:
    """What one step has enqueued and collected; also what /status shows."""

    step: int
    enqueued_groups: list[int] = field(default_factory=list)  # prompt indices
    samples: dict[int, dict[int, ScoredMessage]] = field(default_factory=dict)  # prompt -> sample -> message
    entry_ids: list[str] = field(default_factory=list)  # scored entries to ack once the step is durable
    kept: list[int] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=lambda: {"zero_variance": 0, "reward_error": 0, "stale": 0})
    done_groups: set[int] = field(default_factory=set)

    def in_flight(self, group_size: int) -> int:
        return sum(group_size - len(self.samples.get(p, {})) for p in self.enqueued_groups if p not in self.done_groups)


class Driver:
    """Owns the loop; the trainer owns the maths, the queue layer owns Redis."""

    def __init__(self, cfg: RLConfig, *, resume: bool = False) -> None:
        from services.trainer.trainer import GTPOTrainer
        from shared.keys import Keys
        from shared.queue import Queue, WeightRegistry, connect

        self.cfg = cfg
        self.trainer = GTPOTrainer(cfg)
        if resume and self.trainer.resume() and self.trainer.accelerator.is_main_process:
            # records of a step that was running when the trainer died are not durable: that step runs again
            done = self.trainer.state.step
            keep_rows(cfg.output_dir / "trained_groups.jsonl", lambda row: row["step"] < done)
            keep_rows(cfg.output_dir / "metrics.jsonl", lambda row: row["step"] <= done)
        self.prompts = load_prompts(cfg.data)
        self.main = self.trainer.accelerator.is_main_process
        rc = cfg.redis
        self.keys = Keys(rc.namespace)
        if self.main:  # one consumer per trainer, however many processes train
            self.redis = connect(rc.resolved_url())
            self.queue = Queue(self.redis, self.keys, codec=rc.codec, claim_idle_ms=rc.claim_idle_ms,
                               max_deliveries=rc.max_deliveries)  # fmt: skip
            self.registry = WeightRegistry(self.redis, self.keys)
        self.consumer = f"trainer-{cfg.run_id}"  # stable: a restarted trainer reads its own pending entries first
        self.stop = threading.Event()
        self.current: StepState | None = None
        self.waiting = ""
        self.history: list[dict] = []
        self.recovered = False  # own pending entries (a previous incarnation's) read once at start

    # ------------------------------------------------------------------ the loop

    def run(self) -> list[dict]:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from shared.queue import with_reconnect

        if self.main:
            with_reconnect(self.queue.ensure_groups, what="creating consumer groups")
            self._publish_current()
        state = self.trainer.state
        cols = (TextColumn("gtpo"), BarColumn(), TextColumn("step {task.completed}/{task.total} {task.fields[info]}"))
        with Progress(*cols, TimeElapsedColumn(), disable=not self.main) as bar:
            task = bar.add_task("rl", total=self.cfg.steps, completed=state.step, info="")
            # the main process decides when to stop, so every rank stops after the same step
            while (
                state.step < self.cfg.steps
                and broadcast_text(self.trainer.accelerator, str(self.stop.is_set())) == "False"
            ):
                metrics = self.one_step()
                bar.update(task, completed=state.step, info=f"reward {metrics.get('reward_mean', 0):.3f}")
        if self.stop.is_set():
            log.info("stopped by signal after step %d (checkpointed)", state.step)
        return self.history

    def one_step(self) -> dict:
        """Collect (main process), train (every process), checkpoint, publish, acknowledge: one RL step.

        Only the main process talks to Redis; the others get the step's batch by broadcast, so a multi-GPU or
        multi-node trainer is one consumer, not one per rank.
        """
        from shared.queue import with_reconnect

        st = StepState(step=self.trainer.state.step)
        self.current = st
        cursor = self.trainer.state.data_cursor
        payload = self._collect_step(st, cursor) if self.main else None
        groups, rewards, correct, extra = decode_batch(broadcast_text(self.trainer.accelerator, payload))
        self.waiting = "training"
        metrics = self.trainer.rl_step(groups, rewards, extra, correct)
        self.trainer.state.data_cursor = cursor + int(extra["groups_enqueued"])
        if self.main:
            self._record_trained(st)
        path = self.trainer.save()
        if self.main:
            version = WeightsVersion(version=self.trainer.state.policy_version, path=str(path / "model"),
                                     step=self.trainer.state.step)  # fmt: skip
            with_reconnect(lambda: self._publish(version), what="publishing weights")
            with_reconnect(lambda: self.queue.ack(self.keys.scored, self.keys.trainer_group, *st.entry_ids),
                           what="acknowledging the step")  # fmt: skip
            self._prune_weights()
        self.trainer.accelerator.wait_for_everyone()
        self.history.append(metrics)
        self.waiting = ""
        return metrics

    def _collect_step(self, st: StepState, cursor: int) -> str:
        """Enqueue and collect until `prompts_per_step` groups are kept (or the budget / time runs out)."""
        from shared.queue import with_reconnect

        budget = math.ceil(self.cfg.prompts_per_step * self.cfg.oversample)
        with_reconnect(lambda: self._enqueue(st, cursor, self.cfg.prompts_per_step), what="enqueueing tasks")
        deadline = time.monotonic() + self.cfg.step_timeout_s
        last_log = 0.0
        while len(st.kept) < self.cfg.prompts_per_step and time.monotonic() < deadline:
            with_reconnect(lambda: self._collect(st), what="collecting scored rollouts")
            open_groups = len(st.enqueued_groups) - len(st.done_groups)
            missing = self.cfg.prompts_per_step - len(st.kept)
            if open_groups < missing and len(st.enqueued_groups) < budget:
                more = min(missing - open_groups, budget - len(st.enqueued_groups))
                with_reconnect(lambda m=more: self._enqueue(st, cursor, m), what="enqueueing refills")
            if open_groups == 0 and len(st.enqueued_groups) >= budget:
                break  # the oversampling budget is spent: train on what is there
            self.waiting = f"waiting for {missing} groups, {st.in_flight(self.cfg.rollout.group_size)} tasks in flight"
            if time.monotonic() - last_log > 10:
                log.info("step %d: %s", st.step, self.waiting)
                last_log = time.monotonic()
        if len(st.kept) < self.cfg.prompts_per_step:
            log.warning("step %d: training on %d of %d groups (%s)", st.step, len(st.kept),
                        self.cfg.prompts_per_step, "budget spent" if len(st.enqueued_groups) >= budget else "timeout")  # fmt: skip
        return self._batch(st)

    # ------------------------------------------------------------------ queue side

    def _task(self, step: int, prompt_index: int, sample: int, attempt: int = 0) -> TaskMessage:
        cfg, r = self.cfg, self.cfg.rollout
        p = self.prompts[prompt_index]
        tok = self.trainer.loaded.tokenizer
        user = cfg.prompt_template.format(question=p.question)
        if cfg.chat_template:
            ids = list(
                tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)["input_ids"]
            )
        else:
            ids = tok(user, add_special_tokens=False)["input_ids"]
        params = SamplingParams(
            strategy=r.strategy, denoising_steps=r.denoising_steps,
            temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, max_new_tokens=r.max_new_tokens, n=1,
            seed=task_seed(cfg.seed, step, prompt_index, sample, attempt) % (2**62), logprobs=True,
            confidence_threshold=sample_threshold(r.confidence_threshold, r.threshold_spread, sample, r.group_size),
        )  # fmt: skip
        suffix = f":a{attempt}" if attempt else ""
        return TaskMessage(
            task_id=f"{cfg.run_id}:{step}:{prompt_index}:{sample}{suffix}", run_id=cfg.run_id, step=step,
            prompt_index=prompt_index, sample_index=sample, group_size=r.group_size, prompt_ids=ids,
            prompt_text=user, reference=p.answer, params=params, policy_version=self.trainer.state.policy_version,
            attempt=attempt,
        )  # fmt: skip

    def _enqueue(self, st: StepState, cursor: int, groups: int) -> None:
        for _ in range(groups):
            prompt_index = (cursor + len(st.enqueued_groups)) % len(self.prompts)
            for sample in range(self.cfg.rollout.group_size):
                msg = self._task(st.step, prompt_index, sample)
                self.queue.publish(self.keys.tasks, msg, msg.task_id)
            st.enqueued_groups.append(prompt_index)

    def _collect(self, st: StepState) -> None:
        if not self.recovered:  # a killed trainer's unacknowledged groups come back at once, not after claim_idle
            deliveries = self.queue.own_pending(self.keys.scored, self.keys.trainer_group, self.consumer, ScoredMessage)
            self.recovered = True
        else:
            deliveries = self.queue.consume(self.keys.scored, self.keys.trainer_group, self.consumer, ScoredMessage,
                                            count=256, block_ms=500)  # fmt: skip
        for d in deliveries:
            msg: ScoredMessage = d.message
            t = msg.task
            if t.run_id != self.cfg.run_id or t.step != st.step or t.prompt_index not in st.enqueued_groups:
                self.queue.ack(self.keys.scored, self.keys.trainer_group, d.entry_id)  # another run / an old step
                continue
            st.entry_ids.append(d.entry_id)
            if msg.rollout.policy_version < self.trainer.state.policy_version - self.cfg.max_staleness:
                st.dropped["stale"] += 1  # too old: sample it again with the current weights
                retry = self._task(t.step, t.prompt_index, t.sample_index, t.attempt + 1)
                self.queue.publish(self.keys.tasks, retry, retry.task_id)
                continue
            st.samples.setdefault(t.prompt_index, {})[t.sample_index] = msg
            self._close_group(st, t.prompt_index)

    def _close_group(self, st: StepState, prompt_index: int) -> None:
        group = st.samples[prompt_index]
        if prompt_index in st.done_groups or len(group) < self.cfg.rollout.group_size:
            return
        st.done_groups.add(prompt_index)
        if any(m.score.status != "ok" for m in group.values()):
            st.dropped["reward_error"] += 1  # an unverifiable reward is not a zero: do not train on it
            return
        totals = [m.score.total for m in group.values()]
        if self.cfg.dynamic_sampling and max(totals) - min(totals) <= 1e-9:
            st.dropped["zero_variance"] += 1
            return
        if len(st.kept) < self.cfg.prompts_per_step:
            st.kept.append(prompt_index)

    # ------------------------------------------------------------------ training and weights

    def _batch(self, st: StepState) -> str:
        """The kept groups, their rewards, accuracy verdicts and the step's rollout metrics, as JSON for the
        broadcast."""
        groups, rewards, correct = [], [], []
        for p in st.kept:
            ordered = [st.samples[p][i] for i in range(self.cfg.rollout.group_size)]
            groups.append([m.rollout.model_dump(mode="json") for m in ordered])
            rewards.append([m.score.total for m in ordered])
            if self.cfg.loss.floor_correct and any("accuracy" not in m.score.components for m in ordered):
                raise RuntimeError("loss.floor_correct: the reward service sent no accuracy component; weigh it")
            correct.append([m.score.components.get("accuracy", 0.0) >= 1.0 for m in ordered])
        extra = rollout_metrics([m for p in st.done_groups for m in st.samples[p].values()])
        extra.update({f"dropped_{k}": v for k, v in st.dropped.items()}, groups_enqueued=len(st.enqueued_groups))
        return json.dumps({"groups": groups, "rewards": rewards, "correct": correct, "extra": extra})

    def _publish_current(self) -> None:
        """Make the trainer's weights the ones rollout workers serve (on start and on resume)."""
        from services.trainer.checkpoint import latest_checkpoint
        from shared.queue import with_reconnect

        ckpt = latest_checkpoint(self.trainer.checkpoint_root)
        path = ckpt / "model" if ckpt is not None else self.cfg.model
        version = WeightsVersion(version=self.trainer.state.policy_version, path=str(Path(path).resolve()),
                                 step=self.trainer.state.step)  # fmt: skip
        cur = with_reconnect(self.registry.current, what="reading the weights registry")
        if cur is None or cur.version < version.version:
            with_reconnect(lambda: self._publish(version), what="publishing weights")

    def _publish(self, version: WeightsVersion) -> None:
        cur = self.registry.current()
        if cur is None or cur.version < version.version:
            self.registry.publish(version)
        for url in self.cfg.rollout_urls:
            push_weights(url, version, self.cfg.api_token)

    def _record_trained(self, st: StepState) -> None:
        """Append the step's trained groups to trained_groups.jsonl (audit trail; a resume drops the rows of steps
        that never reached their checkpoint)."""
        if not self.trainer.accelerator.is_main_process:
            return
        with (self.cfg.output_dir / "trained_groups.jsonl").open("a") as f:
            for p in st.kept:
                ids = sorted(m.task.task_id for m in st.samples[p].values())
                f.write(json.dumps({"step": st.step, "prompt_index": p, "task_ids": ids}) + "\n")

    def _prune_weights(self) -> None:
        """Delete checkpoint weights no live rollout worker serves any more (beyond the last `keep_last`)."""
        import shutil

        from services.trainer.checkpoint import list_checkpoints

        keep = {p.resolve() for p in list_checkpoints(self.trainer.checkpoint_root)[-self.cfg.keep_last :]}
        for v in self.registry.deletable_versions():
            model_dir = Path(v.path)
            ckpt = model_dir.parent
            if ckpt.resolve() not in keep and ckpt.parent.resolve() == self.trainer.checkpoint_root.resolve():
                shutil.rmtree(ckpt, ignore_errors=True)
            self.registry.forget(v.version)

    def status(self) -> dict:
        st = self.current
        return {
            "step": self.trainer.state.step,
            "policy_version": self.trainer.state.policy_version,
            "waiting": self.waiting,
            "groups_kept": len(st.kept) if st else 0,
            "groups_enqueued": len(st.enqueued_groups) if st else 0,
            "last": self.history[-1] if self.history else None,
        }


def broadcast_text(accelerator, text: str | None) -> str:
    """The main process's text on every process (a no-op with one process)."""
    if accelerator.num_processes == 1:
        assert text is not None
        return text
    from accelerate.utils import broadcast_object_list

    box = [text]
    broadcast_object_list(box, from_process=0)
    return box[0]


def decode_batch(text: str) -> tuple[list[list], list[list[float]], list[list[bool]], dict]:
    """Rollouts, rewards, accuracy verdicts (grouped alike) and the step's extra metrics."""
    from shared.contracts import Rollout

    data = json.loads(text)
    groups = [[Rollout.model_validate(r) for r in g] for g in data["groups"]]
    return groups, data["rewards"], data["correct"], data["extra"]


def keep_rows(path: Path, keep) -> None:
    """Rewrite a JSONL file with only the rows `keep(row)` accepts (atomically)."""
    if not path.exists():
        return
    rows = [x for x in path.read_text().splitlines() if x.strip() and keep(json.loads(x))]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    tmp.replace(path)


def rollout_metrics(msgs: list[ScoredMessage]) -> dict[str, float]:
    """Accuracy, tokens per denoising step, length and truncation over the collected samples."""
    if not msgs:
        return {}
    n = len(msgs)
    return {
        "accuracy": sum(m.score.components.get("accuracy", 0.0) for m in msgs) / n,
        "tokens_per_step": sum(len(m.rollout.token_ids) / max(1, len(set(m.rollout.step_map))) for m in msgs) / n,
        "response_length": sum(len(m.rollout.token_ids) for m in msgs) / n,
        "truncated": sum(m.rollout.finish_reason == "length" for m in msgs) / n,
        "reward_errors": sum(m.score.status != "ok" for m in msgs),
    }


def push_weights(url: str, version: WeightsVersion, token) -> None:
    """Tell one rollout service over HTTP to load `version` (bounded retries; failures are logged, the Redis
    registry remains the source of truth)."""
    import httpx

    headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token is not None else {}
    body = {"version": version.version, "path": version.path}
    for attempt in range(3):
        try:
            r = httpx.post(
                f"{url.rstrip('/')}/v1/weights", json=body, headers=headers, timeout=httpx.Timeout(300, connect=5)
            )
            if r.status_code < 500:
                if r.status_code >= 400:
                    log.error("rollout %s refused weights v%d: %s", url, version.version, r.text)
                return
        except httpx.TransportError as e:
            log.warning("rollout %s unreachable for weights v%d (%s), attempt %d", url, version.version, e, attempt + 1)
        time.sleep(1.0 * (attempt + 1))


def install_sigterm(driver: Driver) -> None:
    """SIGTERM / SIGINT: finish the current step, checkpoint, exit."""

    def handler(signum, frame):
        log.info("signal %d: finishing step %d, then checkpointing", signum, driver.trainer.state.step)
        driver.stop.set()

    signal.signal(signal.SIGTERM, handler)


def start_status_server(driver: Driver, port: int) -> threading.Thread:
    """/health, /status and /metrics of the trainer, from a background thread (the loop blocks)."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse

    app = FastAPI(title="gtpo trainer")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/status")
    def status() -> dict:
        return driver.status()

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        s = driver.status()
        lines = [f"gtpo_trainer_step {s['step']}", f"gtpo_trainer_policy_version {s['policy_version']}",
                 f"gtpo_trainer_groups_kept {s['groups_kept']}"]  # fmt: skip
        for k, v in (s["last"] or {}).items():
            if isinstance(v, int | float) and k != "time":
                lines.append(f"gtpo_trainer_last_{k} {v}")
        return "\n".join(lines) + "\n"

    server = uvicorn.Server(uvicorn.Config(app, host="0.0.0.0", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="trainer-status", daemon=True)
    thread.start()
    return thread


def run_rl(cfg: RLConfig, *, resume: bool = False) -> list[dict]:
    """`gtpo train`: build the driver, serve its status, run until `cfg.steps` (or SIGTERM)."""
    driver = Driver(cfg, resume=resume)
    install_sigterm(driver)
    if cfg.health_port is not None and driver.main:
        start_status_server(driver, cfg.health_port)
    return driver.run()
