"""The optimised per-step decoding loop of the torch engine against a frozen copy of the old one
(tests/oracles/engine_reference.py): the same tokens, step maps, tails and log-probs, bit for bit, and the same
number of forwards, over strategies, filters, stop tokens, prompt lengths and batches (issue 32 item 20)."""

import pytest
import torch
from oracles.engine_reference import ReferenceEngine

from services.rollout.engines.torch_engine import TorchEngine
from shared.contracts.wire import GenerationRequest, SamplingParams

B = 4

SETTINGS = {
    "dynamic": {},
    "dynamic-low-threshold": {"confidence_threshold": 0.02},
    "static": {"strategy": "low_confidence_static", "denoising_steps": 2},
    "static-one-per-step": {"strategy": "low_confidence_static", "denoising_steps": B},
    "sequential": {"strategy": "sequential"},
    "filtered": {"temperature": 0.7, "top_k": 20, "top_p": 0.9},
    "greedy": {"temperature": 0.0},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: a second intra-op thread only spins on a shared machine (10x slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _requests(
    seed: int, lengths: list[int], n: int, stops: list[int], max_new: int, **params
) -> list[GenerationRequest]:
    gen = torch.Generator().manual_seed(seed)
    return [
        GenerationRequest(
            prompt_ids=torch.randint(0, 250, (length,), generator=gen).tolist(),
            params=SamplingParams(
                seed=seed * 100 + i, n=n, max_new_tokens=max_new + i % 3, stop_token_ids=stops, logprobs=True, **params
            ),
        )
        for i, length in enumerate(lengths)
    ]


def _fields(out) -> list[list[tuple]]:
    return [
        [
            (r.token_ids, r.step_map, r.tail_ids, r.tail_steps, r.logprobs, r.finish_reason, r.seed, r.text)
            for r in group
        ]
        for group in out
    ]


def _check(loaded, reqs, max_batch_size: int = 32) -> None:
    new, old = (
        TorchEngine(loaded, max_batch_size=max_batch_size),
        ReferenceEngine(loaded, max_batch_size=max_batch_size),
    )
    got, want = new.generate(reqs), old.generate(reqs)
    assert _fields(got) == _fields(want)  # logprobs compared as floats with ==: bit-identical
    assert new.stats == old.stats  # same forwards, same returned tokens


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("model", ["tiny", "sharp"])
def test_batched_rows_match_the_frozen_loop(request, model, setting):
    """Batches of prompts of every length mod B (tails in the first block), two samples each, one token in seven a
    stop: rows finish at different blocks and, with the sharp model, at different steps of a block."""
    loaded = request.getfixturevalue(model)
    stops = list(range(3, loaded.model.config.vocab_size, 7))
    for seed in (1, 2):
        _check(loaded, _requests(seed, [1, 3, 4, 6, 9, 14], 2, stops, 10, **SETTINGS[setting]))


@pytest.mark.parametrize("model", ["tiny", "sharp"])
def test_batch_of_one_without_stops_matches_the_frozen_loop(request, model):
    """The benchmark's case: one long-prompt row decoding many blocks, no stop token."""
    loaded = request.getfixturevalue(model)
    for seed in (3, 4):
        _check(loaded, _requests(seed, [37], 1, [], 41))


def test_chunks_and_mixed_settings_match_the_frozen_loop(sharp):
    """Rows with different strategies and filters in one batch, split into chunks of 3."""
    stops = list(range(0, 320, 5))
    reqs = []
    for i, setting in enumerate(SETTINGS.values()):
        reqs += _requests(10 + i, [2 + 3 * i], 1 + i % 2, stops, 9, **setting)
    _check(sharp, reqs, max_batch_size=3)


def test_rope_and_additive_mask_are_computed_once_per_query_set(tiny, monkeypatch):
    """A block's forwards share positions and mask: the rope is computed by the prefill, the block's first forward
    (which also commits the previous block) and its second, not at every denoising step."""
    engine = TorchEngine(tiny)
    rotary = engine.model.model.rotary_emb
    calls = []
    original = rotary.forward
    monkeypatch.setattr(rotary, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    (((r,),)) = engine.generate(_requests(5, [9], 1, [], 16))  # random weights: one token per step
    blocks = len(r.token_ids + r.tail_ids) // B + 1  # the prompt tail's block and the whole ones after it
    assert engine.stats.forwards > 3 * blocks
    assert len(calls) <= 1 + 2 * blocks
