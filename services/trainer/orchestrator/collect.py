"""Collection for the round driver (docs/design.md section 7): admission, the buffer of scored groups, staleness, refills.

A prompt group is enqueued while the trainer is at step s with `train_by` = s + k (k = `max_staleness`): it must be
trained at step s + k at the latest, and may be trained earlier. Its samples are generated with the weights of
step s or newer (a rollout worker loads at least the version a task names), so when step t <= s + k trains it,
no sample is more than k versions old. The driver keeps (k + 1) x `prompts_per_step` groups enqueued or buffered,
so rollout workers always have work while the trainer trains, and a step takes the first complete groups in
deadline order: a slow response holds up nothing but its own group. k = 0 is the synchronous loop: groups of step
s only, the same tasks, seeds and refills as before.

Durability: a group is written to a Redis ledger (`Keys.run_groups`) before its tasks are published; its scored
entries stay pending until the checkpoint of the step that trained (or dropped) it is written, then they are acked
and the group leaves the ledger in one transaction. A trainer killed at any point rebuilds the same buffer from the
ledger and its pending entries, and trains every group once. The last step's trained groups are also recorded in
the checkpoint, for a crash between the checkpoint and the ack, and so are the groups dispatched but not yet
trained: the data cursor already counts them, so when the ledger is gone too (Redis restarted without persistence)
a resumed run dispatches them again (`groups_redispatched`) instead of skipping their prompts.

A sample whose task was dead-lettered anywhere on the way (poison input, too many deliveries) is re-sampled under a
new attempt id, up to `MAX_ATTEMPTS`; then its group is dropped and refilled.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.trainer.config import RLConfig
from services.trainer.learner.objective import filter_component_groups, filter_groups
from shared.contracts.wire import GroupRecord, ScoredMessage, TaskMessage, same_rewards
from shared.model.step_map import tokens_per_step
from shared.prompts import encode_prompt

log = logging.getLogger("gtpo.trainer")

MAX_ATTEMPTS = 3
"""Attempts of one sample (the first, and re-samples after a stale rollout or a dead letter) before its group goes."""


@dataclass
class Prompt:
    question: str
    answer: str


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


def task_id(run_id: str, train_by: int, prompt_index: int, sample: int, attempt: int = 0) -> str:
    """``run:train_by:prompt:sample`` (``:aN`` for attempt N > 0), the idempotency id of a task and of what follows it.

    >>> task_id("run", 3, 17, 2), task_id("run", 3, 17, 2, attempt=1)
    ('run:3:17:2', 'run:3:17:2:a1')
    """
    return f"{run_id}:{train_by}:{prompt_index}:{sample}" + (f":a{attempt}" if attempt else "")


def parse_task_id(text: str) -> tuple[str, int, int, int, int] | None:
    """(run, train_by, prompt_index, sample, attempt) of a `task_id`, or None for anything else.

    >>> parse_task_id("run:3:17:2:a1"), parse_task_id("junk")
    (('run', 3, 17, 2, 1), None)
    """
    parts = text.split(":")
    if len(parts) not in (4, 5) or (len(parts) == 5 and not parts[4].startswith("a")):
        return None
    try:
        train_by, prompt_index, sample = (int(p) for p in parts[1:4])
        attempt = int(parts[4][1:]) if len(parts) == 5 else 0
    except ValueError:
        return None
    return parts[0], train_by, prompt_index, sample, attempt


@dataclass
class Group:
    """One prompt group: enqueued, collecting, or complete and buffered until a step trains it.

    Attributes:
        train_by: the last step that may train it (the step it was enqueued at, plus k).
        prompt_index: the prompt, as an index into the dataset.
        cursor: its position in the prompt stream.
        version: the trainer's policy version when it was enqueued (its samples are at least that new).
        samples: sample index -> its scored message.
        attempts: sample index -> the attempt expected (0 until a re-sample).
        entry_ids: scored entries to acknowledge once the group's fate is durable.
        done: completion order (set when the last sample arrived).
        verdict: None while collecting; then "kept", "zero_variance", "reward_error" or "dead_lettered".
    """

    train_by: int
    prompt_index: int
    cursor: int
    version: int
    samples: dict[int, ScoredMessage] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)
    entry_ids: list[str] = field(default_factory=list)
    done: int | None = None
    verdict: str | None = None

    @property
    def key(self) -> str:
        return f"{self.train_by}:{self.prompt_index}"

    def record(self) -> str:
        """Its `GroupRecord` in the ledger."""
        return GroupRecord(train_by=self.train_by, prompt_index=self.prompt_index, cursor=self.cursor,
                           version=self.version).model_dump_json()  # fmt: skip

    @classmethod
    def from_record(cls, raw: bytes | str) -> Group:
        """The group of a ledger entry.

        Raises:
            ValueError: not a `GroupRecord` (pydantic's ValidationError).
        """
        r = GroupRecord.model_validate_json(raw)
        return cls(r.train_by, r.prompt_index, r.cursor, r.version)


def group_tokens_per_step(samples: list[ScoredMessage]) -> float:
    """The group's mean over its samples of tokens per denoising step (the speed reward's measure).

    >>> from types import SimpleNamespace as S
    >>> group_tokens_per_step([S(rollout=S(token_ids=[0] * 8, step_map=[1, 1, 1, 1, 2, 2, 2, 2])),
    ...                        S(rollout=S(token_ids=[0] * 4, step_map=[1, 2, 3, 4]))])  # (4 + 1) / 2
    2.5
    """
    return sum(tokens_per_step(len(m.rollout.token_ids), m.rollout.step_map) for m in samples) / len(samples)


def verdict_of(samples: list[ScoredMessage], dynamic_sampling: bool,
               component_weights: Mapping[str, float] | None = None,
               tpf_window: tuple[float, float] | None = None) -> str:  # fmt: skip
    """What a complete group is worth: "kept", or why it is dropped (the one place that drops groups).

    An unverifiable reward is not a zero (do not train on it); a group whose rewards all agree has no signal.
    With `component_weights` (`loss.reward_norm: per_component`), "agree" means every weighted component agrees:
    the group is dropped exactly when its advantages would all be 0 (`filter_component_groups`).
    With `tpf_window` (`prompt_filter_tpf`, LightningRL), a group whose mean tokens per step lies outside
    [low, high] is dropped as "tpf_filtered" (and refilled like any dropped group).
    """
    if any(m.score.status != "ok" for m in samples):
        return "reward_error"
    if tpf_window is not None and not tpf_window[0] <= group_tokens_per_step(samples) <= tpf_window[1]:
        return "tpf_filtered"
    if dynamic_sampling and component_weights is None:
        if not filter_groups([[m.score.total for m in samples]])[0][0]:
            return "zero_variance"
    elif dynamic_sampling:
        names = sorted(component_weights)
        table = [[m.score.components.get(n, 0.0) for n in names] for m in samples]
        if not filter_component_groups([table], [component_weights[n] for n in names])[0][0]:
            return "zero_variance"
    return "kept"


def foreign_weights(msg: ScoredMessage, identity: str, version: int) -> str | None:
    """Why the weights that generated `msg` are none this run published (None when they are one of its versions
    0 .. `version`): a number alone names the weights of any run that used the namespace, and another run's v4 is
    not this run's v4."""
    r = msg.rollout
    if r.policy_run != identity:
        return f"generated with weights v{r.policy_version} of run {r.policy_run}, not of this run ({identity})"
    if r.policy_version > version:
        return f"generated with weights v{r.policy_version}, newer than the trainer's v{version}"
    return None


