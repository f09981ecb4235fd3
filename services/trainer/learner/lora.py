"""LoRA (peft) for SFT and GTPO: the adapter, its files, the merged model, and applying a version in an engine.

The trained model is the SDAR base with peft's LoRA layers injected in place (``apply_lora``): the policy module
and the engines keep calling the same Qwen3 modules, so the packed forward, the masks and the KV-cache decoder are
unchanged. The KL reference is the same model with its adapters disabled (``adapters_disabled``): no second copy.

Files (in a checkpoint, ``<ckpt>/adapter/``; a weight version of the torch engine is that folder):

    adapter_config.json         peft's LoraConfig (``peft.PeftModel.from_pretrained`` loads the folder as it is)
    adapter_model.safetensors   the LoRA tensors under peft's names (``...q_proj.lora_A.weight``)
    gtpo_base.json              what the adapter was trained on: the base's fingerprint and diffusion spec

Only the main process writes. Every process loads (``load_adapter``), with an exact key and shape match.
peft is imported only here and only when LoRA is asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from shared.model.sdar import DiffusionSpec, nonfinite_tensor

if TYPE_CHECKING:
    from services.trainer.config import LoraSettings

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


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` is an adapter folder (adapter_config.json, no SDAR config.json)."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


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


def load_adapter(peft_model, folder: Path) -> None:
    """Restore a saved adapter into `peft_model` in place (resume): exact keys and shapes."""
    copy_adapter(peft_model, read_adapter_tensors(folder), str(folder))


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
