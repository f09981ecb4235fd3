"""The torch engine at its limits: cancellation at block boundaries, and numerical settings at the edge of what the
contract accepts (vanishing temperature and top-p, top-k past the vocabulary), which must decode, not crash."""

import math
import threading
import time

import pytest

from services.rollout.engines import GenerationCancelled
from services.rollout.engines.sampling import MIN_TEMPERATURE
from services.rollout.engines.torch_engine import TorchEngine
from shared.contracts.wire import MAX_ID, GenerationRequest, Rollout, SamplingParams

B = 4


def _one(engine: TorchEngine, **params) -> Rollout:
    p = SamplingParams(seed=3, max_new_tokens=12, stop_token_ids=[], logprobs=True, **params)
    ((r,),) = engine.generate([GenerationRequest(prompt_ids=[5, 6, 7, 8, 9], params=p)])
    return r


def _trajectory(r: Rollout) -> tuple:
    return r.token_ids, r.step_map, r.tail_ids, r.tail_steps, r.finish_reason


def test_cancel_set_before_decoding_raises_before_any_forward(tiny):
    engine = TorchEngine(tiny)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(GenerationCancelled):
        engine.generate([GenerationRequest(prompt_ids=[1, 2, 3, 4, 5])], cancel=cancel)
    assert engine.stats.forwards == 0


def test_cancel_set_from_another_thread_stops_within_one_block(tiny):
    """The event is set while the engine decodes; it finishes the block in hand (at most B denoising forwards, the
    clean block's commit rides on the next block's first forward) and raises at the boundary."""
    engine = TorchEngine(tiny, max_batch_size=2)
    reqs = [
        GenerationRequest(
            prompt_ids=[1, 2, 3, 4, 5], params=SamplingParams(seed=s, max_new_tokens=1500, stop_token_ids=[])
        )
        for s in range(4)  # two chunks of two rows
    ]
    cancel = threading.Event()
    seen: dict[str, int] = {}

    def watch() -> None:
        while engine.stats.forwards < 3 * B:  # past the first block of the first chunk
            time.sleep(0.0005)
        cancel.set()
        seen["set_by"] = engine.stats.forwards  # read after set: at least the count when it was set

    watcher = threading.Thread(target=watch)
    watcher.start()
    with pytest.raises(GenerationCancelled):
        engine.generate(reqs, cancel=cancel)
    watcher.join()
    assert engine.stats.forwards - seen["set_by"] <= B
    assert engine.stats.tokens == 0  # nothing finished, nothing returned
    # the engine serves on, with the rollouts of a fresh engine
    short = [GenerationRequest(prompt_ids=[1, 2, 3, 4, 5], params=SamplingParams(seed=0, max_new_tokens=10))]
    fresh = TorchEngine(tiny).generate(short)[0][0]
    assert _trajectory(engine.generate(short, cancel=threading.Event())[0][0]) == _trajectory(fresh)


def test_an_unset_event_changes_nothing(tiny):
    engine = TorchEngine(tiny)
    reqs = [GenerationRequest(prompt_ids=[1, 2, 3], params=SamplingParams(seed=9, n=2, max_new_tokens=9))]
    plain, watched = engine.generate(reqs), engine.generate(reqs, cancel=threading.Event())
    assert [_trajectory(r) for r in plain[0]] == [_trajectory(r) for r in watched[0]]


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-45, 1e-30, MIN_TEMPERATURE / 2])
def test_vanishing_temperature_is_greedy(tiny, temperature):
    """Below MIN_TEMPERATURE the engine decodes as T = 0 and says so in the rollout (1e-45 overflowed logits / T to
    inf and crashed the engine; 1e-300 became 0 in float32 while the rollout claimed 1e-300)."""
    engine = TorchEngine(tiny)
    r, greedy = _one(engine, temperature=temperature), _one(engine, temperature=0.0)
    assert _trajectory(r) == _trajectory(greedy)
    assert r.params.temperature == 0.0 and r.logprobs == [0.0] * len(r.token_ids)
    Rollout.model_validate_json(r.model_dump_json())  # finite all through: serialisable


def test_temperature_at_the_floor_samples_with_finite_log_probs(tiny):
    r = _one(TorchEngine(tiny), temperature=MIN_TEMPERATURE)
    assert r.params.temperature == MIN_TEMPERATURE
    assert all(math.isfinite(x) and x <= 0 for x in r.logprobs)


@pytest.mark.parametrize("top_p", [1e-300, 5e-324, 1e-40])
def test_vanishing_top_p_keeps_the_most_likely_token(tiny, top_p):
    """Top-p -> 0 keeps the argmax alone, and the confidence is taken before top-p, at T = 1: exactly greedy
    decoding's tokens and steps, each token with probability 1 under the filtered distribution (log-prob 0)."""
    engine = TorchEngine(tiny)
    r, greedy = _one(engine, top_p=top_p), _one(engine, temperature=0.0)
    assert _trajectory(r) == _trajectory(greedy)
    assert r.logprobs == [0.0] * len(r.token_ids)


def test_top_k_one_is_greedy_and_past_the_vocabulary_is_off(tiny):
    engine = TorchEngine(tiny)
    greedy, unfiltered = _one(engine, temperature=0.0), _one(engine)
    assert _trajectory(_one(engine, top_k=1)) == _trajectory(greedy)  # same argmax, same confidence (T = 1)
    vocab = tiny.model.config.vocab_size
    for top_k in (vocab, vocab + 1, MAX_ID):  # the contract's largest id, far past any vocabulary
        r = _one(engine, top_k=top_k)
        assert r.params.top_k == 0 and _trajectory(r) == _trajectory(unfiltered)
        assert r.logprobs == unfiltered.logprobs


def test_highest_temperature_decodes(tiny):
    r = _one(TorchEngine(tiny), temperature=100.0)
    assert all(math.isfinite(x) and x <= 0 for x in r.logprobs)
