"""weights.transport=http, the worker's side: fetch a published version from the trainer into a local cache,
verified, while the old weights keep serving (docs/design.md section 7, "Weight transport").

A version is fetched file by file into a temporary folder inside the cache; each file is checked against the
manifest (size, sha256), the manifest against the digest the registry published, everything is fsynced, and only
then is the folder renamed to `<cache>/v<version>-<digest>`: a folder of that name is always complete and
verified. A broken stream resumes with an HTTP Range request a few times; a transfer that still fails (trainer
gone, short read, a hash that does not match) raises `FetchError`, and its temporary folder is removed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import httpx

from shared.contracts.wire import WeightsFile, WeightsManifest, WeightsVersion
from shared.http import bearer_headers

log = logging.getLogger("gtpo.rollout")

PARTIAL = ".partial-"
"""Prefix of a folder being fetched (never loaded; removed on failure and when the worker starts)."""


class FetchError(Exception):
    """A version that could not be fetched and verified; the message says why (the old weights stay served)."""


def version_folder(cache: Path, version: WeightsVersion) -> Path:
    """Where a verified copy of `version` lives in `cache`."""
    return cache / f"v{version.version}-{(version.digest or 'none')[:16]}"


def fetch_version(version: WeightsVersion, cache: Path, token=None, timeout_s: float = 60.0) -> Path:
    """Fetch `version` (published with a `url` and `digest`) into `cache`; returns its verified folder.

    Raises:
        FetchError: the manifest does not match the published digest, or a file cannot be fetched whole and
            verified. Nothing is left behind.
    """
    final = version_folder(cache, version)
    if final.is_dir():
        return final
    if version.url is None or version.digest is None:
        raise FetchError(f"weights v{version.version} names no URL and digest to fetch it from")
    headers = bearer_headers(token)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f"{PARTIAL}{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        with httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_s, connect=5)) as client:
            manifest = _manifest(client, version)
            for f in manifest.files:
                _fetch_file(client, f"{version.url}/files/{f.name}", f, tmp / f.name)
        _fsync(tmp)
        os.rename(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.is_dir():  # another process sharing this cache verified and renamed it first
            return final
        raise FetchError(f"weights v{version.version}: cannot write {cache}: {e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(cache)
    return final


def _manifest(client: httpx.Client, version: WeightsVersion) -> WeightsManifest:
    """The version's manifest, refused unless it is the one the registry published (its digest)."""
    try:
        r = client.get(f"{version.url}/manifest")
    except httpx.HTTPError as e:
        raise FetchError(f"weights v{version.version}: manifest unreachable at {version.url}: {e}") from e
    if r.status_code != 200:
        raise FetchError(f"weights v{version.version}: manifest answered {r.status_code}: {r.text[:300]}")
    try:
        manifest = WeightsManifest.model_validate_json(r.content)
    except ValueError as e:
        raise FetchError(f"weights v{version.version}: the manifest is no WeightsManifest: {str(e)[:300]}") from e
    if manifest.digest() != version.digest or manifest.version != version.version:
        raise FetchError(f"weights v{version.version}: the served manifest (digest {manifest.digest()[:16]}) is not "
                         f"the published one ({version.digest[:16]})")  # fmt: skip
    return manifest


