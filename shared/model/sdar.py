"""The SDAR model adapter: SDAR checkpoints <-> `transformers.Qwen3ForCausalLM` (docs/design.md section 2).

SDAR is Qwen3 with a block-causal mask and un-shifted logits; its weights use Qwen3's parameter names, so
loading is a config translation (`model_type` "sdar" -> a `Qwen3Config` plus a `DiffusionSpec`) and saving
writes the SDAR layout back (model_type "sdar", `block_size`, `mask_token_id`, safetensors, tokenizer) so
that LMDeploy and transformers read what the trainer writes. Remote code is never executed and pickled
weights are never loaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import transformers

logger = logging.getLogger(__name__)

ALLOWED_MODEL_TYPES = ("sdar", "qwen3")
MASK_TOKEN_SPELLINGS = ("<|MASK|>", "<MASK>")
"""SDAR's tokenizer_config.json says `<|MASK|>`, its added_tokens.json says `<MASK>`: accept both."""

SDAR_EXTRA_KEYS: frozenset[str] = frozenset(
    {
        # identity and remote code: Qwen3Config sets its own, and we never run SDAR's modeling code
        "auto_map",
        "architectures",
        "model_type",
        "transformers_version",
        "_name_or_path",
        # training-kernel switches of SDAR's remote code; meaningless (or harmful) to Qwen3
        "attn_implementation",
        "_attn_implementation",
        "fuse_cross_entropy",
        "micro_forward",
        "skip_checkpoint",
        "ep_size",
        "use_deepep",
        "debug",
        # ours: they go into DiffusionSpec
        "block_size",
        "mask_token_id",
        # the load dtype is the caller's choice, not the file's
        "torch_dtype",
        "dtype",
    }
)
"""Keys of an SDAR config.json that `Qwen3Config` must not receive (it would keep them as attributes)."""

_LEGACY_ROPE_KEYS = ("rope_theta", "rope_scaling")
_GENERIC_HEAD_KEYS = (
    "id2label",
    "label2id",
    "problem_type",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
)
"""PretrainedConfig defaults for task heads and outputs: SDAR configs do not carry them, so neither do ours."""
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class DiffusionSpec:
    """What a block-diffusion model adds to Qwen3: the block length and the id of the mask token."""

    block_size: int
    mask_token_id: int

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.mask_token_id < 0:
            raise ValueError(f"mask_token_id must be >= 0, got {self.mask_token_id}")


@dataclass
class LoadedModel:
    """A model ready for the torch engine / trainer: weights, tokenizer and diffusion spec."""

    model: transformers.Qwen3ForCausalLM
    tokenizer: transformers.PreTrainedTokenizerBase
    spec: DiffusionSpec


# --------------------------------------------------------------------------- config translation


def resolve_mask_token_id(raw: dict[str, Any], tokenizer: Any = None) -> int:
    """The mask token id of a checkpoint.

    Args:
        raw: parsed config.json; its `mask_token_id` wins when present.
        tokenizer: optional; its `mask_token_id`, else the id of `<|MASK|>` / `<MASK>` in its vocabulary.

    Raises:
        ValueError: when neither source names a mask token.
    """
    if raw.get("mask_token_id") is not None:
        return int(raw["mask_token_id"])
    if tokenizer is not None:
        if getattr(tokenizer, "mask_token_id", None) is not None:
            return int(tokenizer.mask_token_id)
        # get_vocab includes added tokens; convert_tokens_to_ids would map an absent token to unk
        vocab = tokenizer.get_vocab()
        for spelling in MASK_TOKEN_SPELLINGS:
            if spelling in vocab:
                return int(vocab[spelling])
    where = "config.json and the tokenizer" if tokenizer is not None else "config.json (no tokenizer given)"
    raise ValueError(
        f"cannot find the mask token id: {where} name none; "
        f"set `mask_token_id` in config.json or give the tokenizer one of {list(MASK_TOKEN_SPELLINGS)}"
    )


def rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 `rope_parameters` from either 5.x (`rope_parameters`) or SDAR/4.x (`rope_theta`, `rope_scaling`)."""
    if raw.get("rope_parameters"):
        return dict(raw["rope_parameters"])
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(raw.get("rope_theta", 10000.0))}
    scaling = raw.get("rope_scaling")
    if scaling:
        scaling = dict(scaling)
        # 4.x spelled the type `type`
        params["rope_type"] = scaling.pop("rope_type", scaling.pop("type", "default"))
        params.update(scaling)
    return params


def translate_config(
    raw: dict[str, Any], tokenizer: Any = None, default_block_size: int = 4
) -> tuple[transformers.Qwen3Config, DiffusionSpec]:
    """An SDAR (or Qwen3) config.json -> the `Qwen3Config` that holds its weights, and its `DiffusionSpec`.

    Args:
        raw: parsed config.json with `model_type` "sdar" or "qwen3".
        tokenizer: used only when `raw` lacks `mask_token_id` (see `resolve_mask_token_id`).
        default_block_size: used, with a warning, when `raw` lacks `block_size` (Hub SDAR configs may).

    Raises:
        ValueError: for another model_type, or when no mask token id can be found.
    """
    from transformers import Qwen3Config

    model_type = raw.get("model_type")
    if model_type not in ALLOWED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}: expected one of {list(ALLOWED_MODEL_TYPES)}")
    block_size = raw.get("block_size")
    if block_size is None:
        logger.warning("config.json has no block_size; using default_block_size=%d", default_block_size)
        block_size = default_block_size
    spec = DiffusionSpec(block_size=int(block_size), mask_token_id=resolve_mask_token_id(raw, tokenizer))

    kwargs = {k: v for k, v in raw.items() if k not in SDAR_EXTRA_KEYS and k not in _LEGACY_ROPE_KEYS}
    kwargs["rope_parameters"] = rope_parameters(raw)
    config = Qwen3Config(**kwargs)
    if spec.mask_token_id >= config.vocab_size:
        raise ValueError(
            f"mask_token_id {spec.mask_token_id} is outside the vocabulary (vocab_size {config.vocab_size})"
        )
    return config, spec


def to_sdar_config(config: transformers.Qwen3Config, spec: DiffusionSpec) -> dict[str, Any]:
    """The config.json an SDAR checkpoint carries: every Qwen3 key, SDAR's identity and extras, no remote code.

    `rope_theta` / `rope_scaling` / `torch_dtype` are written top-level too, as SDAR (transformers 4.x) configs
    have them and LMDeploy reads them; `rope_parameters` / `dtype` stay for transformers 5.
    """
    d = config.to_dict()
    for key in ("_name_or_path", "auto_map", "attn_implementation", "_attn_implementation", *_GENERIC_HEAD_KEYS):
        d.pop(key, None)
    rope = dict(d.get("rope_parameters") or rope_parameters(d))
    d["rope_theta"] = rope.get("rope_theta", 10000.0)
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    d["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    dtype = d.get("dtype")
    if dtype is not None:
        d["dtype"] = d["torch_dtype"] = str(dtype).removeprefix("torch.")
    d.update(
        model_type="sdar",
        architectures=["SDARForCausalLM"],
        block_size=spec.block_size,
        mask_token_id=spec.mask_token_id,
    )
    return d


# --------------------------------------------------------------------------- loading


def read_config(path: str | Path) -> dict[str, Any]:
    """Parsed `path/config.json`."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    return json.loads(file.read_text())


def load_tokenizer(path: str | Path, config: transformers.PretrainedConfig | None = None) -> Any:
    """The tokenizer stored in `path`, from local files only, never running remote code.

    Passing a config stops AutoTokenizer from parsing config.json itself: for model_type "sdar" plus an
    `auto_map` it would otherwise ask on stdin whether to run SDAR's remote code (and block for 15 s on a tty).
    """
    from transformers import AutoTokenizer, Qwen3Config

    return AutoTokenizer.from_pretrained(
        str(path), config=config or Qwen3Config(), trust_remote_code=False, local_files_only=True
    )


