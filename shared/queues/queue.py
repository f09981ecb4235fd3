"""The Redis layer of the services: work streams, weights registry, liveness (docs/design.md section 4).

Delivery is at least once. Every stream has one consumer group; a consumer reads entries with XREADGROUP,
and an entry stays pending until acked. An entry whose consumer died (idle past `claim_idle_ms`) is claimed
by the next consumer that asks for work; an entry delivered more than `max_deliveries` times, or one that
does not decode, goes to the dead-letter stream instead of looping forever. Producers add entries under an
idempotency id (``run:step:prompt:sample``), so a redelivered entry that is handed off twice reaches the
next stream once.

Payloads are pydantic models encoded as JSON or msgpack (never pickle): field ``d`` holds the bytes, ``v``
the codec name, ``id`` the idempotency id, so a consumer decodes whatever codec its producer used.

Needs Redis >= 6.2 (XAUTOCLAIM, exclusive XPENDING ranges); tested on 6.2 (embedded) and 7.0.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import msgpack
import redis
from pydantic import BaseModel
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from shared.config.settings import CLAIM_IDLE_MS, DEFAULT_CODEC, HEARTBEAT_TTL_S, MAX_DELIVERIES
from shared.contracts.wire import HeartbeatInfo, WeightsVersion, WorkerHeartbeat, WorkerKind, brief_error
from shared.queues.keys import Keys

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

TRANSIENT_ERRORS: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
"""Errors that mean "Redis is down, restarting or loading": worth retrying, unlike a ResponseError."""


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _text(value: bytes | str | None) -> str | None:
    """Bytes a foreign producer wrote, as text that never raises (bad UTF-8 shows as U+FFFD)."""
    if value is None:
        return None
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def _number(value: bytes | None, kind: type[T], default: T) -> T:
    try:
        return kind(value) if value is not None else default  # type: ignore[call-arg]
    except (TypeError, ValueError):
        return default


# --------------------------------------------------------------------------- codecs


class Codec:
    """Encodes a pydantic model to bytes and back. Use `Codec.get("json")` or `Codec.get("msgpack")`."""

    name: ClassVar[str]

    def encode(self, msg: BaseModel) -> bytes:
        """The wire bytes of `msg`."""
        raise NotImplementedError

    def decode(self, data: bytes, model_cls: type[M]) -> M:
        """Parse and validate `data` as `model_cls` (raises ValueError / pydantic.ValidationError)."""
        raise NotImplementedError

    @classmethod
    def get(cls, name: str | Codec) -> Codec:
        """The codec called `name` (a Codec instance is returned as is).

        Args:
            name: ``json`` or ``msgpack``.
        """
        if isinstance(name, Codec):
            return name
        try:
            return _CODECS[name]
        except KeyError:
            raise ValueError(f"codec: one of {sorted(_CODECS)}, got {name!r}") from None


class JsonCodec(Codec):
    """Compact JSON (no spaces) straight from pydantic's Rust serializer."""

    name = "json"

    def encode(self, msg: BaseModel) -> bytes:
        return msg.__pydantic_serializer__.to_json(msg)

    def decode(self, data: bytes, model_cls: type[M]) -> M:
        return model_cls.model_validate_json(data)


class MsgpackCodec(Codec):
    """msgpack of `model_dump(mode="python")`: ints take 1-5 bytes, floats 9, no text parsing."""

    name = "msgpack"

    def encode(self, msg: BaseModel) -> bytes:
        # str-valued Enums pack as their str value (msgpack accepts str subclasses)
        return msgpack.packb(msg.model_dump(mode="python"), use_bin_type=True)

    def decode(self, data: bytes, model_cls: type[M]) -> M:
        return model_cls.model_validate(msgpack.unpackb(data, raw=False, strict_map_key=True))


_CODECS: dict[str, Codec] = {c.name: c() for c in (JsonCodec, MsgpackCodec)}


# --------------------------------------------------------------------------- Lua scripts

# The existence check comes before the XADD and the SET after it: if the XADD fails (OOM under noeviction),
# no idempotency key is left behind to swallow the retry.
_PUBLISH_LUA = """
-- KEYS[1] idempotency key, KEYS[2] stream; ARGV[1] ttl (s), ARGV[2..] field/value pairs
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
redis.call('SET', KEYS[1], id, 'EX', ARGV[1])
return id
"""

