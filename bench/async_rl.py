"""Asynchronous GTPO against the synchronous loop: steps/hour and busy fractions over workers x max_staleness.

    python bench/async_rl.py [--workers 4,16,64] [--k 0,1,2,4] [--swap off,on] [--steps 8] [--time-scale 400] [--quick]

Real: the round driver (`services.trainer.orchestrator.driver.Driver`: admission, the buffer, the ledger, staleness checks,
acknowledgements, weights publishing and pruning), Redis ($REDIS_URL, a fresh namespace per configuration, else an
embedded server), the `RolloutWorker` loop (one thread per worker, `task_batch=1`: a worker is one decoding slot)
and `RewardWorker`s scoring with a real `VerifierPool`. Simulated: the engine (a task sleeps for its response's
length times a per-token time; lengths are lognormal) and the trainer (a step sleeps for its batch's response
tokens times a per-token time).

The time model, in simulated seconds (the wall clock runs `--time-scale` x 16 / workers times faster: every
configuration then generates the same tokens per wall-clock second, so the CPU cost of the queues, the driver and
the reward workers, which is not what is measured, weighs the same on each):

* response length: lognormal, median 1024 tokens, sigma 0.7 (p99/p50 = 5.1), capped at 8192 (the recipe's budget);
* rollout: 1250 s for an 8192-token response (DiRL section 4.3: a step's rollout takes ~1.2-1.3 ks at 8K tokens,
  and a synchronous step waits for its longest response), i.e. 0.153 s per token of one sequence;
* training: 167 s for a batch of mean-length responses (DiRL: ~167 s per step), proportional to the batch's tokens.

In-flight updates (`--swap on`: `rollout.swap_at_block`, docs/design.md section 7): a simulated response sleeps in
slices of whole blocks (`--swap-check-s` of simulated decoding each, cut on the absolute block grid) and calls the
real worker's block hook between two slices, as the torch engine calls it between two blocks; the hook reads the
registry (rate-limited by `swap_poll_ms`) and loads a newer version of the run, so the next slice's tokens carry it
(`Rollout.token_versions`). Both settings sleep in the same slices, so the switch alone changes nothing of the
timing; a weights load costs no simulated time either way. Staleness is reported per sample (the bound's view: a
response's oldest token) and per token (`staleness_token_*`, computed by the trainer's `token_staleness`).

Each configuration runs `--warmup` steps and then `--steps` measured ones. Steps/hour is in simulated time over the
measured steps; the trainer's busy fraction is its time in `rl_step` over that window, a worker's is its time in
`generate` over it. The ratio column is steps/hour against k = 0 at the same worker count in the same run; `ideal`
is what perfect overlap would give in this time model (a Monte Carlo of the synchronous step against the rollout
throughput). Every configuration's audit trail (`trained_groups.jsonl`) is checked: each group and each task trained
at most once, every group complete, every sample within k versions of the trainer's. Exits 1 if any check fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/async_rl.py` puts bench/ first on sys.path, and the verifier pool's spawned workers inherit it: keep
# bench/'s modules from shadowing anything
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse
import contextlib
import heapq
import io
import json
import logging
import math
import random
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace

from services.rollout.host import Loaded, Served
from services.trainer.learner.checkpoint import TrainerState
from services.trainer.learner.objective import token_staleness
from services.trainer.orchestrator.collect import parse_task_id
from shared.contracts.wire import GenerationRequest, Rollout, StepBatch

BLOCK = 4
"""Block size of the simulated decoder; it unmasks two tokens per denoising step."""

REF_WORKERS = 16
"""`--time-scale` is the scale at this many workers; n workers run at scale x REF_WORKERS / n."""


# --------------------------------------------------------------------------- the time model


@dataclass(frozen=True)
class Lengths:
    """Response lengths: lognormal with this median and sigma, capped at `cap` tokens (then truncated)."""

    median: float = 1024
    sigma: float = 0.7
    cap: int = 8192

    def draw(self, rng: random.Random) -> int:
        return max(1, min(self.cap, round(self.median * math.exp(rng.gauss(0.0, self.sigma)))))

    def quantile(self, q: float) -> float:
        """The q-quantile of the capped length.

        >>> round(Lengths(1024, 0.7, 8192).quantile(0.99) / Lengths(1024, 0.7, 8192).quantile(0.5), 2)
        5.1
        """
        return min(self.cap, self.median * math.exp(self.sigma * statistics.NormalDist().inv_cdf(q)))

    def mean(self) -> float:
        """E[min(X, cap)] for X lognormal: exp(mu + s^2/2) Phi((ln c - mu - s^2)/s) + c (1 - Phi((ln c - mu)/s))."""
        mu, s, c, phi = math.log(self.median), self.sigma, self.cap, statistics.NormalDist().cdf
        return math.exp(mu + s * s / 2) * phi((math.log(c) - mu - s * s) / s) + c * (1 - phi((math.log(c) - mu) / s))


@dataclass(frozen=True)
class TimeModel:
    """Simulated seconds per token; `scale` simulated seconds pass per wall-clock second."""

    lengths: Lengths
    rollout_s_per_token: float
    train_s_per_token: float
    scale: float

    @classmethod
    def from_step_times(cls, lengths: Lengths, rollout_cap_s: float, train_step_s: float, batch: int, scale: float):
        """`rollout_cap_s`: one `lengths.cap`-token response; `train_step_s`: a batch of `batch` mean responses."""
        return cls(lengths, rollout_cap_s / lengths.cap, train_step_s / (batch * lengths.mean()), scale)

    def wall(self, simulated_s: float) -> float:
        return simulated_s / self.scale

    def for_workers(self, workers: int) -> TimeModel:
        """The same model with the wall clock scaled to `workers` (see the module docstring)."""
        return replace(self, scale=self.scale * REF_WORKERS / workers)


def ideal_ratio(tm: TimeModel, workers: int, tasks: int, reps: int = 2000, seed: int = 0) -> float:
    """Synchronous step time over the asynchronous one with perfect overlap, in this time model.

    Synchronous: `tasks` lengths drawn, handed in order to the first free of `workers` slots, the step ends with
    the last one (its makespan), then the trainer trains. Asynchronous: the slots never idle and training hides
    behind generation, so a step takes the longer of training and `tasks` mean responses over `workers` slots.
    Refills of dropped groups and expired groups are left out (they cost both loops).
    """
    rng = random.Random(seed)
    total = 0.0
    for _ in range(reps):
        free = [0.0] * workers
        for _ in range(tasks):
            heapq.heappush(free, heapq.heappop(free) + tm.lengths.draw(rng))
        total += max(free)
    train = tasks * tm.lengths.mean() * tm.train_s_per_token
    sync = total / reps * tm.rollout_s_per_token + train
    return sync / max(train, tasks * tm.lengths.mean() / workers * tm.rollout_s_per_token)


# --------------------------------------------------------------------------- the simulated engine


@dataclass(frozen=True)
class Prompt:
    question: str
    answer: str
    accuracy: float
    """How often the simulated policy answers it right."""


def make_prompts(n: int, seed: int = 0) -> list[Prompt]:
    """Sums of two numbers, each with an accuracy drawn from U(0.2, 0.8): a few groups agree on every reward (and
    dynamic sampling drops and refills them), as in a real run."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(10, 1000), rng.randrange(10, 1000)
        out.append(Prompt(f"What is {a} + {b}?", str(a + b), rng.uniform(0.2, 0.8)))
    return out


