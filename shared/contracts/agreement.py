"""The start-up agreement check: before the first step, the trainer's settings and each service's `ServiceInfo`
(`GET /info`, or a worker's heartbeat) must agree on the Redis namespace and codec, the reward names and weights
(the scored totals it trains on are summed with the reward worker's), the model's block size and mask token id, and
that the trainer's weights folder lies under each rollout worker's checkpoint root. The trainer checks each scored
sample's weights again (`ScoredMessage.reward_weights`): a worker may join later. `refusals` reads, while the
trainer runs, which workers refused the version it published.

`disagreements` is the pure check; `fetch_info` and `registered_infos` gather what the services say.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from shared.contracts.wire import ServiceInfo, WorkerHeartbeat, WorkerKind, same_rewards


class AgreementError(ValueError):
    """The services disagree with the trainer; one line per mismatch, each naming both values."""


class ServiceUnreachable(Exception):
    """A service did not answer `GET /info` in time: it cannot be checked (not a mismatch)."""


@dataclass(frozen=True)
class TrainerSide:
    """What the trainer runs with, as the services must see it.

    Args:
        namespace, codec: its `redis.namespace` and `redis.codec`.
        reward_weights: what every reward service must score with (`same_rewards`).
        block_size, mask_token_id: its model's; None = not checked here (`gtpo up` has not loaded the model).
    """

    namespace: str
    codec: str
    reward_weights: Mapping[str, float] = field(default_factory=dict)
    block_size: int | None = None
    mask_token_id: int | None = None
    weights_dir: str | None = None
    """Where the trainer writes the weight versions it publishes: inside every rollout worker's checkpoint root."""


def disagreements(trainer: TrainerSide, where: str, info: ServiceInfo) -> list[str]:
    """Every mismatch between the trainer and the service at `where` (a URL or a worker id), naming both values.

    >>> t = TrainerSide("run-a", "msgpack", {"accuracy": 1.0}, block_size=4, mask_token_id=3)
    >>> disagreements(t, "http://r:8001", ServiceInfo(kind="rollout", worker_id="rollout-0", namespace="run-a",
    ...                                                 codec="json", block_size=8, mask_token_id=3))
    ["redis.codec: trainer 'msgpack', rollout http://r:8001: 'json'", 'block_size: trainer 4, rollout http://r:8001: 8']
    """
    kind = info.kind.value
    out = [
        f"{name}: trainer {mine!r}, {kind} {where}: {theirs!r}"
        for name, mine, theirs in (
            ("redis.namespace", trainer.namespace, info.namespace),
            ("redis.codec", trainer.codec, info.codec),
        )  # fmt: skip
        if mine != theirs
    ]
    if info.kind == WorkerKind.rollout:
        for name, mine, theirs in (("block_size", trainer.block_size, info.block_size),
                                   ("mask_token_id", trainer.mask_token_id, info.mask_token_id)):  # fmt: skip
            if mine is not None and mine != theirs:
                out.append(f"{name}: trainer {mine}, {kind} {where}: {theirs}")
        if trainer.weights_dir is not None and info.checkpoint_root is not None:
            if not Path(trainer.weights_dir).is_relative_to(info.checkpoint_root):
                out.append(f"checkpoint_root: trainer writes weights to {trainer.weights_dir}, outside {kind} {where}'s "
                           f"checkpoint root {info.checkpoint_root}: it would refuse every version")  # fmt: skip
    elif info.kind == WorkerKind.reward:
        unknown = sorted(set(trainer.reward_weights) - set(info.rewards))
        if unknown:
            out.append(f"reward_weights: trainer names {', '.join(unknown)}, unknown to {kind} {where} "
                       f"(it knows {', '.join(info.rewards) or 'none'})")  # fmt: skip
        elif not same_rewards(dict(trainer.reward_weights), info.weights):
            out.append(f"reward_weights: trainer {dict(trainer.reward_weights)}, {kind} {where}: {info.weights} "
                       "(the trainer would train on totals weighed otherwise)")  # fmt: skip
    return out


def check_agreement(trainer: TrainerSide, found: Mapping[str, ServiceInfo]) -> None:
    """Raise AgreementError listing every mismatch of every service in `found` (where -> what it says)."""
    lines = [line for where, info in found.items() for line in disagreements(trainer, where, info)]
    if lines:
        raise AgreementError("the services disagree with the trainer:\n  " + "\n  ".join(lines))


def fetch_info(url: str, deadline_s: float = 60.0, alive=lambda: True) -> ServiceInfo:
    """`GET {url}/info`, retried while the service starts (connection refused, 503) until `deadline_s`.

    Args:
        alive: False once the service's process has exited (`gtpo up`): stop waiting for it.

    Raises:
        ServiceUnreachable: no answer in time, or the process exited.
        AgreementError: an answer that is not a ServiceInfo.
    """
    import httpx

    deadline = time.monotonic() + deadline_s
    last = "no answer"
    while True:
        try:
            resp = httpx.get(f"{url.rstrip('/')}/info", timeout=httpx.Timeout(10, connect=2))
            if resp.status_code == 200:
                return ServiceInfo.model_validate_json(resp.content)
            last = f"HTTP {resp.status_code}"
            if resp.status_code != 503:  # 503: still loading; anything else will not change
                break
        except httpx.TransportError as e:
            last = type(e).__name__
        except ValidationError as e:
            raise AgreementError(f"{url}/info: not a ServiceInfo ({e.error_count()} errors)") from None
        if not alive() or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    state = "" if alive() else "; the process exited"
    raise ServiceUnreachable(f"{url}/info: cannot check that the service agrees ({last}{state})")


def refusals(live_workers: Mapping[str, WorkerHeartbeat], version: int) -> list[str]:
    """One line per live rollout worker that refused weights `version` (the `weights_refused` entry of its
    heartbeat), naming the path, the worker's checkpoint root and the reason: what the trainer says while it waits
    for rollouts that worker will never make."""
    out = []
    for worker_id, beat in live_workers.items():
        r = beat.info.weights_refused
        if r is not None and r.version == version:
            out.append(f"rollout {worker_id} refused weights v{r.version} from {r.path} (its checkpoint root is "
                       f"{r.root}): {r.reason}")  # fmt: skip
    return out


def registered_infos(live_workers: Mapping[str, WorkerHeartbeat]) -> dict[str, ServiceInfo]:
    """The `ServiceInfo` of each live worker that put a readable one in its heartbeat
    (`WeightRegistry.live_workers()`); another version's heartbeat reads as none: its HTTP /info, if the trainer
    has its URL, still checks it."""
    return {wid: beat.info.service for wid, beat in live_workers.items() if beat.info.service is not None}
