"""The engine of one rollout process behind a lock, shared by the HTTP routes and the task worker: the limits every
request obeys, cancellable generation, and weight loads that only move forward.

The engine is not thread-safe: generation and weight loads take one lock; both run in worker threads, so the event
loop keeps answering health checks during a long batch. The lock is reentrant for one reason: with
`rollout.swap_at_block` the engine calls the worker's hook between two blocks on the generating thread, which
already holds the lock, and the hook loads a newer version through the same `load` (its checks, metrics and
`served`) as every other load; any other thread still waits for the whole batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services.rollout.engines import Engine, GenerationCancelled
from services.rollout.settings import RolloutSettings
from services.rollout.weights import Served, WeightsError, check_move, checkpoint_folder, served_shapes
from shared.contracts.wire import GenerateRequest, GenerationRequest, Rollout, SamplingParams
from shared.prompts import encode_prompt

log = logging.getLogger("gtpo.rollout")

LOCK_POLL_S = 0.05
"""A request waiting for the engine re-checks its cancel event this often."""


class RolloutMetrics:
    """Prometheus counters of one app (own registry: several apps may live in one test process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("gtpo_rollout_requests", "generate requests", ["source"], registry=self.registry)
        self.tokens = Counter("gtpo_rollout_tokens", "response tokens generated", registry=self.registry)
        self.seconds = Histogram("gtpo_rollout_batch_seconds", "seconds per generate batch", registry=self.registry)
        self.cancelled = Counter(
            "gtpo_rollout_cancelled", "generations abandoned (client gone)", ["source"], registry=self.registry
        )
        self.version = Gauge("gtpo_rollout_policy_version", "loaded policy version", registry=self.registry)
        self.weight_loads = Counter("gtpo_rollout_weight_loads", "weight loads", ["source"], registry=self.registry)
        self.weight_load_seconds = Histogram(
            "gtpo_rollout_weight_load_seconds", "seconds per weight load, the engine held (generation paused)",
            ["source"], registry=self.registry,
        )  # fmt: skip
        self.weight_failures = Counter(
            "gtpo_rollout_weight_load_failures", "weight loads refused or failed", ["source"], registry=self.registry
        )
        self.bad_records = Counter(
            "gtpo_rollout_bad_records", "values read from Redis that break their contract (skipped)", ["key"],
            registry=self.registry,
        )  # fmt: skip


def request_error(
    prompt_ids: Sequence[int], params: SamplingParams, settings: RolloutSettings, field: str
) -> str | None:
    """Why one prompt may not be generated on this service, naming the field; None when it may.

    The same limits hold over HTTP and for tasks from the stream.

    Args:
        prompt_ids: the prompt's token ids.
        params: its sampling settings.
        settings: the service's limits.
        field: how the caller names the prompt (``prompts[3]``, ``prompt_ids``).
    """
    if params.max_new_tokens > settings.max_new_tokens:
        return f"params.max_new_tokens: at most {settings.max_new_tokens} on this service, got {params.max_new_tokens}"
    if not 1 <= len(prompt_ids) <= settings.max_prompt_tokens:
        return f"{field}: needs 1 to {settings.max_prompt_tokens} tokens, got {len(prompt_ids)}"
    return None


def prompt_ids_of(body: GenerateRequest, tokenizer, settings: RolloutSettings) -> list[list[int]]:
    """The token ids of every prompt of a `/v1/generate` body, within the service's limits.

    Raises:
        ValueError: naming the field (``prompts[i]``, ``prompt_ids[i]``, ``params.max_new_tokens``, ``prompts x n``).
    """
    count = len(body.prompts or body.prompt_ids or [])
    if count * body.params.n > settings.max_prompts:
        raise ValueError(
            f"prompts x n: at most {settings.max_prompts} rollouts per request, got {count * body.params.n}"
        )
    if body.prompt_ids is not None:
        prompts, field = [list(p) for p in body.prompt_ids], "prompt_ids"
    else:
        prompts, field = [_encode(tokenizer, p, body.chat, i) for i, p in enumerate(body.prompts or [])], "prompts"
    for i, ids in enumerate(prompts):
        reason = request_error(ids, body.params, settings, f"{field}[{i}]")
        if reason is not None:
            raise ValueError(reason)
    return prompts


def _encode(tokenizer, text: str, chat: bool, i: int) -> list[int]:
    try:
        return encode_prompt(tokenizer, text, chat=chat)
    except Exception as e:  # a tokenizer or chat template refusing this text is the text's fault, not a 500
        raise ValueError(f"prompts[{i}]: cannot be tokenised: {type(e).__name__}: {str(e)[:200]}") from e


class EngineHost:
    """The engine behind a lock, with metrics and the version it serves."""

    def __init__(self, engine: Engine, metrics: RolloutMetrics, start: Path | None = None) -> None:
        """`start`: the checkpoint the engine was built from, whose tensor shapes new versions must match."""
        self.engine, self.metrics = engine, metrics
        self.lock = threading.RLock()  # reentrant: a load from the block hook runs inside `generate` (module doc)
        self.served: Served | None = None
        """(version, folder) of the last load; None = the start model, which is no published version."""
        self.shapes = served_shapes(start) if start is not None else {}
        metrics.version.set(engine.policy_version)

    @property
    def served_version(self) -> int | None:
        """The published version served; None while the start model is."""
        return None if self.served is None else self.served.version

    @property
    def served_run(self) -> str | None:
        """The run that published the served version; None while the start model (or unnamed weights) is."""
        return None if self.served is None else self.served.run

    @contextmanager
    def _engine(self, cancel: threading.Event | None) -> Iterator[Engine]:
        """Hold the engine; a request whose client left while it waited gives up without decoding."""
        while not self.lock.acquire(timeout=LOCK_POLL_S):
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled("cancelled while waiting for the engine")
        try:
            yield self.engine
        finally:
            self.lock.release()

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        source: str,
        cancel: threading.Event | None = None,
        at_block: Callable[[], None] | None = None,
    ) -> list[list[Rollout]]:
        """Decode `requests` (``params.n`` rollouts each, in order); `at_block` is called at every block boundary
        after the first, holding the engine (`Engine.block_hook`): it may `load` a newer version.

        Raises:
            GenerationCancelled: `cancel` was set; the engine stopped at a block boundary and is free again.
            ValueError: a request the engine cannot decode (token ids outside its vocabulary, bad settings).
        """
        t0 = time.perf_counter()
        try:
            with self._engine(cancel) as engine:
                if at_block is not None and not engine.supports_block_hook:
                    raise RuntimeError(f"swap_at_block: the {engine.name} engine cannot swap weights between blocks")
                run = self.served_run  # read under the lock: a block hook loads newer versions of this run only
                engine.block_hook = at_block
                try:
                    out = engine.generate(requests, cancel=cancel)
                finally:
                    engine.block_hook = None
            for group in out:
                for r in group:
                    r.policy_run = run
        except GenerationCancelled:
            self.metrics.cancelled.labels(source).inc()
            raise
        self.metrics.seconds.observe(time.perf_counter() - t0)
        self.metrics.requests.labels(source).inc()
        self.metrics.tokens.inc(sum(len(r.token_ids) for group in out for r in group))
        return out

    def load(
        self, path: str | Path, root: Path, version: int, source: str, rollback: bool = False, run: str | None = None
    ) -> Loaded:
        """Serve `version` of `run` from the checkpoint folder `path`, checked first (`weights.checkpoint_folder`).

        Raises:
            WeightsError: 403 a file outside `root`; 409 the version would move backwards without `rollback`;
                422 a folder that cannot be loaded. The old weights are still served.
        """
        t0 = time.perf_counter()
        try:
            ckpt = checkpoint_folder(path, root)
            folder = ckpt.folder
            with self._engine(None) as engine:
                before = self.served
                if not check_move(before, version, folder, rollback, run):
                    if run is not None:  # the same files, now known as `run`'s (two runs' v0: the start model)
                        self.served = Served(version, str(folder), run)
                    return Loaded(version, str(folder), 0.0, before)  # pushed over HTTP and announced in Redis
                bad = ckpt.mismatches(self.shapes)
                if bad:
                    raise WeightsError(422, f"weights: {path} does not fit the served model: {'; '.join(bad[:3])}")
                try:
                    engine.load_weights(folder, version)
                except Exception as e:  # whatever a loader raises on a bad folder; the engine keeps its weights
                    raise WeightsError(422, f"weights: cannot load {path}: {type(e).__name__}: {str(e)[:500]}") from e
                self.served = Served(version, str(folder), run)
                if not ckpt.adapter:  # an adapter leaves the base, whose shapes the next version must fit
                    self.shapes = ckpt.shapes
        except WeightsError:
            self.metrics.weight_failures.labels(source).inc()
            raise
        self.metrics.version.set(version)
        self.metrics.weight_loads.labels(source).inc()
        self.metrics.weight_load_seconds.labels(source).observe(time.perf_counter() - t0)
        log.info("loaded weights v%d from %s (%s)", version, folder, source)
        return Loaded(version, str(folder), time.perf_counter() - t0, before)


@dataclass(frozen=True)
class Loaded:
    """What a weights load did: the version and folder now served, its seconds (0 = already served), and the
    version served before (None = the start model)."""

    version: int
    path: str
    seconds: float
    previous: Served | None