def step_map_for(prompt_len: int, n: int) -> list[int]:
    """Two tokens per denoising step on the absolute block grid (the prompt's last block is shared).

    >>> step_map_for(2, 6)  # positions 2,3 | 4,5,6,7: one step for the first block, two for the second
    [1, 1, 2, 2, 3, 3]
    """
    steps, step, pos = [], 0, prompt_len
    while len(steps) < n:
        width = min(BLOCK - pos % BLOCK, n - len(steps))  # the response's positions in this block
        steps += [step + 1 + j // 2 for j in range(width)]
        step, pos = step + (width + 1) // 2, pos + width
    return steps


def slice_ends(prompt_len: int, n: int, blocks: int) -> list[int]:
    """Where the slices of a simulated response end (response token counts): after its first (partial) block, then
    every `blocks` blocks of the absolute grid, then at its end.

    >>> slice_ends(2, 11, 1)  # positions 2,3 | 4..7 | 8..11 | 12
    [2, 6, 10, 11]
    >>> slice_ends(4, 20, 2)
    [8, 16, 20]
    """
    first = (-prompt_len) % BLOCK
    return [e for e in range(first, n, BLOCK * blocks) if e > 0] + [n]


def sim_rollout(req: GenerationRequest, prompt: Prompt, version: int, lengths: Lengths) -> Rollout:
    """The rollout the simulated policy returns for one request: its length and correctness follow from the
    request's seed (so a task always gets the same answer), the text is what the reward service verifies."""
    seed = req.params.seed or 0
    rng = random.Random(seed)
    limit = min(lengths.cap, req.params.max_new_tokens)
    n = min(lengths.draw(rng), limit)
    right = rng.random() < prompt.accuracy
    answer = prompt.answer if right else str(int(prompt.answer) + 1)
    ids = list(rng.randbytes(n))  # byte ids: inside the tiny tokenizer's vocabulary
    return Rollout(
        prompt_ids=req.prompt_ids, token_ids=ids, step_map=step_map_for(len(req.prompt_ids), n),
        text=f"Adding the two numbers gives $\\boxed{{{answer}}}$.", finish_reason="stop" if n < limit else "length",
        policy_version=version, params=req.params.model_copy(update={"block_size": BLOCK}), seed=seed,
        logprobs=[-(b + 1) / 1024 for b in ids],
    )  # fmt: skip


class SimHost:
    """What `RolloutWorker` drives (`load`, `generate`): no model, each request sleeps for its length.

    Args:
        prompts: prompt ids -> the prompt (the simulated policy knows the answer and how often it gets it right).
        tm: lengths and seconds per token.
        stop: set to end a sleep early (the bench is shutting down).
    """

    def __init__(
        self, prompts: dict[tuple[int, ...], Prompt], tm: TimeModel, stop: threading.Event, slice_blocks: int = 1
    ) -> None:
        """`slice_blocks`: blocks decoded between two calls of the block hook (see the module docstring)."""
        self.prompts, self.tm, self.stop, self.slice_blocks = prompts, tm, stop, slice_blocks
        self.version: int | None = None
        self.served_run: str | None = None
        self.spans: list[tuple[float, float]] = []
        """(start, end) of each `generate`, monotonic: the worker's busy time."""

    @property
    def served_version(self) -> int | None:
        return self.version

    def load(self, path, root: Path, version: int, source: str, rollback: bool = False, run=None) -> Loaded:
        # a real engine takes seconds here: not what is measured
        before, self.version, self.served_run = self.version, version, run
        return Loaded(version, str(path), 0.0, None if before is None else Served(before, str(path)))

    def generate(
        self, requests: list[GenerationRequest], source: str, cancel=None, at_block=None
    ) -> list[list[Rollout]]:
        start = time.monotonic()
        out = []
        for req in requests:
            rollout = sim_rollout(req, self.prompts[tuple(req.prompt_ids)], self.version or 0, self.tm.lengths)
            rollout.policy_run = self.served_run
            versions = self.decode(len(req.prompt_ids), len(rollout.token_ids), at_block)
            if at_block is not None:  # validated: versions change only where a block starts
                rollout = Rollout.model_validate({**rollout.model_dump(), "token_versions": versions})
            out.append([rollout])
        self.spans.append((start, time.monotonic()))
        return out

    def decode(self, prompt_len: int, n: int, at_block) -> list[int]:
        """Sleep for `n` tokens' decoding in slices of whole blocks, calling `at_block` between two slices (it may
        load a newer version). Returns the version of each token. Sleeps to absolute deadlines, so slicing adds no
        time."""
        t0, per_token = time.monotonic(), self.tm.wall(self.tm.rollout_s_per_token)
        versions: list[int] = []
        for end in slice_ends(prompt_len, n, self.slice_blocks):
            if versions and at_block is not None:
                at_block()
            versions += [self.version or 0] * (end - len(versions))
            self.stop.wait(max(0.0, t0 + end * per_token - time.monotonic()))
        return versions


# --------------------------------------------------------------------------- the simulated trainer


class SoloAccelerator:
    """One process: what the driver asks of an Accelerator."""

    num_processes = 1
    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass


class SimTrainer:
    """A `services.trainer.orchestrator.driver.DrivenLearner`: a step sleeps for its tokens, a checkpoint is a small folder.

    Args:
        output_dir: the run's folder (checkpoints go under it).
        tokenizer: encodes the prompts (the collector's).
        tm: seconds per trained token.
    """

    spec = None
    """No model: the start-up check leaves the block size and mask id unchecked."""

    def __init__(self, output_dir: Path, tokenizer, tm: TimeModel) -> None:
        self.state = TrainerState()
        self.accelerator = SoloAccelerator()
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.checkpoint_root = output_dir / "checkpoints"
        self.tm = tm
        self.spans: list[tuple[float, float]] = []
        """(start, end) of each `rl_step`, monotonic."""

    def resume(self) -> bool:
        return False

    def start_fresh(self) -> None:
        shutil.rmtree(self.checkpoint_root, ignore_errors=True)

    def rl_step(self, batch: StepBatch) -> dict:
        start = time.monotonic()
        tokens = sum(len(s.rollout.token_ids) for g in batch.groups for s in g)
        time.sleep(self.tm.wall(tokens * self.tm.train_s_per_token))
        flat = [s.reward for g in batch.groups for s in g]
        lag_mean, lag_max = token_staleness([s.rollout.versions() for g in batch.groups for s in g],
                                            self.state.policy_version)  # fmt: skip
        metrics = {"loss": 0.0, "tokens": tokens, "updates": 1 if tokens else 0, "groups": len(batch.groups),
                   "reward_mean": sum(flat) / max(1, len(flat)), "staleness_token_mean": lag_mean,
                   "staleness_token_max": lag_max, **batch.metrics}  # fmt: skip
        self.state.step += 1
        metrics.update(step=self.state.step, time=time.time())
        self.spans.append((start, time.monotonic()))
        return metrics

    def weights_path(self, ckpt: Path) -> Path:
        return ckpt / "model"

    def save(self, *, publish: bool = True) -> Path:
        if publish:
            self.state.policy_version += 1
        path = self.checkpoint_root / f"step-{self.state.step:08d}"
        (path / "model").mkdir(parents=True, exist_ok=True)
        (path / "model" / "version").write_text(str(self.state.policy_version))
        (path / "trainer_state.json").write_text(json.dumps(asdict(self.state)))  # what marks it complete
        return path


# --------------------------------------------------------------------------- measuring


def busy_fraction(spans: list[tuple[float, float]], t0: float, t1: float) -> float:
    """The part of [t0, t1] covered by non-overlapping `spans`.

    >>> busy_fraction([(0, 2), (3, 5), (9, 12)], 1, 11)
    0.5
    """
    covered = sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in spans)
    return covered / (t1 - t0) if t1 > t0 else 0.0


