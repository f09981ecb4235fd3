"""`gtpo launch`: run `gtpo train` under `accelerate launch` on one node of a multi-node job.

One image runs under every scheduler: the node count, this node's rank and the rendezvous address come from
whichever scheme the environment shows (first match wins):

* ``PET_*`` (Kubeflow Trainer v2 / JobSet torch runtime, and PyTorchJob from training-operator 1.7 on):
  ``PET_NNODES``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``, ``PET_NPROC_PER_NODE``;
* PyTorchJob (older training-operator): ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, which are
  *node*-level there (one pod per node), so ``WORLD_SIZE`` is the node count;
* Indexed Job + headless Service (plain Kubernetes, `deploy/k8s`): the rank is ``JOB_COMPLETION_INDEX``, the node
  count ``NNODES``, and the main process is pod 0 under the headless Service, ``<job>-0.<HEADLESS_SERVICE>``
  (``<job>`` from ``JOB_NAME``, else this pod's ``HOSTNAME`` without its ``-<index>`` suffix);
* otherwise one node (``127.0.0.1``).

``NPROC_PER_NODE`` and ``MASTER_PORT`` (default 29500) apply to every scheme that does not set its own. The resolved
topology becomes ``accelerate launch --num_machines --machine_rank --main_process_ip --main_process_port
--num_processes`` with a config from `deploy/accelerate` (DeepSpeed configs get the ``standard`` multi-node launcher:
each pod runs its own launcher, no SSH, no hostfile).

The launcher stays the parent of `accelerate launch` instead of exec'ing it: a SIGTERM (Kubernetes, `docker stop`)
is forwarded to the whole process tree, so the trainer finishes its step and checkpoints; accelerate's single-process
launcher would otherwise die at once and take its child down with it. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import typer
from pydantic import Field

from shared.config.loader import CommandConfig, command_prefix
from shared.process import become_subreaper, die_with_parent

DEFAULT_PORT = 29500
DEFAULT_ACCELERATE_CONFIG = Path("deploy/accelerate/ddp.yaml")
# node-level variables of the schedulers: accelerate passes its own values to the processes it starts
SCHEDULER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(ValueError):
    """The environment describes no consistent topology; the message names the variable."""


@dataclass(frozen=True)
class DistSpec:
    """Where this node sits in the job."""

    scheme: str  # "pet" | "pytorchjob" | "indexed-job" | "single"
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    nproc_per_node: int | None = None  # None: decided on the node (its GPUs, 1 on CPU)

    def describe(self) -> str:
        procs = "auto" if self.nproc_per_node is None else self.nproc_per_node
        return (
            f"scheme={self.scheme} nnodes={self.nnodes} node_rank={self.node_rank} "
            f"master={self.master_addr}:{self.master_port} nproc_per_node={procs}"
        )


def _int(environ: Mapping[str, str], name: str, *, minimum: int = 0) -> int:
    raw = environ[name].strip()
    try:
        value = int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r}: expected an integer") from None
    if value < minimum:
        raise LaunchError(f"{name}={value}: must be >= {minimum}")
    return value


def _nnodes(environ: Mapping[str, str], name: str) -> int:
    """`N`, or torchrun's elastic `MIN:MAX` when both are equal (a fixed-size job)."""
    raw = environ[name].strip()
    if ":" in raw:
        lo, _, hi = raw.partition(":")
        if lo.strip() != hi.strip():
            raise LaunchError(f"{name}={raw!r}: elastic node ranges are not supported; use a fixed node count")
        return _int({name: lo}, name, minimum=1)
    return _int(environ, name, minimum=1)


def _nproc(environ: Mapping[str, str], *names: str) -> int | None:
    """The first of `names` that is set; torchrun's `auto` / `gpu` / `cpu` mean: decide on the node."""
    for name in names:
        raw = environ.get(name, "").strip()
        if raw and raw not in ("auto", "gpu", "cpu"):
            return _int(environ, name, minimum=1)
    return None


def _port(environ: Mapping[str, str], *names: str) -> int:
    for name in names:
        if environ.get(name, "").strip():
            port = _int(environ, name, minimum=1)
            if port > 65535:
                raise LaunchError(f"{name}={port}: not a TCP port")
            return port
    return DEFAULT_PORT


