"""Sharded training under Accelerate (FSDP2, DeepSpeed ZeRO) and the sharded part of its checkpoints.

FSDP2 shards every parameter and its optimizer state by rows (`Shard(0)` on a 1-D mesh, `torch.chunk` sizes:
rank r of W owns rows [r * ceil(n / W), (r + 1) * ceil(n / W)) of an n-row tensor, clipped to n). A checkpoint
keeps that state without pickle, written by every rank, beside the gathered SDAR weights of `model/`:

    shards/meta.json                kind, world size, parameter names and shapes, the optimizer's param groups
    shards/rank-00000.safetensors   this rank's rows of every parameter (`model.<name>`) and of every optimizer
                                    state shaped like its parameter (`optim.<name>.<key>`); other states (Adam's
                                    scalar `step`) whole; this rank's RNG states (`rng.*`)
    shards/rank-00000.json          this rank's first row and row count of each sharded key

Resume reads, for each parameter of the current run, the rows this rank owns now from whichever old rank files
hold them (`safe_open(...).get_slice`, so no rank ever holds a full tensor): a checkpoint written by N processes
resumes on any number of processes, 1 (no FSDP) included. With the same number each rank reads back exactly its
own rows, and the run continues bit for bit.

DeepSpeed keeps its engine's own format (`deepspeed/`, written by every rank through `save_checkpoint`; it pickles,
as DeepSpeed does); its partitions are tied to the world size, so a resume on another number of processes is
refused, naming both.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from services.trainer.learner.checkpoint import (
    CheckpointError,
    decode_json,
    encode_json,
    read_json,
    write_json,
    write_tensors,
)

logger = logging.getLogger(__name__)

SHARDS_DIR = "shards"
DEEPSPEED_DIR = "deepspeed"
META_FILE = "meta.json"
FORMAT_VERSION = 1
FSDP2, DEEPSPEED = "fsdp2", "deepspeed"


# --------------------------------------------------------------------------- accelerate


def make_accelerator(mixed_precision: str, *, cuda: bool):
    """The trainer's `Accelerator`, honouring an FSDP or DeepSpeed config on CPU too.

    Accelerate applies `distributed_type: FSDP` / `DEEPSPEED` only on accelerator devices; on CPU it silently runs
    the same config as plain data parallel (MULTI_CPU), which is how a sharded config would pass CPU tests
    untested. Here the launcher's settings (`ACCELERATE_USE_FSDP` + `FSDP_*`, `ACCELERATE_USE_DEEPSPEED` +
    `ACCELERATE_DEEPSPEED_*`) are applied on CPU (gloo) as Accelerate applies them on GPU.
    """
    from accelerate import Accelerator, DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not cuda)
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return accelerator
    state = accelerator.state
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        plugin = DeepSpeedPlugin()  # reads the launcher's ACCELERATE_DEEPSPEED_* variables
        plugin.set_mixed_precision(mixed_precision)
        plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins, kind = plugin, DistributedType.DEEPSPEED
    elif _flag("ACCELERATE_USE_FSDP"):
        state.fsdp_plugin, kind = FullyShardedDataParallelPlugin(), DistributedType.FSDP  # reads FSDP_*
    else:
        return accelerator
    state.distributed_type = kind
    # the process-level state too: `prepare` copies it back into the accelerator's state
    PartialState._shared_state["distributed_type"] = kind
    return accelerator


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def sharding_kind(accelerator) -> str | None:
    """`FSDP2`, `DEEPSPEED` or None (one process or DDP: every rank holds everything)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return DEEPSPEED
    if accelerator.distributed_type == DistributedType.FSDP:
        if not accelerator.is_fsdp2:
            raise ValueError("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config")
        return FSDP2
    return None


def full_state_dict(accelerator, wrapped: torch.nn.Module, lm: torch.nn.Module) -> dict[str, Tensor]:
    """The whole model's weights (`lm`'s names) on the main process (CPU), empty elsewhere; `wrapped` is what
    `accelerator.prepare` returned around it. Collective: every rank calls it."""
    kind = sharding_kind(accelerator)
    if kind == FSDP2:
        return _gather_rows(lm, main=accelerator.is_main_process)
    if kind == DEEPSPEED:  # ZeRO-3 gathers (zero3_save_16bit_model); ZeRO-2 holds whole parameters
        state = accelerator.get_state_dict(wrapped) or {}  # None on the other ranks under ZeRO-3
        prefix = _prefix_of(accelerator.unwrap_model(wrapped), lm)
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return {k: v.detach().cpu() for k, v in lm.state_dict().items()}


