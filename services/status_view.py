"""`gtpo status [--watch]`: one screen of a running job, read from Redis alone.

Queue depths (length, pending, lag per stream, dead letters), each live worker (kind, busy or idle, the entries it
holds, the weights version it serves, how long ago it last beat, its busy share since it started), the trainer
(step, policy version, what it waits for, the last step's wait / train / checkpoint seconds) and the weight
versions. A worker is busy while it holds delivered entries of its stream that it has not handed on yet; the
trainer's part comes from the status it writes after every step (`Driver._write_status`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from shared.contracts.wire import TrainerStatus, WorkerHeartbeat

STREAM_OF = {"rollout": "tasks", "reward": "rollouts"}
"""The stream each worker kind consumes (its pending entries there are the work it holds)."""
TIMEOUT_S = 3.0
"""Seconds `gtpo status` waits for a connection or a reply: a Redis answers in milliseconds, and a port that is
not Redis (an HTTP server waits for the rest of a request that never comes) must fail fast, not hang."""


class StatusError(Exception):
    """The view cannot be read at all (Redis down, not Redis, refused): one line naming the URL."""


@dataclass
class Snapshot:
    """What `gtpo status` shows, read at `at` (unix seconds).

    A key holding something its writer never wrote (garbage, the wrong Redis type) is listed in `invalid` and
    its part of the view says so; a stream's depth is then None.
    """

    namespace: str
    at: float
    depths: dict[str, dict[str, Any] | None]
    workers: dict[str, WorkerHeartbeat]
    trainer: TrainerStatus | None
    current_version: int | None
    versions: list[int] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)


_GARBAGE = (ValueError, TypeError, RecursionError)
"""What parsing a malformed value raises (pydantic's ValidationError, JSON and UTF-8 errors are ValueErrors)."""


def read_snapshot(redis, namespace: str) -> Snapshot:
    """Everything the view shows, from one Redis (the workers' heartbeats, the streams, the trainer's status).

    Read only: nothing is written or pruned. A malformed key is reported (`Snapshot.invalid`), never raised;
    a Redis that cannot be reached raises its connection error.
    """
    import redis as redis_lib

    from shared.contracts.wire import WeightsVersion
    from shared.queues.keys import Keys
    from shared.queues.queue import Queue

    keys, queue, invalid = Keys(namespace), Queue(redis, Keys(namespace)), []

    def guarded(key: str, read, default=None):
        try:
            return read()
        except (redis_lib.ResponseError, *_GARBAGE):  # ResponseError: WRONGTYPE, a key of another Redis type
            invalid.append(key)
            return default

    def trainer() -> TrainerStatus | None:
        raw = redis.get(keys.trainer_status)
        return TrainerStatus.model_validate_json(raw) if raw else None

    def current() -> int | None:
        raw = redis.get(keys.weights_current)
        return WeightsVersion.model_validate_json(raw).version if raw else None

    versions = []
    for field_name, raw in guarded(keys.weights_meta, lambda: redis.hgetall(keys.weights_meta), {}).items():
        v = guarded(
            f"{keys.weights_meta}[{_text(field_name)}]", lambda raw=raw: WeightsVersion.model_validate_json(raw)
        )
        if v is not None:
            versions.append(v.version)
    return Snapshot(
        namespace=namespace, at=time.time(),
        depths={s: guarded(s, lambda s=s: queue.depth(s)) for s in (*keys.streams, keys.dead)},
        workers=_workers(redis, keys, guarded), trainer=guarded(keys.trainer_status, trainer),
        current_version=guarded(keys.weights_current, current), versions=sorted(versions), invalid=invalid,
    )  # fmt: skip


def _workers(redis, keys, guarded) -> dict[str, WorkerHeartbeat]:
    """Worker id -> its live heartbeat; a malformed one is reported by `guarded`."""
    members = sorted(_text(m) for m in guarded(keys.workers, lambda: redis.smembers(keys.workers), set()))
    names = [f"{keys.prefix}worker:{m}" for m in members]
    out = {}
    for name, raw in zip(names, redis.mget(names) if names else [], strict=True):
        beat = guarded(name, lambda raw=raw: WorkerHeartbeat.model_validate_json(raw)) if raw is not None else None
        if beat is not None:
            out[beat.id] = beat
    return out


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


def held_entries(snap: Snapshot, worker_id: str, kind: str) -> int:
    """Entries of its stream delivered to `worker_id` and not yet handed on (0 for a kind without a stream)."""
    from shared.queues.keys import Keys

    stream = getattr(Keys(snap.namespace), STREAM_OF.get(kind, ""), None)
    groups = (snap.depths.get(stream) or {}).get("groups", {}) if stream else {}
    return sum(g["consumers"].get(worker_id, 0) for g in groups.values())


def worker_rows(snap: Snapshot) -> list[list[str]]:
    """One row per live worker: id, kind, state, held, weights, last beat, busy share."""
    rows = []
    for wid, w in sorted(snap.workers.items(), key=lambda kv: (kv[1].kind, kv[0])):
        held = held_entries(snap, wid, w.kind)
        busy, up = w.info.busy_s, w.info.up_s
        share = busy / up if busy is not None and up else None
        rows.append([
            wid, w.kind, "busy" if held else "idle", str(held), "-" if w.version is None else f"v{w.version}",
            f"{max(0.0, snap.at - w.ts):.1f} s ago", "-" if share is None else f"{share:.0%}",
        ])  # fmt: skip
    return rows


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _seconds(value: Any) -> str:
    return f"{float(value):.2f}" if _number(value) else "-"


def _invalid(key: str) -> str:
    return f"invalid ({key})"


def render(snap: Snapshot):
    """The snapshot as rich renderables: queues, workers, trainer and weights; a malformed key shows as
    `invalid (<key>)` where its part of the view would be."""
    from rich.console import Group
    from rich.table import Table

    from shared.queues.keys import Keys

    keys = Keys(snap.namespace)
    queues = Table(title=f"queues ({snap.namespace})")
    for col in ("stream", "length", "pending", "lag"):
        queues.add_column(col, justify="left" if col == "stream" else "right")
    for stream, d in snap.depths.items():
        cells = [_invalid(stream), "", ""] if d is None else [str(d.get(k)) for k in ("length", "pending", "lag")]
        queues.add_row(stream.rpartition(":")[2], *cells)
    workers = Table(title=f"live workers ({len(snap.workers)})")
    for col in ("worker", "kind", "state", "held", "weights", "last heartbeat", "busy since start"):
        workers.add_column(col)
    for row in worker_rows(snap):
        workers.add_row(*row)
    for key in snap.invalid:
        if key == keys.workers or key.startswith(f"{keys.prefix}worker:"):
            workers.add_row(_invalid(key))
    trainer = Table(title="trainer", show_header=False)
    t = snap.trainer
    if keys.trainer_status in snap.invalid:
        trainer.add_row("status", _invalid(keys.trainer_status))
    elif t is None:
        trainer.add_row("status", "no trainer status in the last minute")
    else:
        last = t.last or {}
        trainer.add_row("run", t.run_id)
        trainer.add_row("step", str(t.step))
        trainer.add_row("policy version", f"v{t.policy_version}")
        trainer.add_row("doing", t.waiting or str(t.phase))
        trainer.add_row("buffered / open groups", f"{t.groups_buffered} / {t.groups_open}")
        trainer.add_row("samples in flight", str(t.samples_in_flight))
        trainer.add_row(
            "last step (wait / train / checkpoint s)",
            " / ".join(_seconds(last.get(k)) for k in ("time_wait_s", "time_train_s", "time_checkpoint_s")),
        )
        written = t.ts
        trainer.add_row("status written", f"{max(0.0, snap.at - written):.1f} s ago" if _number(written) else "-")
    current = _invalid(keys.weights_current) if keys.weights_current in snap.invalid else f"v{snap.current_version}"
    bad_meta = [k for k in snap.invalid if k.startswith(keys.weights_meta)]
    weights = f"weights: current {current}, published {snap.versions}" + "".join(f", {_invalid(k)}" for k in bad_meta)
    return Group(queues, workers, trainer, weights)


def read(redis, redis_url: str, namespace: str, timeout_s: float = TIMEOUT_S) -> Snapshot:
    """`read_snapshot`, with whatever stops Redis from answering as one `StatusError` naming the URL."""
    import redis as redis_lib

    from shared.config.settings import redact_url

    try:
        return read_snapshot(redis, namespace)
    except redis_lib.TimeoutError:
        why = f"no reply within {timeout_s:g} s (is this the port of a Redis server?)"
    except redis_lib.RedisError as e:  # refused, closed, not Redis's protocol, authentication...
        why = f"{type(e).__name__}: {e}"
    raise StatusError(f"redis {redact_url(redis_url)}: {why}")


def show(redis_url: str, namespace: str, console, *, watch: bool = False, interval_s: float = 1.0,
         iterations: int | None = None, timeout_s: float = TIMEOUT_S) -> None:  # fmt: skip
    """Print the view once, or (`watch`) keep it live, redrawn every `interval_s` until Ctrl-C (or `iterations`).

    Raises:
        StatusError: Redis could not be read (the first time, with `watch`: later failures show in the view,
            and the next redraw tries again).
    """
    from shared.queues.queue import connect

    redis = connect(redis_url, socket_timeout=timeout_s, retries=0)
    view = render(read(redis, redis_url, namespace, timeout_s))
    if not watch:
        console.print(view)
        return
    from rich.live import Live
    from rich.text import Text

    done = 0
    with Live(view, console=console, refresh_per_second=4) as live:
        try:
            while iterations is None or done < iterations:
                time.sleep(interval_s)
                try:
                    live.update(render(read(redis, redis_url, namespace, timeout_s)))
                except StatusError as e:  # Redis restarting: say so, keep watching
                    live.update(Text(f"{e} (retrying every {interval_s:g} s)", style="red"))
                done += 1
        except KeyboardInterrupt:
            pass