def _first(environ: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        if environ.get(name, "").strip():
            return environ[name].strip()
    return None


def _indexed_job_master(environ: Mapping[str, str], index: int) -> str:
    """`<job>-0.<headless service>`: the stable DNS name of index 0 of an Indexed Job with `subdomain` set."""
    service = _first(environ, "HEADLESS_SERVICE")
    if service is None:
        raise LaunchError(
            "JOB_COMPLETION_INDEX is set with NNODES > 1 but HEADLESS_SERVICE is not: set it to the Job's "
            "`subdomain` (the headless Service), or set MASTER_ADDR"
        )
    job = _first(environ, "JOB_NAME")
    if job is None:
        hostname = _first(environ, "HOSTNAME") or ""
        suffix = f"-{index}"
        if not hostname.endswith(suffix) or len(hostname) == len(suffix):
            raise LaunchError(
                f"cannot tell the Job's name: JOB_NAME is unset and HOSTNAME={hostname!r} does not end in {suffix!r}"
            )
        job = hostname[: -len(suffix)]
    return f"{job}-0.{service}"


def resolve_dist(environ: Mapping[str, str]) -> DistSpec:
    """This node's place in the job, from the scheduler's environment variables (see the module docstring)."""
    if _first(environ, "PET_NNODES"):
        nnodes = _nnodes(environ, "PET_NNODES")
        rank_var = next((n for n in ("PET_NODE_RANK", "RANK", "JOB_COMPLETION_INDEX") if _first(environ, n)), None)
        if rank_var is None and nnodes > 1:
            raise LaunchError(f"PET_NNODES={nnodes} but no node rank: set PET_NODE_RANK")
        rank = _int(environ, rank_var) if rank_var else 0
        master = _first(environ, "PET_MASTER_ADDR", "MASTER_ADDR")
        if master is None and nnodes > 1:
            raise LaunchError(f"PET_NNODES={nnodes} but no main process address: set PET_MASTER_ADDR")
        spec = DistSpec("pet", nnodes, rank, master or "127.0.0.1", _port(environ, "PET_MASTER_PORT", "MASTER_PORT"),
                        _nproc(environ, "PET_NPROC_PER_NODE", "NPROC_PER_NODE"))  # fmt: skip
    elif all(_first(environ, n) for n in ("MASTER_ADDR", "WORLD_SIZE", "RANK")):
        spec = DistSpec("pytorchjob", _int(environ, "WORLD_SIZE", minimum=1), _int(environ, "RANK"),
                        environ["MASTER_ADDR"].strip(), _port(environ, "MASTER_PORT"),
                        _nproc(environ, "NPROC_PER_NODE"))  # fmt: skip
    elif _first(environ, "JOB_COMPLETION_INDEX"):
        index = _int(environ, "JOB_COMPLETION_INDEX")
        nnodes = _nnodes(environ, "NNODES") if _first(environ, "NNODES") else 1
        if nnodes == 1:
            master = "127.0.0.1"
        else:
            master = _first(environ, "MASTER_ADDR") or _indexed_job_master(environ, index)
        spec = DistSpec("indexed-job", nnodes, index, master, _port(environ, "MASTER_PORT"),
                        _nproc(environ, "NPROC_PER_NODE"))  # fmt: skip
    else:
        if _first(environ, "NNODES") and _nnodes(environ, "NNODES") > 1:
            raise LaunchError(
                "NNODES > 1 but this node has no rank: run under an Indexed Job (JOB_COMPLETION_INDEX), "
                "a PyTorchJob (RANK, WORLD_SIZE, MASTER_ADDR) or Kubeflow Trainer (PET_NODE_RANK, ...)"
            )
        spec = DistSpec("single", 1, 0, "127.0.0.1", _port(environ, "MASTER_PORT"), _nproc(environ, "NPROC_PER_NODE"))
    if not 0 <= spec.node_rank < spec.nnodes:
        raise LaunchError(
            f"{spec.scheme}: node rank {spec.node_rank} is outside 0..{spec.nnodes - 1}; "
            "the node count must equal the number of pods (e.g. NNODES == the Job's completions)"
        )
    return spec


def is_deepspeed(accelerate_config: Path) -> bool:
    import yaml

    data = yaml.safe_load(Path(accelerate_config).read_text()) or {}
    return str(data.get("distributed_type", "")).upper() == "DEEPSPEED"


def build_accelerate_argv(
    spec: DistSpec,
    *,
    accelerate_config: Path,
    train_config: Path,
    resume: bool = False,
    fresh: bool = False,
    overrides: Sequence[str] = (),
    cpu: bool = False,
    deepspeed: bool = False,
    python: str | None = None,
) -> list[str]:
    """`accelerate launch ... -m services train --config ...` for this node (`spec.nproc_per_node` must be set)."""
    if spec.nproc_per_node is None:
        raise ValueError("nproc_per_node must be decided before building the command")
    argv = [python or sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(accelerate_config),
            "--num_machines", str(spec.nnodes),
            "--machine_rank", str(spec.node_rank),
            "--main_process_ip", spec.master_addr,
            "--main_process_port", str(spec.master_port),
            "--num_processes", str(spec.nnodes * spec.nproc_per_node)]  # fmt: skip
    if cpu:
        argv.append("--cpu")
    if deepspeed and spec.nnodes > 1:
        argv += ["--deepspeed_multinode_launcher", "standard"]
    argv += ["-m", "services", "train", "--config", str(train_config)]
    argv += ["--resume"] * resume + ["--fresh"] * fresh
    return argv + list(overrides)


def child_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The scheduler's node-level variables removed: accelerate sets per-process ones for its children."""
    return {k: v for k, v in environ.items() if k not in SCHEDULER_VARS and not k.startswith("PET_")}


def find_accelerate_config(path: Path) -> Path:
    """`path` as given, else relative to the source checkout (so `deploy/accelerate/x.yaml` works from anywhere)."""
    if path.is_file():
        return path
    if not path.is_absolute():
        candidate = Path(__file__).resolve().parents[2] / path
        if candidate.is_file():
            return candidate
    raise LaunchError(f"--accelerate-config: {path} not found (the configs live in deploy/accelerate/)")


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def wait_for_host(host: str, port: int, timeout_s: float, *, interval_s: float = 2.0) -> None:
    """Block until `host` resolves: a worker pod may start before the main pod has its DNS record."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.getaddrinfo(host, port)
            return
        except socket.gaierror as e:
            if time.monotonic() >= deadline:
                raise LaunchError(f"main process address {host} did not resolve within {timeout_s:.0f}s ({e})") from e
            time.sleep(interval_s)


# ---------------------------------------------------------------------------------------------- process supervision


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pgid: int, kill_after_s: float | None, give_up_after_s: float = 10.0) -> None:
    """Wait for every remaining child (orphans included); SIGKILL the group after `kill_after_s` (None: wait)."""
    start = time.monotonic()
    killed_at = None
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid:
            continue
        now = time.monotonic()
        if kill_after_s is not None and killed_at is None and now - start > kill_after_s:
            _killpg(pgid, signal.SIGKILL)
            killed_at = now
        if killed_at is not None and now - killed_at > give_up_after_s:
            return  # something outside the group: not ours to kill
        time.sleep(0.1)


def run_supervised(
    argv: Sequence[str], env: Mapping[str, str] | None = None, *, straggler_grace_s: float = 30.0
) -> int:
    """Run `argv` in its own process group and return its exit status (128 + N when killed by signal N).

    SIGTERM / SIGINT / SIGHUP are forwarded to the whole group, and after a signal every descendant is waited for
    (the trainer checkpoints; Kubernetes' grace period bounds the wait). After a normal exit, processes the command
    left behind get SIGTERM and, `straggler_grace_s` later, SIGKILL. Meant for a process whose only children are the
    ones this starts (the `gtpo launch` CLI, often PID 1 of its container): it waits for every child it has.
    """
    become_subreaper()
    # own session for the signal forwarding; die_with_parent so a SIGKILLed supervisor leaves no trainer behind
    proc = subprocess.Popen(list(argv), env=None if env is None else dict(env), start_new_session=True,
                            preexec_fn=die_with_parent)  # fmt: skip
    signalled: list[int] = []

    def forward(signum, _frame) -> None:
        signalled.append(signum)
        _killpg(proc.pid, signum)

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, forward) for s in handled}
    try:
        code = proc.wait()
        if not signalled:
            _killpg(proc.pid, signal.SIGTERM)
        _reap(proc.pid, None if signalled else straggler_grace_s)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code if code >= 0 else 128 - code


# ---------------------------------------------------------------------------------------------- the command


def _fail(message: str) -> typer.Exit:
    typer.echo(f"gtpo launch: {message}", err=True)
    return typer.Exit(code=2)


def _processes(spec, nproc_per_node: int | None):
    """`spec` with this node's process count (the flag's, else the scheduler's, else one per GPU), and whether it
    runs on CPU; `typer.Exit` when the node cannot run that many."""
    gpus = cuda_device_count()
    nproc = nproc_per_node or spec.nproc_per_node or max(gpus, 1)
    spec = replace(spec, nproc_per_node=nproc)
    cpu = gpus == 0
    if cpu and spec.nnodes * nproc > 1:
        raise _fail(f"{spec.nnodes * nproc} processes requested but this node has no GPU; on CPU run one process")
    if gpus and nproc > gpus:
        raise _fail(f"{nproc} processes per node requested but this node has {gpus} GPU(s)")
    return spec, cpu


class LaunchSettings(CommandConfig):
    """`gtpo launch`: `gtpo train` under `accelerate launch` on this node (`GTPO_LAUNCH__NPROC_PER_NODE=8`); the run
    itself is the RLConfig of `config` (`GTPO_TRAIN__*`)."""

    env_prefix: ClassVar[str | None] = command_prefix("launch")

    config: Path = Field(description="RL run config (YAML) that each process passes to gtpo train")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides for gtpo train")
    accelerate_config: Path = Field(DEFAULT_ACCELERATE_CONFIG, description="deploy/accelerate/*.yaml")
    resume: bool = False
    fresh: bool = False
    nproc_per_node: int | None = Field(None, ge=1, description="default: the scheduler's, else the node's GPUs")
    rendezvous_timeout: float = Field(900.0, ge=0, description="seconds a worker waits for the main node's address")


def _load_settings(given: dict):
    """The launch's settings (defaults < `GTPO_LAUNCH__*` < the flags given) and the run's RLConfig, loaded here and
    not in every process accelerate starts: a bad config fails once, before any rendezvous."""
    from services.trainer.config import RLConfig
    from shared.config.loader import ConfigError, load_config

    args = [f"{k}={v if isinstance(v, (str, Path)) else json.dumps(v)}" for k, v in given.items() if v is not None]
    try:
        opts = load_config(LaunchSettings, None, args)
        return opts, load_config(RLConfig, opts.config, opts.overrides)
    except ConfigError as e:
        raise _fail(str(e)) from None


def launch_command(
    config: Path | None = typer.Option(None, "--config", help="RL run config (YAML) that each process trains"),
    overrides: list[str] | None = typer.Argument(None, help="key=value overrides for gtpo train, e.g. steps=20"),
    accelerate_config: Path | None = typer.Option(
        None, "--accelerate-config", help=f"accelerate config (deploy/accelerate/*.yaml) [{DEFAULT_ACCELERATE_CONFIG}]"
    ),
    resume: bool | None = typer.Option(None, "--resume", help="continue from the latest checkpoint in output_dir"),
    fresh: bool | None = typer.Option(
        None, "--fresh", help="start again at step 0 where a run wrote before (its files are moved aside)"
    ),
    nproc_per_node: int | None = typer.Option(
        None,
        "--nproc-per-node",
        min=1,
        help="processes on this node; default: the scheduler's, else its GPUs (1 on CPU)",
    ),
    rendezvous_timeout: float | None = typer.Option(
        None, "--rendezvous-timeout", min=0, help="seconds a worker node waits for the main node's address [900]"
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="print the resolved settings, the topology and the accelerate command; run nothing"
    ),
) -> None:
    """Run `gtpo train` on this node under `accelerate launch`, with the node rank, node count and main address
    taken from the scheduler (Indexed Job, PyTorchJob, Kubeflow Trainer) or a single node.

    Example (every node of a 2-node job runs the same command):
    gtpo launch --config run.yaml --accelerate-config deploy/accelerate/zero2.yaml --resume
    """
    from shared.config.loader import dump_config

    opts, run = _load_settings({"config": config, "overrides": overrides or None, "resume": resume, "fresh": fresh,
                                "accelerate_config": accelerate_config, "nproc_per_node": nproc_per_node,
                                "rendezvous_timeout": rendezvous_timeout})  # fmt: skip
    config, overrides, resume, fresh = opts.config, opts.overrides, opts.resume, opts.fresh
    try:
        spec = resolve_dist(os.environ)
        acc = find_accelerate_config(opts.accelerate_config)
    except LaunchError as e:
        raise _fail(str(e)) from e
    spec, cpu = _processes(spec, opts.nproc_per_node)
    if resume and fresh:
        raise _fail("--resume and --fresh: choose one (continue the run, or start it again at step 0)")
    argv = build_accelerate_argv(spec, accelerate_config=acc, train_config=config, resume=resume, fresh=fresh,
                                 overrides=overrides or [], cpu=cpu, deepspeed=is_deepspeed(acc))  # fmt: skip
    typer.echo(f"gtpo launch: {spec.describe()}", err=True)
    if dry_run:
        typer.echo(dump_config(opts) + "---\n" + dump_config(run) + "---\n" + " ".join(argv))
        return
    if spec.node_rank > 0:
        try:
            wait_for_host(spec.master_addr, spec.master_port, opts.rendezvous_timeout)
        except LaunchError as e:
            raise _fail(str(e)) from e
    raise typer.Exit(code=run_supervised(argv, child_environ(os.environ)))
