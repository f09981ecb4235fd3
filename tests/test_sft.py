"""SFT data: formats, errors naming the line, block padding, masking, the step order."""

import doctest
import json

import pytest
import torch

import services.trainer.learner.sft as sft_mod
import services.trainer.learner.trajectory as traj_mod
from services.trainer.learner.sft import (
    DataError,
    batch_indices,
    encode_example,
    pad_to_block,
    random_mask_item,
    trace_item,
)
from services.trainer.learner.trainer import step_generator
from shared.data import read_jsonl


@pytest.mark.parametrize("module", [sft_mod, traj_mod])
def test_doctests(module):
    assert doctest.testmod(module).failed == 0


def test_prompt_response_and_messages_rows_encode_the_same(tiny):
    tok = tiny.tokenizer
    a = encode_example({"prompt": "1+1=", "response": "2"}, tok, True, "x")
    b = encode_example({"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]},
                       tok, True, "x")  # fmt: skip
    assert a == b
    prompt, response = a
    assert tok.decode(prompt) == "<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n"
    assert response == tok("2", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    raw_prompt, raw_response = encode_example({"prompt": "1+1=", "response": "2"}, tok, False, "x")
    assert raw_prompt == tok("1+1=", add_special_tokens=False)["input_ids"]  # the text's own ids, no BOS
    assert raw_response == tok("2", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_bad_rows_name_file_line_and_field(tmp_path, tiny):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n\nnot json\n')
    with pytest.raises(DataError, match=r"d.jsonl:3"):
        read_jsonl(f)
    with pytest.raises(DataError, match="needs 'prompt' and 'response'"):
        encode_example({"question": "q"}, tiny.tokenizer, True, "d.jsonl:1")
    with pytest.raises(DataError, match="assistant"):
        encode_example({"messages": [{"role": "user", "content": "q"}]}, tiny.tokenizer, True, "d.jsonl:1")
    with pytest.raises(DataError, match="assistant"):
        encode_example({"messages": ["q", {"role": "assistant", "content": "a"}]}, tiny.tokenizer, True, "x")
    with pytest.raises(DataError, match="rollout"):
        trace_item({"step_map": [1]}, 1, "d.jsonl:2")


def test_pad_to_block_fills_the_last_block_with_the_end_token():
    assert pad_to_block(3, [7, 8], 4, 0) == [7, 8, 0, 0, 0]
    assert pad_to_block(2, [7, 8], 4, 0) == [7, 8]


def test_random_mask_masks_only_response_and_at_least_one():
    for seed in range(20):
        item = random_mask_item([1, 2, 3], [4, 5, 6, 7, 8], 4, step_generator(seed, 0, 0), eps=1e-3)
        rnd = item.trajectory.rounds[0]
        assert not rnd.masked[:3].any() and rnd.masked.sum() >= 1
        assert torch.equal(rnd.masked, rnd.targets) and item.token_scale >= 1.0


def test_batch_indices_are_epochs_of_permutations_and_pure():
    first = [i for s in range(5) for i in batch_indices(10, 2, s, seed=3)]
    assert sorted(first) == list(range(10))  # one epoch = every row once
    assert batch_indices(10, 2, 7, seed=3) == batch_indices(10, 2, 7, seed=3)


def test_trace_rows_round_trip_a_rollout(tiny):
    from services.rollout.engines.torch_engine import TorchEngine
    from shared.contracts.wire import GenerationRequest, SamplingParams

    ((r,),) = TorchEngine(tiny).generate(
        [GenerationRequest(prompt_ids=[5, 6, 7], params=SamplingParams(seed=1, max_new_tokens=6))]
    )
    item = trace_item(json.loads(r.model_dump_json()), 1, "x")
    assert item.trajectory.target_count == len(r.token_ids)
