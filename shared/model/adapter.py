"""A LoRA adapter as files and as a served slot: what the trainer writes and the rollout engines read.

A folder (in a trainer checkpoint, ``<ckpt>/adapter/``; a weight version of the torch engine is that folder):

    adapter_config.json         peft's LoraConfig (``peft.PeftModel.from_pretrained`` loads the folder as it is)
    adapter_model.safetensors   the LoRA tensors under peft's names (``...q_proj.lora_A.weight``)
    gtpo_base.json              what the adapter was trained on: the base's fingerprint and diffusion spec

Both ends share this module: the trainer (services/trainer/learner/lora.py, which injects and trains the adapter)
writes the folder, the rollout service checks it (`adapter_fits`) and serves it (`AdapterSlot`). peft is imported
only inside the functions that need it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shared.model.sdar import DiffusionSpec, nonfinite_tensor

ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_FILE = "gtpo_base.json"
ADAPTER_NAME = "default"
FINGERPRINT_VALUES = 64
"""Values of each base tensor the fingerprint reads: a full fine-tune changes them all, and it stays cheap at 8B."""
FORMAT_VERSION = 1


class AdapterError(ValueError):
    """An adapter that cannot be applied to this model (another base, another shape, a missing or extra tensor)."""


# --------------------------------------------------------------------------- names (pure)


def adapter_key(param_name: str, adapter: str = ADAPTER_NAME) -> str | None:
    """peft's file key of a LoRA parameter name, or None for a base parameter.

    >>> adapter_key("base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight")
    'base_model.model.model.layers.0.mlp.up_proj.lora_A.weight'
    >>> adapter_key("model.layers.0.mlp.up_proj.lora_B.default.weight")
    'base_model.model.model.layers.0.mlp.up_proj.lora_B.weight'
    >>> adapter_key("model.layers.0.mlp.up_proj.base_layer.weight") is None
    True
    """
    for part in ("lora_A", "lora_B"):
        marker = f".{part}.{adapter}."
        if marker in param_name:
            key = param_name.replace(marker, f".{part}.")
            return key if key.startswith("base_model.model.") else f"base_model.model.{key}"
    return None


def base_key(param_name: str) -> str | None:
    """The plain Qwen3 name of a base parameter of a LoRA-injected model, or None for a LoRA parameter.

    >>> base_key("base_model.model.model.layers.0.mlp.up_proj.base_layer.weight")
    'model.layers.0.mlp.up_proj.weight'
    >>> base_key("model.norm.weight")
    'model.norm.weight'
    """
    if ".lora_" in param_name:
        return None
    return param_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def target_of(key: str) -> tuple[str, str]:
    """(base module name, "lora_A" | "lora_B") of an adapter file key.

    >>> target_of("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight")
    ('model.layers.1.self_attn.q_proj', 'lora_B')
    """
    module, part, _ = key.removeprefix("base_model.model.").rsplit(".", 2)
    return module, part


def adapter_fits(shapes: dict[str, tuple[int, ...]], base: dict[str, tuple[int, ...]]) -> list[str]:
    """How adapter tensors (file key -> shape) do not fit a base model's tensors (name -> shape); empty when they fit.

    A LoRA pair of a linear ``W: (out, in)`` is ``lora_A: (r, in)``, ``lora_B: (out, r)``.
    """
    out, ranks = [], {}
    for key, shape in sorted(shapes.items()):
        if not key.endswith(".weight") or ".lora_" not in key:
            out.append(f"{key} is no LoRA tensor")
            continue
        module, part = target_of(key)
        weight = base.get(f"{module}.weight")
        if weight is None or len(weight) != 2:
            out.append(f"{key} targets {module}, which the model has no linear weight for")
            continue
        if len(shape) != 2:
            out.append(f"{key} has shape {list(shape)}, not 2-D")
            continue
        r, want = (shape[0], (shape[0], weight[1])) if part == "lora_A" else (shape[1], (weight[0], shape[1]))
        if tuple(shape) != want:
            out.append(f"{key} has shape {list(shape)}; {module} ({list(weight)}) needs {list(want)}")
        if ranks.setdefault(module, r) != r:
            out.append(f"{module}: lora_A and lora_B disagree on the rank")
    return out


# --------------------------------------------------------------------------- files


def adapter_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters of a LoRA-injected model by their file key."""
    out = {}
    for name, p in model.named_parameters():
        key = adapter_key(name)
        if key is not None:
            out[key] = p
    return out


