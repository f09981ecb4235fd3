"""Trainer checkpoints without pickle (docs/design.md section 6, state and resume; section 4, security).

A checkpoint is one directory `<root>/step-XXXXXXXX/`:

    model/                  SDAR layout (`shared.model.sdar.save_model`): rollout engines load it directly
    optimizer.safetensors   every tensor of `optimizer.state_dict()` (exp_avg, exp_avg_sq, step, ...)
    optimizer.json          the rest of it (param_groups, non-tensor per-parameter values) + tensor references
    scheduler.json          `scheduler.state_dict()`
    rng.safetensors         torch CPU and CUDA generator states
    rng.json                python `random` and numpy global states
    trainer_state.json      step, policy version, data cursor, extra (the RL driver's collector state, metrics row)
    manifest.json           sha256 and size of every other file, written last

`<root>/latest` names the newest directory. Nothing here pickles or unpickles: tensors go to safetensors,
everything else to JSON through a small tagged codec that keeps tuples, non-string dict keys and tensor
positions exact, so `--resume` restores the same objects that were saved and continues bit-for-bit.

Integrity: `load_checkpoint` checks every file against the manifest first (`verify_checkpoint`), so a file that is
missing, truncated or has flipped bytes (headers intact) is an error naming it, not weights silently off. There is
no fallback to an older checkpoint: the run's Redis state (acknowledged groups, the published weight version) has
already moved past it, so the operator decides (move the bad folder aside, or start again with `--fresh`).
`resume_checkpoint` picks the newest `step-*` folder and refuses, naming what is missing, rather than starting over.

Distributed use: only the main process calls `save_checkpoint`, with the unwrapped model
(`accelerator.unwrap_model(model)`); it records that process's RNG states only. Every process calls
`load_checkpoint`. Sharded training (FSDP2, DeepSpeed ZeRO) adds `shards/` or `deepspeed/`, written by every
process into the shared `staging_dir` before the main process completes it (`services.trainer.learner.sharding`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from shared.model.sdar import DiffusionSpec, save_model

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
LATEST_NAME = "latest"
MODEL_DIR = "model"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
RNG_TENSORS = "rng.safetensors"
RNG_META = "rng.json"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1

_CHECKPOINT_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")
_PARTIAL_MARK = ".partial-"
"""Temporary directories are `.step-XXXXXXXX.partial-*`: the leading dot and the suffix keep them out of
`list_checkpoints` and `latest_checkpoint`."""

_TUPLE, _DICT, _TENSOR = "__tuple__", "__dict__", "__tensor__"
_TAGS = (_TUPLE, _DICT, _TENSOR)


class CheckpointError(ValueError):
    """A checkpoint file is corrupt or does not match what it is loaded into."""


class CheckpointMissing(CheckpointError, FileNotFoundError):
    """A file a checkpoint needs is not there (named)."""


@dataclass
class TrainerState:
    """What the training loop needs besides weights, optimizer, scheduler and RNG to continue exactly.

    Attributes:
        step: optimizer steps (SFT) or RL steps done.
        policy_version: version of the weights rollouts are tagged with.
        data_cursor: position in the dataset / prompt stream.
        extra: what else a resumed step needs, JSON-encodable (tuples and int keys survive). The RL driver keeps
            ``collector`` (its collector's state, to rebuild the buffer) and ``metrics`` (the step's metrics row,
            written again when the trainer died between the checkpoint and the row) and ``run`` (the run's identity,
            `Driver.identity`); SFT leaves it empty.
    """

    step: int = 0
    policy_version: int = 0
    data_cursor: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- JSON codec


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _encode(obj: Any, path: str, tensors: dict[str, Tensor] | None) -> Any:
    """`obj` as plain JSON values; tuples and non-string-keyed dicts are tagged so decoding restores them.

    Args:
        obj: the value to encode.
        path: dotted location of `obj`, used for error messages and as the key of tensors found there.
        tensors: where tensors go (replaced by a `__tensor__` reference); None means tensors are an error.

    Raises:
        TypeError: a value JSON cannot hold (a lambda, an arbitrary object, a tensor where none is allowed).
    """
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Tensor) and tensors is not None:
        key = path
        while key in tensors:  # only when names themselves contain dots: keep keys unique
            key += "#"
        tensors[key] = obj
        return {_TENSOR: key}
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, _join(path, i), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, _join(path, i), tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: _encode(v, _join(path, k), tensors) for k, v in obj.items()}
        # int keys (optimizer state) would silently become strings in plain JSON
        return {_DICT: [[_encode(k, path, None), _encode(v, _join(path, k), tensors)] for k, v in obj.items()]}
    raise TypeError(
        f"cannot store {path or 'the value'} in JSON: {type(obj).__name__} values are not supported ({obj!r:.80})"
    )


def _decode(obj: Any, tensors: dict[str, Tensor] | None = None) -> Any:
    """Inverse of `_encode`; `tensors` resolves `__tensor__` references."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1 and next(iter(obj)) in _TAGS:
        tag, value = next(iter(obj.items()))
        if tag == _TUPLE:
            return tuple(_decode(v, tensors) for v in value)
        if tag == _DICT:
            return {_decode(k): _decode(v, tensors) for k, v in value}
        if tensors is None or value not in tensors:
            raise CheckpointError(f"reference to a missing tensor {value!r}")
        return tensors[value]
    return {k: _decode(v, tensors) for k, v in obj.items()}


