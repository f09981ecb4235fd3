"""One trainer per run: a Redis lease with a TTL it renews, and a lock file in the output folder.

Two trainers of one namespace (what a Kubernetes Job does when a replaced pod is still terminating) would split the
scored stream between them and interleave checkpoints. The second one refuses to start, naming the holder, unless
the holder's lease has expired: then it takes over, and the old holder, if it wakes up, finds its lease gone at its
next renewal or before its next write, and exits without writing (`LeaseLost`).

The lock file (`trainer.lock`, flock'ed while held) catches a second trainer on the same filesystem even when the
two are pointed at different Redis servers; the Redis lease catches it across machines.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger("gtpo.trainer")

_RENEW_LUA = """
-- KEYS[1] lease; ARGV[1] token, ARGV[2] ttl ms, ARGV[3] body. 1 = renewed, 2 = re-taken (it had vanished, or held
-- garbage no trainer writes), 0 = lost
local cur = redis.pcall('GET', KEYS[1])
local ok, holder = pcall(cjson.decode, type(cur) == 'string' and cur or '')
if not cur or not ok or type(holder) ~= 'table' or type(holder['token']) ~= 'string' then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
  return 2
end
if holder['token'] ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_TAKE_OVER_LUA = """
-- KEYS[1] lease; ARGV[1] the holder's body as read, ARGV[2] ours, ARGV[3] ttl ms. Only if nobody renewed meanwhile.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

_RELEASE_LUA = """
local cur = redis.pcall('GET', KEYS[1])
local ok, holder = pcall(cjson.decode, type(cur) == 'string' and cur or '')
if ok and type(holder) == 'table' and holder['token'] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaseHeld(RuntimeError):
    """Another trainer holds the run; the message names it."""


class LeaseLost(RuntimeError):
    """This trainer's lease was taken over: it must stop without writing anything."""


def parse_holder(raw: bytes | str | None) -> dict | None:
    """The holder recorded at the lease key, or None when the value is not one (garbage no trainer writes)."""
    try:
        holder = json.loads(raw) if raw else None
    except ValueError:
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("token"), str) else None


def describe(holder: dict) -> str:
    return (
        f"run {holder.get('run_id')!r} on {holder.get('host')} (pid {holder.get('pid')}, output "
        f"{holder.get('output_dir')}, since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('since', 0)))})"
    )


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


class RunLease:
    """The lease of the trainer of one namespace.

    Args:
        redis: a client.
        key: the lease key (`Keys.trainer_lease`).
        run_id: this trainer's run.
        output_dir: where the lock file goes.
        ttl_s: a holder that has not renewed for this long has lost the run.
    """

    def __init__(self, redis, key: str, run_id: str, output_dir: Path, ttl_s: float) -> None:
        self.redis, self.key, self.ttl_ms = redis, key, max(1000, int(ttl_s * 1000))
        self.token = secrets.token_hex(16)
        self.body = {"token": self.token, "run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                     "output_dir": str(Path(output_dir).resolve()), "since": time.time()}  # fmt: skip
        self.lock_path = Path(output_dir) / "trainer.lock"
        self._lock_file = None
        self._renew = redis.register_script(_RENEW_LUA)
        self._release = redis.register_script(_RELEASE_LUA)
        self._take_over = redis.register_script(_TAKE_OVER_LUA)
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _public(self) -> str:
        return json.dumps({k: v for k, v in self.body.items() if k != "token"})

    def acquire(self) -> None:
        """Take the run or raise `LeaseHeld` naming who has it."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = self.lock_path.open("a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = json.loads(f.read() or "{}")
            except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
                holder = {}
            f.close()
            holder = holder if isinstance(holder, dict) else {}
            raise LeaseHeld(f"another trainer holds {self.lock_path}: {describe(holder)}") from None
        try:
            taken = (
                bool(self.redis.set(self.key, json.dumps(self.body), nx=True, px=self.ttl_ms)) or self._dead_holder()
            )
            if not taken:
                raw, left = self.redis.get(self.key), self.redis.pttl(self.key)
        except BaseException:  # Redis away: unlock, so that a retry (`with_reconnect`) can lock again
            f.close()
            raise
        if not taken:
            f.close()
            holder = parse_holder(raw) or {}
            raise LeaseHeld(
                f"another trainer drives this namespace: {describe(holder)}; its lease expires in "
                f"{max(0, left) / 1000:.1f} s unless it renews it (stop it, or wait for it to die)"
            )
        f.seek(0)
        f.truncate()
        f.write(self._public())
        f.flush()
        self._lock_file = f
        log.info("trainer lease taken (ttl %.0f s)", self.ttl_ms / 1000)

    def _dead_holder(self) -> bool:
        """Take the lease over from a holder on this host whose process is gone (a SIGKILLed trainer restarted
        with --resume need not wait out the TTL); False when the holder may still be alive."""
        raw = self.redis.get(self.key)
        if raw is None:
            return bool(self.redis.set(self.key, json.dumps(self.body), nx=True, px=self.ttl_ms))
        holder = parse_holder(raw)
        if holder is None:
            log.warning("the trainer lease key %s holds no trainer's record (%r); taking it", self.key, raw[:100])
            holder = {}
        else:
            try:
                pid = int(holder.get("pid", 0))
            except (TypeError, ValueError):
                pid = 0
            # our own pid: a previous incarnation in a restarted container (pid 1 again), not a live holder
            if holder.get("host") != self.body["host"] or (pid != os.getpid() and pid_alive(pid)):
                return False
        taken = int(self._take_over(keys=[self.key], args=[raw, json.dumps(self.body), self.ttl_ms]))
        if taken:
            log.warning("took the trainer lease over from %s, whose process is gone", describe(holder))
        return bool(taken)

    def renew(self) -> bool:
        """Extend the lease; False (and `lost` set) when another trainer has it now."""
        result = int(self._renew(keys=[self.key], args=[self.token, self.ttl_ms, json.dumps(self.body)]))
        if result == 2:
            log.warning("trainer lease had vanished (Redis restarted without persistence?); taken again")
        if result == 0:
            self.lost.set()
        return result != 0

    def check(self) -> None:
        """Raise `LeaseLost` if the lease is gone: call before every write that another trainer could also make."""
        if self.lost.is_set() or not self.renew():
            raise LeaseLost("the trainer lease was taken over by another trainer; stopping without writing")

    def start_renewing(self, on_lost) -> threading.Thread:
        """Renew every ttl / 3 in a daemon thread; call `on_lost()` once if the lease is taken over."""
        from shared.queues.queue import TRANSIENT_ERRORS

        def loop() -> None:
            while not self._stop.wait(self.ttl_ms / 3000):
                try:
                    if not self.renew():
                        log.error("trainer lease lost to another trainer")
                        on_lost()
                        return
                except TRANSIENT_ERRORS as e:  # Redis down: keep trying; the lease may expire meanwhile
                    log.warning("could not renew the trainer lease: %s", e)
                except Exception as e:  # never let the renewing thread die: the step loop's check would still pass
                    log.exception("renewing the trainer lease failed: %s", e)

        self._thread = threading.Thread(target=loop, name="trainer-lease", daemon=True)
        self._thread.start()
        return self._thread

    def release(self) -> None:
        """Give the run up (only if still ours) and unlock the lock file."""
        self._stop.set()
        try:
            self._release(keys=[self.key], args=[self.token])
        except Exception as e:  # the lease expires by itself; never fail a clean exit for it
            log.warning("could not release the trainer lease: %s", e)
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None
