"""The torch reference engine: batched block-diffusion decoding with a KV cache, on CPU or CUDA.

Per block of B tokens (docs/design.md section 2): start it as masks (the prompt tail is given), forward it against the
cached earlier blocks, sample every masked position, unmask by strategy, repeat until the block is clean. The KV
of a block's denoising forwards is cropped right away; the clean block is committed by the first forward of the
next block, which carries it along ([clean block k | masked block k+1], 2B queries), so committing costs no
forward of its own.

Prompts of different lengths share a batch: each prompt is left-padded by whole blocks so that every row's first
generation block lands on the same column, while positions (and so blocks) stay absolute per row. Each sample
draws its uniforms from its own generator, so a request gives the same tokens in any batch.

In-flight weight updates (``rollout.swap_at_block``, docs/design.md section 7): with a ``block_hook`` set, the engine
calls it at every block boundary after the first block; the hook may load newer weights, and every in-flight row
decodes its next block with them. The KV cache of earlier blocks stays as the older weights computed it, and the
last clean block is committed by the first forward of the next block, so with the new weights: both are part of
the behaviour policy that sampled the later tokens, and their recorded log-probs are those of that policy. Each
row records the version of every token (``Rollout.token_versions``); ``policy_version`` is the version it started
with.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from services.rollout.engines.base import Engine
from services.rollout.engines.rows import (
    Row,
    build_rollout,
    check_spec,
    decode_grouped,
    default_stop_ids,
    expand_rows,
    raise_if_cancelled,
)
from services.rollout.engines.sampling import block_uniforms, cut_response, sample_block, select_unmask, strategy_codes
from shared.contracts.wire import GenerationRequest, Rollout
from shared.model.masks import square_mask, to_additive
from shared.model.sdar import DiffusionSpec, LoadedModel, load_model, nonfinite_tensor


@dataclass
class DecodeStats:
    """Counters for benchmarks: model forwards and generated (returned) tokens."""

    forwards: int = 0
    tokens: int = 0


class _RowParams:
    """Per-row sampling settings as tensors, indexable when rows finish."""

    def __init__(self, rows: list[Row], device: torch.device):
        p = [r.params for r in rows]
        self.temperature = torch.tensor([x.temperature for x in p], device=device, dtype=torch.float32)
        self.top_k = torch.tensor([x.top_k for x in p], device=device)
        self.top_p = torch.tensor([x.top_p for x in p], device=device, dtype=torch.float32)
        self.threshold = torch.tensor([x.confidence_threshold for x in p], device=device, dtype=torch.float32)
        self.per_step = torch.tensor([x.tokens_per_step() for x in p], device=device)
        self.strategy = strategy_codes([x.strategy for x in p], device)

    def select(self, idx: Tensor) -> _RowParams:
        out = object.__new__(_RowParams)
        for name in ("temperature", "top_k", "top_p", "threshold", "per_step", "strategy"):
            setattr(out, name, getattr(self, name)[idx])
        return out


@dataclass
class _Queries:
    """The queries of a run of forwards: positions (N, Q) and bool mask (N, Q, K), with the rope and additive mask
    the first forward computes from them for the later ones."""

    pos: Tensor
    mask: Tensor
    rope: tuple[Tensor, Tensor] | None = None
    additive: Tensor | None = None


@functools.cache
def cache_kwarg(layer_cls: type) -> str:
    """The decoder layer's name for its KV cache: `cache` (transformers 5.24) or `past_key_values` (5.17 and earlier).

    Layers take **kwargs, so the wrong name is silently ignored and the cache never fills: ask the signature
    (once per layer class: this runs on every denoising step).
    """
    return "cache" if "cache" in inspect.signature(layer_cls.forward).parameters else "past_key_values"


def select_cache_rows(cache, idx: Tensor) -> None:
    """Keep the batch rows ``idx`` (n,) of a DynamicCache, in that order.

    transformers' ``batch_select_indices`` leaves a layer that holds no positions alone, batch dimension and all;
    the next forward then concatenates a smaller batch onto it and fails. The cache is empty while the first
    block decodes when no prompt has a whole block (each denoising forward's KV is cropped), so an empty cache is
    reset instead: it has nothing to keep, and the next forward creates it with the new batch size.
    """
    if cache.get_seq_length() == 0:
        cache.reset()
    else:
        cache.batch_select_indices(idx)


class TorchEngine(Engine):
    """Reference engine over transformers' Qwen3 with explicit block-diffusion masks."""

    name = "torch"
    supports_block_hook = True

    def __init__(self, loaded: LoadedModel, *, max_batch_size: int = 32, policy_version: int = 0):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size: must be >= 1, got {max_batch_size}")
        self._loaded = loaded
        self.max_batch_size = max_batch_size
        self._version = policy_version
        self._adapter = None  # the LoRA adapter served on top of the base, once a version brought one
        self.stats = DecodeStats()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str = "auto",
        dtype: torch.dtype | None = None,
        max_batch_size: int = 32,
        policy_version: int = 0,
    ) -> TorchEngine:
        """Load an SDAR-layout checkpoint; ``device="auto"`` picks CUDA when present (bf16 there, fp32 on CPU)."""
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else device.replace("auto", "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        loaded = load_model(path, dtype=dtype, device=dev)
        return cls(loaded, max_batch_size=max_batch_size, policy_version=policy_version)

    @property
    def spec(self) -> DiffusionSpec:
        return self._loaded.spec

    @property
    def policy_version(self) -> int:
        return self._version

    @property
    def model(self):
        return self._loaded.model

    @property
    def tokenizer(self):
        return self._loaded.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def load_weights(self, path: str | Path, version: int) -> None:
        """A full SDAR checkpoint replaces the model; a LoRA adapter folder (``shared.model.adapter``) is applied
        to the served base in place, only its tensors copied (``adapter_bytes``)."""
        from shared.model.adapter import AdapterSlot, is_adapter_dir

        if is_adapter_dir(path):
            if self._adapter is None:
                self._adapter = AdapterSlot()
            self._adapter.apply(self.model, Path(path), self.spec)
            self._version = version
            return
        p = next(self.model.parameters())
        loaded = load_model(path, dtype=p.dtype, device=p.device)
        check_spec(path, loaded.spec, self.spec)
        bad = nonfinite_tensor(loaded.model.state_dict().items())
        if bad is not None:
            raise ValueError(f"{path}: tensor {bad} holds NaN or inf values")
        self._loaded, self._version, self._adapter = loaded, version, None

    @property
    def adapter_bytes(self) -> int:
        """Bytes the last adapter version copied into the model (0 when no adapter is served)."""
        return 0 if self._adapter is None else self._adapter.bytes_loaded

    def generate(
        self, requests: Sequence[GenerationRequest], *, cancel: threading.Event | None = None
    ) -> list[list[Rollout]]:
        """Rows are grouped by block size and decoded ``max_batch_size`` at a time; ``cancel`` is checked before
        every block of every chunk."""
        vocab = self.model.config.vocab_size
        rows = expand_rows(requests, self.spec.block_size, default_stop_ids(self.tokenizer), vocab)

        def decode(block_size: Hashable, group: list[Row]) -> list[Rollout]:
            assert isinstance(block_size, int)
            out: list[Rollout] = []
            for start in range(0, len(group), self.max_batch_size):
                out += self._decode(group[start : start + self.max_batch_size], block_size, cancel)
            return out

        return decode_grouped(requests, rows, lambda r: r.params.block_size, decode)

    def _forward(self, ids: Tensor, queries: _Queries, cache) -> Tensor:
        """Run the decoder layers on ids (N, Q) at ``queries``. Returns hidden states (N, Q, H).

        Calls the layers directly: Qwen3Model.forward would only pass our 4-D mask through unchanged, and its
        wrappers cost a tenth of a tiny model's decoding step. The rope and the additive mask are computed by the
        first forward over ``queries`` and reused by the later ones (the same call on the same input: the same
        bits), so a block's denoising steps after the first run the layers and little else.
        """
        self.stats.forwards += 1
        body = self.model.model
        hidden = body.embed_tokens(ids)
        if queries.rope is None:
            queries.rope = body.rotary_emb(hidden, queries.pos)
            queries.additive = to_additive(queries.mask, hidden.dtype)
        kwargs = {
            "attention_mask": queries.additive,
            "position_embeddings": queries.rope,
            "position_ids": queries.pos,
            "use_cache": True,
            cache_kwarg(type(body.layers[0])): cache,
        }
        for layer in body.layers:
            hidden = layer(hidden, **kwargs)
        return body.norm(hidden)

    @torch.inference_mode()
    def _decode(self, rows: list[Row], block_size: int, cancel: threading.Event | None = None) -> list[Rollout]:
        from transformers import DynamicCache

        raise_if_cancelled(cancel)
        dev, b = self.device, block_size
        cache = DynamicCache(config=self.model.config)
        order = list(range(len(rows)))  # batch row -> index into `rows`
        params = _RowParams(rows, dev)
        full_blocks = torch.tensor([len(r.prompt) // b for r in rows], device=dev)
        k_pos, k_valid = self._prefill(rows, full_blocks, b, cache)
        counter = torch.zeros(len(rows), device=dev, dtype=torch.long)  # denoising steps so far, per row
        pending: tuple[Tensor, Tensor] | None = None  # the last clean block, committed by the next forward
        results: dict[int, Rollout] = {}
        offsets = torch.arange(b, device=dev)
        t, start_version, hook = 0, self._version, self.block_hook
        while order:
            raise_if_cancelled(cancel)  # a block boundary: every row's tokens so far are whole blocks
            if hook is not None and t > 0:
                hook()  # may load newer weights: every row decodes its next blocks with them (module docstring)
            block_pos = (full_blocks + t)[:, None] * b + offsets  # (n, B) absolute positions
            block_rows = [rows[i] for i in order]
            cur, steps, logps = self._denoise_block(
                block_rows, t, block_pos, params, counter, cache, k_pos, k_valid, pending
            )
            if pending is not None:
                k_pos = torch.cat([k_pos, pending[1]], 1)
                k_valid = torch.cat([k_valid, torch.ones_like(pending[1], dtype=torch.bool)], 1)
            keep = self._absorb_block(block_rows, order, t, (cur, steps, logps), results, start_version, hook)
            if len(keep) < len(order) and keep:
                idx = torch.tensor(keep, device=dev)
                select_cache_rows(cache, idx)
                k_pos, k_valid, full_blocks, counter = k_pos[idx], k_valid[idx], full_blocks[idx], counter[idx]
                cur, block_pos, params = cur[idx], block_pos[idx], params.select(idx)
            order = [order[i] for i in keep]
            pending = (cur, block_pos)
            t += 1
        return [results[i] for i in range(len(rows))]

    def _absorb_block(self, rows, order, t, block, results, start_version, hook) -> list[int]:
        """Append a clean block (tokens, steps, log-probs, each (n, B)) to its rows; the finished rows become
        rollouts in ``results`` (by index into the chunk's rows). Returns the batch indices of the rows going on."""
        # one host copy per block for the whole batch, not one per row and field
        cur_l, steps_l, logps_l = (x.tolist() for x in block)
        keep = []
        for i, (ri, row) in enumerate(zip(order, rows, strict=True)):
            n_given = len(row.prompt) % len(cur_l[i]) if t == 0 else 0  # the prompt tail opens the first block
            row.tokens += cur_l[i][n_given:]
            row.steps += steps_l[i][n_given:]
            row.logprobs += logps_l[i][n_given:]
            row.versions += [self._version] * (len(cur_l[i]) - n_given)
            length, reason = cut_response(row.tokens, row.params.max_new_tokens, row.params.stop_token_ids)
            if reason:
                results[ri] = build_rollout(row, length, reason, self.tokenizer, start_version,
                                            per_token_versions=hook is not None)  # fmt: skip
                self.stats.tokens += length
            else:
                keep.append(i)
        return keep

    def _denoise_block(self, rows, t, block_pos, params, counter, cache, k_pos, k_valid, pending):
        """Denoise one block of every row until it is clean; commits ``pending`` with the first forward.

        Returns the clean block (n, B), the step of each position (n, B) and its log-prob at unmask time (n, B);
        the first block starts with the prompt tail given. ``counter`` (n,) is advanced in place.

        While every row still has a masked position (always at batch 1) the step skips the row gathers: each row
        has then taken every step of the block, so its uniforms are row ``s`` of the block's.
        """
        dev, b, n = block_pos.device, block_pos.shape[1], len(rows)
        cur, masked = self._fresh_block(rows, t, block_pos)
        uniforms = torch.stack([block_uniforms(r.generator, b) for r in rows]).to(dev)  # (n, B steps, B)
        steps = torch.zeros((n, b), device=dev, dtype=torch.long)
        logps = torch.zeros((n, b), device=dev, dtype=torch.float32)
        q_pos = block_pos if pending is None else torch.cat([pending[1], block_pos], 1)
        # inference mask (all copies 0): a key is visible when valid and in the query's block or an earlier one
        keys = torch.cat([k_pos, q_pos], 1)
        valid = torch.cat([k_valid, torch.ones_like(q_pos, dtype=torch.bool)], 1)
        mask = ((keys // b)[:, None, :] <= (q_pos // b)[:, :, None]) & valid[:, None, :]
        queries = _Queries(q_pos, mask)
        used: Tensor | None = None  # uniforms rows consumed per row, once rows differ
        lm_head, s = self.model.lm_head, 0
        need = masked.any(1)
        n_need = int(need.sum())
        while n_need:
            q_ids = cur if pending is None else torch.cat([pending[0], cur], 1)
            hidden = self._forward(q_ids, queries, cache)
            cache.crop(-b)  # the current block's KV changes at the next step; earlier blocks stay
            if pending is not None:  # committed: later forwards query the current block alone
                pending, queries = None, _Queries(block_pos, mask[:, b:])
            if n_need == n:  # every row takes this step: no gathers, no scatters
                tok, conf, lp = sample_block(
                    lm_head(hidden[:, -b:]), uniforms[:, s], params.temperature, params.top_k, params.top_p
                )
                sel = select_unmask(conf, masked, params.strategy, params.threshold, params.per_step)
                counter += 1
                steps = torch.where(sel, counter[:, None], steps)
                cur = torch.where(sel, tok, cur)
                logps = torch.where(sel, lp, logps)
            else:
                if used is None:
                    used = torch.full((n,), s, device=dev, dtype=torch.long)
                rows_idx = need.nonzero().squeeze(1)
                p, hid = params.select(rows_idx), hidden[rows_idx, -b:]
                u = uniforms[rows_idx, used[rows_idx]]
                tok, conf, lp = sample_block(lm_head(hid), u, p.temperature, p.top_k, p.top_p)
                sel = torch.zeros_like(masked)
                sel[rows_idx] = select_unmask(conf, masked[rows_idx], p.strategy, p.threshold, p.per_step)
                counter += need
                used += need
                steps = torch.where(sel, counter[:, None], steps)
                cur[rows_idx] = torch.where(sel[rows_idx], tok, cur[rows_idx])
                logps[rows_idx] = torch.where(sel[rows_idx], lp, logps[rows_idx])
            masked &= ~sel
            need = masked.any(1)
            n_need = int(need.sum())  # the step's one host sync
            s += 1
        return cur, steps, logps

    def _fresh_block(self, rows, t: int, block_pos: Tensor) -> tuple[Tensor, Tensor]:
        """The block before its first step: (n, B) ids, all masks but the prompt tail given in the first block
        (t == 0), and (n, B) whether each position is still masked."""
        dev, b, n = block_pos.device, block_pos.shape[1], len(rows)
        cur = torch.full((n, b), self.spec.mask_token_id, device=dev, dtype=torch.long)
        masked = torch.ones((n, b), device=dev, dtype=torch.bool)
        if t == 0:
            for i, row in enumerate(rows):
                tail = row.prompt[len(row.prompt) // b * b :]
                if tail:
                    cur[i, : len(tail)] = torch.tensor(tail, device=dev, dtype=torch.long)
                    masked[i, : len(tail)] = False
        return cur, masked

    def _prefill(self, rows: list[Row], full_blocks: Tensor, b: int, cache) -> tuple[Tensor, Tensor]:
        """Cache the prompts' whole blocks, left-padded by whole blocks. Returns key positions and validity (N, L)."""
        dev, n = self.device, len(rows)
        length = int(full_blocks.max()) * b
        pos = torch.zeros((n, length), device=dev, dtype=torch.long)
        valid = torch.zeros((n, length), device=dev, dtype=torch.bool)
        if length == 0:
            return pos, valid
        ids = torch.full((n, length), self.spec.mask_token_id, device=dev, dtype=torch.long)
        for i, r in enumerate(rows):
            m = int(full_blocks[i]) * b
            ids[i, length - m :] = torch.tensor(r.prompt[:m], device=dev, dtype=torch.long)
            pos[i, length - m :] = torch.arange(m, device=dev)
            valid[i, length - m :] = True
        self._forward(ids, _Queries(pos, square_mask(pos, torch.zeros_like(pos), b, valid)), cache)
        return pos, valid
