"""SDAR adapter: config translation against the real SDAR-8B-Chat files, tiny tokenizer, save/load round trip."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen3ForCausalLM

from shared.model.sdar import (
    DiffusionSpec,
    count_parameters,
    load_model,
    load_tokenizer,
    read_config,
    resolve_mask_token_id,
    save_model,
    translate_config,
)
from shared.model.tiny import TINY_SPECIAL_TOKENS, build_tiny_tokenizer, init_tiny, tiny_config

SDAR_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/sdar-8b-chat"
SDAR_MASK_ID = 151669


def _sdar_dir() -> Path:
    if not (SDAR_DIR / "config.json").is_file():
        pytest.skip(f"SDAR-8B-Chat config/tokenizer files absent: {SDAR_DIR}")
    return SDAR_DIR


@pytest.fixture(scope="module")
def sdar_tokenizer():
    return load_tokenizer(_sdar_dir())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return init_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


def _expected_sdar_names(num_layers: int) -> set[str]:
    """The parameter names of SDAR's model.safetensors.index.json (lmdeploy_sdar.md 2.1)."""
    per_layer = [
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        *(f"self_attn.{p}_proj.weight" for p in "qkvo"),
        "self_attn.q_norm.weight",
        "self_attn.k_norm.weight",
        *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    ]
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    names |= {f"model.layers.{i}.{p}" for i in range(num_layers) for p in per_layer}
    return names


# --------------------------------------------------------------------------- real SDAR-8B-Chat files


def test_translate_real_sdar_config():
    raw = read_config(_sdar_dir())
    config, spec = translate_config(raw)
    assert config.model_type == "qwen3"
    assert (config.hidden_size, config.intermediate_size) == (4096, 12288)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (36, 32, 8)
    assert config.head_dim == 128
    assert config.vocab_size == 151936
    assert config.rope_parameters["rope_theta"] == 1e6
    assert config.rope_parameters["rope_type"] == "default"
    assert config.rms_norm_eps == 1e-6
    assert config.tie_word_embeddings is False
    assert config.attention_bias is False
    assert spec == DiffusionSpec(block_size=4, mask_token_id=SDAR_MASK_ID)
    # the SDAR extras must not leak into the Qwen3 config
    for key in ("auto_map", "fuse_cross_entropy", "micro_forward", "block_size", "mask_token_id", "debug"):
        assert not hasattr(config, key), key
    assert config._attn_implementation != "flex_attention"


def test_real_sdar_parameter_names_match_checkpoint_layout():
    config, _ = translate_config(read_config(_sdar_dir()))
    with torch.device("meta"):  # 8B parameters, zero bytes
        model = Qwen3ForCausalLM(config)
    assert {name for name, _ in model.named_parameters()} == _expected_sdar_names(36)
    assert model.lm_head.weight.shape == (151936, 4096)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (8 * 128, 4096)


def test_real_sdar_tokenizer_mask_token(sdar_tokenizer):
    raw = read_config(_sdar_dir())
    assert sdar_tokenizer.mask_token == "<|MASK|>"
    assert sdar_tokenizer.convert_tokens_to_ids("<|MASK|>") == SDAR_MASK_ID
    assert sdar_tokenizer.encode("<|MASK|>", add_special_tokens=False) == [SDAR_MASK_ID]
    assert sdar_tokenizer.eos_token_id == 151643
    assert resolve_mask_token_id(raw) == SDAR_MASK_ID
    without = {k: v for k, v in raw.items() if k not in ("mask_token_id", "block_size")}
    assert resolve_mask_token_id(without, sdar_tokenizer) == SDAR_MASK_ID
    _, spec = translate_config(without, sdar_tokenizer)  # Hub configs may lack both keys
    assert spec == DiffusionSpec(block_size=4, mask_token_id=SDAR_MASK_ID)


def test_real_sdar_chat_template(sdar_tokenizer):
    text = sdar_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


# --------------------------------------------------------------------------- translation edge cases


def _vocab_only(vocab: dict[str, int]) -> SimpleNamespace:
    """A tokenizer that names no mask token; it only has one in its vocabulary (e.g. SDAR's `<MASK>` spelling)."""
    return SimpleNamespace(mask_token_id=None, get_vocab=lambda: vocab)


def test_resolve_mask_token_id_order():
    assert resolve_mask_token_id({"mask_token_id": 5}, _vocab_only({"<|MASK|>": 9})) == 5
    assert resolve_mask_token_id({}, _vocab_only({"a": 0, "<MASK>": 7})) == 7
    assert resolve_mask_token_id({}, _vocab_only({"<MASK>": 7, "<|MASK|>": 8})) == 8
    with pytest.raises(ValueError, match="mask token id"):
        resolve_mask_token_id({}, _vocab_only({"a": 0}))
    with pytest.raises(ValueError, match="mask token id"):
        resolve_mask_token_id({})


def test_translate_rejects_other_model_types():
    with pytest.raises(ValueError, match=r"model_type 'llama'.*sdar.*qwen3"):
        translate_config({"model_type": "llama", "mask_token_id": 1})
    with pytest.raises(ValueError, match="model_type None"):
        translate_config({"mask_token_id": 1})


def test_translate_defaults_block_size_with_warning(caplog):
    with caplog.at_level("WARNING", logger="shared.model.sdar"):
        _, spec = translate_config({"model_type": "qwen3", "vocab_size": 64, "mask_token_id": 3}, default_block_size=8)
    assert spec == DiffusionSpec(block_size=8, mask_token_id=3)
    assert "block_size" in caplog.text


