"""Which checkpoint folders the rollout service may load, and which versions it may move to.

A folder is checked before any loader opens it: every file in it (and every shard its index names) must resolve
under the checkpoint root, be a regular file (a FIFO would block the load forever), and the JSON and safetensors
headers must parse and cover their files. What only a real load can tell (a shape mismatch, a config the model
class refuses) surfaces as a `WeightsError` from `EngineHost.load`, with the old weights still served.
"""

from __future__ import annotations

import json
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.http import confine
from shared.model.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_fits
from shared.model.adapter import BASE_FILE as ADAPTER_BASE

MAX_ENTRIES = 4096
"""Files in one checkpoint folder at most (a folder holds config, tokenizer and weight shards)."""
MAX_JSON_BYTES = 64 * 1024 * 1024
"""config.json and the shard index at most (SDAR-8B's index is about 60 kB)."""
MAX_HEADER_BYTES = 100_000_000
"""The safetensors library's own limit on a header."""


class WeightsError(Exception):
    """A weights load refused, with the HTTP status that says why.

    Attributes:
        status: 403 outside the checkpoint root, 409 a version conflict, 422 a folder that cannot be loaded.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Served:
    """A version, the resolved folder it was loaded from, and the run that published it (None = unknown)."""

    version: int
    path: str
    run: str | None = None


def check_move(served: Served | None, version: int, path: Path, rollback: bool, run: str | None = None) -> bool:
    """Whether loading (`version`, `path`) is needed; raises `WeightsError(409)` when it would move backwards.

    Versions only move forward within a run: an older version, or the served version from another folder, is
    refused unless `rollback`. The start model is no published version (None): any version may follow it, and so
    may any version of another run (`run` given and not the served one's: a new run took the namespace over, its
    numbers start again).

    Returns:
        False when exactly that version from that folder is already served (nothing to do).
    """
    if served is not None and (served.version, served.path) == (version, str(path)):
        return False
    if served is None or version > served.version or rollback or (run is not None and run != served.run):
        return True
    if version == served.version:
        raise WeightsError(
            409,
            f"version: {version} is already served from {served.path}, not {path}; a version names one checkpoint "
            "(send rollback=true to replace it)",
        )
    raise WeightsError(
        409, f"version: {version} is older than the served {served.version}; send rollback=true to go back"
    )


@dataclass(frozen=True)
class Checkpoint:
    """A checked checkpoint folder: where it is, its config.json, and each tensor's shape (from the headers)."""

    folder: Path
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    adapter: bool = False
    """A LoRA adapter folder (adapter_config.json + adapter_model.safetensors) to apply to the served base."""

    def mismatches(self, served: dict[str, tuple[int, ...]]) -> list[str]:
        """How this checkpoint does not fit a served one: tensors of another shape, tensors it lacks (a loader
        would initialise them at random without a word). An untied `lm_head.weight` is not needed by a tied one.
        An adapter must fit the served base's linear layers (``shared.model.adapter.adapter_fits``)."""
        if self.adapter:
            return adapter_fits(self.shapes, served) if served else []
        out = [
            f"{name} has shape {list(shape)}, the served model {list(served[name])}"
            for name, shape in sorted(self.shapes.items())
            if name in served and served[name] != shape
        ]
        tied = {"lm_head.weight"} if self.config.get("tie_word_embeddings") else set()
        out += [f"{name} is missing" for name in sorted(set(served) - set(self.shapes) - tied)]
        return out


def checkpoint_folder(path: str | Path, root: Path) -> Checkpoint:
    """The checkpoint folder `path` names, once every file a loader will open has been checked.

    Args:
        path: absolute, or relative to `root`.
        root: the checkpoint root; every file must resolve inside it (symlinks followed).

    Raises:
        WeightsError: 403 when something resolves outside `root`, 422 when the folder cannot be loaded.
    """
    folder = _resolve(path, root, what=f"path: {path}")
    try:
        mode = folder.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise WeightsError(422, f"path: {path} does not exist under the checkpoint root") from None
    except OSError as e:  # a name over 255 bytes or a path over 4 KB (ENAMETOOLONG), no permission...
        raise WeightsError(422, f"path: {_short(path)} cannot be opened: {e.strerror}") from None
    if not stat.S_ISDIR(mode):
        raise WeightsError(422, f"path: {path} is not a folder (a checkpoint is a folder with config.json)")
    names = _entries(folder, root, path)
    if "config.json" not in names and ADAPTER_CONFIG in names:
        return _adapter_folder(folder, root, names, path)
    if "config.json" not in names:
        raise WeightsError(422, f"path: {path} holds no SDAR checkpoint (no config.json) and no LoRA adapter")
    config = read_object(folder / "config.json", f"{path}/config.json")
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in _weight_files(folder, root, names, path):
        shapes.update(tensor_shapes(shard, f"{path}/{shard.name}"))
    return Checkpoint(folder, config, shapes)


def _adapter_folder(folder: Path, root: Path, names: set[str], path: str | Path) -> Checkpoint:
    """A LoRA adapter version: its adapter_config.json, the base it was trained on, and its tensors' shapes."""
    config = read_object(folder / ADAPTER_CONFIG, f"{path}/{ADAPTER_CONFIG}")
    if config.get("peft_type") != "LORA":
        raise WeightsError(422, f"{path}/{ADAPTER_CONFIG}: peft_type must be LORA, got {config.get('peft_type')!r}")
    for name in (ADAPTER_WEIGHTS, ADAPTER_BASE):
        if name not in names:
            raise WeightsError(422, f"path: {path} is a LoRA adapter without {name}")
    read_object(folder / ADAPTER_BASE, f"{path}/{ADAPTER_BASE}")
    shapes = tensor_shapes(_resolve(folder / ADAPTER_WEIGHTS, root, f"{path}/{ADAPTER_WEIGHTS}"),
                           f"{path}/{ADAPTER_WEIGHTS}")  # fmt: skip
    return Checkpoint(folder, config, shapes, adapter=True)