def base_fingerprint(model: torch.nn.Module) -> str:
    """A cheap hash of the base weights under the adapter: each base tensor's name and its first values in bf16.

    Rounding to bf16 makes a bf16 engine and an fp32 trainer of the same base agree; LoRA tensors are left out.
    """
    h = hashlib.sha256()
    named = sorted((k, p) for n, p in model.named_parameters() if (k := base_key(n)) is not None)
    for name, p in named:
        head = p.detach().flatten()[:FINGERPRINT_VALUES].to(torch.bfloat16).view(torch.int16).cpu()
        h.update(name.encode() + b"\0" + head.numpy().tobytes())
    return h.hexdigest()


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` is an adapter folder (adapter_config.json, no SDAR config.json)."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def read_base_info(folder: Path) -> dict[str, Any]:
    """``gtpo_base.json`` of an adapter folder.

    Raises:
        AdapterError: missing or not what this module writes.
    """
    file = folder / BASE_FILE
    if not file.is_file():
        raise AdapterError(f"{folder}: no {BASE_FILE}, so nothing tells which base model the adapter was trained on")
    try:
        info = json.loads(file.read_text())
    except ValueError as e:
        raise AdapterError(f"{file}: not valid JSON: {e}") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT_VERSION or "fingerprint" not in info:
        raise AdapterError(f"{file}: not a gtpo adapter description (format {FORMAT_VERSION} with a fingerprint)")
    return info


def read_adapter_tensors(folder: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    file = folder / ADAPTER_WEIGHTS
    if not file.is_file():
        raise AdapterError(f"{folder}: no {ADAPTER_WEIGHTS}")
    return load_file(str(file), device="cpu")


def copy_adapter(model: torch.nn.Module, tensors: dict[str, Tensor], where: str) -> int:
    """Copy adapter `tensors` (file key -> tensor) into the LoRA parameters of `model` in place; returns the bytes
    copied. Keys and shapes must match exactly: a tensor left out or left over is an error, never ignored."""
    own = adapter_parameters(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise AdapterError(f"{where}: adapter tensors do not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")  # fmt: skip
    bad = [f"{k} {list(t.shape)} != {list(own[k].shape)}" for k, t in tensors.items() if t.shape != own[k].shape]
    if bad:
        raise AdapterError(f"{where}: adapter tensors of the wrong shape: {bad[:3]}")
    with torch.no_grad():
        for k, t in tensors.items():
            own[k].copy_(t)
    return sum(t.numel() * t.element_size() for t in tensors.values())


# --------------------------------------------------------------------------- an engine applying a version


def _same_lora(a, b) -> bool:
    keys = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "bias")
    return all(getattr(a, k, None) == getattr(b, k, None) for k in keys)


class AdapterSlot:
    """The adapter of a serving model: the first version injects LoRA layers, every later one copies only the
    adapter tensors into them (in place; the base weights never move).

    Attributes:
        fingerprint: ``base_fingerprint`` of the served base, taken before the first injection.
        bytes_loaded: adapter bytes copied by the last `apply`.
    """

    def __init__(self) -> None:
        self.config = None
        self.fingerprint: str | None = None
        self.bytes_loaded = 0

    def apply(self, model: torch.nn.Module, folder: Path, spec: DiffusionSpec) -> None:
        """Serve the adapter in `folder` on `model`.

        Raises:
            AdapterError: the adapter was trained on another base or block layout, has another LoRA shape than
                the one being served, or its tensors do not match. The served weights are left unchanged.
        """
        from peft import LoraConfig, inject_adapter_in_model

        info = read_base_info(folder)
        if (info.get("block_size"), info.get("mask_token_id")) != (spec.block_size, spec.mask_token_id):
            raise AdapterError(f"{folder}: trained for block_size={info.get('block_size')}, mask_token_id="
                               f"{info.get('mask_token_id')}; the served model has {spec.block_size}, "
                               f"{spec.mask_token_id}")  # fmt: skip
        if self.fingerprint is None:
            self.fingerprint = base_fingerprint(model)
        if info["fingerprint"] != self.fingerprint:
            raise AdapterError(f"{folder}: the adapter was trained on another base model than the one served "
                               "(fingerprints differ)")  # fmt: skip
        config = LoraConfig.from_pretrained(str(folder))
        tensors = read_adapter_tensors(folder)
        if (bad := nonfinite_tensor(tensors.items())) is not None:
            raise AdapterError(f"{folder}: tensor {bad} holds NaN or inf values")
        if self.config is None:
            shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
            if bad := adapter_fits({k: tuple(t.shape) for k, t in tensors.items()}, shapes):
                raise AdapterError(f"{folder}: {'; '.join(bad[:3])}")
            config.inference_mode = True
            try:  # the config's layers must take these tensors, else the model goes back to the bare base
                inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
                self.bytes_loaded = copy_adapter(model, tensors, str(folder))
            except BaseException:
                remove_lora(model)
                raise
            self.config = config
            return
        if not _same_lora(config, self.config):
            raise AdapterError(f"{folder}: LoRA r={config.r}, alpha={config.lora_alpha}, targets "
                               f"{sorted(config.target_modules)} differ from the served adapter's r={self.config.r}, "
                               f"alpha={self.config.lora_alpha}, {sorted(self.config.target_modules)}; restart the "
                               "rollout service to change them")  # fmt: skip
        self.bytes_loaded = copy_adapter(model, tensors, str(folder))


def remove_lora(model: torch.nn.Module) -> None:
    """Undo `inject_adapter_in_model`: every LoRA layer is replaced by the base layer it wraps (same tensors)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
