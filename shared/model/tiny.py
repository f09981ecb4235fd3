"""The offline `tiny` preset: a byte-level tokenizer with a mask token and a small Qwen3 config (docs/design.md section 2).

Nothing is downloaded: the tokenizer is built with the `tokenizers` library and the weights are random.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from shared.model.sdar import DiffusionSpec, save_model

TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>"]
TINY_MAX_LENGTH = 2048

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""Qwen's ChatML without system-prompt defaults or <think> handling."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of the ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 260-token byte-level tokenizer: token id = byte value (0..255), then the 4 special tokens (256..259).

    An empty merge list makes every byte its own token, so any UTF-8 text round-trips exactly and digits stay
    single tokens (what the arithmetic demo wants).
    """
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # no regex split: with no merges it would only cost time
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        mask_token="<|MASK|>",
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=TINY_MAX_LENGTH,
    )


def tiny_config(vocab_size: int, **overrides: Any) -> Qwen3Config:
    """A 4-layer, hidden-128 Qwen3 config (~1M parameters with the tiny tokenizer).

    Args:
        vocab_size: tokenizer length; rounded up to a multiple of 64 (the spare rows are never sampled
            in practice and keep matmuls aligned, as real checkpoints do).
        overrides: any Qwen3Config field; `rope_theta` is accepted and folded into `rope_parameters`.
    """
    rope_theta = float(overrides.pop("rope_theta", 10000.0))
    fields: dict[str, Any] = {
        "vocab_size": -(-vocab_size // 64) * 64,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": TINY_MAX_LENGTH,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "attention_bias": False,
    }
    fields.update(overrides)
    return Qwen3Config(**fields)


def init_tiny(out: str | Path, *, seed: int = 0, block_size: int = 4, **config_overrides: Any) -> Path:
    """Build a randomly initialised tiny SDAR checkpoint (fp32) and save it to `out` in SDAR layout.

    Args:
        out: checkpoint directory (created).
        seed: torch seed for the initial weights; the same seed gives the same weights.
        block_size: the diffusion block length recorded in config.json.
        config_overrides: passed to `tiny_config` (`vocab_size` below the tokenizer's length is raised to it).
    """
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    eos = tokenizer.eos_token_id
    config_overrides = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos, **config_overrides}
    # a larger vocab_size leaves the rows past the tokenizer unused (benchmarks size the LM head like a real model's)
    vocab = max(len(tokenizer), int(config_overrides.pop("vocab_size", 0)))
    config = tiny_config(vocab, **config_overrides)
    config._attn_implementation = "sdpa"
    model = Qwen3ForCausalLM(config).to(torch.float32)
    spec = DiffusionSpec(block_size=block_size, mask_token_id=tokenizer.mask_token_id)
    return save_model(model, tokenizer, spec, out)


# --------------------------------------------------------------------------- tiny-sdar (LMDeploy GPU checks)

TINY_SDAR_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
}
"""Sizes LMDeploy's Triton kernels accept: head_dim a power of two (64), heads a multiple of the KV heads."""


def init_tiny_sdar(
    out: str | Path,
    *,
    seed: int = 0,
    block_size: int = 4,
    tokenizer_dir: str | Path | None = None,
    **config_overrides: Any,
) -> Path:
    """A randomly initialised tiny SDAR checkpoint that LMDeploy's dLLM engine can serve; built offline.

    Two tokenizers:
      * default: the byte-level tiny tokenizer (vocab 320, `<|MASK|>` = 259). LMDeploy hard-codes SDAR's mask
        id 151669; our LMDeploy patch makes it read `mask_token_id` from config.json instead.
      * `tokenizer_dir`: a real SDAR/Qwen tokenizer directory (e.g. ../shared/data/sdar-8b-chat: vocab.json,
        merges.txt, tokenizer_config.json), loaded from local files without remote code. The vocabulary is
        SDAR's 151936 rows with `<|MASK|>` = 151669, which LMDeploy serves unpatched; embeddings are tied to
        keep the checkpoint small (~40 MB fp32).

    Args:
        out: checkpoint directory (created).
        seed: torch seed for the initial weights.
        block_size: the diffusion block length recorded in config.json.
        config_overrides: any Qwen3Config field (on top of `TINY_SDAR_CONFIG`).
    """
    from shared.model.sdar import load_tokenizer, resolve_mask_token_id

    torch.manual_seed(seed)
    fields: dict[str, Any] = dict(TINY_SDAR_CONFIG)
    if tokenizer_dir is None:
        tokenizer = build_tiny_tokenizer()
        vocab = len(tokenizer)
    else:
        tokenizer = load_tokenizer(tokenizer_dir)
        vocab = max(151936, len(tokenizer))
        fields["tie_word_embeddings"] = True
    eos = tokenizer.eos_token_id
    fields.update(bos_token_id=eos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id or eos)
    fields.update(config_overrides)
    config = tiny_config(vocab, **fields)
    config._attn_implementation = "sdpa"
    model = Qwen3ForCausalLM(config).to(torch.float32)
    spec = DiffusionSpec(block_size=block_size, mask_token_id=resolve_mask_token_id({}, tokenizer))
    return save_model(model, tokenizer, spec, out)
