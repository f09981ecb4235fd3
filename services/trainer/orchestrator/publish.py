"""Weight versions of a run: publish them (Redis registry, then a push over HTTP), prune the ones nobody serves.

The registry is the source of truth: rollout workers load its current version between tasks. The HTTP push only
makes a serving-only rollout service (no worker) pick a version up at once; its failures are logged, not fatal.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from shared.contracts.wire import WeightsRequest, WeightsVersion
from shared.http import bearer_headers

log = logging.getLogger("gtpo.trainer")


def publish(registry, version: WeightsVersion, rollout_urls: list[str], token) -> None:
    """Make `version` current (unless the registry already has it or a newer one of the same run) and push it to
    `rollout_urls`."""
    cur = registry.current()
    if cur is None or cur.version < version.version or cur.run != version.run:
        registry.publish(version)
    for url in rollout_urls:
        push_weights(url, version, token)


def push_weights(url: str, version: WeightsVersion, token, attempts: int = 3) -> bool:
    """Tell one rollout service over HTTP to load `version`; returns whether it did.

    A refusal (4xx: a path outside its root, an older version than it serves) is logged with the service's reason
    and not retried; an unreachable service or a 5xx is retried `attempts` times with a growing pause.
    """
    import httpx

    headers = bearer_headers(token)
    body = WeightsRequest(version=version.version, path=version.path, run=version.run).model_dump(mode="json")
    for attempt in range(1, attempts + 1):
        try:
            r = httpx.post(
                f"{url.rstrip('/')}/v1/weights", json=body, headers=headers, timeout=httpx.Timeout(300, connect=5)
            )
        except httpx.TransportError as e:
            log.warning("rollout %s unreachable for weights v%d (%s), attempt %d/%d", url, version.version,
                        _hide(str(e), token), attempt, attempts)  # fmt: skip
        else:
            if r.status_code < 400:
                return True
            log.error("rollout %s answered %d to weights v%d: %s", url, r.status_code, version.version,
                      _hide(r.text[:500], token))  # fmt: skip
            if r.status_code < 500:
                return False
        time.sleep(1.0 * attempt)
    return False


def _hide(text: str, token) -> str:
    """`text` without the token: an HTTP library's error can quote the header that carried it."""
    secret = token.get_secret_value() if token is not None else ""
    return text.replace(secret.strip(), "***") if secret.strip() else text


def prune(registry, checkpoint_root: Path, keep: set[Path]) -> list[int]:
    """Delete checkpoints whose weights no live rollout worker serves any more, except those in `keep`; returns
    the versions forgotten.

    Only folders directly under `checkpoint_root` are ever deleted (a registry entry pointing elsewhere, such as
    the start model, is forgotten but its files stay).
    """
    root = checkpoint_root.resolve()
    keep = {p.resolve() for p in keep}
    gone = []
    for v in registry.deletable_versions():
        ckpt = Path(v.path).parent.resolve()
        if ckpt not in keep and ckpt.parent == root:
            shutil.rmtree(ckpt, ignore_errors=True)
        registry.forget(v.version)
        gone.append(v.version)
    return gone