def served_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the checkpoint a process started from, to compare new versions with; empty (nothing
    compared) when its files cannot be read."""
    try:
        return checkpoint_folder(folder, folder).shapes
    except WeightsError:
        return {}


def _short(path: str | Path, keep: int = 200) -> str:
    """`path` for a message: a 4 KB name is cut to its first and last characters."""
    text = str(path)
    return text if len(text) <= 2 * keep else f"{text[:keep]}...{text[-keep:]} ({len(text)} characters)"


def _resolve(path: str | Path, root: Path, what: str) -> Path:
    if "\x00" in str(path):  # what the registry holds was never validated as a file name
        raise WeightsError(422, f"{what} holds a NUL character")
    try:
        return confine(path, root)
    except UnicodeError as e:
        raise WeightsError(422, f"{what} is no file name: {e}") from e
    except ValueError as e:
        raise WeightsError(403, str(e)) from e
    except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13), a name too long
        raise WeightsError(422, f"{what} cannot be resolved: {e}") from e


def _entries(folder: Path, root: Path, path: str | Path) -> set[str]:
    """Names in `folder`, each checked: inside `root` once resolved, a regular file or a folder."""
    names: set[str] = set()
    try:
        entries = list(folder.iterdir())
    except OSError as e:
        raise WeightsError(422, f"path: {path} cannot be listed: {e.strerror}") from e
    if len(entries) > MAX_ENTRIES:
        raise WeightsError(422, f"path: {path} holds {len(entries)} entries; a checkpoint holds at most {MAX_ENTRIES}")
    for entry in entries:
        target = _resolve(entry, root, what=f"path: {path}/{entry.name}")
        try:
            mode = target.stat().st_mode
        except OSError as e:  # a dangling symlink, a file removed meanwhile
            raise WeightsError(422, f"path: {path}/{entry.name} cannot be read: {e.strerror}") from e
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise WeightsError(422, f"path: {path}/{entry.name} is not a regular file (a pipe, socket or device)")
        names.add(entry.name)
    return names


def _weight_files(folder: Path, root: Path, names: set[str], path: str | Path) -> list[Path]:
    """Every safetensors file a loader may open: the shards of the index, and every top-level `*.safetensors`
    (LMDeploy globs them)."""
    files = {folder / n for n in names if n.endswith(".safetensors")}
    if "model.safetensors.index.json" in names:
        index = read_object(folder / "model.safetensors.index.json", f"{path}/model.safetensors.index.json")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise WeightsError(422, f"{path}/model.safetensors.index.json: weight_map must map names to files")
        for shard in sorted(set(weight_map.values())):
            target = _resolve(folder / shard, root, what=f"{path}/model.safetensors.index.json names {shard!r}: it")
            if not target.is_file():
                raise WeightsError(422, f"{path}/model.safetensors.index.json names {shard!r}, which is no file")
            files.add(target)
    if not files:
        raise WeightsError(422, f"path: {path} holds no safetensors weights (model.safetensors or its index)")
    return sorted(files)


def read_object(file: Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json, a shard index).

    Raises:
        WeightsError(422): missing, too big, not UTF-8 JSON, or not an object.
    """
    try:
        size = file.stat().st_size
        if not file.is_file():
            raise WeightsError(422, f"{what}: not a regular file")
        if size > MAX_JSON_BYTES:
            raise WeightsError(422, f"{what}: {size} bytes; at most {MAX_JSON_BYTES}")
        data = json.loads(file.read_bytes())
    except OSError as e:
        raise WeightsError(422, f"{what}: cannot be read: {e.strerror}") from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise WeightsError(422, f"{what}: not valid JSON: {str(e)[:200]}") from e
    if not isinstance(data, dict):
        raise WeightsError(422, f"{what}: must hold a JSON object, got {type(data).__name__}")
    return data


def tensor_shapes(file: Path, what: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a safetensors file; refused when its header does not parse or its data is shorter
    than the header says (a copy cut short).

    Layout: 8 bytes little-endian header length N, N bytes of JSON header (name -> dtype, shape,
    data_offsets [start, end] relative to the data), then the data.
    """
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
            if n < 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise WeightsError(422, f"{what}: truncated or not safetensors ({size} bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise WeightsError(422, f"{what}: cannot be read: {e.strerror}") from e
    except (ValueError, RecursionError) as e:
        raise WeightsError(422, f"{what}: the safetensors header is not valid JSON: {str(e)[:200]}") from e
    if not isinstance(header, dict):
        raise WeightsError(422, f"{what}: the safetensors header must be a JSON object")
    end, shapes = 0, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise WeightsError(422, f"{what}: tensor {name[:100]!r} has no valid data_offsets")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise WeightsError(422, f"{what}: tensor {name[:100]!r} has no valid shape")
        end, shapes[name] = max(end, offsets[1]), tuple(shape)
    if size < 8 + n + end:
        raise WeightsError(422, f"{what}: truncated ({size} bytes; its header needs {8 + n + end})")
    return shapes
