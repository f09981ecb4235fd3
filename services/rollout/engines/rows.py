"""What every engine does around decoding: one row per (request, sample) with its checked and resolved settings,
the rollout a finished row becomes, and the results put back in request order. Engines differ only in how they
decode a group of rows (:func:`decode_grouped`).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.rollout.engines.base import GenerationCancelled
from services.rollout.engines.sampling import MIN_TEMPERATURE, derive_seed
from shared.contracts.wire import GenerationRequest, Rollout, SamplingParams
from shared.model.sdar import DiffusionSpec


@dataclass
class Row:
    """One sample being decoded: its request, resolved settings and generator, and what it generated so far.

    ``tokens`` / ``steps`` / ``logprobs`` cover every generated position in whole blocks (prompt tail excluded),
    so the response and the tail are cut from them when the row finishes.
    """

    request_index: int
    sample_index: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    """The policy version that sampled each generated position (one per token, like ``tokens``)."""
    step: int = 0


def default_stop_ids(tokenizer) -> list[int]:
    """The model's end tokens: eos and, where the tokenizer has it, the chat turn end ``<|im_end|>``."""
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    return sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id)


def effective_params(params: SamplingParams, block_size: int, stop_ids: list[int], vocab_size: int) -> SamplingParams:
    """The settings a row is decoded with, and recorded in its rollout: the model's defaults filled in, and

    * a temperature below :data:`~services.rollout.engines.sampling.MIN_TEMPERATURE` is 0 (greedy), so the
      rollout says how it was decoded;
    * ``top_k >= vocab_size`` is 0 (it keeps every token: the same distribution, and no integer too large for a
      tensor).
    """
    p = params.resolved(block_size, stop_ids)
    update: dict[str, object] = {}
    if 0 < p.temperature < MIN_TEMPERATURE:
        update["temperature"] = 0.0
    if p.top_k >= vocab_size:
        update["top_k"] = 0
    return p.model_copy(update=update) if update else p


def check_prompt_ids(prompt: Sequence[int], vocab_size: int) -> None:
    """Raise ValueError (naming ``prompt_ids``) unless every id is in [0, vocab_size)."""
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt_ids: token ids must be in [0, {vocab_size}), got {bad[:5]}")


def check_spec(path: str | Path, loaded: DiffusionSpec, served: DiffusionSpec) -> None:
    """Raise ValueError unless new weights keep the block size and mask id the engine serves."""
    if loaded != served:
        raise ValueError(f"weights: {path} has {loaded}, the engine serves {served}")


def expand_rows(
    requests: Sequence[GenerationRequest], block_size: int, stop_ids: list[int], vocab_size: int
) -> list[Row]:
    """One row per (request, sample) with its effective settings and its own generator; checks every prompt first.

    Raises:
        ValueError: a prompt id outside the vocabulary, or settings that do not fit the model (naming the field).
    """
    for req in requests:
        check_prompt_ids(req.prompt_ids, vocab_size)
    rows = []
    for i, req in enumerate(requests):
        params = effective_params(req.params, block_size, stop_ids, vocab_size)
        base = params.seed if params.seed is not None else secrets.randbits(62)
        for j in range(params.n):
            seed = derive_seed(base, j)
            rows.append(Row(i, j, list(req.prompt_ids), params, seed, torch.Generator().manual_seed(seed)))
    return rows


def build_rollout(
    row: Row, length: int, reason: str, tokenizer, version: int, *, per_token_versions: bool = False
) -> Rollout:
    """Split a finished row into response (``length`` positions) and tail and wrap it in the wire contract.

    ``version`` is the version the row started with; ``per_token_versions`` records ``row.versions`` as the
    rollout's ``token_versions`` (the engine swapped weights at block boundaries, or may have)."""
    text_ids = row.tokens[:length]
    if reason == "stop":
        text_ids = text_ids[:-1]
    return Rollout(
        prompt_ids=row.prompt,
        token_ids=row.tokens[:length],
        step_map=row.steps[:length],
        tail_ids=row.tokens[length:],
        tail_steps=row.steps[length:],
        text=tokenizer.decode(text_ids, skip_special_tokens=True),
        finish_reason=reason,
        policy_version=version,
        params=row.params,
        seed=row.seed,
        logprobs=row.logprobs[:length] if row.params.logprobs else None,
        token_versions=row.versions[:length] if per_token_versions else None,
    )


def decode_grouped(
    requests: Sequence[GenerationRequest],
    rows: list[Row],
    key: Callable[[Row], Hashable],
    decode: Callable[[Hashable, list[Row]], list[Rollout]],
) -> list[list[Rollout]]:
    """Decode rows group by group and return ``params.n`` rollouts per request, in request order.

    Args:
        rows: from :func:`expand_rows` over ``requests``.
        key: rows with equal keys are decoded together (groups in first-seen order, rows in order within one).
        decode: (key, group) -> one rollout per row of the group, in the group's order.
    """
    groups: dict[Hashable, list[Row]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    done: dict[tuple[int, int], Rollout] = {}
    for k, group in groups.items():
        for row, rollout in zip(group, decode(k, group), strict=True):
            done[(row.request_index, row.sample_index)] = rollout
    return [[done[(i, j)] for j in range(req.params.n)] for i, req in enumerate(requests)]


def raise_if_cancelled(cancel: threading.Event | None) -> None:
    """Raise :class:`GenerationCancelled` when the caller has set ``cancel``."""
    if cancel is not None and cancel.is_set():
        raise GenerationCancelled("generation cancelled by the caller")