def _check_weights(path: Path) -> None:
    """Refuse anything but safetensors weights; pickled .bin files are never opened."""
    if (path / WEIGHTS_NAME).is_file() or (path / WEIGHTS_INDEX_NAME).is_file():
        return
    pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if pickled:
        raise ValueError(
            f"{path} holds only pickled weights ({', '.join(pickled)}); refusing to unpickle them. "
            f"Convert them to safetensors ({WEIGHTS_NAME}) in a trusted environment first."
        )
    raise FileNotFoundError(f"no safetensors weights ({WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}) in {path}")


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Load an SDAR (or Qwen3) checkpoint directory as a `Qwen3ForCausalLM` in eval mode.

    Args:
        path: directory with config.json, safetensors weights and tokenizer files.
        dtype: parameter dtype (fp32 for CPU tests, bf16 on GPUs).
        device: where the weights go.
        attn_implementation: "sdpa" (any device), "eager", or "flex_attention" where available.

    Raises:
        ValueError: pickled-only weights, an unsupported model_type, no mask token, or tensors missing or of
            the wrong shape.
        FileNotFoundError: no config.json or no weights.
    """
    from transformers import Qwen3ForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    path = Path(path)
    raw = read_config(path)
    _check_weights(path)
    tokenizer = load_tokenizer(path)
    config, spec = translate_config(raw, tokenizer)
    model, info = Qwen3ForCausalLM.from_pretrained(
        str(path),
        config=config,
        dtype=dtype,
        # under DeepSpeed ZeRO-3 (its config active in this process) each rank loads only its partition
        **({} if is_deepspeed_zero3_enabled() else {"device_map": torch.device(device)}),
        attn_implementation=attn_implementation,
        use_safetensors=True,
        trust_remote_code=False,
        local_files_only=True,
        output_loading_info=True,
    )
    # transformers fills a missing tensor with random values and only logs it: a checkpoint that lacks weights is
    # a broken checkpoint, never a model to train or serve
    missing, mismatched = list(info.get("missing_keys") or []), list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        what = [f"missing {k}" for k in missing[:5]] + [f"wrong shape {m[0]}" for m in mismatched[:5]]
        raise ValueError(f"weights: {path} does not hold the model's tensors ({', '.join(what)})")
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec)


# --------------------------------------------------------------------------- saving


def _strip_tokenizer_auto_map(directory: Path) -> None:
    """A tokenizer loaded from SDAR's repo keeps its `auto_map` (pointing at a .py file we do not ship)."""
    file = directory / "tokenizer_config.json"
    if not file.is_file():
        return
    data = json.loads(file.read_text())
    if data.pop("auto_map", None) is not None:
        file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _publish(staging: Path, out: Path) -> None:
    """Move a finished checkpoint from `staging` into `out`, config.json last.

    Readers treat config.json as "checkpoint complete", so it is removed first and written last. Stale weight
    files are removed because LMDeploy globs every *.safetensors in the directory.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)
    new = {p.name for p in staging.iterdir()}
    for stale in [*out.glob("*.safetensors"), out / WEIGHTS_INDEX_NAME]:
        if stale.name not in new:
            stale.unlink(missing_ok=True)
    for name in sorted(new - {"config.json"}):
        os.replace(staging / name, out / name)
    os.replace(staging / "config.json", out / "config.json")


def save_model(
    model: Any, tokenizer: Any, spec: DiffusionSpec, out: str | Path, state_dict: dict[str, Any] | None = None
) -> Path:
    """Write `model` + `tokenizer` to `out` in SDAR layout; returns `out`. `state_dict` replaces the model's own
    weights (gathered sharded weights, merged LoRA weights).

    Layout: config.json (model_type "sdar", SDARForCausalLM, block_size, mask_token_id, no auto_map),
    model.safetensors (Qwen3 parameter names; sharded with an index for large models), generation_config.json,
    tokenizer files. Everything is staged in a sibling temp directory first, so a crash never leaves a
    config.json next to half-written weights.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model.save_pretrained(staging, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
        _strip_tokenizer_auto_map(staging)
        sdar = to_sdar_config(model.config, spec)
        (staging / "config.json").write_text(json.dumps(sdar, indent=2, sort_keys=True) + "\n")
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights once)."""
    return sum(p.numel() for p in model.parameters())


def nonfinite_tensor(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding NaN or +-inf, else None: weights that would make every
    generation fail must be refused before they replace the served ones."""
    for name, t in named:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def nonfinite_in_files(files: Iterable[Path]) -> str | None:
    """`nonfinite_tensor` over the tensors of safetensors files, read one at a time: ``file: tensor`` or None."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as f:
            bad = nonfinite_tensor((name, f.get_tensor(name)) for name in f.keys())
        if bad is not None:
            return f"{file.name}: {bad}"
    return None