def audit(rows: list[dict], group_size: int, k: int) -> dict:
    """What the audit trail says: problems with exactly-once training (empty when none) and the staleness seen.

    Args:
        rows: `trained_groups.jsonl`, one row per trained group.
        group_size: samples per group.
        k: the staleness bound.
    """
    problems, groups, tasks = [], set(), set()
    staleness = []
    for row in rows:
        key = (row["train_by"], row["prompt_index"])
        if key in groups:
            problems.append(f"group {key} trained twice")
        groups.add(key)
        samples = set()
        for tid in row["task_ids"]:
            if tid in tasks:
                problems.append(f"task {tid} trained twice")
            tasks.add(tid)
            parsed = parse_task_id(tid)
            if parsed is None or (parsed[1], parsed[2]) != key:
                problems.append(f"task {tid} is not of group {key}")
            else:
                samples.add(parsed[3])
        if samples != set(range(group_size)):
            problems.append(f"group {key} trained samples {sorted(samples)} of {group_size}")
        staleness += [row["trainer_version"] - v for v in row["versions"]]
    if not rows:
        problems.append("no group was trained")
    if staleness and (min(staleness) < 0 or max(staleness) > k):
        problems.append(f"staleness {min(staleness)}..{max(staleness)} outside 0..{k}")
    return {"problems": problems, "groups": len(groups), "staleness_max": max(staleness, default=0),
            "staleness_mean": sum(staleness) / max(1, len(staleness))}  # fmt: skip