def _gather_rows(lm: torch.nn.Module, *, main: bool) -> dict[str, Tensor]:
    """Every entry of `lm.state_dict()` whole, one tensor at a time (no rank holds more than one extra), kept on
    the main process only. Collective, in state_dict order on every rank."""
    from torch.distributed.tensor import DTensor

    out = {}
    for key, value in lm.state_dict().items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if main:
            out[key] = full.detach().cpu()
    return out


def _prefix_of(root: torch.nn.Module, sub: torch.nn.Module) -> str:
    """`sub`'s dotted name inside `root` plus a dot ("" when it is `root`)."""
    for name, module in root.named_modules():
        if module is sub:
            return f"{name}." if name else ""
    raise ValueError(f"{type(sub).__name__} is not inside {type(root).__name__}")


def resume_problem(saved: str | None, now: str | None, world: int) -> str | None:
    """Why a checkpoint holding state the `saved` way cannot resume a run sharded the `now` way on `world`
    processes (`FSDP2`, `DEEPSPEED` or None for whole state), or None when it can.

    FSDP2 shards reshard onto any number of processes and into an unsharded run; DeepSpeed partitions only resume
    under DeepSpeed (and on as many processes, checked by `load_deepspeed`); whole state only resumes unsharded.

    >>> resume_problem(None, FSDP2, 2)
    'it holds unsharded state (no shards/); this run is fsdp2 on 2 processes: resume it without sharding'
    """
    here = f"{now or 'unsharded'} on {world} process{'es' if world > 1 else ''}"
    if saved is None and now is not None:
        return f"it holds unsharded state (no {SHARDS_DIR}/); this run is {here}: resume it without sharding"
    if saved == DEEPSPEED and now != DEEPSPEED:
        return f"it holds DeepSpeed partitions; this run is {here}: resume it with DeepSpeed"
    if saved == FSDP2 and now == DEEPSPEED:
        return f"it holds FSDP2 shards; this run is {here}: resume it with FSDP2 (on any number of processes)"
    return None


def set_deepspeed_micro_batch(accelerator, micro_batch_size: int) -> None:
    """DeepSpeed's `prepare` needs a micro-batch size, and the trainer feeds no data loader to infer it from."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = micro_batch_size
    if ds.get("train_batch_size", "auto") == "auto":  # DeepSpeed checks micro x accumulation x world
        accumulation = int(ds.get("gradient_accumulation_steps", 1))
        ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * accumulation * accelerator.num_processes


# --------------------------------------------------------------------------- rows


def shard_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """(first row, row count) of rank `rank` in an n-row tensor split as FSDP2 does (`torch.chunk` on dim 0).

    >>> [shard_rows(5, 2, r) for r in range(2)], shard_rows(1, 2, 1)
    ([(0, 3), (3, 2)], (1, 0))
    """
    size = math.ceil(n / world) if n else 0
    start = min(rank * size, n)
    return start, min(size, n - start)


def _local(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _is_row_sharded(p: Tensor) -> bool:
    """Whether `p` is an FSDP2 parameter sharded by rows; other placements are refused by name."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        return False
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise CheckpointError(f"unsupported placement {p.placements} on a {p.device_mesh.ndim}-D mesh (FSDP2 Shard(0))")
    return True


def _owned_rows(p: Tensor) -> tuple[int, int]:
    """(first row, rows) of the full parameter that this rank holds; the whole tensor when `p` is not sharded."""
    if not _is_row_sharded(p):
        return 0, p.shape[0] if p.dim() else 0
    start, rows = shard_rows(p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank())
    if _local(p).shape[0] != rows:
        raise CheckpointError(f"local shard of {tuple(p.shape)} has {_local(p).shape[0]} rows, expected {rows}")
    return start, rows