def encode_json(obj: Any, path: str) -> Any:
    """`obj` as plain JSON values that `decode_json` turns back into the same tuples, int-keyed dicts, ...

    Raises:
        TypeError: a value JSON cannot hold, named by its location under `path`.
    """
    return _encode(obj, path, None)


def decode_json(obj: Any) -> Any:
    """Inverse of `encode_json`."""
    return _decode(obj)


# --------------------------------------------------------------------------- optimizer <-> tensors + JSON


def optimizer_to_tensors(state_dict: dict) -> tuple[dict[str, Tensor], dict]:
    """Split an optimizer `state_dict()` into safetensors-ready tensors and a JSON-able meta dict.

    Tensors are keyed by their location, e.g. `state.<param_idx>.exp_avg` (`step` too where the optimizer keeps
    it as a tensor); the meta dict holds everything else (param_groups, non-tensor per-parameter values) with
    references to those keys. Pure: tensors are not copied or moved.

    Args:
        state_dict: `optimizer.state_dict()`.

    Raises:
        TypeError: a value that is neither a tensor nor JSON-encodable.
    """
    tensors: dict[str, Tensor] = {}
    meta = {"format": FORMAT_VERSION, "state_dict": _encode(state_dict, "", tensors)}
    return tensors, meta


def optimizer_from_tensors(tensors: dict[str, Tensor], meta: dict) -> dict:
    """Inverse of `optimizer_to_tensors`: the optimizer state_dict, ready for `optimizer.load_state_dict`.

    Args:
        tensors: the tensors (as loaded from optimizer.safetensors).
        meta: the meta dict (as loaded from optimizer.json).

    Raises:
        CheckpointError: unknown format, a referenced tensor is missing, or tensors are left over.
    """
    if meta.get("format") != FORMAT_VERSION or "state_dict" not in meta:
        raise CheckpointError(f"unsupported optimizer meta (format {meta.get('format')!r})")
    state_dict = _decode(meta["state_dict"], tensors)
    used = _collect_refs(meta["state_dict"])
    if unused := sorted(set(tensors) - used):
        raise CheckpointError(f"optimizer tensors not referenced by the meta: {unused[:5]}")
    return state_dict


def _collect_refs(obj: Any) -> set[str]:
    """Every `__tensor__` key referenced in an encoded structure."""
    if isinstance(obj, list):
        return set().union(*(_collect_refs(v) for v in obj)) if obj else set()
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return {obj[_TENSOR]}
        return set().union(*(_collect_refs(v) for v in obj.values())) if obj else set()
    return set()


# --------------------------------------------------------------------------- RNG


