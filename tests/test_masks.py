"""Masks against hand-derived matrices (B=2, a 3-token prompt: not a block multiple)."""

import warnings

import torch
from oracles.per_round import per_round_layout

from shared.model.masks import (
    block_causal_mask,
    flex_block_mask,
    generation_start,
    packed_layout,
    square_mask,
    to_additive,
)

MASK = 99


def _grid(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in r.replace(" ", "")] for r in rows])


def test_block_causal_inference_mask_by_hand():
    expected = _grid(
        [
            "11 00 00",
            "11 00 00",
            "11 11 00",
            "11 11 00",
            "11 11 11",
            "11 11 11",
        ]
    )
    assert torch.equal(block_causal_mask(6, 2), expected)


def test_block_causal_mask_with_offset_keeps_absolute_blocks():
    # positions 1..4 with B=2: blocks 0,1,1,2
    expected = _grid(["1000", "1110", "1110", "1111"])
    assert torch.equal(block_causal_mask(4, 2, offset=1), expected)


def test_generation_start_shares_block_with_prompt_tail():
    assert generation_start(3, 2) == 2
    assert generation_start(4, 2) == 4
    assert generation_start(5, 4) == 4
    assert generation_start(1, 4) == 0


def test_per_round_layout_by_hand():
    clean = torch.tensor([10, 11, 12, 20, 21, 22])  # prompt 10,11,12; response 20,21,22
    noisy = torch.tensor([10, 11, 12, MASK, 21, MASK])
    lay = per_round_layout(clean, noisy, prompt_len=3, block_size=2)
    # the noisy copy starts at the block holding the prompt tail (position 2)
    assert lay.input_ids.tolist() == [10, 11, 12, 20, 21, 22, 12, MASK, 21, MASK]
    assert lay.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5]
    assert lay.copy_ids.tolist() == [0] * 6 + [1] * 4
    expected = _grid(
        [
            "11 00 00  00 00",
            "11 00 00  00 00",
            "11 11 00  00 00",
            "11 11 00  00 00",
            "11 11 11  00 00",
            "11 11 11  00 00",
            "11 00 00  11 00",  # noisy block 1: clean block 0 + itself
            "11 00 00  11 00",
            "11 11 00  00 11",  # noisy block 2: clean blocks 0-1 + itself
            "11 11 00  00 11",
        ]
    )
    assert torch.equal(lay.bool_mask(2), expected)


def test_packed_layout_by_hand_with_partial_copy():
    clean = torch.tensor([10, 11, 12, 20, 21, 22])
    round1 = torch.tensor([10, 11, 12, MASK, MASK, MASK])
    round2 = torch.tensor([10, 11, 12, 20, 21, MASK])
    lay = packed_layout(clean, [round1, round2], 3, 2, blocks=[torch.tensor([1, 2]), torch.tensor([2])])
    assert lay.input_ids.tolist() == [10, 11, 12, 20, 21, 22, 12, MASK, MASK, MASK, 21, MASK]
    assert lay.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 4, 5]
    assert lay.copy_ids.tolist() == [0] * 6 + [1] * 4 + [2] * 2
    expected = _grid(
        [
            "11 00 00  00 00  00",
            "11 00 00  00 00  00",
            "11 11 00  00 00  00",
            "11 11 00  00 00  00",
            "11 11 11  00 00  00",
            "11 11 11  00 00  00",
            "11 00 00  11 00  00",
            "11 00 00  11 00  00",
            "11 11 00  00 11  00",
            "11 11 00  00 11  00",
            "11 11 00  00 00  11",  # copy 2 never sees copy 1
            "11 11 00  00 00  11",
        ]
    )
    assert torch.equal(lay.bool_mask(2), expected)


def test_sdar_sft_layout_noisy_first():
    # [x_t | x_0] with n=4, B=2 (SDAR training): noisy sees strictly earlier clean blocks and its own block
    pos = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    copies = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])
    expected = _grid(
        [
            "1100 0000",
            "1100 0000",
            "0011 1100",
            "0011 1100",
            "0000 1100",
            "0000 1100",
            "0000 1111",
            "0000 1111",
        ]
    )
    assert torch.equal(square_mask(pos, copies, 2), expected)


def test_padding_keys_hidden_and_padding_queries_see_only_themselves():
    pos = torch.tensor([[0, 0, 0, 1]])  # two left pads, then a 2-token block
    valid = torch.tensor([[False, False, True, True]])
    m = square_mask(pos, torch.zeros_like(pos), 2, valid)[0]
    assert torch.equal(m, _grid(["1000", "0100", "0011", "0011"]))


def test_additive_mask_values():
    m = block_causal_mask(4, 2)
    add = to_additive(m[None], torch.float32)
    assert add.shape == (1, 1, 4, 4)
    assert add[0, 0, 0, 1] == 0 and add[0, 0, 0, 2] == torch.finfo(torch.float32).min
    assert torch.equal(add[0, 0] == 0, m)
    lay = per_round_layout(torch.arange(6), torch.arange(6), 3, 2)
    assert torch.equal(lay.additive_mask(2, torch.bfloat16)[0, 0] == 0, lay.bool_mask(2))


def test_flex_block_mask_matches_dense_mask():
    from torch.nn.attention.flex_attention import flex_attention

    clean = torch.arange(20)
    lay = packed_layout(
        clean, [clean.clone(), clean.clone()], 7, 4, blocks=[torch.tensor([1, 2, 4]), torch.tensor([3])]
    )
    pos, copies = lay.position_ids[None], lay.copy_ids[None]
    valid = torch.ones_like(pos, dtype=torch.bool)
    valid[0, -1] = False
    q, k, v = (torch.randn(1, 2, pos.shape[1], 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex attention on CPU warns that it is unoptimised
        out = flex_attention(q, k, v, block_mask=flex_block_mask(pos, copies, 4, valid))
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=square_mask(pos, copies, 4, valid)[:, None]
    )
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
