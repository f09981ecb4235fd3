"""Every Redis key name the services use, in one place (docs/design.md section 4).

All keys live under ``{namespace}:``. The braces are a Redis Cluster hash tag: every key of one namespace maps
to the same slot, so the Lua scripts in `shared.queues.queue` (which touch a stream, an idempotency key and sometimes a
second stream) stay legal on a cluster. A namespace is one deployment or one test; deleting ``{namespace}:*``
removes everything it wrote.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.config.settings import DEFAULT_NAMESPACE

_NAMESPACE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
"""No braces (hash tag), colons (separator) or glob characters (`pattern` must match literally)."""


@dataclass(frozen=True)
class Keys:
    """Key names of one namespace.

    Args:
        namespace: 1-64 characters from ``[A-Za-z0-9_.-]``.
    """

    namespace: str = DEFAULT_NAMESPACE

    def __post_init__(self) -> None:
        if not _NAMESPACE.match(self.namespace):
            raise ValueError(f"namespace: 1-64 characters from [A-Za-z0-9_.-], got {self.namespace!r}")

    @property
    def prefix(self) -> str:
        """``{namespace}:``, the start of every key below."""
        return "{" + self.namespace + "}:"

    @property
    def pattern(self) -> str:
        """SCAN MATCH pattern of every key of the namespace (for cleanup and inspection)."""
        return self.prefix + "*"

    # ------------------------------------------------------------------ streams

    @property
    def tasks(self) -> str:
        """Stream of `TaskMessage`: one sample to generate; read by the rollout workers."""
        return self.prefix + "stream:tasks"

    @property
    def rollouts(self) -> str:
        """Stream of `RolloutMessage`: a task with its rollout; read by the reward workers."""
        return self.prefix + "stream:rollouts"

    @property
    def scored(self) -> str:
        """Stream of `ScoredMessage`: a rollout with its reward; read by the trainer."""
        return self.prefix + "stream:scored"

    @property
    def dead(self) -> str:
        """Dead-letter stream: entries that failed to decode or were delivered too often.

        Each entry holds ``reason``, ``stream`` (the source), ``entry_id`` (in the source), ``group``,
        ``deliveries``, ``ts`` (unix seconds) and the original ``d`` / ``v`` / ``id`` fields when they still
        existed. No consumer group: operators read it with `Queue.dead_letters`.
        """
        return self.prefix + "stream:dead"

    @property
    def streams(self) -> tuple[str, str, str]:
        """The three work streams, in pipeline order."""
        return (self.tasks, self.rollouts, self.scored)

    # ------------------------------------------------------------------ consumer groups

    @property
    def rollout_group(self) -> str:
        """Consumer group of the rollout workers on `tasks`."""
        return "rollout-workers"

    @property
    def reward_group(self) -> str:
        """Consumer group of the reward workers on `rollouts`."""
        return "reward-workers"

    @property
    def trainer_group(self) -> str:
        """Consumer group of the trainer on `scored`."""
        return "trainer"

    @property
    def groups(self) -> dict[str, str]:
        """Work stream -> the one consumer group that reads it."""
        return {self.tasks: self.rollout_group, self.rollouts: self.reward_group, self.scored: self.trainer_group}

    # ------------------------------------------------------------------ idempotency

    def idem(self, stream: str, message_id: str) -> str:
        """String key whose existence means `message_id` was already added to `stream`; holds the entry id.

        Set with an expiry (`Queue.idem_ttl_s`) together with the XADD, in one Lua script.

        Args:
            stream: a full stream key (e.g. `tasks`), not a bare name.
            message_id: the producer's idempotency id, e.g. a task id ``run:step:prompt:sample``.
        """
        return f"{self.prefix}idem:{stream.removeprefix(self.prefix)}:{message_id}"

    # ------------------------------------------------------------------ weights

    @property
    def weights_current(self) -> str:
        """String: JSON of the current `WeightsVersion` (the newest the trainer published)."""
        return self.prefix + "weights:current"

    @property
    def weights_versions(self) -> str:
        """Sorted set: every published version not yet forgotten (member = version as text, score = version)."""
        return self.prefix + "weights:versions"

    @property
    def weights_meta(self) -> str:
        """Hash: version (text) -> JSON of its `WeightsVersion` (path, step)."""
        return self.prefix + "weights:meta"

    # ------------------------------------------------------------------ liveness

    def worker(self, kind: str, worker_id: str) -> str:
        """String with an expiry: JSON ``{kind, id, version, info, ts}`` of one worker; gone = worker dead.

        Args:
            kind: ``rollout``, ``reward`` or ``trainer``.
            worker_id: unique per process (host + pid, pod name, ...).
        """
        return f"{self.prefix}worker:{kind}:{worker_id}"

    @property
    def workers(self) -> str:
        """Set of ``kind:worker_id`` ever heartbeating; members whose `worker` key expired are pruned lazily.

        An index instead of SCAN, so that listing workers does not walk a shared Redis's whole keyspace.
        """
        return self.prefix + "workers"

    @property
    def workers_pattern(self) -> str:
        """SCAN MATCH pattern of every worker heartbeat key (for inspection; services use `workers`)."""
        return self.prefix + "worker:*"

    @property
    def trainer_status(self) -> str:
        """String expiring a minute after its last write: JSON the trainer writes after each step and every 10 s
        while it waits for groups, holding its ``step``, ``policy_version``, what it is ``waiting`` for and ``ts``
        (unix seconds), with the collector's counts and the last metrics row (`Driver.status`)."""
        return self.prefix + "trainer:status"

    # ------------------------------------------------------------------ the trainer's run state

    @property
    def trainer_lease(self) -> str:
        """String with an expiry: JSON ``{token, run_id, host, pid, output_dir, since}`` of the one trainer that
        drives this namespace; renewed while it lives, so a second trainer refuses to start (`RunLease`)."""
        return self.prefix + "trainer:lease"

    def run_groups(self, run_id: str) -> str:
        """Hash: ``tag:prompt_index`` -> JSON ``{tag, prompt_index, cursor, version}`` of every prompt group the
        trainer of `run_id` enqueued and has not yet trained or given up (the admission ledger a resumed trainer
        rebuilds its buffer from)."""
        return f"{self.prefix}run:{run_id}:groups"

    def run_cursor(self, run_id: str) -> str:
        """String: the next position in the prompt stream of `run_id` (every group enqueued took one)."""
        return f"{self.prefix}run:{run_id}:cursor"
