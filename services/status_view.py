"""`gtpo status [--watch]`: one screen of a running job, read from Redis alone.

Queue depths (length, pending, lag per stream, dead letters), each live worker (kind, busy or idle, the entries it
holds, the weights version it serves, how long ago it last beat, its busy share since it started), the trainer
(step, policy version, what it waits for, the last step's wait / train / checkpoint seconds) and the weight
versions. A worker is busy while it holds delivered entries of its stream that it has not handed on yet; the
trainer's part comes from the status it writes after every step (`Driver._write_status`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

STREAM_OF = {"rollout": "tasks", "reward": "rollouts"}
"""The stream each worker kind consumes (its pending entries there are the work it holds)."""


@dataclass
class Snapshot:
    """What `gtpo status` shows, read at `at` (unix seconds)."""

    namespace: str
    at: float
    depths: dict[str, dict[str, Any]]
    workers: dict[str, dict[str, Any]]
    trainer: dict[str, Any] | None
    current_version: int | None
    versions: list[int] = field(default_factory=list)


def read_snapshot(redis, namespace: str) -> Snapshot:
    """Everything the view shows, from one Redis (the workers' heartbeats, the streams, the trainer's status)."""
    from shared.keys import Keys
    from shared.queue import Queue, WeightRegistry

    keys = Keys(namespace)
    reg = WeightRegistry(redis, keys)
    raw = redis.get(keys.trainer_status)
    current = reg.current()
    return Snapshot(namespace=namespace, at=time.time(), depths=Queue(redis, keys).depths(),
                    workers=reg.live_workers(), trainer=json.loads(raw) if raw else None,
                    current_version=current.version if current else None,
                    versions=[v.version for v in reg.versions()])  # fmt: skip


def held_entries(snap: Snapshot, worker_id: str, kind: str) -> int:
    """Entries of its stream delivered to `worker_id` and not yet handed on (0 for a kind without a stream)."""
    from shared.keys import Keys

    stream = getattr(Keys(snap.namespace), STREAM_OF.get(kind, ""), None)
    groups = snap.depths.get(stream, {}).get("groups", {}) if stream else {}
    return sum(g["consumers"].get(worker_id, 0) for g in groups.values())


def worker_rows(snap: Snapshot) -> list[list[str]]:
    """One row per live worker: id, kind, state, held, weights, last beat, busy share."""
    rows = []
    for wid, w in sorted(snap.workers.items(), key=lambda kv: (kv[1]["kind"], kv[0])):
        held = held_entries(snap, wid, w["kind"])
        info = w.get("info") or {}
        share = info["busy_s"] / info["up_s"] if info.get("up_s") else None
        rows.append([
            wid, w["kind"], "busy" if held else "idle", str(held),
            "-" if w.get("version") is None else f"v{w['version']}",
            f"{max(0.0, snap.at - w['ts']):.1f} s ago", "-" if share is None else f"{share:.0%}",
        ])  # fmt: skip
    return rows


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{float(value):.2f}"


def render(snap: Snapshot):
    """The snapshot as rich renderables: queues, workers, trainer and weights."""
    from rich.console import Group
    from rich.table import Table

    queues = Table(title=f"queues ({snap.namespace})")
    for col in ("stream", "length", "pending", "lag"):
        queues.add_column(col, justify="left" if col == "stream" else "right")
    for stream, d in snap.depths.items():
        queues.add_row(stream.rpartition(":")[2], str(d.get("length")), str(d.get("pending")), str(d.get("lag")))
    workers = Table(title=f"live workers ({len(snap.workers)})")
    for col in ("worker", "kind", "state", "held", "weights", "last heartbeat", "busy since start"):
        workers.add_column(col)
    for row in worker_rows(snap):
        workers.add_row(*row)
    trainer = Table(title="trainer", show_header=False)
    t = snap.trainer
    if t is None:
        trainer.add_row("status", "no trainer status in the last minute")
    else:
        last = t.get("last") or {}
        trainer.add_row("run", str(t.get("run_id")))
        trainer.add_row("step", str(t.get("step")))
        trainer.add_row("policy version", f"v{t.get('policy_version')}")
        trainer.add_row("doing", t.get("waiting") or "idle")
        trainer.add_row("buffered / open groups", f"{t.get('groups_buffered')} / {t.get('groups_open')}")
        trainer.add_row("samples in flight", str(t.get("samples_in_flight")))
        trainer.add_row(
            "last step (wait / train / checkpoint s)",
            " / ".join(_seconds(last.get(k)) for k in ("time_wait_s", "time_train_s", "time_checkpoint_s")),
        )
        trainer.add_row("status written", f"{max(0.0, snap.at - t.get('ts', snap.at)):.1f} s ago")
    weights = f"weights: current v{snap.current_version}, published {snap.versions}"
    return Group(queues, workers, trainer, weights)


def show(redis_url: str, namespace: str, console, *, watch: bool = False, interval_s: float = 1.0,
         iterations: int | None = None) -> None:  # fmt: skip
    """Print the view once, or (`watch`) keep it live, redrawn every `interval_s` until Ctrl-C (or `iterations`)."""
    from shared.queue import connect

    redis = connect(redis_url)
    if not watch:
        console.print(render(read_snapshot(redis, namespace)))
        return
    from rich.live import Live

    done = 0
    with Live(render(read_snapshot(redis, namespace)), console=console, refresh_per_second=4) as live:
        try:
            while iterations is None or done < iterations:
                time.sleep(interval_s)
                live.update(render(read_snapshot(redis, namespace)))
                done += 1
        except KeyboardInterrupt:
            pass
