"""Queue throughput and hand-off latency through tasks -> rollouts -> scored, JSON against msgpack.

    python bench/queues.py [--messages 2000] [--tokens 4096] [--inflight 32]

One process, four threads: a producer publishes TaskMessages (at most `--inflight` unfinished), a rollout
stage hands each task off as a RolloutMessage with a `--tokens`-token rollout (token_ids, step_map and
logprobs of that length), a reward stage hands it off as a ScoredMessage, and a trainer stage consumes and
acks it. Prints messages/s, end-to-end and per-`hand_off` latency percentiles and payload sizes per codec,
with the msgpack/json ratio. Runs against $REDIS_URL (in a private namespace, deleted afterwards) or an
embedded server with AOF on, as deployed.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from shared.contracts.wire import (
    Rollout,
    RolloutMessage,
    SamplingParams,
    ScoredMessage,
    ScoreResult,
    TaskMessage,
)
from shared.queues.keys import Keys
from shared.queues.queue import Codec, Queue, connect
from shared.queues.redis_server import EmbeddedRedis

PROMPT_LEN = 256
BLOCK = 4


def make_rollout(tokens: int, seed: int = 0) -> Rollout:
    """A realistic `tokens`-token rollout: SDAR-vocabulary ids, two tokens per step, full-precision logprobs."""
    rng = random.Random(seed)
    params = SamplingParams(block_size=BLOCK, denoising_steps=BLOCK, max_new_tokens=tokens, seed=seed, logprobs=True)
    return Rollout(
        prompt_ids=[rng.randrange(151_000) for _ in range(PROMPT_LEN)],
        token_ids=[rng.randrange(151_000) for _ in range(tokens)],
        step_map=[i // BLOCK * 2 + (i % BLOCK) // 2 + 1 for i in range(tokens)],
        finish_reason="length",
        policy_version=3,
        params=params,
        seed=seed,
        logprobs=[-rng.expovariate(2.0) for _ in range(tokens)],
    )


def make_task(i: int, rollout: Rollout) -> TaskMessage:
    return TaskMessage(
        task_id=f"bench:3:{i // 8}:{i % 8}",
        run_id="bench",
        train_by=3,
        prompt_index=i // 8,
        sample_index=i % 8,
        group_size=8,
        prompt_ids=rollout.prompt_ids,
        prompt_text="x" * 600,
        reference="42",
        params=rollout.params,
        policy_version=3,
    )


@dataclass
class Run:
    """What the four threads share for one codec."""

    queue: Queue
    total: int
    inflight: threading.Semaphore
    stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    sent_at: dict[str, float] = field(default_factory=dict)
    e2e_ms: list[float] = field(default_factory=list)
    hand_off_ms: list[float] = field(default_factory=list)
    received: int = 0
    errors: list[BaseException] = field(default_factory=list)


def _loop(run: Run, fn: Callable[[], None]) -> None:
    """Run a stage until told to stop; an exception stops the whole run (and is reported)."""
    try:
        while not run.stop.is_set():
            fn()
    except BaseException as e:  # a thread must not die silently: the main thread would wait forever
        run.errors.append(e)
        run.stop.set()


def producer(run: Run, rollout: Rollout) -> Callable[[], None]:
    k, counter = run.queue.keys, iter(range(run.total))

    def step() -> None:
        i = next(counter, None)
        if i is None:
            run.stop.wait()
            return
        while not run.inflight.acquire(timeout=0.1):
            if run.stop.is_set():
                return
        t = make_task(i, rollout)
        run.sent_at[t.task_id] = time.perf_counter()
        run.queue.publish(k.tasks, t, t.task_id)

    return step


def rollout_stage(run: Run, rollout: Rollout) -> Callable[[], None]:
    q, k = run.queue, run.queue.keys

    def step() -> None:
        for d in q.consume(k.tasks, k.rollout_group, "rollout-0", TaskMessage, count=8, block_ms=100):
            # model_construct: the worker built and validated its rollout already; we measure the queue
            msg = RolloutMessage.model_construct(task=d.message, rollout=rollout, worker="rollout-0")
            t0 = time.perf_counter()
            q.hand_off(k.tasks, k.rollout_group, d.entry_id, k.rollouts, msg, d.message.task_id)
            run.hand_off_ms.append((time.perf_counter() - t0) * 1e3)

    return step


def reward_stage(run: Run) -> Callable[[], None]:
    q, k = run.queue, run.queue.keys

    def step() -> None:
        for d in q.consume(k.rollouts, k.reward_group, "reward-0", RolloutMessage, count=8, block_ms=100):
            score = ScoreResult(id=d.message.task.task_id, total=1.0, components={"accuracy": 1.0}, status="ok")
            msg = ScoredMessage.model_construct(task=d.message.task, rollout=d.message.rollout, score=score)
            t0 = time.perf_counter()
            q.hand_off(k.rollouts, k.reward_group, d.entry_id, k.scored, msg, d.message.task.task_id)
            run.hand_off_ms.append((time.perf_counter() - t0) * 1e3)

    return step


def trainer_stage(run: Run) -> Callable[[], None]:
    q, k = run.queue, run.queue.keys

    def step() -> None:
        got = q.consume(k.scored, k.trainer_group, "trainer-0", ScoredMessage, count=16, block_ms=100)
        q.ack(k.scored, k.trainer_group, *(d.entry_id for d in got))
        now = time.perf_counter()
        for d in got:
            run.e2e_ms.append((now - run.sent_at.pop(d.message.task.task_id)) * 1e3)
            run.inflight.release()
        before, run.received = run.received, run.received + len(got)
        if run.received // 64 > before // 64:  # keep Redis memory bounded: drop what every stage is done with
            for stream in k.streams:
                q.trim_acked(stream)
        if run.received >= run.total:
            run.done.set()
            run.stop.set()

    return step


def run_codec(client: redis.Redis, codec: str, total: int, inflight: int, rollout: Rollout) -> dict[str, float]:
    """Push `total` messages through the pipeline with `codec`; returns the measurements."""
    keys = Keys(f"bench-{codec}-{uuid.uuid4().hex[:8]}")
    q = Queue(client, keys, codec=codec)
    q.ensure_groups()
    run = Run(q, total, threading.Semaphore(inflight))
    stages = [producer(run, rollout), rollout_stage(run, rollout), reward_stage(run), trainer_stage(run)]
    threads = [threading.Thread(target=_loop, args=(run, s), daemon=True) for s in stages]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    finished = run.done.wait(timeout=300)
    wall = time.perf_counter() - t0
    run.stop.set()
    for t in threads:
        t.join(timeout=5)
    _delete(client, keys)
    if run.errors:
        raise run.errors[0]
    if not finished:
        raise TimeoutError(f"{codec}: {run.received}/{total} messages after 300 s")
    return _summary(run, wall, codec, rollout)


def _delete(client: redis.Redis, keys: Keys) -> None:
    names = list(client.scan_iter(match=keys.pattern, count=1000))
    for i in range(0, len(names), 500):
        client.unlink(*names[i : i + 500])


def _pct(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def _summary(run: Run, wall: float, codec: str, rollout: Rollout) -> dict[str, float]:
    c = Codec.get(codec)
    t = make_task(0, rollout)
    scored = ScoredMessage(task=t, rollout=rollout, score=ScoreResult(id="x", total=1, components={}, status="ok"))
    return {
        "messages/s": run.total / wall,
        "end-to-end p50 ms": _pct(run.e2e_ms, 50),
        "end-to-end p99 ms": _pct(run.e2e_ms, 99),
        "hand_off p50 ms": _pct(run.hand_off_ms, 50),
        "hand_off p99 ms": _pct(run.hand_off_ms, 99),
        "task bytes": len(c.encode(t)),
        "scored bytes": len(c.encode(scored)),
        "encode+decode scored ms": _codec_ms(c, scored),
    }


def _codec_ms(codec: Codec, msg: ScoredMessage, repeats: int = 20) -> float:
    """Median time of one encode plus one decode, outside Redis (what every stage pays in CPU)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        codec.decode(codec.encode(msg), ScoredMessage)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _print_table(results: dict[str, dict[str, float]]) -> None:
    js, mp = results["json"], results["msgpack"]
    print(f"{'metric':<26}{'json':>12}{'msgpack':>12}{'msgpack/json':>14}")
    for name in js:
        print(f"{name:<26}{js[name]:>12.4g}{mp[name]:>12.4g}{mp[name] / js[name]:>14.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=4096, help="response length of each rollout")
    ap.add_argument("--inflight", type=int, default=32, help="unfinished messages at most (the producer waits)")
    args = ap.parse_args()
    rollout = make_rollout(args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        server = None if os.environ.get("REDIS_URL") else EmbeddedRedis(tmp)
        url = os.environ["REDIS_URL"] if server is None else server.url
        where = "REDIS_URL" if server is None else "embedded redis-server, AOF everysec"
        try:
            client = connect(url)
            version = client.info("server")["redis_version"]
            print(
                f"{args.messages} messages, {args.tokens}-token rollouts, inflight {args.inflight}; {where} {version}"
            )
            results = {c: run_codec(client, c, args.messages, args.inflight, rollout) for c in ("json", "msgpack")}
        finally:
            if server is not None:
                server.stop()
    _print_table(results)


if __name__ == "__main__":
    main()