def check_scored(msg: ScoredMessage, vocab_size: int, max_new_tokens: int, version: int) -> str | None:
    """Why a scored message cannot be trained on by a trainer at `version` (None when it can): the trainer's
    per-message validation, so that one bad entry is dead-lettered alone instead of failing its step on every
    resume."""
    r, t = msg.rollout, msg.task
    if r.policy_version > version:  # weights this trainer never had (another run's registry): never trainable
        return f"generated with weights v{r.policy_version}, newer than the trainer's v{version}"
    if list(r.prompt_ids) != list(t.prompt_ids):
        return "rollout.prompt_ids differ from the task's prompt"
    if len(r.token_ids) > max(max_new_tokens, t.params.max_new_tokens):
        return f"rollout has {len(r.token_ids)} tokens, more than max_new_tokens={t.params.max_new_tokens}"
    for name, ids in (("prompt_ids", r.prompt_ids), ("token_ids", r.token_ids), ("tail_ids", r.tail_ids)):
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            return f"rollout.{name}: {bad[0]} is outside the vocabulary (size {vocab_size})"
    if r.logprobs is not None and not all(math.isfinite(x) and x <= 1e-6 for x in r.logprobs):
        return "rollout.logprobs: every value must be a finite log-probability (<= 0)"
    if not math.isfinite(msg.score.total) or not all(math.isfinite(v) for v in msg.score.components.values()):
        return "score: total and components must be finite"
    return None