_HAND_OFF_LUA = """
-- KEYS[1] idempotency key, KEYS[2] destination stream, KEYS[3] source stream
-- ARGV[1] ttl (s), ARGV[2] source group, ARGV[3] source entry id, ARGV[4..] field/value pairs
local id = false
if redis.call('EXISTS', KEYS[1]) == 0 then
  id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
  redis.call('SET', KEYS[1], id, 'EX', ARGV[1])
end
redis.call('XACK', KEYS[3], ARGV[2], ARGV[3])
return id
"""

_DEAD_LETTER_LUA = """
-- KEYS[1] dead stream, KEYS[2] source stream; ARGV[1] max dead entries, ARGV[2] group, ARGV[3] entry id,
-- ARGV[4..] field/value pairs
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 4))
redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
return 1
"""

# Returns {0, current} when refused. An equal version is accepted only with an identical payload, so that a
# trainer that crashed after publishing can publish again.
_WEIGHTS_PUBLISH_LUA = """
-- KEYS[1] current, KEYS[2] versions zset, KEYS[3] meta hash; ARGV[1] version, ARGV[2] JSON
-- versions only move forward within a run; another run takes over (its numbers start again, the old run's go)
local function run_of(t) if t['run'] == nil or t['run'] == cjson.null then return nil end return t['run'] end
local cur = redis.pcall('GET', KEYS[1])
local ok, c = pcall(cjson.decode, type(cur) == 'string' and cur or '')
local v = ok and type(c) == 'table' and tonumber(c['version'])
if v then  -- a current value that is not a version (garbage) is replaced, never compared
  local new = tonumber(ARGV[1])
  if run_of(c) ~= run_of(cjson.decode(ARGV[2])) then
    redis.call('DEL', KEYS[2], KEYS[3])
  elseif new < v or (new == v and cur ~= ARGV[2]) then
    return {0, cur}
  end
end
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('SET', KEYS[1], ARGV[2])
return {1, ARGV[2]}
"""

# Atomic with `heartbeat`'s MULTI (SET + SADD): a worker that heartbeats is never pruned by mistake. pcall: a key
# of another type (garbage in the namespace) is reported as an empty value, never an error that fails the caller.
_LIVE_WORKERS_LUA = """
-- KEYS[1] workers set; ARGV[1] worker key prefix. Returns member, value pairs of the live workers ('' = not a
-- string); prunes dead members.
local members = redis.pcall('SMEMBERS', KEYS[1])
if type(members) == 'table' and members.err then return {} end
local out = {}
for _, member in ipairs(members) do
  local v = redis.pcall('GET', ARGV[1] .. member)
  if type(v) == 'table' and v.err then v = '' end
  if v then
    table.insert(out, member)
    table.insert(out, v)
  else
    redis.call('SREM', KEYS[1], member)
  end
end
return out
"""


# --------------------------------------------------------------------------- queue


@dataclass
class Delivery(Generic[M]):
    """One entry handed to a consumer; ack it (or hand it off) when done.

    Attributes:
        stream: the stream key it came from.
        entry_id: the Redis entry id (what `ack` / `hand_off` take).
        message: the decoded payload.
        deliveries: how many times it has been delivered, this time included (1 = first delivery).
        message_id: the producer's idempotency id.
    """

    stream: str
    entry_id: str
    message: M
    deliveries: int
    message_id: str | None = None