@dataclass
class Row:
    """One configuration's figures."""

    workers: int
    k: int
    steps: int
    scale: float
    steps_per_hour: float
    trainer_busy: float
    worker_busy: float
    reward_busy: float | None
    staleness_max: int
    staleness_mean: float
    groups_expired: int
    samples_stale: int
    groups_trained: int
    exactly_once: bool
    problems: list[str] = field(default_factory=list)
    ratio: float | None = None
    ideal: float | None = None
    swap: bool = False
    """rollout.swap_at_block"""
    token_staleness_mean: float = 0.0
    token_staleness_max: int = 0


# --------------------------------------------------------------------------- one configuration


@dataclass
class Bench:
    """What every configuration of a sweep shares."""

    tm: TimeModel
    redis_url: str
    pool: object
    tokenizer: object
    prompts: list[Prompt]
    root: Path
    prompts_per_step: int = 8
    group_size: int = 8
    reward_workers: int = 2
    warmup: int = 1
    steps: int = 8
    seed: int = 0
    swap_check_s: float = 10.0
    """Simulated decoding seconds between two calls of the block hook (whole blocks; 16 blocks at 10 s). Coarser
    than an engine's every block because every worker here is a thread of one process and each call reads Redis
    under the GIL: at 2.5 s, 16 workers made ~2,700 reads a wall second and lost ~5 points of busy time to it. A
    version is then picked up within 10 s of decoding, against steps of ~500-800 s."""
    data: Path = field(init=False)
    """The prompts as the driver reads them."""
    by_ids: dict[tuple[int, ...], Prompt] = field(init=False, default_factory=dict)
    """Prompt ids -> prompt: how the simulated engine recognises the prompt of a request."""

    def __post_init__(self) -> None:
        from services.trainer.config import RLConfig
        from shared.prompts import encode_prompt

        template = RLConfig.model_fields["prompt_template"].default
        self.data = self.root / "prompts.jsonl"
        self.data.write_text("".join(json.dumps({"question": p.question, "ground_truth_answer": p.answer}) + "\n"
                                     for p in self.prompts))  # fmt: skip
        for p in self.prompts:  # the ids the collector will send
            ids = encode_prompt(self.tokenizer, template.format(question=p.question), chat=False)
            self.by_ids[tuple(ids)] = p

    def config(self, k: int, out: Path, namespace: str):
        from services.trainer.config import RLConfig

        return RLConfig.model_validate({
            "model": str(out / "start"), "output_dir": str(out), "data": str(self.data), "seed": self.seed,
            "steps": self.warmup + self.steps, "prompts_per_step": self.prompts_per_step, "max_staleness": k,
            "loss": {"objective": "decoupled" if k else "standard"},
            "chat_template": False, "keep_last": 2, "step_timeout_s": 600,
            "rollout": {"group_size": self.group_size, "max_new_tokens": self.tm.lengths.cap},
            "redis": {"url": self.redis_url, "namespace": namespace},
        })  # fmt: skip

    def run(self, workers: int, k: int, swap: bool = False) -> Row:
        """Run one configuration to its last step; the figures over the measured steps."""
        from services.reward.settings import RewardSettings
        from services.reward.worker import RewardWorker
        from services.rollout.settings import RolloutSettings
        from services.rollout.worker import RolloutWorker
        from services.trainer.orchestrator.driver import Driver

        namespace = f"bench-async-{uuid.uuid4().hex[:8]}-w{workers}-k{k}" + ("-swap" if swap else "")
        tm = self.tm.for_workers(workers)
        out = self.root / namespace
        (out / "start").mkdir(parents=True)
        cfg = self.config(k, out, namespace)
        stop = threading.Event()
        blocks = max(1, round(self.swap_check_s / (BLOCK * tm.rollout_s_per_token)))
        hosts = [SimHost(self.by_ids, tm, stop, blocks) for _ in range(workers)]
        poll_ms = int(tm.wall(blocks * BLOCK * tm.rollout_s_per_token) * 500)  # half a slice: never skips a check
        threads = []
        try:
            for i, host in enumerate(hosts):
                settings = RolloutSettings(model=out / "start", checkpoint_root=out, worker_id=f"rollout-{i}",
                                           task_batch=1, redis=cfg.redis, swap_at_block=swap,
                                           swap_poll_ms=poll_ms)  # fmt: skip
                threads.append(RolloutWorker(host, settings).start(stop))
            for i in range(self.reward_workers):
                settings = RewardSettings(worker_id=f"reward-{i}", weights={"accuracy": 1.0}, redis=cfg.redis)
                threads.append(RewardWorker(self.pool, settings).start(stop))
            trainer = SimTrainer(out, self.tokenizer, tm)
            with contextlib.redirect_stdout(io.StringIO()):  # the driver's progress bar: one line per row instead
                history = Driver(cfg, learner=lambda _: trainer).run()
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=10)
            delete_namespace(self.redis_url, namespace)
        rows = [json.loads(x) for x in (out / "trained_groups.jsonl").read_text().splitlines() if x.strip()]
        return replace(self.measure(workers, k, trainer, hosts, history, rows), swap=swap)

    def measure(self, workers: int, k: int, trainer: SimTrainer, hosts: list[SimHost], history, rows) -> Row:
        t0, t1 = trainer.spans[self.warmup - 1][1], trainer.spans[-1][1]
        measured = trainer.spans[self.warmup :]
        window = history[self.warmup :]
        found = audit(rows, self.group_size, k)
        short = [m["step"] for m in history if m["groups"] != self.prompts_per_step]
        problems = found["problems"] + ([f"steps {short} trained fewer than {self.prompts_per_step} groups"]
                                        if short else [])  # fmt: skip
        reward = [m["busy_reward"] for m in window if "busy_reward" in m]
        tokens = max(1, sum(m["tokens"] for m in window))
        return Row(
            workers=workers, k=k, steps=len(measured), scale=trainer.tm.scale,
            steps_per_hour=len(measured) / trainer.tm.scale / (t1 - t0) * 3600,
            trainer_busy=sum(b - a for a, b in measured) / (t1 - t0),
            worker_busy=sum(busy_fraction(h.spans, t0, t1) for h in hosts) / len(hosts),
            reward_busy=sum(reward) / len(reward) if reward else None,
            staleness_max=found["staleness_max"], staleness_mean=found["staleness_mean"],
            groups_expired=sum(int(m.get("groups_expired", 0)) for m in window),
            samples_stale=sum(int(m.get("dropped_stale", 0)) for m in window),
            groups_trained=found["groups"], exactly_once=not problems, problems=problems,
            token_staleness_mean=sum(m["staleness_token_mean"] * m["tokens"] for m in window) / tokens,
            token_staleness_max=max((m["staleness_token_max"] for m in window), default=0),
        )  # fmt: skip