def rng_state() -> tuple[dict[str, Tensor], dict]:
    """Torch (CPU, every CUDA device) generator states as tensors; python and numpy states as JSON."""
    tensors = {"torch.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch.cuda.{i}"] = state
    meta: dict[str, Any] = {"format": FORMAT_VERSION, "python": _encode(random.getstate(), "python", None)}
    try:
        import numpy as np
    except ImportError:
        return tensors, meta
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return tensors, meta


def set_rng_state(tensors: dict[str, Tensor], meta: dict) -> None:
    """Restore what `rng_state` recorded; a CUDA state is restored only where that device exists."""
    torch.set_rng_state(tensors["torch.cpu"])
    cuda = sorted((k for k in tensors if k.startswith("torch.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available != len(cuda):
            logger.warning("checkpoint has CUDA RNG states for %d devices, %d available", len(cuda), available)
        for i, key in enumerate(cuda[:available]):
            torch.cuda.set_rng_state(tensors[key], device=i)
    random.setstate(_decode(meta["python"]))
    if "numpy" in meta:
        try:
            import numpy as np
        except ImportError:
            logger.warning("checkpoint has a numpy RNG state but numpy is not installed; not restored")
            return
        name, keys, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------- file helpers


def write_json(path: Path, data: Any, indent: int | None = 1) -> None:
    path.write_text(json.dumps(data, indent=indent) + "\n")


def write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    # safetensors needs contiguous CPU tensors; detach so a tensor with grad history is accepted too
    save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, str(path), metadata={"format": "pt"})


def _read(path: Path, reader: Callable[[Path], Any]) -> Any:
    """`reader(path)`, with a missing or unreadable file reported by name."""
    if not path.is_file():
        raise CheckpointMissing(f"checkpoint file missing: {path}")
    try:
        return reader(path)
    except (OSError, ValueError, SafetensorError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"corrupt checkpoint file {path}: {exc}") from exc


def read_json(path: Path) -> Any:
    return _read(path, lambda p: json.loads(p.read_text()))


def _read_tensors(path: Path) -> dict[str, Tensor]:
    return _read(path, lambda p: load_file(str(p), device="cpu"))


# --------------------------------------------------------------------------- saving


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint of `step`, zero-padded so names sort by step.

    >>> checkpoint_name(40)
    'step-00000040'
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoint_dir(root: str | Path, step: int) -> Path:
    """`root/step-XXXXXXXX` (see `checkpoint_name`)."""
    return Path(root) / checkpoint_name(step)


def _write_contents(
    out: Path,
    *,
    model: Any,
    tokenizer: Any,
    spec: DiffusionSpec,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    state: TrainerState,
    merged: bool = False,
    model_state: dict[str, Tensor] | None = None,
) -> None:
    """Write every checkpoint file into `out`; trainer_state.json last (readers take it as "complete")."""
    from services.trainer.learner import lora

    if lora.is_adapter_model(model):  # adapter/ in peft's layout; model/ only when merged weights are published
        lora.save_adapter(model, out / lora.ADAPTER_DIR, spec)
        if merged:
            lora.save_merged(model, tokenizer, spec, out / MODEL_DIR)
    else:
        save_model(model, tokenizer, spec, out / MODEL_DIR, state_dict=model_state)
    if optimizer is not None:
        tensors, meta = optimizer_to_tensors(optimizer.state_dict())
        write_tensors(out / OPTIMIZER_TENSORS, tensors)
        write_json(out / OPTIMIZER_META, meta)
    if scheduler is not None:
        write_json(out / SCHEDULER_FILE, _encode(scheduler.state_dict(), "scheduler", None))
    rng_tensors, rng_meta = rng_state()
    write_tensors(out / RNG_TENSORS, rng_tensors)
    write_json(out / RNG_META, rng_meta, indent=None)  # 1,250 ints: one per line is noise
    write_json(out / STATE_FILE, {"format": FORMAT_VERSION, **_encode(asdict(state), "state", None)})


def staging_dir(root: str | Path, step: int) -> Path:
    """The staging folder of a checkpoint that every process writes into (sharded state), named by the step so
    that every rank finds it without being told. Only the main process creates it (`fresh_dir`)."""
    return Path(root) / f".{checkpoint_name(step)}{_PARTIAL_MARK}shared"


def fresh_dir(path: Path) -> Path:
    """`path` as a new empty folder (what a crashed save left there is deleted)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _move_into_place(staging: Path, final: Path) -> None:
    """Rename `staging` to `final`; an existing `final` (the same step saved again) is swapped out first,
    because rename onto a non-empty directory fails."""
    if not final.exists():
        os.replace(staging, final)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}{_PARTIAL_MARK}old-", dir=final.parent))
    os.replace(final, old / final.name)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def _write_latest(root: Path, name: str) -> None:
    """Point `root/latest` at `name` atomically (temp file + os.replace)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{LATEST_NAME}.", dir=root)
    with os.fdopen(fd, "w") as f:
        f.write(name + "\n")
    os.replace(tmp, root / LATEST_NAME)


def _prune(root: Path, keep: Path, keep_last: int) -> None:
    """Delete all but `keep` and the `keep_last - 1` highest other checkpoints, and stale partial dirs.

    Partial dirs are left by a crash mid-save; only the main process saves, so none is in flight now.
    """
    others = [p for p in list_checkpoints(root) if p != keep]
    for old in others[: max(len(others) - (keep_last - 1), 0)]:
        logger.info("deleting old checkpoint %s", old)
        shutil.rmtree(old)
    for partial in root.glob(f".{CHECKPOINT_PREFIX}*{_PARTIAL_MARK}*"):
        logger.warning("deleting an unfinished checkpoint %s", partial)
        shutil.rmtree(partial, ignore_errors=True)


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model: Any,
    tokenizer: Any,
    spec: DiffusionSpec,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    state: TrainerState,
    keep_last: int = 3,
    merged: bool = False,
    model_state: dict[str, Tensor] | None = None,
    staging: Path | None = None,
) -> Path:
    """Write a complete checkpoint to `root/step-XXXXXXXX` atomically, point `root/latest` at it, prune old ones.

    Call it from the main process only, after the step's optimizer update.

    Args:
        root: checkpoint root (created).
        step: names the directory; usually `state.step`.
        model: the unwrapped model (`accelerator.unwrap_model(model)`), a `transformers` model.
        tokenizer: saved next to the weights so `<ckpt>/model` is a complete SDAR checkpoint.
        spec: block size and mask token id for the SDAR config.
        optimizer: its full (gathered) state is saved when given.
        scheduler: an LR scheduler whose `state_dict()` is JSON-encodable (LambdaLR with plain functions,
            LinearLR, CosineAnnealingLR, SequentialLR, ...).
        state: trainer counters and extras.
        keep_last: how many checkpoints to keep, the new one included (>= 1).
        merged: a peft `model` also writes its merged weights to model/ (see `services.trainer.learner.lora`).
        model_state: the weights to write instead of `model`'s own (a sharded model's gathered weights).
        staging: the folder (`staging_dir`) that other processes have already written their part into; by
            default a new one.

    Returns:
        The checkpoint directory.

    Raises:
        ValueError: keep_last < 1 or step < 0.
        TypeError: a wrapped model, or state the JSON codec cannot hold (named by its location).
    """
    _check_saveable(model, keep_last)
    final = checkpoint_dir(root, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    staging = staging or Path(tempfile.mkdtemp(prefix=f".{final.name}{_PARTIAL_MARK}", dir=root))
    try:
        _write_contents(
            staging, model=model, tokenizer=tokenizer, spec=spec, optimizer=optimizer, scheduler=scheduler, state=state,
            merged=merged, model_state=model_state,
        )  # fmt: skip
        write_manifest(staging)
        _move_into_place(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _write_latest(root, final.name)
    _prune(root, final, keep_last)
    return final


def _check_saveable(model: Any, keep_last: int) -> None:
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"model is a {type(model).__name__}: pass accelerator.unwrap_model(model)")


# --------------------------------------------------------------------------- checksums


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path) -> None:
    """`folder/manifest.json`: the sha256 and size of every file under `folder`, written last and atomically (temp
    file + os.replace), so a manifest is only ever there complete."""
    files = {
        p.relative_to(folder).as_posix(): {"sha256": file_sha256(p), "size": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST_FILE}.", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"format": FORMAT_VERSION, "files": files}, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST_FILE)


def checkpoint_problems(path: Path) -> list[str]:
    """Why the checkpoint folder `path` cannot be resumed: each missing file and each file whose size or sha256
    differs from the manifest, by path; [] when it is whole.

    A checkpoint written before manifests existed is checked for its state file only (and a warning logged).
    """
    if not (path / STATE_FILE).is_file():
        return [f"{path / STATE_FILE} is missing (the checkpoint is incomplete)"]
    if not (path / MANIFEST_FILE).is_file():
        logger.warning("%s has no %s (written before checksums): its files are not verified", path, MANIFEST_FILE)
        return []
    try:
        files = read_json(path / MANIFEST_FILE)["files"]
        entries = [(str(rel), int(want["size"]), str(want["sha256"])) for rel, want in files.items()]
    except (CheckpointError, KeyError, TypeError, ValueError, AttributeError) as exc:
        return [f"{path / MANIFEST_FILE} is corrupt: {exc}"]
    problems = []
    for rel, size, sha in entries:
        file = path / rel
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif file.stat().st_size != size:
            problems.append(f"{file} has {file.stat().st_size} bytes, the manifest says {size}")
        elif file_sha256(file) != sha:
            problems.append(f"{file} is corrupt: its sha256 differs from the manifest's")
    return problems


def verify_checkpoint(path: str | Path) -> None:
    """Raise unless every file of checkpoint `path` is there and matches the manifest.

    Raises:
        CheckpointMissing: files are missing (every problem named).
        CheckpointError: a file's bytes differ from the manifest (every problem named).
    """
    path = Path(path)
    if problems := checkpoint_problems(path):
        missing = all(p.endswith("missing") or "incomplete" in p for p in problems)
        raise (CheckpointMissing if missing else CheckpointError)(
            f"checkpoint {path} cannot be resumed: " + "; ".join(problems)
        )


# --------------------------------------------------------------------------- finding


def _step_of(path: Path) -> int | None:
    match = _CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root` (a `step-*` dir with trainer_state.json), oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _step_of(p) is not None and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: _step_of(p) or 0)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint `root/latest` names, else the highest complete one, else None.

    `latest` is trusted only when it names a complete `step-*` directory directly under `root`, so it can
    never point outside the checkpoint root.
    """
    root = Path(root)
    pointer = root / LATEST_NAME
    if pointer.is_file():
        name = pointer.read_text().strip()
        candidate = root / name
        if _CHECKPOINT_RE.match(name) and (candidate / STATE_FILE).is_file():
            return candidate
        logger.warning("%s names %r, which is not a complete checkpoint; scanning %s", pointer, name, root)
    found = list_checkpoints(root)
    return found[-1] if found else None


def resume_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint `--resume` continues from: the newest `step-*` folder under `root`, verified; None when
    `root` holds no `step-*` folder at all.

    The newest folder is taken even when it is incomplete, so a damaged checkpoint is reported rather than
    silently replaced by an older one (whose steps the run's Redis state has already moved past).

    Raises:
        CheckpointMissing / CheckpointError: the newest checkpoint is not whole (every problem named).
    """
    root = Path(root)
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None] if root.is_dir() else []
    found.sort(key=lambda p: _step_of(p) or 0)
    if not found:
        return None
    verify_checkpoint(found[-1])
    return found[-1]


RUN_FILES = ("metrics.jsonl", "trained_groups.jsonl")
"""What a run appends to in its output folder (besides `checkpoints/`): a fresh run must not append to them."""


def earlier_run(output_dir: Path) -> list[Path]:
    """What an earlier run left in `output_dir` that a new run would append to or mix with: its row files and a
    non-empty checkpoints folder; [] for a folder no run has written yet."""
    ckpts = output_dir / "checkpoints"
    found = [output_dir / name for name in RUN_FILES if (output_dir / name).exists()]
    if ckpts.is_dir() and any(ckpts.iterdir()):
        found.append(ckpts)
    return found


def move_aside(output_dir: Path, also: tuple[str, ...] = ()) -> Path | None:
    """Move what `earlier_run` finds (and the entries `also` names) into `output_dir/previous-<UTC time>/`
    (`--fresh`); returns that folder, or None when there was nothing to move. Nothing is deleted."""
    import time

    found = earlier_run(output_dir) + [output_dir / name for name in also if (output_dir / name).exists()]
    if not found:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = output_dir / f"previous-{stamp}"
    n = 0
    while dest.exists():  # two fresh starts within a second
        n += 1
        dest = output_dir / f"previous-{stamp}-{n}"
    dest.mkdir(parents=True)
    for path in found:
        os.replace(path, dest / path.name)
    return dest


# --------------------------------------------------------------------------- loading


def _model_tensors(model_dir: Path) -> dict[str, Tensor]:
    """Every tensor of the (possibly sharded) safetensors weights in `model_dir`."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointMissing(f"checkpoint file missing: no safetensors weights in {model_dir}")
    weights: dict[str, Tensor] = {}
    for file in files:
        weights.update(_read_tensors(file))
    return weights


def _load_weights(model: torch.nn.Module, model_dir: Path) -> None:
    """Copy the weights in `model_dir` into `model` in place; keys must match exactly.

    A key absent from the files is accepted only when it is tied to (shares storage with) a loaded one:
    `save_pretrained` writes tied weights (embeddings / lm_head) once.
    """
    weights = _model_tensors(model_dir)
    own = model.state_dict()
    unexpected = sorted(set(weights) - set(own))
    loaded_ptrs = {own[k].data_ptr() for k in weights if k in own}
    missing = sorted(k for k in set(own) - set(weights) if own[k].data_ptr() not in loaded_ptrs)
    if missing or unexpected:
        raise CheckpointError(
            f"weights in {model_dir} do not match the model: missing {missing[:10]}, unexpected {unexpected[:10]}"
            " (pass the unwrapped model)"
        )
    model.load_state_dict(weights, strict=False)


def _load_state(path: Path) -> TrainerState:
    data = read_json(path / STATE_FILE)
    try:
        decoded = _decode(data)
        return TrainerState(
            step=int(decoded["step"]),
            policy_version=int(decoded["policy_version"]),
            data_cursor=int(decoded["data_cursor"]),
            extra=dict(decoded.get("extra", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"corrupt checkpoint file {path / STATE_FILE}: {exc!r}") from exc


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
    verify: bool = True,
) -> TrainerState:
    """Restore a checkpoint written by `save_checkpoint` into the given objects, in place.

    Call it on every process, with the unwrapped model; the optimizer and scheduler must be built the same way
    as when saving (same parameter groups, same scheduler type and lambdas).

    Args:
        path: the checkpoint directory (e.g. `latest_checkpoint(root)`).
        model: receives `path/model/*.safetensors` (strict key match).
        optimizer: receives the optimizer state (moved to its parameters' devices by `load_state_dict`).
        scheduler: receives the scheduler state.
        restore_rng: restore torch (CPU, CUDA), python and numpy global RNG states.
        verify: check every file against the manifest first (`verify_checkpoint`); off where another process
            has just verified the same folder.

    Returns:
        The saved `TrainerState`.

    Raises:
        CheckpointMissing: a needed file is missing (named); a FileNotFoundError too.
        CheckpointError: a file is corrupt (named, or its checksum differs) or the weights do not match the model.
    """
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    state = _load_state(path)
    if model is not None:
        from services.trainer.learner import lora

        if lora.is_adapter_model(model):
            lora.load_adapter(model, path / lora.ADAPTER_DIR)
        else:
            _load_weights(model, path / MODEL_DIR)
    if optimizer is not None:
        meta = read_json(path / OPTIMIZER_META)
        optimizer.load_state_dict(optimizer_from_tensors(_read_tensors(path / OPTIMIZER_TENSORS), meta))
    if scheduler is not None:
        scheduler.load_state_dict(_decode(read_json(path / SCHEDULER_FILE)))
    # last, so nothing above can consume randomness after the restore
    if restore_rng:
        set_rng_state(_read_tensors(path / RNG_TENSORS), read_json(path / RNG_META))
    return state