def _trainable(lm: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[tuple[int, str, Tensor]]:
    """(optimizer index, name, parameter) of every parameter the optimizer updates, in its state_dict order."""
    names = {id(p): n for n, p in lm.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        if id(p) not in names:
            raise CheckpointError("the optimizer updates a parameter that is not the model's")
        yield i, names[id(p)], p


# --------------------------------------------------------------------------- saving


def _rank_file(folder: Path, rank: int, suffix: str) -> Path:
    return folder / f"rank-{rank:05d}{suffix}"


def save_shards(folder: Path, lm: torch.nn.Module, optimizer: torch.optim.Optimizer, *, rank: int, world: int) -> None:
    """Write this rank's rows of the parameters and optimizer state to `folder`; the main process adds meta.json.

    Every rank calls it, after the step's update (no collective inside).
    """
    from services.trainer.learner.checkpoint import rng_state

    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    rows: dict[str, list[int]] = {}

    def put(key: str, value: Tensor, like: Tensor | None) -> None:
        tensors[key] = _local(value)
        if like is not None and like.dim() and tuple(value.shape) == tuple(like.shape):
            rows[key] = list(_owned_rows(like))

    for name, p in lm.named_parameters():
        put(f"model.{name}", p.detach(), p)
    sd = optimizer.state_dict()
    states: dict[str, dict[str, Any]] = {}
    for i, name, p in _trainable(lm, optimizer):
        other = {}
        for key, value in sd["state"].get(i, {}).items():
            if isinstance(value, Tensor):
                put(f"optim.{name}.{key}", value, p)
            else:
                other[key] = value
        states[name] = {"keys": sorted(sd["state"].get(i, {})), "other": other}
    rng_tensors, rng_meta = rng_state()
    tensors.update({f"rng.{k}": v for k, v in rng_tensors.items()})
    write_tensors(_rank_file(folder, rank, ".safetensors"), tensors)
    write_json(_rank_file(folder, rank, ".json"), {"format": FORMAT_VERSION, "rows": rows, "rng": rng_meta})
    if rank == 0:
        names = [name for _, name, _ in _trainable(lm, optimizer)]
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
        meta = {
            "format": FORMAT_VERSION, "kind": FSDP2, "world": world,
            "params": {n: list(p.shape) for n, p in lm.named_parameters()},
            "param_groups": encode_json(groups, "param_groups"),
            "states": encode_json(states, "states"),
        }  # fmt: skip
        write_json(folder / META_FILE, meta)


# --------------------------------------------------------------------------- loading


class ShardReader:
    """The rows of any key of a sharded checkpoint, read lazily from the rank files that hold them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.meta = read_json(folder / META_FILE)
        if self.meta.get("format") != FORMAT_VERSION or self.meta.get("kind") != FSDP2:
            raise CheckpointError(f"{folder / META_FILE}: not a gtpo FSDP2 shard description")
        self.world = int(self.meta["world"])
        self._files = []
        self._rows = []
        for r in range(self.world):
            path = _rank_file(folder, r, ".safetensors")
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint file missing: {path} (written by {self.world} processes)")
            self._files.append(safe_open(str(path), framework="pt", device="cpu"))
            self._rows.append(read_json(_rank_file(folder, r, ".json")))

    def whole(self, key: str) -> Tensor:
        """A key every rank holds whole (from rank 0)."""
        if key not in self._files[0].keys():
            raise CheckpointError(f"{self.folder}: no {key}")
        return self._files[0].get_tensor(key)

    def rows(self, key: str, start: int, count: int) -> Tensor:
        """Rows [start, start + count) of the full tensor `key`, gathered from the ranks that hold them."""
        if key not in self._rows[0]["rows"]:
            return self.whole(key)[start : start + count]
        parts = []
        for f, table in zip(self._files, self._rows, strict=True):
            first, n = table["rows"][key]
            lo, hi = max(start, first), min(start + count, first + n)
            if lo < hi:
                parts.append(f.get_slice(key)[lo - first : hi - first])
        if not parts:
            return self.whole(key)[0:0]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def like(self, key: str, p: Tensor) -> Tensor:
        """The saved `key` laid out as `p` is in this run: this rank's rows of it (a DTensor if `p` is one)."""
        from torch.distributed.tensor import DTensor

        start, count = _owned_rows(p)
        local = self.rows(key, start, count)
        if tuple(local.shape[1:]) != tuple(p.shape[1:]):
            raise CheckpointError(f"{key}: saved shape {tuple(local.shape)} does not fit {tuple(p.shape)}")
        if isinstance(p, DTensor):
            return DTensor.from_local(local.to(_local(p).device), p.device_mesh, p.placements, shape=p.shape,
                                      stride=p.stride(), run_check=False)  # fmt: skip
        return local

    def rng(self, rank: int) -> tuple[dict[str, Tensor], dict] | None:
        """The RNG states rank `rank` saved, if that rank existed."""
        if rank >= self.world:
            return None
        f = self._files[rank]
        tensors = {k.removeprefix("rng."): f.get_tensor(k) for k in f.keys() if k.startswith("rng.")}
        return tensors, self._rows[rank]["rng"]


def load_shards(
    folder: Path, lm: torch.nn.Module, optimizer: torch.optim.Optimizer | None, *, rank: int, world: int,
    restore_rng: bool = True,
) -> None:  # fmt: skip
    """Restore what `save_shards` wrote into `lm` and `optimizer` as this run lays them out (any world size).

    Raises:
        CheckpointError: the checkpoint's parameters are not this model's (named), or a file is corrupt.
    """
    from services.trainer.learner.checkpoint import set_rng_state

    reader = ShardReader(folder)
    saved = reader.meta["params"]
    own = {n: list(p.shape) for n, p in lm.named_parameters()}
    if saved != own:
        diff = sorted(k for k in set(saved) | set(own) if saved.get(k) != own.get(k))
        raise CheckpointError(f"{folder}: parameters differ from this model's: {diff[:5]}")
    if reader.world != world:
        logger.info("resharding a checkpoint of %d processes onto %d", reader.world, world)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            _local(p).copy_(_local(reader.like(f"model.{name}", p)))
    if optimizer is not None:
        optimizer.load_state_dict(_optimizer_state(reader, lm, optimizer))
    if restore_rng and (rng := reader.rng(rank)) is not None and reader.world == world:
        set_rng_state(*rng)  # another layout draws differently anyway: its ranks keep their own streams


def _optimizer_state(reader: ShardReader, lm: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state_dict of this run's layout, from the checkpoint's rows."""
    groups = decode_json(reader.meta["param_groups"])
    states = decode_json(reader.meta["states"])
    index = {name: i for i, name, _ in _trainable(lm, optimizer)}
    saved_names = [n for g in groups for n in g["params"]]
    if sorted(saved_names) != sorted(index):
        raise CheckpointError(f"{reader.folder}: the optimizer's parameters differ from this run's")
    state: dict[int, dict[str, Any]] = {}
    for i, name, p in _trainable(lm, optimizer):
        entry = states.get(name, {"keys": [], "other": {}})
        values = dict(entry["other"])
        for key in entry["keys"]:
            if key in values:
                continue
            tensor_key = f"optim.{name}.{key}"
            shaped = tensor_key in reader._rows[0]["rows"]
            values[key] = reader.like(tensor_key, p) if shaped else reader.whole(tensor_key)
        if values:
            state[i] = values
    return {"state": state, "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in groups]}


def checkpoint_kind(checkpoint: Path) -> str | None:
    """How a checkpoint holds its training state: `FSDP2` shards, `DEEPSPEED` partitions, or None (whole)."""
    if (checkpoint / SHARDS_DIR).is_dir():
        return FSDP2
    if (checkpoint / DEEPSPEED_DIR).is_dir():
        return DEEPSPEED
    return None


# --------------------------------------------------------------------------- DeepSpeed


def save_deepspeed(folder: Path, engine, *, world: int, main: bool) -> None:
    """The engine's own checkpoint (every rank writes its partitions); collective."""
    engine.save_checkpoint(str(folder), tag="state", exclude_frozen_parameters=True)
    if main:
        write_json(folder / META_FILE, {"format": FORMAT_VERSION, "kind": DEEPSPEED, "world": world})


def load_deepspeed(folder: Path, engine, *, world: int) -> None:
    """Restore `save_deepspeed`'s checkpoint into `engine`; refused on another number of processes."""
    saved = int(read_json(folder / META_FILE)["world"])
    if saved != world:
        raise CheckpointError(
            f"{folder.parent.name} was written by {saved} DeepSpeed processes; this run has {world}. ZeRO partitions"
            f" are tied to the process count: resume with {saved} processes"
        )
    path, _ = engine.load_checkpoint(str(folder), tag="state", load_module_strict=False)
    if path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint in {folder}")
