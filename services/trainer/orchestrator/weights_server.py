"""weights.transport=http: the trainer's main process serves each published version's files itself, so rollout
workers need no shared volume (docs/design.md section 7, "Weight transport").

A version's manifest (every file of its folder with size and sha256) is computed once when it is published; its
digest goes into the `WeightsVersion` record, so a worker can tell the manifest it fetched is the one published.
Files are streamed from disk (`FileResponse`: chunks, HTTP Range, so a broken transfer resumes where it stopped).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, Response

from shared.contracts.wire import WeightsFile, WeightsManifest, WeightsVersion
from shared.http import require_token

HASH_CHUNK = 8 * 1024 * 1024
"""Bytes read at once while hashing a file."""


class WeightsFileResponse(FileResponse):
    """A file streamed in 1 MiB chunks (starlette's 64 kB costs a Python round per 64 kB: a few GB crawl)."""

    chunk_size = 1024 * 1024


def hash_file(path: Path) -> WeightsFile:
    """Size and sha256 of one file, named by its path (relabelled by the caller)."""
    h, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return WeightsFile(name=path.name, size=size, sha256=h.hexdigest())


def build_manifest(folder: Path, version: int, run: str | None) -> WeightsManifest:
    """Every regular file under `folder` (sorted by relative path) with its size and sha256.

    A LoRA version's folder is the adapter (adapter_config.json, adapter_model.safetensors, gtpo_base.json and
    peft's README): only those are sent.
    """
    files = []
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        rel = p.relative_to(folder).as_posix()
        files.append(hash_file(p).model_copy(update={"name": rel}))
    if not files:
        raise ValueError(f"weights: {folder} holds no files to serve")
    return WeightsManifest(version=version, run=run, files=files)


class WeightStore:
    """The versions this trainer serves: version -> (folder, manifest). Thread-safe: the training loop adds and
    drops, the HTTP thread reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._served: dict[int, tuple[Path, WeightsManifest]] = {}

    def add(self, version: WeightsVersion, base_url: str) -> WeightsVersion:
        """Serve `version`'s folder (hashed now, unless it is already served from that folder); returns the record
        to publish, with its `url` and `digest`."""
        folder = Path(version.path).resolve()
        with self._lock:
            known = self._served.get(version.version)
        if known is None or known[0] != folder or known[1].run != version.run:
            known = (folder, build_manifest(folder, version.version, version.run))
            with self._lock:
                self._served[version.version] = known
        url = f"{base_url.rstrip('/')}/v1/weights/{version.version}"
        return version.model_copy(update={"url": url, "digest": known[1].digest()})

    def drop(self, version: int) -> None:
        with self._lock:
            self._served.pop(version, None)

    def versions(self) -> list[int]:
        with self._lock:
            return sorted(self._served)

    def lookup(self, version: int) -> tuple[Path, WeightsManifest]:
        """Raises HTTPException(404) for a version not (or no longer) served."""
        with self._lock:
            found = self._served.get(version)
        if found is None:
            raise HTTPException(404, f"weights v{version} is not served here (never published, or pruned)")
        return found


def weights_router(store: WeightStore, token) -> APIRouter:
    """`GET /v1/weights/{version}/manifest` and `GET /v1/weights/{version}/files/{name}`; behind `token` (the
    run's `api_token`, which the rollout services share) when one is set."""

    def auth(request: Request) -> None:
        if token is not None:
            require_token(request, token)

    router = APIRouter(dependencies=[Depends(auth)])

    @router.get("/v1/weights/{version}/manifest", response_model=WeightsManifest)
    def manifest(version: int) -> Response:
        return Response(store.lookup(version)[1].model_dump_json(), media_type="application/json")

    @router.get("/v1/weights/{version}/files/{name:path}")
    def file(version: int, name: str) -> WeightsFileResponse:
        folder, m = store.lookup(version)
        entry = next((f for f in m.files if f.name == name), None)
        if entry is None:  # only the manifest's names: nothing else of the trainer's disk is reachable
            raise HTTPException(404, f"weights v{version} has no file {name[:200]!r}")
        path = folder / entry.name
        if not path.is_file():
            raise HTTPException(410, f"weights v{version}: {entry.name} is gone from the trainer's disk (pruned)")
        return WeightsFileResponse(path, media_type="application/octet-stream", headers={"X-Sha256": entry.sha256})

    return router