class Queue:
    """Idempotent, at-least-once work queues on Redis streams with consumer groups.

    Args:
        redis: a client with ``decode_responses=False`` (see `connect`).
        keys: key names of the namespace.
        codec: how this producer encodes (consumers decode any codec).
        claim_idle_ms: a pending entry idle this long belongs to a dead consumer and is claimed by the next one.
            Must exceed the longest time a live consumer holds an entry before acking it.
        max_deliveries: an entry delivered more often than this goes to the dead-letter stream.
        idem_ttl_s: how long an idempotency id is remembered.
        dead_maxlen: approximate cap of the dead-letter stream.
    """

    def __init__(
        self,
        redis: redis.Redis,
        keys: Keys,
        codec: str | Codec = DEFAULT_CODEC,
        claim_idle_ms: int = CLAIM_IDLE_MS,
        max_deliveries: int = MAX_DELIVERIES,
        idem_ttl_s: int = 7 * 24 * 3600,
        dead_maxlen: int = 100_000,
    ) -> None:
        if claim_idle_ms < 1 or max_deliveries < 1 or idem_ttl_s < 1:
            raise ValueError("claim_idle_ms, max_deliveries and idem_ttl_s must be >= 1")
        self.redis = redis
        self.keys = keys
        self.codec = Codec.get(codec)
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.idem_ttl_s = idem_ttl_s
        self.dead_maxlen = dead_maxlen
        self._publish = redis.register_script(_PUBLISH_LUA)
        self._hand_off = redis.register_script(_HAND_OFF_LUA)
        self._dead = redis.register_script(_DEAD_LETTER_LUA)
        self._claim_cursor: dict[tuple[str, str], str] = {}
        """XAUTOCLAIM resumes where it stopped, so a long pending list is scanned round-robin."""

    # ------------------------------------------------------------------ setup

    def ensure_groups(self) -> None:
        """Create every stream's consumer group (and the stream) if missing; safe to call any time."""
        for stream, group in self.keys.groups.items():
            self._create_group(stream, group)

    def _create_group(self, stream: str, group: str) -> None:
        try:
            # id "0", not "$": entries added before the group existed (or before a restart lost it) are still read
            self.redis.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    # ------------------------------------------------------------------ produce

    def _fields(self, msg: BaseModel, message_id: str) -> list[bytes | str]:
        return ["d", self.codec.encode(msg), "v", self.codec.name, "id", message_id]

    def publish(self, stream: str, msg: BaseModel, message_id: str) -> str | None:
        """Add `msg` to `stream` unless `message_id` was already added (within `idem_ttl_s`).

        Args:
            stream: a stream key, e.g. ``keys.tasks``.
            msg: the payload.
            message_id: the idempotency id, e.g. the task id.

        Returns:
            The new entry id, or None for a duplicate.
        """
        args = [self.idem_ttl_s, *self._fields(msg, message_id)]
        entry_id = self._publish(keys=[self.keys.idem(stream, message_id), stream], args=args)
        return _s(entry_id) if entry_id else None

    def hand_off(
        self, src_stream: str, group: str, entry_id: str, dst_stream: str, msg: BaseModel, message_id: str
    ) -> str | None:
        """Add `msg` to `dst_stream` (once per `message_id`) and ack the source entry, in one atomic script.

        The next stage's entry is durable before the source is acked, and a redelivered source entry that is
        handed off again is acked without a second entry downstream.

        Args:
            src_stream: the stream the work came from.
            group: the consumer group that read it.
            entry_id: the source entry id (`Delivery.entry_id`).
            dst_stream: the next stage's stream.
            msg: the next stage's payload.
            message_id: its idempotency id.

        Returns:
            The new entry id, or None when `message_id` was already handed off.
        """
        args = [self.idem_ttl_s, group, entry_id, *self._fields(msg, message_id)]
        keys = [self.keys.idem(dst_stream, message_id), dst_stream, src_stream]
        new_id = self._hand_off(keys=keys, args=args)
        return _s(new_id) if new_id else None

    # ------------------------------------------------------------------ consume

    def consume(
        self,
        stream: str,
        group: str,
        consumer: str,
        model_cls: type[M],
        count: int = 16,
        block_ms: int = 1000,
        *,
        claim: bool = True,
    ) -> list[Delivery[M]]:
        """Entries for `consumer`: first those a dead consumer left idle, then new ones.

        Entries delivered more than `max_deliveries` times, and entries that do not decode as `model_cls`, go
        to the dead-letter stream (acked) and are not returned. A vanished group (Redis restarted without
        persistence) is recreated, once.

        Args:
            stream: a stream key.
            group: its consumer group.
            consumer: this consumer's name, stable across its lifetime (its pending entries are filed under it).
            model_cls: the payload model.
            count: entries at most.
            block_ms: wait this long for new entries when there are none; 0 = do not wait. Must stay under
                the client's socket timeout.
            claim: also claim entries idle past `claim_idle_ms`. A group's only consumer that holds entries on
                purpose (the trainer's buffer of scored groups) passes False: claiming its own idle entries would
                redeliver them until they were dead-lettered.

        Returns:
            Up to `count` deliveries, possibly none.
        """
        self._check_block(block_ms)
        return self._with_group(
            stream, group, lambda: self._consume(stream, group, consumer, model_cls, count, block_ms, claim)
        )

    def own_pending(
        self, stream: str, group: str, consumer: str, model_cls: type[M], count: int = 256
    ) -> list[Delivery[M]]:
        """Entries delivered to `consumer` earlier and never acked: call once when a consumer restarts under the
        same name, to resume its work at once instead of after `claim_idle_ms`.

        They are re-claimed (their delivery count goes up, so a message that crashes its consumer every time
        still ends in the dead-letter stream).

        Args:
            stream: a stream key.
            group: its consumer group.
            consumer: the consumer's stable name.
            model_cls: the payload model.
            count: entries at most.
        """
        return self._with_group(stream, group, lambda: self._own_pending(stream, group, consumer, model_cls, count))

    def _with_group(self, stream: str, group: str, fn: Callable[[], T]) -> T:
        """Run `fn`; if the group vanished (Redis restarted without persistence), recreate it and retry once."""
        try:
            return fn()
        except redis.ResponseError as e:
            if not str(e).startswith("NOGROUP"):
                raise
            logger.warning(
                "consumer group %s of %s vanished (Redis restarted without persistence?); recreating", group, stream
            )
            self.ensure_groups()
            self._create_group(stream, group)
            self._claim_cursor.pop((stream, group), None)
            return fn()

    def _check_block(self, block_ms: int) -> None:
        timeout = self.redis.connection_pool.connection_kwargs.get("socket_timeout")
        if timeout is not None and block_ms / 1000 >= timeout:
            # the socket would time out first and the client would retry a blocking read in a loop
            raise ValueError(f"block_ms: must stay under the client's socket_timeout ({timeout} s), got {block_ms}")

    def _consume(
        self, stream: str, group: str, consumer: str, model_cls: type[M], count: int, block_ms: int, claim: bool
    ) -> list[Delivery[M]]:
        out = self._claim_stale(stream, group, consumer, model_cls, count) if claim else []
        remaining = count - len(out)
        if remaining <= 0:
            return out
        # never block when claimed work is already in hand
        block = block_ms if block_ms > 0 and not out else None
        resp = self.redis.xreadgroup(group, consumer, {stream: ">"}, count=remaining, block=block)
        for _name, entries in resp.items() if isinstance(resp, dict) else resp or []:
            for entry_id, fields in entries:
                delivery = self._decode(stream, group, _s(entry_id), fields, model_cls, 1)
                if delivery is not None:
                    out.append(delivery)
        return out

    def _claim_stale(self, stream: str, group: str, consumer: str, model_cls: type[M], count: int) -> list[Delivery[M]]:
        """XAUTOCLAIM entries idle past `claim_idle_ms`; dead-letter those delivered too often."""
        start = self._claim_cursor.get((stream, group), "0-0")
        resp = self.redis.xautoclaim(stream, group, consumer, self.claim_idle_ms, start_id=start, count=count)
        cursor, entries = _s(resp[0]), resp[1]
        self._claim_cursor[(stream, group)] = cursor
        for gone in resp[2] if len(resp) > 2 else []:  # Redis >= 7: trimmed while pending, already un-pended
            self._dead_letter(stream, group, _s(gone), "entry deleted (trimmed) while pending", {}, 0)
        live = [(_s(eid), fields) for eid, fields in entries if eid is not None and fields is not None]
        if len(live) < len(entries):  # Redis 6.2 reports trimmed entries as nil, without their ids
            self._purge_deleted(stream, group, consumer, start, cursor, {eid for eid, _ in live})
        if live:
            logger.info("%s claimed %d entries of %s idle over %d ms", consumer, len(live), stream, self.claim_idle_ms)
        return self._accept_claimed(stream, group, consumer, model_cls, live)

    def _own_pending(self, stream: str, group: str, consumer: str, model_cls: type[M], count: int) -> list[Delivery[M]]:
        rows = self.redis.xpending_range(stream, group, min="-", max="+", count=count, consumername=consumer)
        ids = [_s(r["message_id"]) for r in rows]
        if not ids:
            return []
        entries = self.redis.xclaim(stream, group, consumer, 0, ids)
        live = [(_s(eid), fields) for eid, fields in entries if eid is not None and fields is not None]
        returned = {eid for eid, _ in live}
        self._dead_letter_missing(stream, group, [i for i in ids if i not in returned])
        return self._accept_claimed(stream, group, consumer, model_cls, live)

    def _accept_claimed(
        self, stream: str, group: str, consumer: str, model_cls: type[M], live: list[tuple[str, dict]]
    ) -> list[Delivery[M]]:
        """Decode claimed entries; dead-letter those delivered more than `max_deliveries` times."""
        if not live:
            return []
        counts = self._delivery_counts(stream, group, consumer, [eid for eid, _ in live])
        out = []
        for eid, fields in live:
            n = counts.get(eid)
            if n is None:
                continue  # acked by its slow first consumer after all: done, nothing to do
            if n > self.max_deliveries:
                self._dead_letter(
                    stream, group, eid, f"delivered {n} times (max_deliveries={self.max_deliveries})", fields, n
                )
                continue
            delivery = self._decode(stream, group, eid, fields, model_cls, n)
            if delivery is not None:
                out.append(delivery)
        return out

    def _delivery_counts(self, stream: str, group: str, consumer: str, entry_ids: list[str]) -> dict[str, int]:
        """Entry id -> times delivered, for the ids still pending for `consumer` (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        for eid in entry_ids:
            pipe.xpending_range(stream, group, min=eid, max=eid, count=1, consumername=consumer)
        counts = {}
        for rows in pipe.execute():
            for row in rows:
                counts[_s(row["message_id"])] = int(row["times_delivered"])
        return counts

    def _purge_deleted(self, stream: str, group: str, consumer: str, start: str, cursor: str, live: set[str]) -> None:
        """Redis 6.2: ack (and dead-letter) pending ids of `consumer` in the scanned range that no longer exist."""
        end = "+" if cursor == "0-0" else "(" + cursor
        rows = self.redis.xpending_range(stream, group, min=start, max=end, count=1000, consumername=consumer)
        self._dead_letter_missing(stream, group, [_s(r["message_id"]) for r in rows if _s(r["message_id"]) not in live])

    def _dead_letter_missing(self, stream: str, group: str, candidates: list[str]) -> None:
        """Ack (and dead-letter) those of `candidates` that no longer exist in the stream."""
        if not candidates:
            return
        pipe = self.redis.pipeline(transaction=False)
        for eid in candidates:
            pipe.xrange(stream, min=eid, max=eid, count=1)
        for eid, found in zip(candidates, pipe.execute(), strict=True):
            if not found:
                self._dead_letter(stream, group, eid, "entry deleted (trimmed) while pending", {}, 0)

    def _decode(
        self, stream: str, group: str, entry_id: str, fields: dict[bytes, bytes], model_cls: type[M], deliveries: int
    ) -> Delivery[M] | None:
        message_id = _text(fields.get(b"id"))
        try:
            message = Codec.get(_s(fields[b"v"])).decode(fields[b"d"], model_cls)
        except Exception as e:  # foreign bytes can raise anything (msgpack, UTF-8, pydantic): never crash
            reason = f"undecodable as {model_cls.__name__}: {type(e).__name__}: {str(e)[:500]}"
            self._dead_letter(stream, group, entry_id, reason, fields, deliveries)
            return None
        return Delivery(stream, entry_id, message, deliveries, message_id)

    def reject(self, delivery: Delivery, group: str, reason: str) -> None:
        """Dead-letter one delivered entry at once, with why: it decoded but can never be processed (a prompt id
        outside the vocabulary, a field over a contract's limit). Its batch-mates are not affected.

        The original fields are copied to the dead-letter stream and the entry is acked, atomically.

        Args:
            delivery: what `consume` / `own_pending` returned.
            group: the consumer group that read it.
            reason: what is wrong with it, for the operator.
        """
        found = self.redis.xrange(delivery.stream, min=delivery.entry_id, max=delivery.entry_id, count=1)
        fields = found[0][1] if found else {}
        self._dead_letter(delivery.stream, group, delivery.entry_id, reason, fields, delivery.deliveries)

    def _dead_letter(
        self, stream: str, group: str, entry_id: str, reason: str, fields: dict[bytes, bytes], deliveries: int
    ) -> None:
        """Copy the entry to the dead-letter stream with why, and ack it, atomically."""
        logger.warning("dead-lettering %s %s (group %s): %s", stream, entry_id, group, reason)
        meta: list[bytes | str] = ["reason", reason, "stream", stream, "entry_id", entry_id, "group", group]
        meta += ["deliveries", str(deliveries), "ts", repr(time.time())]
        for key in (b"d", b"v", b"id"):
            if key in fields:
                meta += [key, fields[key]]
        self._dead(keys=[self.keys.dead, stream], args=[self.dead_maxlen, group, entry_id, *meta])

    def ack(self, stream: str, group: str, *entry_ids: str) -> int:
        """Mark entries done; returns how many were pending.

        Args:
            stream: a stream key.
            group: its consumer group.
            entry_ids: `Delivery.entry_id` values.
        """
        return int(self.redis.xack(stream, group, *entry_ids)) if entry_ids else 0

    # ------------------------------------------------------------------ inspect and trim

    def depths(self) -> dict[str, dict[str, Any]]:
        """Per stream (work streams and dead letters): ``length``, ``pending`` and ``lag`` summed over its groups,
        and ``groups``: per group ``pending``, ``consumers`` (name -> pending), ``lag`` (entries not yet delivered;
        None before Redis 7), ``last_delivered``, ``oldest_pending``."""
        return {stream: self.depth(stream) for stream in (*self.keys.streams, self.keys.dead)}

    def depth(self, stream: str) -> dict[str, Any]:
        """One stream's entry of `depths`."""
        if not self.redis.exists(stream):
            return {"length": 0, "pending": 0, "lag": None, "groups": {}}
        groups = {}
        for info in self.redis.xinfo_groups(stream):
            name = _s(info["name"])
            summary = self.redis.xpending(stream, name)
            groups[name] = {
                "pending": int(info["pending"]),
                "consumers": {_s(c["name"]): int(c["pending"]) for c in summary["consumers"] or []},
                "lag": info.get("lag"),
                "last_delivered": _s(info["last-delivered-id"]),
                "oldest_pending": _s(summary["min"]) if summary["min"] else None,
            }
        lags = [g["lag"] for g in groups.values()]
        return {
            "length": int(self.redis.xlen(stream)),
            "pending": sum(g["pending"] for g in groups.values()),
            "lag": sum(lags) if lags and None not in lags else None,
            "groups": groups,
        }

    def dead_letters(self, count: int = 100) -> list[dict[str, Any]]:
        """The newest `count` dead letters, newest first: ``dead_id``, ``reason``, ``stream``, ``entry_id``,
        ``group``, ``deliveries``, ``ts``, ``message_id``, ``codec`` and the raw ``payload`` bytes (or None)."""
        out = []
        # whatever a dead letter holds (it is there because it was malformed) reads back without raising
        for dead_id, f in self.redis.xrevrange(self.keys.dead, count=count):
            out.append(
                {
                    "dead_id": _s(dead_id),
                    "reason": _text(f.get(b"reason")),
                    "stream": _text(f.get(b"stream")),
                    "entry_id": _text(f.get(b"entry_id")),
                    "group": _text(f.get(b"group")),
                    "deliveries": _number(f.get(b"deliveries"), int, 0),
                    "ts": _number(f.get(b"ts"), float, 0.0),
                    "message_id": _text(f.get(b"id")),
                    "codec": _text(f.get(b"v")),
                    "payload": f.get(b"d"),
                }
            )
        return out

    def trim(self, stream: str, maxlen: int) -> int:
        """Approximate MAXLEN trim; returns entries removed.

        Unlike `trim_acked` this also drops entries not yet read or acked: use it for a hard memory cap.

        Args:
            stream: a stream key.
            maxlen: keep about this many newest entries (Redis trims whole macro-nodes, so maybe a few more).
        """
        return int(self.redis.xtrim(stream, maxlen=maxlen, approximate=True))

    def trim_acked(self, stream: str) -> int:
        """Approximately drop entries that every group of `stream` has read and acked; returns entries removed.

        Args:
            stream: a stream key.
        """
        try:
            infos = self.redis.xinfo_groups(stream)
        except redis.ResponseError:
            return 0  # no such stream
        floor: tuple[int, int] | None = None
        for info in infos:
            summary = self.redis.xpending(stream, info["name"])
            if summary["pending"]:
                keep = _parse_id(summary["min"])
            else:
                ms, seq = _parse_id(info["last-delivered-id"])
                keep = (ms, seq + 1)
            floor = keep if floor is None else min(floor, keep)
        if floor is None:
            return 0  # no group: nobody has declared what it still needs
        return int(self.redis.xtrim(stream, minid=f"{floor[0]}-{floor[1]}", approximate=True))


def _parse_id(entry_id: bytes | str) -> tuple[int, int]:
    ms, _, seq = _s(entry_id).partition("-")
    return int(ms), int(seq or 0)


# --------------------------------------------------------------------------- weights and liveness


class WeightRegistry:
    """Published weight versions, worker heartbeats, and which versions may be deleted.

    Args:
        redis: a client (see `connect`).
        keys: key names of the namespace.
    """

    def __init__(self, redis: redis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._publish = redis.register_script(_WEIGHTS_PUBLISH_LUA)
        self._live = redis.register_script(_LIVE_WORKERS_LUA)
        self.skipped: Counter[str] = Counter()
        """Key -> reads skipped because its value broke its contract."""
        self._warned: set[tuple[str, int]] = set()

    def publish(self, version: WeightsVersion) -> None:
        """Record `version` and make it current.

        Args:
            version: must be newer than the current one (the same one again is accepted if identical), unless it
                is another run's (`WeightsVersion.run`): that run takes over, the old run's versions are forgotten.

        Raises:
            ValueError: an older version of the same run, or the current version with another path or step.
        """
        keys = [self.keys.weights_current, self.keys.weights_versions, self.keys.weights_meta]
        ok, current = self._publish(keys=keys, args=[version.version, version.model_dump_json()])
        if not ok:
            raise ValueError(f"weights version {version.version} is not newer than the current {_s(current)}")

    def current(self, strict: bool = False) -> WeightsVersion | None:
        """The newest published version, or None before the first (or when the key holds garbage: skipped, counted
        and logged; the next `publish` replaces it).

        Args:
            strict: raise ValueError on garbage instead (a rollout worker reports it in `/ready` itself).
        """
        try:
            raw = self.redis.get(self.keys.weights_current)
        except redis.ResponseError as e:  # another type at the key
            if strict:
                raise ValueError(f"{self.keys.weights_current}: {e}") from None
            self._skip(self.keys.weights_current, b"", e)
            return None
        if not raw:
            return None
        try:
            return WeightsVersion.model_validate_json(raw)
        except ValueError as e:  # garbage: as if nothing were published (the next publish replaces it)
            if strict:
                raise
            self._skip(self.keys.weights_current, raw, e)
            return None

    def versions(self) -> list[WeightsVersion]:
        """Every version not yet forgotten, oldest first (an entry that is not a `WeightsVersion` is skipped)."""
        out = []
        for field, raw in self.redis.hgetall(self.keys.weights_meta).items():
            try:
                out.append(WeightsVersion.model_validate_json(raw))
            except ValueError as e:
                self._skip(f"{self.keys.weights_meta}[{_s(field)}]", raw, e)
        return sorted(out, key=lambda v: v.version)

    def forget(self, version: int) -> None:
        """Drop `version` from the registry (after its files were deleted).

        Args:
            version: any version but the current one.
        """
        current = self.current()
        if current is not None and current.version == version:
            raise ValueError(f"version {version} is current: it cannot be forgotten")
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(self.keys.weights_versions, str(version))
        pipe.hdel(self.keys.weights_meta, str(version))
        pipe.execute()

    def heartbeat(
        self,
        kind: str,
        worker_id: str,
        loaded_version: int | None,
        ttl_s: float = HEARTBEAT_TTL_S,
        info: HeartbeatInfo | None = None,
    ) -> None:
        """Say "alive, serving `loaded_version`" for `ttl_s` seconds; call it every ttl_s / 3 or so.

        Args:
            kind: ``rollout``, ``reward`` or ``trainer`` (no colon).
            worker_id: unique per process.
            loaded_version: the weights version the worker serves (rollout workers); None = none yet.
            ttl_s: the worker counts as dead this long after its last heartbeat.
            info: what the worker says about itself (busy seconds, its `ServiceInfo`, ...).
        """
        if ":" in kind:
            raise ValueError(f"kind: no colon allowed, got {kind!r}")
        body = WorkerHeartbeat(kind=kind, id=worker_id, version=loaded_version, info=info or HeartbeatInfo(),
                               ts=time.time())  # fmt: skip
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(
            self.keys.worker(kind, worker_id), body.model_dump_json(exclude_none=True), px=max(1, int(ttl_s * 1000))
        )
        pipe.sadd(self.keys.workers, f"{kind}:{worker_id}")
        pipe.execute()

    def live_workers(self, kind: str | None = None) -> dict[str, WorkerHeartbeat]:
        """Worker id -> the heartbeat of each worker whose heartbeat has not expired.

        A heartbeat that is not a `WorkerHeartbeat` (garbage, another program's key) is skipped, counted in
        `skipped` and logged once per key and value: one bad key never stops whoever reads the registry.

        Args:
            kind: only this kind; None = all (worker ids must then be unique across kinds).
        """
        raw = self._live(keys=[self.keys.workers], args=[self.keys.prefix + "worker:"])
        out = {}
        for member, value in zip(raw[::2], raw[1::2], strict=True):
            try:
                body = WorkerHeartbeat.model_validate_json(value)
            except ValueError as e:  # pydantic's ValidationError is a ValueError
                self._skip(self.keys.prefix + "worker:" + _s(member), value, e)
                continue
            if kind is None or body.kind == kind:
                out[body.id] = body
        return out

    def _skip(self, key: str, value: bytes, err: Exception) -> None:
        self.skipped[key] += 1
        seen = (key, hash(value))
        if seen not in self._warned:
            self._warned.add(seen)
            logger.warning("skipping %s: not a valid value (%s)", key, brief_error(err))

    def deletable_versions(self, kind: str = WorkerKind.rollout) -> list[WeightsVersion]:
        """Versions older than both the current one and every live `kind` worker's loaded version.

        None at all while a live worker has not loaded any version (it may be about to load an old one);
        dead workers (expired heartbeats) do not hold anything back.

        Args:
            kind: the workers that load weights.
        """
        current = self.current()
        if current is None:
            return []
        loaded = [w.version for w in self.live_workers(kind).values()]
        if any(v is None for v in loaded):
            return []
        floor = min([current.version, *loaded])
        return [v for v in self.versions() if v.version < floor]


# --------------------------------------------------------------------------- connections


def connect(url: str | None = None, *, socket_timeout: float = 10.0, retries: int = 3) -> redis.Redis:
    """A client that survives brief outages: bounded timeouts and a few retries with backoff.

    Args:
        url: ``redis://`` / ``rediss://`` URL (password and TLS go here); None = $REDIS_URL, else localhost.
        socket_timeout: seconds per command; blocking reads (`Queue.consume`'s block_ms) must stay under it.
        retries: retries of one command on connection errors and timeouts (the scripts are idempotent, so a
            retried XADD after a lost reply adds nothing twice).
    """
    url = url or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=min(5, socket_timeout),
        socket_keepalive=True,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=2, base=0.05), retries=retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        decode_responses=False,
    )


