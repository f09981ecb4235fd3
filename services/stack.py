"""`gtpo up`: the all-in-one local stack (its dashboard, `gtpo status`, is services/status_view.py).

`gtpo up` starts a real Redis (embedded, with AOF, unless REDIS_URL is set), the rollout and reward workers and the
trainer, each a separate process logging to `output_dir/logs/`, restarts a worker that dies, follows the trainer's
metrics with a progress bar, and stops everything when the trainer exits. Before it starts the trainer, every service
must agree with the run (`check_services`); the trainer then checks its model's block size and mask id itself.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.trainer.config import RLConfig
from shared.config.loader import dump_config
from shared.config.settings import redact_url
from shared.contracts.agreement import AgreementError, ServiceUnreachable, check_agreement, fetch_info
from shared.contracts.wire import ServiceInfo
from shared.process import die_with_parent, free_port


@dataclass
class Managed:
    """A child process with the command that (re)starts it."""

    name: str
    cmd: list[str]
    log: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0
    url: str | None = None
    """Where a service answers HTTP (its `GET /info`); None for the trainer."""

    def start(self, env: dict[str, str]) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            self.cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=die_with_parent
        )
        out.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 15.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


SERVICE_WAIT_S = 300.0
"""How long `gtpo up` waits for each service to answer `GET /info` (a rollout service loads its model first)."""


def check_services(cfg: RLConfig, services: list[Managed], wait_s: float = SERVICE_WAIT_S) -> dict[str, ServiceInfo]:
    """What each started service says (`GET /info`), checked against the run; one still starting after `wait_s` is
    left to the supervisor and missing from the returned mapping.

    Raises:
        AgreementError: every mismatch, naming both values; or a service that exited before it answered (its
            settings were refused, say), with the last line of its log.
    """
    found = {}
    for p in services:
        if p.url is None:
            continue
        try:
            found[p.url] = fetch_info(p.url, wait_s, alive=p.alive)
        except ServiceUnreachable:
            if not p.alive():
                lines = p.log.read_text(errors="replace").strip().splitlines() if p.log.exists() else []
                last = f": {lines[-1]}" if lines else ""
                raise AgreementError(f"{p.name} exited before answering GET /info (log {p.log}){last}") from None
    check_agreement(cfg.trainer_side(), found)
    return found


def _gtpo(*args: str) -> list[str]:
    return [sys.executable, "-m", "services", *args]


def redis_arguments(cfg: RLConfig) -> list[str]:
    """`redis.<field>=<value>` for every Redis setting but the URL, which travels as $REDIS_URL (a secret)."""
    return [f"redis.{k}={v}" for k, v in cfg.redis.model_dump(mode="json", exclude={"url"}).items()]


def plan(cfg: RLConfig, run_dir: Path, rollout_workers: int, reward_workers: int, resume: bool, fresh: bool = False,
         rollout_args: Sequence[str] = ()):  # fmt: skip
    """The processes of a stack (not started) and the trainer config they share; `rollout_args` are key=value
    settings of every rollout worker (e.g. `swap_at_block=true`).

    Secrets stay out of the commands and of the trainer's config file: the Redis URL and the API token reach
    every process through its environment (`run_stack`).
    """
    root = Path(os.path.commonpath([cfg.model.resolve(), run_dir.resolve()]))
    logs = run_dir / "logs"
    common = redis_arguments(cfg)
    procs, urls, ports = [], [], set()
    for i in range(rollout_workers):
        port = free_port(ports)
        urls.append(f"http://127.0.0.1:{port}")
        # weights.transport=http: each worker's cache in the run's folder, not the default under `root` (the
        # common ancestor of the model and the run, which other runs share and may not be writable)
        cache = run_dir.resolve() / "weights-cache" / f"rollout-{i}"
        cmd = _gtpo("serve", "rollout", "--worker", f"model={cfg.model.resolve()}", f"checkpoint_root={root}",
                    f"port={port}", f"worker_id=rollout-{i}", f"weights_cache={cache}", *rollout_args, *common)  # fmt: skip
        procs.append(Managed(f"rollout-{i}", cmd, logs / f"rollout-{i}.log", url=urls[-1]))
    for i in range(reward_workers):
        port = free_port(ports)
        cmd = _gtpo("serve", "reward", "--worker", f"port={port}", f"worker_id=reward-{i}",
                    f"weights={json.dumps(cfg.reward_weights)}", f"zero_truncated={cfg.zero_truncated}",
                    *common)  # fmt: skip
        procs.append(Managed(f"reward-{i}", cmd, logs / f"reward-{i}.log", url=f"http://127.0.0.1:{port}"))
    trainer_cfg = cfg.model_copy(
        update={"rollout_urls": urls, "api_token": None, "redis": cfg.redis.model_copy(update={"url": None})}
    )
    cfg_path = run_dir / "run.yaml"
    flags = ["--resume"] * resume + ["--fresh"] * fresh
    trainer = Managed("trainer", _gtpo("train", "--config", str(cfg_path), *flags), logs / "trainer.log")
    return procs, trainer, trainer_cfg, cfg_path


def run_stack(
    cfg: RLConfig,
    *,
    rollout_workers: int = 1,
    reward_workers: int = 1,
    resume: bool = False,
    fresh: bool = False,
    threads: int | None = None,
    rollout_args: Sequence[str] = (),
) -> int:
    """Run the whole job locally; returns the trainer's exit code.

    Args:
        threads: CPU threads of each process's torch (OMP_NUM_THREADS); None = torch's default (every core).
        rollout_args: key=value settings of every rollout worker (`gtpo serve rollout` arguments).
    """
    from rich.console import Console

    from shared.queues.redis_server import EmbeddedRedis

    console = Console()
    run_dir = cfg.output_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    embedded = None
    url = cfg.redis.resolved_url()
    if resume and fresh:
        raise ValueError("--resume and --fresh: choose one (continue the run, or start it again at step 0)")
    if fresh and not url:  # the embedded server's data is the earlier run's queues and weight registry
        from services.trainer.learner.checkpoint import move_aside

        if (dest := move_aside(run_dir, also=("redis",))) is not None:
            console.print(f"--fresh: moved the earlier run's files to {dest}; starting at step 0")
    if not url:
        embedded = EmbeddedRedis(data_dir=run_dir / "redis")
        embedded.start()
        url = embedded.url
    token = secrets.token_urlsafe(24)
    env = {**os.environ, "REDIS_URL": url, "GTPO_TRAIN__API_TOKEN": token, "GTPO_ROLLOUT__API_TOKEN": token}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    workers, trainer, trainer_cfg, cfg_path = plan(cfg, run_dir, rollout_workers, reward_workers, resume, fresh,
                                                   rollout_args)  # fmt: skip
    cfg_path.write_text(dump_config(trainer_cfg))
    source = "embedded" if embedded else "redis.url" if cfg.redis.url else "REDIS_URL"
    console.print(f"redis {redact_url(url)} ({source}), logs in {run_dir / 'logs'}")
    try:
        for p in workers:
            p.start(env)
        found = check_services(cfg, workers)
        unchecked = [p.name for p in workers if p.url not in found]
        console.print(f"services agree with the run: {len(found)} checked" +
                      (f"; not answering, unchecked: {', '.join(unchecked)}" if unchecked else ""))  # fmt: skip
        trainer.start(env)
        return _supervise(trainer, workers, env, run_dir, cfg.steps, console)
    finally:
        trainer.stop()
        for p in workers:
            p.stop()
        if embedded is not None:
            embedded.stop()


def _supervise(trainer: Managed, workers: list[Managed], env, run_dir: Path, steps: int, console) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    metrics = run_dir / "metrics.jsonl"
    cols = (TextColumn("gtpo up"), BarColumn(), TextColumn("step {task.completed}/{task.total} {task.fields[info]}"))
    with Progress(*cols, TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("run", total=steps, info="starting services")
        while trainer.alive():
            for p in workers:
                if not p.alive():
                    p.restarts += 1
                    console.print(
                        f"[yellow]{p.name} exited ({p.proc.returncode if p.proc else '?'}); restart {p.restarts}, see {p.log}"
                    )
                    p.start(env)
            last = _last_metrics(metrics)
            if last:
                bar.update(task, completed=int(last.get("step", 0)),
                           info=f"reward {last.get('reward_mean', 0):.3f} acc {last.get('accuracy', 0):.3f}")  # fmt: skip
            time.sleep(1.0)
        last = _last_metrics(metrics)
        if last:
            bar.update(task, completed=int(last.get("step", 0)))
    code = trainer.proc.returncode if trainer.proc else 1
    if code != 0:
        console.print(f"[red]trainer exited with {code}; see {trainer.log}")
    return code


def _last_metrics(path: Path) -> dict | None:
    if not path.exists():
        return None
    lines = path.read_text().splitlines()
    return json.loads(lines[-1]) if lines else None
