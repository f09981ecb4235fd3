"""The async benchmark's pieces (bench/async_rl.py): one tiny configuration through the real driver, Redis, rollout
and reward workers, checked for its table row and exactly-once training; the audit, the busy fraction and the time
model on hand-derived cases. No wall-clock assertion: the figures are only checked to be fractions and counts."""

import json
import math
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from bench.async_rl import (
    Bench,
    Lengths,
    Prompt,
    Row,
    SimHost,
    TimeModel,
    audit,
    busy_fraction,
    make_prompts,
    sim_rollout,
    table,
    with_ratios,
)
from shared.contracts.wire import GenerationRequest, SamplingParams


@pytest.mark.redis
def test_one_tiny_configuration_trains_every_group_once_within_the_bound(redis_url, tmp_path):
    from services.reward.verify import VerifierPool
    from shared.model.tiny import build_tiny_tokenizer

    tm = TimeModel(Lengths(64, 0.7, 256), rollout_s_per_token=1.0, train_s_per_token=0.05, scale=1250.0)
    with VerifierPool(workers=1, timeout_s=5.0) as pool:
        bench = Bench(tm, redis_url, pool, build_tiny_tokenizer(), make_prompts(40), tmp_path, prompts_per_step=2,
                      group_size=2, reward_workers=1, warmup=1, steps=2)  # fmt: skip
        row = bench.run(workers=2, k=1)
    assert row.problems == [] and row.exactly_once
    assert (row.workers, row.k, row.steps, row.scale) == (2, 1, 2, 1250.0 * 16 / 2)
    assert row.groups_trained == 3 * 2  # warm-up + 2 measured steps, 2 groups each
    assert 0 <= row.staleness_max <= 1
    assert 0 < row.trainer_busy <= 1 and 0 < row.worker_busy <= 1 and row.steps_per_hour > 0
    assert row.reward_busy is None or 0 <= row.reward_busy <= 1
    (run,) = [p for p in tmp_path.iterdir() if p.name.startswith("bench-async-")]
    trained = [json.loads(x) for x in (run / "trained_groups.jsonl").read_text().splitlines()]
    assert [r["step"] for r in trained] == [0, 0, 1, 1, 2, 2]
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["groups"] for m in metrics] == [2, 2, 2] and all(m["tokens"] > 0 for m in metrics)


def _row(group: tuple[int, int], samples=(0, 1), trainer_version=3, versions=(3, 3)) -> dict:
    tag, prompt = group
    return {"step": 0, "train_by": tag, "prompt_index": prompt, "trainer_version": trainer_version,
            "task_ids": [f"run:{tag}:{prompt}:{j}" for j in samples], "versions": list(versions)}  # fmt: skip


def test_the_audit_passes_a_clean_trail_and_names_each_kind_of_fault():
    clean = [_row((1, 0)), _row((1, 1), versions=(2, 3))]
    found = audit(clean, group_size=2, k=1)
    assert found["problems"] == [] and found["groups"] == 2
    assert found["staleness_max"] == 1 and found["staleness_mean"] == pytest.approx(0.25)  # (0+0+1+0) / 4

    twice = audit([*clean, _row((1, 0))], group_size=2, k=1)["problems"]
    assert "group (1, 0) trained twice" in twice and "task run:1:0:0 trained twice" in twice
    assert audit([_row((1, 0), samples=(0,), versions=(3,))], 2, 1)["problems"] == [
        "group (1, 0) trained samples [0] of 2"
    ]
    assert audit([_row((1, 0), versions=(1, 3))], 2, 1)["problems"] == ["staleness 0..2 outside 0..1"]
    assert audit([], 2, 1)["problems"] == ["no group was trained"]


def test_busy_fraction_clips_spans_to_the_window():
    # [2, 6] is covered by (1, 3) for 1 s and (5, 8) for 1 s: 2 of 4 s
    assert busy_fraction([(1.0, 3.0), (5.0, 8.0)], 2.0, 6.0) == 0.5
    assert busy_fraction([(0.0, 1.0)], 2.0, 6.0) == 0.0
    assert busy_fraction([], 2.0, 2.0) == 0.0


def test_the_length_model_has_the_tail_the_issue_asks_for():
    ls = Lengths(1024, 0.7, 8192)
    # p99 / p50 = exp(0.7 * z_0.99) = exp(0.7 * 2.3263) = 5.09
    assert ls.quantile(0.99) / ls.quantile(0.5) == pytest.approx(5.09, abs=0.01)
    # uncapped, the mean is median * exp(sigma^2 / 2) = 1024 * exp(0.245) = 1308.3
    assert Lengths(1024, 0.7, 10**9).mean() == pytest.approx(1308.3, abs=0.1)
    assert ls.mean() < 1308.3  # the cap only takes away
    tm = TimeModel.from_step_times(ls, rollout_cap_s=1250, train_step_s=167, batch=64, scale=400)
    assert tm.rollout_s_per_token == pytest.approx(1250 / 8192)
    assert tm.train_s_per_token * 64 * ls.mean() == pytest.approx(167)
    assert tm.for_workers(64).scale == 100 and tm.for_workers(4).scale == 1600