def delete_namespace(url: str, namespace: str) -> None:
    """UNLINK every key of the namespace (SCAN, never FLUSHALL: the server may be shared)."""
    from shared.queues.keys import Keys
    from shared.queues.queue import connect

    client = connect(url)
    try:
        names = list(client.scan_iter(match=Keys(namespace).pattern, count=1000))
        for i in range(0, len(names), 500):
            client.unlink(*names[i : i + 500])
    finally:
        client.close()


def with_ratios(rows: list[Row], tm: TimeModel, tasks: int) -> list[Row]:
    """Fill each row's ratio to k = 0 without in-flight updates (the synchronous loop) at its worker count, and the
    ideal ratio of perfect overlap."""
    base = {r.workers: r.steps_per_hour for r in rows if r.k == 0 and not r.swap}
    ideal = {w: ideal_ratio(tm, w, tasks) for w in {r.workers for r in rows}}
    for r in rows:
        r.ratio = r.steps_per_hour / base[r.workers] if r.workers in base else None
        r.ideal = ideal[r.workers] if r.k > 0 else 1.0
    return rows


# --------------------------------------------------------------------------- output


def table(rows: list[Row]):
    from rich.table import Table

    t = Table(title="async GTPO: simulated engine and trainer, real driver / Redis / reward workers")
    for name in ("workers", "k", "swap", "steps/h", "x k=0", "ideal x", "trainer busy", "worker busy", "reward busy",
                 "stale mean", "stale max", "tok stale mean", "tok stale max", "expired", "exactly once"):  # fmt: skip
        t.add_column(name, justify="right")
    for r in rows:
        t.add_row(
            str(r.workers), str(r.k), "on" if r.swap else "off", f"{r.steps_per_hour:.2f}",
            "-" if r.ratio is None else f"{r.ratio:.2f}", f"{r.ideal:.2f}", f"{r.trainer_busy:.0%}",
            f"{r.worker_busy:.0%}", "-" if r.reward_busy is None else f"{r.reward_busy:.0%}",
            f"{r.staleness_mean:.2f}", str(r.staleness_max), f"{r.token_staleness_mean:.2f}",
            str(r.token_staleness_max), str(r.groups_expired), "yes" if r.exactly_once else "NO",
        )  # fmt: skip
    return t


