"""LoRA (peft) training: inject the adapter, train it, save it, merge it (`gtpo merge-lora`).

The trained model is the SDAR base with peft's LoRA layers injected in place (``apply_lora``): the policy module
and the engines keep calling the same Qwen3 modules, so the packed forward, the masks and the KV-cache decoder are
unchanged. The KL reference is the same model with its adapters disabled (``adapters_disabled``): no second copy.

The adapter's files, its fit check and the engines' serving slot are the format both ends share
(shared/model/adapter.py). Only the main process writes; every process loads (``load_adapter``), with an exact key
and shape match. peft is imported only when LoRA is asked for.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from shared.model.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_DIR,
    ADAPTER_NAME,
    BASE_FILE,
    FORMAT_VERSION,
    AdapterError,
    base_fingerprint,
    base_key,
    copy_adapter,
    read_adapter_tensors,
    read_base_info,
)
from shared.model.sdar import DiffusionSpec

if TYPE_CHECKING:
    from services.trainer.config import LoraSettings


# --------------------------------------------------------------------------- the model


def lora_config(settings: LoraSettings, base: str | Path | None = None):
    """peft's LoraConfig of `settings`; `base` is recorded as ``base_model_name_or_path``."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules), bias="none",
        base_model_name_or_path=None if base is None else str(base),
    )  # fmt: skip


def apply_lora(model: torch.nn.Module, settings: LoraSettings, *, seed: int = 0, base: str | Path | None = None):
    """Inject LoRA layers into `model` in place; returns the ``peft.PeftModel`` that wraps it.

    Only the adapter trains (the base is frozen). lora_A is drawn from a generator seeded by `seed` (the global RNG
    is left as it was), lora_B starts at zero, so the adapted model starts exactly at the base.

    Raises:
        AdapterError: a target module the model does not have.
    """
    from peft import get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if missing := sorted(set(settings.target_modules) - names):
        raise AdapterError(
            f"lora.target_modules: the model has no linear layer named {missing} (it has {sorted(names)})"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora_config(settings, base))
    return peft_model


def is_adapter_model(model: Any) -> bool:
    """Whether `model` is a peft model (never imports peft: without it loaded, nothing can be one)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


@contextlib.contextmanager
def adapters_disabled(peft_model):
    """The base model for the duration (the KL reference): the LoRA layers pass their input through unchanged."""
    with peft_model.disable_adapter():
        yield


def merged_state_dict(peft_model) -> dict[str, Tensor]:
    """The base weights with every LoRA delta added, under plain Qwen3 names (what ``merge_and_unload`` computes,
    bit for bit, without touching the model)."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    out = {k: t.detach() for n, t in base.state_dict().items() if (k := base_key(n)) is not None}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            key = f"{name.removeprefix('base_model.model.')}.weight"
            weight = module.get_base_layer().weight
            out[key] = weight.detach() + module.get_delta_weight(ADAPTER_NAME).detach().to(weight.dtype)
    return out


# --------------------------------------------------------------------------- files


def published_weights(checkpoint: Path) -> Path:
    """The folder of a trainer checkpoint that engines load: ``model/`` (full or merged weights), else the adapter."""
    model = checkpoint / "model"
    return checkpoint / ADAPTER_DIR if not model.is_dir() and (checkpoint / ADAPTER_DIR).is_dir() else model


def save_adapter(peft_model, out: Path, spec: DiffusionSpec, *, fingerprint: str | None = None) -> Path:
    """Write the adapter to `out` in peft's layout plus ``gtpo_base.json``; returns `out`.

    `fingerprint` (``base_fingerprint`` of the start model) is computed when not given.
    """
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    info = {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint or base_fingerprint(peft_model),
        "block_size": spec.block_size,
        "mask_token_id": spec.mask_token_id,
    }
    (out / BASE_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return out


def save_merged(peft_model, tokenizer, spec: DiffusionSpec, out: Path) -> Path:
    """Write the merged model (base + LoRA deltas) to `out` in SDAR layout (`shared.model.sdar.save_model`)."""
    from shared.model.sdar import save_model

    base = peft_model.get_base_model()
    return save_model(base, tokenizer, spec, out, state_dict=merged_state_dict(peft_model))


def load_adapter(peft_model, folder: Path) -> None:
    """Restore a saved adapter into `peft_model` in place (resume): exact keys and shapes."""
    copy_adapter(peft_model, read_adapter_tensors(folder), str(folder))


# --------------------------------------------------------------------------- `gtpo merge-lora`


def adapter_folder(source: Path) -> Path:
    """The adapter folder of a trainer checkpoint (``<ckpt>/adapter``) or `source` itself when it is one.

    Raises:
        AdapterError: neither holds adapter_config.json.
    """
    for folder in (source / ADAPTER_DIR, source):
        if (folder / ADAPTER_CONFIG).is_file():
            return folder
    raise AdapterError(f"{source}: no LoRA adapter here (no {ADAPTER_CONFIG}, nor {ADAPTER_DIR}/{ADAPTER_CONFIG})")


def load_with_adapter(folder: Path, base: Path | None = None):
    """The base model with the adapter in `folder` applied (exact keys); returns (peft model, LoadedModel).

    `base` defaults to the adapter's ``base_model_name_or_path``; when the folder carries ``gtpo_base.json``, the
    base must be the one it was trained on.
    """
    from peft import LoraConfig, get_peft_model

    from shared.model.sdar import load_model

    config = LoraConfig.from_pretrained(str(folder))
    base = base or (Path(config.base_model_name_or_path) if config.base_model_name_or_path else None)
    if base is None:
        raise AdapterError(f"{folder}/{ADAPTER_CONFIG} names no base model: pass --base")
    loaded = load_model(base)
    if (folder / BASE_FILE).is_file() and read_base_info(folder)["fingerprint"] != base_fingerprint(loaded.model):
        raise AdapterError(f"{folder}: the adapter was trained on another base model than {base}")
    config.inference_mode = True
    peft_model = get_peft_model(loaded.model, config)
    copy_adapter(peft_model, read_adapter_tensors(folder), str(folder))
    return peft_model.eval(), loaded


def merge_lora(source: Path, out: Path, base: Path | None = None) -> Path:
    """Write base + adapter as one SDAR-layout checkpoint to `out` (what transformers and LMDeploy load)."""
    peft_model, loaded = load_with_adapter(adapter_folder(source), base)
    return save_merged(peft_model, loaded.tokenizer, loaded.spec, out)