def test_translate_legacy_rope_scaling():
    raw = {
        "model_type": "sdar",
        "mask_token_id": 1,
        "rope_theta": 5e5,
        "rope_scaling": {"type": "linear", "factor": 2.0},
    }
    config, _ = translate_config(raw)
    assert config.rope_parameters == {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}


# --------------------------------------------------------------------------- tiny tokenizer


def test_tiny_tokenizer_round_trips_text():
    tok = build_tiny_tokenizer()
    for text in ["Q: 12+7=?\nA: \\boxed{19}", "  leading spaces\ttab\r\n", "héllo wörld 😀 ∑", "<|MASK|> in text"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.encode("12+7", add_special_tokens=False) == [ord(c) for c in "12+7"]


def test_tiny_tokenizer_special_tokens():
    tok = build_tiny_tokenizer()
    ids = [tok.convert_tokens_to_ids(t) for t in TINY_SPECIAL_TOKENS]
    assert ids == [256, 257, 258, 259]
    for token, token_id in zip(TINY_SPECIAL_TOKENS, ids, strict=True):
        assert tok.encode(token, add_special_tokens=False) == [token_id]
    assert tok.mask_token == "<|MASK|>"
    assert tok.mask_token_id == ids[3]
    assert tok.eos_token_id == tok.pad_token_id == ids[0]
    assert len(tok) == 260


def test_tiny_chat_template():
    tok = build_tiny_tokenizer()
    messages = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    convo = messages + [{"role": "assistant", "content": "\\boxed{1}"}]
    assert tok.apply_chat_template(convo, tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n\\boxed{1}<|im_end|>\n"
    )


def test_tiny_config_defaults():
    config = tiny_config(260)
    assert config.vocab_size == 320
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (128, 4, 32)
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert tiny_config(64, num_hidden_layers=2, rope_theta=500.0).rope_parameters["rope_theta"] == 500.0


# --------------------------------------------------------------------------- save / load


def test_init_tiny_writes_sdar_layout(tiny_dir):
    files = {p.name for p in tiny_dir.iterdir()}
    assert "model.safetensors" in files
    assert not any(name.endswith(".bin") for name in files)
    assert [p.name for p in tiny_dir.parent.iterdir()] == ["tiny"]  # the staging directory is gone
    raw = json.loads((tiny_dir / "config.json").read_text())
    assert raw["model_type"] == "sdar"
    assert raw["architectures"] == ["SDARForCausalLM"]
    assert (raw["block_size"], raw["mask_token_id"]) == (4, 259)
    assert raw["rope_theta"] == 10000.0
    assert raw["head_dim"] == 32
    assert "auto_map" not in raw
    assert "auto_map" not in json.loads((tiny_dir / "tokenizer_config.json").read_text())


def test_saved_config_translates_back(tiny_dir):
    tok = build_tiny_tokenizer()
    config, spec = translate_config(read_config(tiny_dir))
    expected = tiny_config(len(tok), bos_token_id=256, eos_token_id=256, pad_token_id=256)
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rope_parameters",
        "rms_norm_eps",
        "tie_word_embeddings",
        "attention_bias",
        "eos_token_id",
        "pad_token_id",
    ):
        assert getattr(config, key) == getattr(expected, key), key
    assert spec == DiffusionSpec(4, 259)


def test_save_load_identical_logits(tiny_dir, tmp_path):
    first = load_model(tiny_dir)
    assert not first.model.training
    assert first.spec == DiffusionSpec(4, 259)
    assert first.model.config._attn_implementation == "sdpa"
    assert count_parameters(first.model) > 0
    ids = torch.randint(0, 260, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = first.model(ids).logits
    copy = save_model(first.model, first.tokenizer, first.spec, tmp_path / "a" / "b")
    second = load_model(copy)
    with torch.no_grad():
        after = second.model(ids).logits
    assert before.shape == (2, 12, 320)
    assert torch.equal(before, after)
    assert second.tokenizer.encode("Q: 1+1=") == first.tokenizer.encode("Q: 1+1=")


def test_init_tiny_is_seeded(tmp_path):
    a = load_model(init_tiny(tmp_path / "a", seed=3, num_hidden_layers=1)).model
    b = load_model(init_tiny(tmp_path / "b", seed=3, num_hidden_layers=1)).model
    c = load_model(init_tiny(tmp_path / "c", seed=4, num_hidden_layers=1)).model
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_load_refuses_pickled_weights(tiny_dir, tmp_path):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    # not a valid pickle either: the error must come before anything tries to open it
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"pickled.*pytorch_model\.bin"):
        load_model(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(tmp_path)
    # config + tokenizer alone still translate
    _, spec = translate_config(read_config(tmp_path), load_tokenizer(tmp_path))
    assert spec == DiffusionSpec(4, 259)


def test_a_checkpoint_missing_a_tensor_is_refused_not_filled_with_random_values(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from shared.model.sdar import load_model
    from shared.model.tiny import init_tiny

    src = init_tiny(tmp_path / "tiny", seed=0)
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    [weights] = broken.glob("*.safetensors")
    tensors = load_file(weights)
    dropped = next(k for k in tensors if "layers.0.mlp" in k)
    del tensors[dropped]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing"):
        load_model(broken)