def _guarded(method):
    """Run `method` holding the collector's lock (see `Collector`'s threading contract)."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    return guarded


class Collector:
    """The main process's side of the queues for one run: what is enqueued, what is buffered, what a step trains.

    Threading contract: the driver mutates the collector from one thread at a time (the step loop, or the
    collect-while-training thread while the step loop trains), but the status server reads it from its own threads
    at any moment. Every method that reads or changes `groups` holds `lock` (re-entrant), so a reader sees the state
    between two routed deliveries, never a dict changing size under it; `counts_now` is what a status page reads.

    Args:
        cfg: the run's config (k, prompts per step, oversampling, sampling settings).
        queue: the run's `shared.queues.queue.Queue`.
        prompts: the dataset.
        tokenizer: encodes prompts.
        vocab_size: token ids at or above this are poison.
        identity: the run's identity (`Driver.identity`): the `run` of every weights version it publishes, and
            what each sample's `rollout.policy_run` must be.
    """

    def __init__(self, cfg: RLConfig, queue, prompts: list[Prompt], tokenizer, vocab_size: int, *,
                 identity: str) -> None:  # fmt: skip
        self.cfg, self.queue, self.keys = cfg, queue, queue.keys
        self.identity = identity
        self.redis = queue.redis
        self.prompts, self.tokenizer, self.vocab_size = prompts, tokenizer, vocab_size
        self.k = cfg.max_staleness
        self.consumer = f"trainer-{cfg.run_id}"  # stable: a restarted trainer reads its own pending entries first
        self.group_name = self.keys.trainer_group
        self.groups: dict[str, Group] = {}
        self.lock = threading.RLock()
        self.cursor = 0
        self.seq = 0
        self.enqueued = 0  # groups enqueued while collecting the current step
        self.first_step = True
        self.completed: list[Group] = []  # groups completed while collecting the current step (their metrics)
        self.finished: list[Group] = []  # dropped groups whose entries are acked with the next commit
        self.counts: Counter[str] = Counter()
        self.dead_cursor = "0-0"
        self.last_arrival = time.monotonic()
        self._prompt_ids: dict[int, list[int]] = {}
        self._unrouted: list = []
        """Deliveries read but not yet routed when Redis went away: the trainer never claims its own pending entries
        back, so a retried `poll` routes these first instead of losing them until a restart."""

    # ------------------------------------------------------------------ start and resume

    @_guarded
    def start(self, step: int, state_cursor: int, saved: dict | None) -> None:
        """Create the consumer group and rebuild the buffer: the ledger's groups, then this consumer's pending
        entries (a previous incarnation's), routed as if they had just arrived.

        Args:
            step: the step about to be collected.
            state_cursor: the checkpoint's data cursor.
            saved: the checkpoint's collector record (`resume_record`), or None on a fresh start.
        """
        self.queue.ensure_groups()
        self.groups, self.finished, self.completed = {}, [], []  # from scratch, so a retry after an outage is safe
        trained = set((saved or {}).get("trained", []))
        raw_cursor = self.redis.get(self.keys.run_cursor(self.cfg.run_id))
        self.cursor = max(state_cursor, int(raw_cursor) if raw_cursor else 0)
        stale_keys = []
        for key, raw in self.redis.hgetall(self.keys.run_groups(self.cfg.run_id)).items():
            g = Group.from_record(raw)
            if g.key in trained or g.train_by < step:
                stale_keys.append(key)  # trained before the crash, or past its deadline: never again
                continue
            self.groups[g.key] = g
            self.cursor = max(self.cursor, g.cursor + 1)
        if stale_keys:
            self.redis.hdel(self.keys.run_groups(self.cfg.run_id), *stale_keys)
        lost = self._lost_groups(saved, step, trained)
        if lost:
            log.warning("the Redis ledger lost %d groups the checkpoint counts as dispatched (Redis restarted without "
                        "persistence?): dispatching them again", len(lost))  # fmt: skip
            for g in lost:
                self.groups[g.key] = g
                self.cursor = max(self.cursor, g.cursor + 1)
            self._record(*lost)  # in the ledger before their tasks are published again, below
        self.counts["redispatched"] = len(lost)
        if saved is None:
            last = self.redis.xrevrange(self.keys.dead, count=1)
            self.dead_cursor = last[0][0].decode() if last else "0-0"
        else:
            self.dead_cursor = saved.get("dead_cursor", "0-0")
        for g in sorted(self.groups.values(), key=lambda g: g.cursor):
            self._publish_tasks(g, range(self.cfg.rollout.group_size))  # idempotent: lost tasks come back
        pending = self.queue.own_pending(self.keys.scored, self.group_name, self.consumer, ScoredMessage,
                                         count=100_000)  # fmt: skip
        if self.groups or pending:
            log.info("rebuilt the buffer: %d groups in the ledger, %d scored entries pending", len(self.groups),
                     len(pending))  # fmt: skip
        for d in pending:
            self._route(d, step, step)

    def _lost_groups(self, saved: dict | None, step: int, trained: set[str]) -> list[Group]:
        """The groups the checkpoint records as dispatched and not yet trained that are in neither the ledger nor
        the buffer (the ledger was lost), still within their deadline at `step`."""
        lost = []
        for raw in (saved or {}).get("pending", []):
            g = Group.from_record(raw)
            if g.key not in trained and g.key not in self.groups and g.train_by >= step:
                lost.append(g)
        return sorted(lost, key=lambda g: g.cursor)

    def resume_record(self, trained: list[Group]) -> dict:
        """What the checkpoint of a step keeps of the collector (see `start`): the groups it trained, and those
        dispatched but not trained, which the data cursor has already passed."""
        done = {g.key for g in trained}
        pending = [g.record() for g in sorted(self.groups.values(), key=lambda g: g.cursor) if g.key not in done]
        return {"trained": [g.key for g in trained], "pending": pending, "dead_cursor": self.dead_cursor}

    # ------------------------------------------------------------------ admission

    def allowance(self) -> int:
        """Groups this step may still enqueue: the oversampling budget (plus the look-ahead on the first step)."""
        budget = math.ceil(self.cfg.prompts_per_step * self.cfg.oversample)
        if self.first_step:
            budget += self.k * self.cfg.prompts_per_step
        return budget - self.enqueued

    @_guarded
    def open_groups(self) -> list[Group]:
        return [g for g in self.groups.values() if g.verdict is None]

    @_guarded
    def kept_groups(self) -> list[Group]:
        """Complete kept groups in the order a step takes them: earliest deadline first, then completion."""
        kept = [g for g in self.groups.values() if g.verdict == "kept"]
        return sorted(kept, key=lambda g: (g.train_by, g.done))

    @_guarded
    def admit(self, step: int, version: int) -> int:
        """Enqueue groups while fewer than (k + 1) x prompts_per_step are enqueued or buffered; returns how many."""
        want = (self.k + 1) * self.cfg.prompts_per_step
        have = len(self.open_groups()) + len(self.kept_groups())
        n = max(0, min(want - have, self.allowance()))
        for _ in range(n):
            self._enqueue(step + self.k, version)
        return n

    def _enqueue(self, train_by: int, version: int) -> Group:
        while True:
            g = Group(train_by, self.cursor % len(self.prompts), self.cursor, version)
            self.cursor += 1
            if g.key not in self.groups:  # a tiny dataset can wrap within one `train_by`: skip the repeat
                break
        self._record(g)
        self.groups[g.key] = g
        self.enqueued += 1
        self._publish_tasks(g, range(self.cfg.rollout.group_size))
        return g

    def _publish_tasks(self, g: Group, samples) -> None:
        for j in samples:
            msg = self.task(g.train_by, g.prompt_index, j, g.attempts.get(j, 0), g.version)
            self.queue.publish(self.keys.tasks, msg, msg.task_id)

    def prompt_ids(self, prompt_index: int) -> list[int]:
        if prompt_index not in self._prompt_ids:
            user = self.cfg.prompt_template.format(question=self.prompts[prompt_index].question)
            self._prompt_ids[prompt_index] = encode_prompt(self.tokenizer, user, chat=self.cfg.chat_template)
        return self._prompt_ids[prompt_index]

    def task(self, train_by: int, prompt_index: int, sample: int, attempt: int, version: int) -> TaskMessage:
        """The task of one sample (its seed and threshold follow from its coordinates)."""
        cfg, r = self.cfg, self.cfg.rollout
        p = self.prompts[prompt_index]
        params = r.params(
            seed=task_seed(cfg.seed, train_by, prompt_index, sample, attempt) % (2**62),
            confidence_threshold=sample_threshold(r.confidence_threshold, r.threshold_spread, sample, r.group_size),
        )  # fmt: skip
        return TaskMessage(
            task_id=task_id(cfg.run_id, train_by, prompt_index, sample, attempt), run_id=cfg.run_id, train_by=train_by,
            prompt_index=prompt_index, sample_index=sample, group_size=r.group_size,
            prompt_ids=self.prompt_ids(prompt_index), prompt_text=cfg.prompt_template.format(question=p.question),
            reference=p.answer, params=params, policy_version=version, attempt=attempt, policy_run=self.identity,
        )  # fmt: skip

    # ------------------------------------------------------------------ collecting

    def poll(self, step: int, version: int, block_ms: int = 500) -> int:
        """Read the scored stream once (and the dead letters), route what arrived; returns entries read."""
        if not self._unrouted:
            self._unrouted = self.queue.consume(self.keys.scored, self.group_name, self.consumer, ScoredMessage,
                                                count=256, block_ms=block_ms, claim=False)  # fmt: skip
        deliveries = list(self._unrouted)
        while self._unrouted:  # routing acks or rejects: a Redis error leaves the rest for the retry
            self._route(self._unrouted[0], step, version)
            self._unrouted.pop(0)
        self._watch_dead_letters(version)
        if deliveries:
            self.last_arrival = time.monotonic()
        elif time.monotonic() - self.last_arrival > self._republish_after_s():
            self.republish()
            self.last_arrival = time.monotonic()
        return len(deliveries)

    def _republish_after_s(self) -> float:
        return max(30.0, 2 * self.cfg.redis.claim_idle_ms / 1000)

    @_guarded
    def republish(self) -> None:
        """Publish the missing samples' tasks again: a no-op while Redis still has them (idempotent ids), the
        recovery when Redis restarted without persistence and lost them."""
        groups = self.open_groups()
        for g in groups:
            self._publish_tasks(g, [j for j in range(self.cfg.rollout.group_size) if j not in g.samples])
        self._record(*groups)

    def _record(self, *groups: Group) -> None:
        """Write `groups` and the cursor to the ledger, in one transaction (before their tasks are published)."""
        pipe = self.redis.pipeline(transaction=True)
        if groups:
            pipe.hset(self.keys.run_groups(self.cfg.run_id), mapping={g.key: g.record() for g in groups})
        pipe.set(self.keys.run_cursor(self.cfg.run_id), self.cursor)
        pipe.execute()

    @_guarded
    def _route(self, d, step: int, version: int) -> None:
        msg: ScoredMessage = d.message
        t = msg.task
        g = self.groups.get(f"{t.train_by}:{t.prompt_index}")
        if g is not None and d.entry_id in g.entry_ids:
            return  # the same entry read again (a retried read): it is already in the buffer
        if t.run_id != self.cfg.run_id or g is None or g.verdict is not None or t.sample_index in g.samples:
            self.counts["late" if t.run_id == self.cfg.run_id else "other_run"] += 1
            self.queue.ack(self.keys.scored, self.group_name, d.entry_id)  # nobody will train it
            return
        reason = foreign_weights(msg, self.identity, version)
        if reason is not None:  # never trained: dead-lettered, and the dead-letter watch samples it again
            self.counts["foreign"] += 1
            log.warning("sample %s is foreign, dead-lettered: %s", t.task_id, reason)
            self.queue.reject(d, self.group_name, reason)
            return
        if not same_rewards(msg.reward_weights, self.cfg.reward_weights):  # a reward worker configured otherwise
            self.counts["reward_mismatch"] += 1
            reason = f"scored with reward weights {msg.reward_weights}, not the trainer's {self.cfg.reward_weights}"
            log.error("sample %s dead-lettered, never trained: %s", t.task_id, reason)
            self.queue.reject(d, self.group_name, reason)  # the dead-letter watch samples it again
            return
        reason = check_scored(msg, self.vocab_size, self.cfg.rollout.max_new_tokens, version)
        if reason is not None:
            self.counts["rejected"] += 1
            self.queue.reject(d, self.group_name, reason)  # the dead-letter watch re-samples it
            return
        if msg.rollout.policy_version < version - self.k:
            self.counts["stale"] += 1  # too old for the bound: sample it again with the current weights
            self._resample(g, t.sample_index, t.attempt + 1)
            self.queue.ack(self.keys.scored, self.group_name, d.entry_id)
            return
        g.samples[t.sample_index] = msg
        g.entry_ids.append(d.entry_id)
        if len(g.samples) == self.cfg.rollout.group_size:
            self._close(g)

    def _close(self, g: Group) -> None:
        ordered = [g.samples[i] for i in range(self.cfg.rollout.group_size)]
        per_component = self.cfg.loss.reward_norm == "per_component"
        g.verdict = verdict_of(ordered, self.cfg.dynamic_sampling, self.cfg.reward_weights if per_component else None,
                               self.cfg.prompt_filter_tpf)  # fmt: skip
        g.done = self.seq
        self.seq += 1
        self.completed.append(g)
        if g.verdict != "kept":
            self._drop(g, g.verdict)

    def _drop(self, g: Group, verdict: str) -> None:
        """Give `g` up (counted under `verdict`): it leaves the buffer now, its entries are acked at the next
        `finish_step`, after the checkpoint."""
        g.verdict = verdict
        self.counts[verdict] += 1
        self.finished.append(g)
        del self.groups[g.key]

    def _resample(self, g: Group, sample: int, attempt: int) -> None:
        if attempt >= MAX_ATTEMPTS:
            log.warning("group %s: sample %d failed %d times; dropping the group", g.key, sample, attempt)
            self._drop(g, "dead_lettered")
            return
        before = g.attempts.get(sample, 0)
        g.attempts[sample] = attempt
        try:
            self._publish_tasks(g, [sample])
        except Exception:
            g.attempts[sample] = before  # not published: a retry re-samples it again
            raise

    @_guarded
    def _watch_dead_letters(self, version: int) -> None:
        """Re-sample every sample of this run that any stage dead-lettered (its group would never complete)."""
        entries = self.redis.xrange(self.keys.dead, min="(" + self.dead_cursor, max="+", count=1000)
        for dead_id, fields in entries:
            raw = fields.get(b"id")
            parsed = parse_task_id(raw.decode("utf-8", errors="replace")) if raw else None
            if parsed is not None and parsed[0] == self.cfg.run_id:
                self._resample_dead(*parsed[1:])
            self.dead_cursor = dead_id.decode()  # after the re-sample: a Redis error on it leaves it for the retry

    def _resample_dead(self, train_by: int, prompt_index: int, sample: int, attempt: int) -> None:
        g = self.groups.get(f"{train_by}:{prompt_index}")
        if g is None or g.verdict is not None or sample in g.samples or attempt < g.attempts.get(sample, 0):
            return
        self._resample(g, sample, attempt + 1)
        self.counts["resampled_dead"] += 1

    # ------------------------------------------------------------------ a step's batch

    @_guarded
    def batch(self) -> list[Group]:
        """The groups the coming step trains: the first `prompts_per_step` kept ones in deadline order."""
        return self.kept_groups()[: self.cfg.prompts_per_step]

    @_guarded
    def exhausted(self) -> bool:
        """No group is still collecting and the step may enqueue no more: train on what there is."""
        return not self.open_groups() and self.allowance() <= 0

    @_guarded
    def finish_step(self, trained: list[Group], next_step: int) -> None:
        """After the checkpoint of the step that trained `trained`: give up the groups past their deadline at
        `next_step`, acknowledge the entries of the trained and dropped groups and remove them from the ledger, in
        one transaction, and start the next step's counters."""
        self.enqueued, self.first_step, self.completed, self.counts = 0, False, [], Counter()
        for g in trained:
            self.groups.pop(g.key, None)
        for g in [g for g in self.groups.values() if g.train_by < next_step]:
            self._drop(g, "expired")  # a kept group beyond the batch, or one still collecting: never trained
        done = [*trained, *self.finished]
        entry_ids = [e for g in done for e in g.entry_ids]
        pipe = self.redis.pipeline(transaction=True)
        if entry_ids:
            pipe.xack(self.keys.scored, self.group_name, *entry_ids)
        if done:
            pipe.hdel(self.keys.run_groups(self.cfg.run_id), *[g.key for g in done])
        pipe.execute()
        self.finished = []

    @_guarded
    def in_flight(self) -> int:
        """Samples enqueued and not yet scored."""
        size = self.cfg.rollout.group_size
        return sum(size - len(g.samples) for g in self.open_groups())

    @_guarded
    def buffered(self) -> int:
        """Complete kept groups waiting for a step."""
        return len(self.kept_groups())

    @_guarded
    def counts_now(self) -> dict[str, int]:
        """What a status page shows, read at one moment (from any thread)."""
        return {"groups_buffered": self.buffered(), "groups_open": len(self.open_groups()),
                "samples_in_flight": self.in_flight()}  # fmt: skip
