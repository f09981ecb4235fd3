"""The reference decoder (`gtpo eval --engines reference`): one request at a time, no KV cache, the whole sequence
recomputed at every denoising step.

It is the baseline the cached, batched engine is checked against (same seeds: identical tokens and step maps) and
benchmarked against. It shares the pure per-step maths (sampling.py) and the row handling (rows.py) with it,
none of the decoding.
"""

from __future__ import annotations

import torch

from services.rollout.engines.rows import Row, build_rollout, default_stop_ids, expand_rows
from services.rollout.engines.sampling import block_uniforms, cut_response, sample_block, select_unmask, strategy_codes
from services.rollout.engines.torch_engine import DecodeStats
from shared.contracts.wire import GenerationRequest, Rollout
from shared.model.masks import block_causal_mask, to_additive
from shared.model.sdar import LoadedModel


@torch.inference_mode()
def naive_decode(loaded: LoadedModel, row: Row, stats: DecodeStats | None = None) -> Rollout:
    """Decode one row by recomputing prompt + every earlier block + the current block at each step."""
    model, p = loaded.model, row.params
    b, mask_id, dev = p.block_size, loaded.spec.mask_token_id, next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    full = len(row.prompt) // b * b
    seq = list(row.prompt[:full])
    tail = list(row.prompt[full:])
    scalar = {
        "temperature": torch.tensor([p.temperature], device=dev),
        "top_k": torch.tensor([p.top_k], device=dev),
        "top_p": torch.tensor([p.top_p], device=dev),
    }
    while True:
        cur = tail + [mask_id] * (b - len(tail))
        masked = torch.tensor([[i >= len(tail) for i in range(b)]], device=dev)
        steps, logps = [0] * b, [0.0] * b
        uniforms, s = block_uniforms(row.generator, b).to(dev), 0
        while bool(masked.any()):
            ids = torch.tensor([seq + cur], device=dev)
            mask = block_causal_mask(ids.shape[1], b).to(dev)[None]
            hidden = model.model(input_ids=ids, attention_mask=to_additive(mask, dtype), use_cache=False)
            if stats is not None:
                stats.forwards += 1
            logits = model.lm_head(hidden.last_hidden_state[:, -b:])
            tok, conf, lp = sample_block(logits, uniforms[s][None], **scalar)
            s += 1
            sel = select_unmask(
                conf,
                masked,
                strategy_codes([p.strategy], dev),
                torch.tensor([p.confidence_threshold], device=dev),
                torch.tensor([p.tokens_per_step()], device=dev),
            )
            row.step += 1
            for i in sel[0].nonzero().squeeze(1).tolist():
                cur[i], steps[i], logps[i] = int(tok[0, i]), row.step, float(lp[0, i])
            masked &= ~sel
        seq += cur
        row.tokens += cur[len(tail) :]
        row.steps += steps[len(tail) :]
        row.logprobs += logps[len(tail) :]
        tail = []
        length, reason = cut_response(row.tokens, p.max_new_tokens, p.stop_token_ids)
        if reason:
            if stats is not None:
                stats.tokens += length
            return build_rollout(row, length, reason, loaded.tokenizer, version=0)


def naive_generate(loaded: LoadedModel, requests: list[GenerationRequest], stats: DecodeStats | None = None):
    """Same contract as ``Engine.generate``, one sample at a time."""
    vocab = loaded.model.config.vocab_size
    rows = expand_rows(requests, loaded.spec.block_size, default_stop_ids(loaded.tokenizer), vocab)
    out: list[list[Rollout]] = [[] for _ in requests]
    for row in rows:
        out[row.request_index].append(naive_decode(loaded, row, stats))
    return out


class NaiveEngine:
    """`naive_generate` behind the engine interface `gtpo eval` uses: `--engines torch,reference`, the CPU parity
    baseline of the cached engine."""

    name = "reference"

    def __init__(self, loaded) -> None:
        self.loaded, self.stats = loaded, DecodeStats()

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def generate(self, requests: list[GenerationRequest]) -> list[list[Rollout]]:
        return naive_generate(self.loaded, requests, self.stats)


__all__ = ["NaiveEngine", "naive_decode", "naive_generate"]
