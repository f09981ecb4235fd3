"""A frozen copy of the torch engine's per-step decoding path as it was before the per-step optimisation (issue 32
item 20): the oracle the optimised engine must match bit for bit (tokens, step maps, log-probs).

Do not optimise this file: its worth is that it stays the plain, obviously-correct loop. It shares the pure
per-step maths (sampling.py), the row handling (rows.py) and the model call with the engine, none of its loop.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from services.rollout.engines.rows import (
    Row,
    build_rollout,
    decode_grouped,
    default_stop_ids,
    expand_rows,
    raise_if_cancelled,
)
from services.rollout.engines.sampling import block_uniforms, cut_response, sample_block, select_unmask, strategy_codes
from services.rollout.engines.torch_engine import TorchEngine, cache_kwarg, select_cache_rows
from shared.contracts.wire import GenerationRequest, Rollout
from shared.model.masks import attention_mask, square_mask, to_additive


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


class ReferenceEngine(TorchEngine):
    """TorchEngine with the old per-step loop (every method below is the pre-optimisation code, verbatim)."""

    name = "torch-reference"

    def generate(
        self, requests: Sequence[GenerationRequest], *, cancel: threading.Event | None = None
    ) -> list[list[Rollout]]:
        vocab = self.model.config.vocab_size
        rows = expand_rows(requests, self.spec.block_size, default_stop_ids(self.tokenizer), vocab)

        def decode(block_size: Hashable, group: list[Row]) -> list[Rollout]:
            assert isinstance(block_size, int)
            out: list[Rollout] = []
            for start in range(0, len(group), self.max_batch_size):
                out += self._decode(group[start : start + self.max_batch_size], block_size, cancel)
            return out

        return decode_grouped(requests, rows, lambda r: r.params.block_size, decode)

    def _forward(self, ids: Tensor, pos: Tensor, mask: Tensor, cache) -> Tensor:
        self.stats.forwards += 1
        body = self.model.model
        hidden = body.embed_tokens(ids)
        rope = body.rotary_emb(hidden, pos)
        additive = to_additive(mask, hidden.dtype)
        cache_arg = {cache_kwarg(type(body.layers[0])): cache}
        for layer in body.layers:
            hidden = layer(
                hidden, attention_mask=additive, position_embeddings=rope, position_ids=pos, use_cache=True, **cache_arg
            )
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
        t = 0
        while order:
            raise_if_cancelled(cancel)
            block_pos = (full_blocks + t)[:, None] * b + torch.arange(b, device=dev)  # (n, B) absolute positions
            cur, given, steps, logps = self._denoise_block(
                [rows[i] for i in order], t, block_pos, params, counter, cache, k_pos, k_valid, pending
            )
            if pending is not None:
                k_pos = torch.cat([k_pos, pending[1]], 1)
                k_valid = torch.cat([k_valid, torch.ones_like(pending[1], dtype=torch.bool)], 1)
            keep = []
            for i, ri in enumerate(order):
                row, n_given = rows[ri], int(given[i].sum())
                row.tokens += cur[i, n_given:].tolist()
                row.steps += steps[i, n_given:].tolist()
                row.logprobs += logps[i, n_given:].tolist()
                length, reason = cut_response(row.tokens, row.params.max_new_tokens, row.params.stop_token_ids)
                if reason:
                    results[ri] = build_rollout(row, length, reason, self.tokenizer, self._version)
                    self.stats.tokens += length
                else:
                    keep.append(i)
            if len(keep) < len(order) and keep:
                idx = torch.tensor(keep, device=dev)
                select_cache_rows(cache, idx)
                k_pos, k_valid, full_blocks, counter = k_pos[idx], k_valid[idx], full_blocks[idx], counter[idx]
                cur, block_pos, params = cur[idx], block_pos[idx], params.select(idx)
            order = [order[i] for i in keep]
            pending = (cur, block_pos)
            t += 1
        return [results[i] for i in range(len(rows))]

    def _denoise_block(self, rows, t, block_pos, params, counter, cache, k_pos, k_valid, pending):
        dev, b, n = self.device, block_pos.shape[1], len(rows)
        cur = torch.full((n, b), self.spec.mask_token_id, device=dev, dtype=torch.long)
        masked = torch.ones((n, b), device=dev, dtype=torch.bool)
        if t == 0:
            for i, row in enumerate(rows):
                tail = row.prompt[len(row.prompt) // b * b :]
                cur[i, : len(tail)] = torch.tensor(tail, device=dev, dtype=torch.long)
                masked[i, : len(tail)] = False
        given = ~masked
        uniforms = torch.stack([block_uniforms(r.generator, b) for r in rows]).to(dev)  # (n, B steps, B)
        steps = torch.zeros((n, b), device=dev, dtype=torch.long)
        logps = torch.zeros((n, b), device=dev, dtype=torch.float32)
        used = torch.zeros(n, device=dev, dtype=torch.long)  # uniforms rows consumed in this block
        q_pos = block_pos if pending is None else torch.cat([pending[1], block_pos], 1)
        keys = torch.cat([k_pos, q_pos], 1)
        valid = torch.cat([k_valid, torch.ones_like(q_pos, dtype=torch.bool)], 1)
        mask = attention_mask(q_pos, torch.zeros_like(q_pos), keys, torch.zeros_like(keys), b, valid)
        while bool(masked.any()):
            q_ids = cur if pending is None else torch.cat([pending[0], cur], 1)
            hidden = self._forward(q_ids, q_pos, mask, cache)
            cache.crop(-b)  # the current block's KV changes at the next step; earlier blocks stay
            if pending is not None:  # committed: later forwards query the current block alone
                pending, q_pos, mask = None, block_pos, mask[:, b:]
            need = masked.any(1)
            if bool(need.all()):  # the common case: skip the row gathers
                rows_idx, p, hid = slice(None), params, hidden[:, -b:]
            else:
                rows_idx = need.nonzero().squeeze(1)
                p, hid = params.select(rows_idx), hidden[rows_idx, -b:]
            u = uniforms[torch.arange(n, device=dev)[rows_idx], used[rows_idx]]
            tok, conf, lp = sample_block(self.model.lm_head(hid), u, p.temperature, p.top_k, p.top_p)
            sel = torch.zeros_like(masked)
            sel[rows_idx] = select_unmask(conf, masked[rows_idx], p.strategy, p.threshold, p.per_step)
            counter += need
            used += need
            steps = torch.where(sel, counter[:, None], steps)
            cur[rows_idx] = torch.where(sel[rows_idx], tok, cur[rows_idx])
            logps[rows_idx] = torch.where(sel[rows_idx], lp, logps[rows_idx])
            masked &= ~sel
        return cur, given, steps, logps

    def _prefill(self, rows: list[Row], full_blocks: Tensor, b: int, cache) -> tuple[Tensor, Tensor]:
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
        self._forward(ids, pos, square_mask(pos, torch.zeros_like(pos), b, valid), cache)
        return pos, valid