def _fetch_file(client: httpx.Client, url: str, entry: WeightsFile, dest: Path, attempts: int = 3) -> None:
    """Stream one file to `dest`, resuming a broken stream with a Range request; verified and fsynced.

    Raises:
        FetchError: still incomplete after `attempts`, longer than the manifest says, or another sha256.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    h, done, why = hashlib.sha256(), 0, "not started"
    with dest.open("wb") as out:
        for attempt in range(1, attempts + 1):
            try:
                done = _stream(client, url, entry, out, h, out.tell())
            except (httpx.HTTPError, httpx.StreamError) as e:
                done = out.tell()  # what was written (and hashed) before the break: the next attempt resumes there
                why = f"{type(e).__name__}: {e}"
                log.warning("weights %s: transfer broken at %d of %d bytes (%s), attempt %d/%d", entry.name, done,
                            entry.size, why, attempt, attempts)  # fmt: skip
                time.sleep(0.2 * attempt)
                continue
            break
        if done != entry.size:
            raise FetchError(f"weights file {entry.name}: short read, {done} of {entry.size} bytes ({why})")
        if h.hexdigest() != entry.sha256:
            raise FetchError(f"weights file {entry.name}: sha256 {h.hexdigest()[:16]} is not the manifest's "
                             f"{entry.sha256[:16]}: corrupt transfer")  # fmt: skip
        out.flush()
        os.fsync(out.fileno())


def _stream(client: httpx.Client, url: str, entry: WeightsFile, out, h, done: int) -> int:
    """Append the bytes of `url` from offset `done` to `out` and `h`; returns the new offset."""
    headers = {"Range": f"bytes={done}-"} if done else {}
    with client.stream("GET", url, headers=headers) as r:
        if r.status_code not in (200, 206) or (done and r.status_code != 206):
            raise FetchError(f"weights file {entry.name}: the trainer answered {r.status_code} "
                             f"({r.read()[:300]!r})")  # fmt: skip
        for chunk in r.iter_bytes():
            done += len(chunk)
            if done > entry.size:
                raise FetchError(f"weights file {entry.name}: more than the manifest's {entry.size} bytes")
            out.write(chunk)
            h.update(chunk)
    return done


def _fsync(folder: Path) -> None:
    """fsync every file's directory under `folder` and `folder` itself (a rename is durable only then)."""
    for d in [*(p for p in folder.rglob("*") if p.is_dir()), folder]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def collect_garbage(cache: Path, keep: set[Path]) -> list[Path]:
    """Delete every verified version folder of `cache` not in `keep` (the served one, the newest fetched); returns
    them. Temporary folders are left to their fetch (and to `clear_partials` when the worker starts)."""
    keep = {p.resolve() for p in keep}
    gone = []
    for p in sorted(cache.glob("v*")) if cache.is_dir() else []:
        if p.is_dir() and p.resolve() not in keep:
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def clear_partials(cache: Path) -> None:
    """Remove what a killed fetch left (a worker starting has no fetch under way)."""
    for p in cache.glob(f"{PARTIAL}*") if cache.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)


class Prefetcher:
    """Fetches versions in a background thread, so the worker keeps generating with the old weights meanwhile;
    the engine pauses only for the load of a verified folder.

    Args:
        cache: where versions go.
        token: the bearer token the trainer's weights routes want (the run's api_token), or None.
        retry_s: after a failed fetch, wait this long before trying that version again.
        timeout_s: seconds without a byte before a transfer counts as broken.
    """

    def __init__(self, cache: Path, token=None, retry_s: float = 10.0, timeout_s: float = 60.0) -> None:
        self.cache, self.token, self.retry_s, self.timeout_s = cache, token, retry_s, timeout_s
        self._lock = threading.Lock()
        self._running: dict[Path, threading.Thread] = {}
        self.failed: dict[Path, tuple[float, str]] = {}
        """Folder -> (when, why) of the last failed fetch of that version."""
        clear_partials(cache)

    def ready(self, version: WeightsVersion) -> Path | None:
        """The verified folder of `version` when it is fetched; else None, with a fetch started unless one runs or
        the last one failed less than `retry_s` ago."""
        final = version_folder(self.cache, version)
        if final.is_dir():
            return final
        with self._lock:
            if final in self._running:
                return None
            failed = self.failed.get(final)
            if failed is not None and time.monotonic() - failed[0] < self.retry_s:
                return None
            thread = threading.Thread(target=self._fetch, args=(version, final), daemon=True,
                                      name=f"fetch-weights-v{version.version}")  # fmt: skip
            self._running[final] = thread
        thread.start()
        return None

    def _fetch(self, version: WeightsVersion, final: Path) -> None:
        t0 = time.perf_counter()
        try:
            fetch_version(version, self.cache, self.token, self.timeout_s)
        except Exception as e:  # FetchError, or anything else: logged, the old weights stay, retried later
            reason = str(e) if isinstance(e, FetchError) else f"{type(e).__name__}: {e}"
            log.error("weights v%d from %s refused, retrying in %.0f s: %s", version.version, version.url,
                      self.retry_s, reason)  # fmt: skip
            with self._lock:
                self.failed[final] = (time.monotonic(), reason[:1000])
        else:
            log.info("fetched weights v%d from %s in %.1f s", version.version, version.url, time.perf_counter() - t0)
            with self._lock:
                self.failed.pop(final, None)
        finally:
            with self._lock:
                self._running.pop(final, None)

    def failure(self, version: WeightsVersion) -> str | None:
        """Why the last fetch of `version` failed; None when it did not (or has not yet)."""
        with self._lock:
            found = self.failed.get(version_folder(self.cache, version))
        return None if found is None else found[1]