def describe(tm: TimeModel, args) -> str:
    ls = tm.lengths
    return (
        f"lengths: lognormal median {ls.median:.0f}, sigma {ls.sigma}, cap {ls.cap} -> mean {ls.mean():.0f}, "
        f"p99/p50 {ls.quantile(0.99) / ls.quantile(0.5):.2f}; rollout {tm.rollout_s_per_token * 1000:.1f} ms/token "
        f"({tm.rollout_s_per_token * ls.cap:.0f} s at the cap); training {tm.train_s_per_token * 1000:.2f} ms/token "
        f"({tm.train_s_per_token * args.prompts_per_step * args.group_size * ls.mean():.0f} s per mean batch); "
        f"{args.prompts_per_step} prompts x {args.group_size} samples per step; time scale {tm.scale:g}x at "
        f"{REF_WORKERS} workers (x {REF_WORKERS}/workers elsewhere); "
        f"{args.warmup} warm-up + {args.steps} measured steps; {args.reward_workers} reward workers, "
        f"{args.verifiers} verifier processes; block hook every {args.swap_check_s:g} simulated s of decoding"
    )


def parse_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_swap(text: str) -> list[bool]:
    """`off,on` -> [False, True]."""
    values = {"off": False, "on": True}
    try:
        return [values[x.strip()] for x in text.split(",") if x.strip()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected comma-separated off / on, got {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=parse_ints, default=[4, 16, 64], help="rollout workers, comma separated")
    ap.add_argument("--k", type=parse_ints, default=[0, 1, 2, 4], help="max_staleness values, comma separated")
    ap.add_argument("--swap", type=parse_swap, default=[False, True],
                    help="rollout.swap_at_block settings, comma separated (off, on)")  # fmt: skip
    ap.add_argument("--swap-check-s", type=float, default=10.0,
                    help="simulated decoding seconds between two block-hook calls (rounded to whole blocks)")  # fmt: skip
    ap.add_argument("--steps", type=int, default=8, help="measured steps per configuration")
    ap.add_argument("--warmup", type=int, default=1, help="steps before measuring")
    ap.add_argument("--time-scale", type=float, default=400.0,
                    help=f"simulated seconds per wall-clock second at {REF_WORKERS} workers")  # fmt: skip
    ap.add_argument("--median-tokens", type=float, default=1024)
    ap.add_argument("--sigma", type=float, default=0.7, help="lognormal sigma of the response length")
    ap.add_argument("--max-new-tokens", type=int, default=8192)
    ap.add_argument("--rollout-cap-s", type=float, default=1250.0, help="simulated seconds of a max-length response")
    ap.add_argument("--train-step-s", type=float, default=167.0, help="simulated seconds to train a mean batch")
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--reward-workers", type=int, default=2)
    ap.add_argument("--verifiers", type=int, default=2, help="verifier processes of the shared pool")
    ap.add_argument("--json", type=Path, help="also write the rows and the settings here")
    ap.add_argument("--quick", action="store_true", help="a tiny run: 16 workers, k 0, 1, 2, swap off and on, 2 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.workers, args.k, args.swap, args.steps = [16], [0, 1, 2], [False, True], 2
    for name in ("steps", "warmup", "prompts_per_step", "group_size", "reward_workers", "verifiers"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: must be >= 1")
    if not args.sigma > 0 or not args.time_scale > 0 or not args.swap_check_s > 0 or min(args.workers, default=0) < 1:
        ap.error("--sigma, --time-scale, --swap-check-s and every --workers value must be > 0")
    return args


def sweep_one(bench: Bench, console, workers: int, k: int, swap: bool) -> Row:
    t = time.monotonic()
    row = bench.run(workers, k, swap)
    console.print(f"workers {workers:>3} k {k} swap {'on ' if swap else 'off'}: {row.steps_per_hour:.2f} steps/h, "
                  f"trainer busy {row.trainer_busy:.0%}, worker busy {row.worker_busy:.0%}, token staleness mean "
                  f"{row.token_staleness_mean:.2f} ({time.monotonic() - t:.0f} s)"
                  + "".join(f"\n  {p}" for p in row.problems))  # fmt: skip
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from rich.console import Console

    from services.reward.verify import VerifierPool
    from shared.model.tiny import build_tiny_tokenizer
    from shared.queues.redis_server import redis_url_or_embedded

    lengths = Lengths(args.median_tokens, args.sigma, args.max_new_tokens)
    batch = args.prompts_per_step * args.group_size
    tm = TimeModel.from_step_times(lengths, args.rollout_cap_s, args.train_step_s, batch, args.time_scale)
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(describe(tm, args))
    with tempfile.TemporaryDirectory(prefix="bench-async-") as tmp:
        root = Path(tmp)
        url, server = redis_url_or_embedded(root / "redis")
        pool = VerifierPool(workers=args.verifiers, timeout_s=5.0)
        try:
            pool.verify_many([("$\\boxed{2}$", "2")])  # spawned and warm before anything is timed
            bench = Bench(tm, url, pool, build_tiny_tokenizer(), make_prompts(512, seed=0), root,
                          args.prompts_per_step, args.group_size, args.reward_workers, args.warmup, args.steps,
                          swap_check_s=args.swap_check_s)  # fmt: skip
            rows = [sweep_one(bench, console, w, k, swap) for w in args.workers for k in args.k for swap in args.swap]
        finally:
            pool.close()
            if server is not None:
                server.stop()
    with_ratios(rows, tm, batch)
    console.print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"settings": describe(tm, args), "rows": [asdict(r) for r in rows]}, indent=1))
    return 0 if all(r.exactly_once for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