def _request(seed: int, prompt_len: int, max_new_tokens: int = 64) -> GenerationRequest:
    params = SamplingParams(max_new_tokens=max_new_tokens, seed=seed, logprobs=True)
    return GenerationRequest(prompt_ids=list(range(1, prompt_len + 1)), params=params)


def test_a_simulated_rollout_follows_from_its_seed_and_is_a_valid_rollout():
    prompt = Prompt("What is 1 + 2?", "3", accuracy=0.5)
    ls = Lengths(16, 1.0, 64)
    for prompt_len in (4, 5, 6, 7):  # every offset of the response in its first block: the step map validates
        a = sim_rollout(_request(7, prompt_len), prompt, 2, ls)
        assert a == sim_rollout(_request(7, prompt_len), prompt, 2, ls)
        assert a.policy_version == 2 and len(a.logprobs) == len(a.token_ids) == len(a.step_map)
        assert sorted(set(a.step_map)) == list(range(1, max(a.step_map) + 1))  # steps 1, 2, ... with none skipped
        assert a.text.endswith(("$\\boxed{3}$.", "$\\boxed{4}$."))
        assert a.finish_reason == ("length" if len(a.token_ids) == 64 else "stop")
    lengths = {len(sim_rollout(_request(s, 4), prompt, 0, ls).token_ids) for s in range(50)}
    assert len(lengths) > 10 and max(lengths) <= 64


def test_the_simulated_host_serves_the_loaded_version_and_counts_its_busy_time():
    prompt = Prompt("q", "3", 0.5)
    req = _request(1, 4)
    host = SimHost({tuple(req.prompt_ids): prompt}, TimeModel(Lengths(16, 1.0, 64), 1.0, 0.0, 1e6), threading.Event())
    loaded = host.load("/x", Path("/"), 5, "registry")
    assert (loaded.version, loaded.seconds, loaded.previous) == (5, 0.0, None) and host.served_version == 5
    ((rollout,),) = host.generate([req], "queue")
    assert rollout.policy_version == 5 and len(host.spans) == 1 and host.spans[0][0] <= host.spans[0][1]


def _result(workers: int, k: int, steps_per_hour: float) -> Row:
    return Row(workers=workers, k=k, steps=4, scale=400.0, steps_per_hour=steps_per_hour, trainer_busy=0.5,
               worker_busy=0.5, reward_busy=None, staleness_max=k, staleness_mean=0.0, groups_expired=0,
               samples_stale=0, groups_trained=32, exactly_once=True)  # fmt: skip


def test_the_table_has_one_row_per_configuration_with_its_ratio_to_k0():
    tm = TimeModel.from_step_times(Lengths(), 1250, 167, 64, 400)
    rows = with_ratios([_result(4, 0, 3.0), _result(4, 2, 4.5), _result(16, 0, 2.0), _result(16, 2, 5.0)], tm, 64)
    assert [r.ratio for r in rows] == [1.0, 1.5, 1.0, 2.5]
    assert rows[0].ideal == 1.0 and rows[1].ideal > 1.0
    assert not math.isclose(rows[1].ideal, rows[3].ideal)  # more workers per step's tasks: more to overlap
    t = table(rows)
    assert t.row_count == 4
    assert [c.header for c in t.columns][:5] == ["workers", "k", "swap", "steps/h", "x k=0"]


def test_with_in_flight_updates_a_response_picks_up_the_new_version_at_its_next_slice_boundary():
    """The simulated host calls the worker's block hook between slices of whole blocks; a load there gives the
    rest of the response the new version (swap rows are compared with k = 0 without swap)."""
    prompt = Prompt("q", "3", 0.5)
    req = _request(3, 5, max_new_tokens=64)
    host = SimHost({tuple(req.prompt_ids): prompt}, TimeModel(Lengths(40, 0.01, 64), 1.0, 0.0, 1e6),
                   threading.Event(), slice_blocks=2)  # fmt: skip
    host.load("/x", Path("/"), 5, "registry")
    calls = []

    def hook():
        calls.append(host.served_version)
        if len(calls) == 1:
            host.load("/y", Path("/"), 6, "registry")

    ((r,),) = host.generate([req], "queue", at_block=hook)
    n = len(r.token_ids)
    assert r.policy_version == 5 and r.token_versions == [5] * 3 + [6] * (n - 3)  # prompt 5: 3 tokens in block 1
    assert len(calls) == len(range(3, n, 8))  # one call per slice boundary (every 2 blocks after the first)
    ((plain,),) = host.generate([req], "queue")
    assert plain.token_versions is None and plain.token_ids == r.token_ids
    rows = with_ratios([_result(4, 0, 2.0), replace(_result(4, 0, 1.0), swap=True), replace(_result(4, 1, 3.0),
                        swap=True)], TimeModel.from_step_times(Lengths(), 1250, 167, 64, 400), 64)  # fmt: skip
    assert [r.ratio for r in rows] == [1.0, 0.5, 1.5]