class RedisUnavailable(redis.ConnectionError):
    """Redis stayed unreachable past a loop's reconnect deadline (`redis.reconnect_s`); the message says while
    doing what and for how long."""


class StopRequested(Exception):
    """A stop (SIGTERM) came while a call waited for Redis to come back: the caller stops instead of waiting."""


def with_reconnect(
    fn: Callable[[], T],
    *,
    what: str,
    deadline_s: float = 120.0,
    log: Callable[[str], None] | None = None,
    errors: Iterable[type[Exception]] = TRANSIENT_ERRORS,
    stop: threading.Event | None = None,
) -> T:
    """Call `fn` until it stops failing with a transient Redis error, for up to `deadline_s`.

    Args:
        fn: the Redis work (it must be safe to repeat).
        what: for the log line, e.g. "reading tasks".
        deadline_s: give up after this many seconds: `RedisUnavailable` for a transient Redis error (any other
            retried error is re-raised as is).
        log: receives each "redis unreachable while <what>, retrying" line; default: this module's warning.
        errors: which exceptions to retry.
        stop: set (SIGTERM) while waiting: raise `StopRequested` at once instead of waiting on.

    Raises:
        RedisUnavailable: still unreachable after `deadline_s`.
        StopRequested: `stop` was set while Redis was unreachable.
    """
    emit = log or logger.warning
    errors = tuple(errors)
    start, attempt = time.monotonic(), 0
    while True:
        try:
            return fn()
        except errors as e:
            if stop is not None and stop.is_set():
                raise StopRequested(f"stopped while {what} (redis unreachable: {e})") from e
            left = deadline_s - (time.monotonic() - start)
            if left <= 0:
                if isinstance(e, TRANSIENT_ERRORS):
                    raise RedisUnavailable(
                        f"redis unreachable for {deadline_s:.0f} s while {what} ({type(e).__name__}: {e}); "
                        "raise redis.reconnect_s to wait longer"
                    ) from e
                raise
            # jittered so that many workers do not reconnect in lockstep after a restart
            delay = min(2.0, 0.05 * 2**attempt, left) * random.uniform(0.5, 1.0)
            emit(f"redis unreachable while {what}, retrying in {delay:.2f} s ({type(e).__name__}: {e})")
            if stop is not None:
                stop.wait(delay)
            else:
                time.sleep(delay)
            attempt += 1
