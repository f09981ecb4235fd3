"""The contracts of issue 33, item 6: the step batch rank 0 sends the other ranks, the worker heartbeat, the group
ledger record and the trainer status; and the one writer of metrics.jsonl (item 1)."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from services.trainer.config import TrainerConfig
from services.trainer.learner.tracking import Trackers
from services.trainer.orchestrator.collect import Group
from services.trainer.orchestrator.driver import rollout_metrics, step_sample
from shared.contracts.wire import (
    GroupRecord,
    HeartbeatInfo,
    Rollout,
    SamplingParams,
    ScoredMessage,
    ScoreResult,
    StepBatch,
    TaskMessage,
    TrainerPhase,
    TrainerStatus,
    WorkerHeartbeat,
)


def _rollout(logprob: float = -0.5) -> Rollout:
    return Rollout(prompt_ids=[1, 2], token_ids=[3, 4], step_map=[1, 1], finish_reason="stop", seed=0,
                   params=SamplingParams(block_size=4), logprobs=[logprob, -1.0])  # fmt: skip


# --------------------------------------------------------------------------- StepBatch


def test_a_step_batch_survives_the_broadcast_text_exactly():
    batch = StepBatch.of(
        [[_rollout(-0.1), _rollout(-2.5)]], [[1.0, 0.0]], correct=[[True, False]],
        components=[[{"accuracy": 1.0, "speed": math.nan}, {"accuracy": 0.0, "speed": 0.25}]],
        reward_weights={"accuracy": 1.0, "speed": 0.0}, metrics={"groups_enqueued": 3.0},
    )  # fmt: skip
    back = StepBatch.model_validate_json(batch.model_dump_json())
    assert back.groups[0][1].rollout == batch.groups[0][1].rollout and back.groups[0][1].reward == 0.0
    assert math.isnan(back.groups[0][0].components["speed"])  # a NaN component is sent as NaN, not as null
    assert [s.correct for s in back.groups[0]] == [True, False] and back.metrics == {"groups_enqueued": 3.0}


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["groups"][0][0].update(reward="NaN"),  # a non-finite reward
        lambda d: d["groups"][0][0].pop("rollout"),  # a sample without its rollout
        lambda d: d.update(rewards=[[1.0]]),  # the old parallel lists
        lambda d: d["groups"][0][0]["rollout"].update(step_map=[1]),  # a rollout whose step map is short
    ],
)
def test_a_malformed_step_batch_is_refused(change):
    data = json.loads(StepBatch.of([[_rollout()]], [[1.0]]).model_dump_json())
    change(data)
    with pytest.raises(ValidationError):
        StepBatch.model_validate_json(json.dumps(data))


def test_parallel_lists_must_be_grouped_like_the_rollouts():
    with pytest.raises(ValueError, match="rewards: need one per rollout"):
        StepBatch.of([[_rollout(), _rollout()]], [[1.0]])
    with pytest.raises(ValueError, match="correct: need one per rollout"):
        StepBatch.of([[_rollout()]], [[1.0]], correct=[[True], [False]])


def test_a_sample_without_an_accuracy_component_has_no_verdict():
    task = TaskMessage(task_id="r:0:0:0", run_id="r", train_by=0, prompt_index=0, sample_index=0, group_size=1,
                       prompt_ids=[1, 2], params=SamplingParams(), policy_version=0)  # fmt: skip

    def scored(components):
        score = ScoreResult(id="x", total=0.5, components=components, status="ok")
        return ScoredMessage(task=task, rollout=_rollout(), score=score)

    assert step_sample(scored({"format": 1.0})).correct is None
    assert step_sample(scored({"accuracy": 1.0})).correct is True
    assert step_sample(scored({"accuracy": 0.5})).correct is False
    # a code run's verdict is its tests: all passed is correct, a fraction is not
    assert step_sample(scored({"code": 1.0, "format": 1.0})).correct is True
    assert step_sample(scored({"code": 0.6})).correct is False


def test_a_code_runs_accuracy_metric_is_the_share_of_tests_passed():
    task = TaskMessage(task_id="r:0:0:0", run_id="r", train_by=0, prompt_index=0, sample_index=0, group_size=1,
                       prompt_ids=[1, 2], params=SamplingParams(), policy_version=0)  # fmt: skip
    msgs = [ScoredMessage(task=task, rollout=_rollout(), score=ScoreResult(id="x", total=c, components={"code": c},
                                                                           status="ok"))  # fmt: skip
            for c in (1.0, 0.5, 0.0, 0.5)]  # fmt: skip
    assert rollout_metrics(msgs)["accuracy"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- heartbeat


def test_a_heartbeat_with_an_unreadable_entry_still_says_the_worker_is_alive():
    raw = {"kind": "rollout", "id": "r0", "version": 3, "ts": 1.0,
           "info": {"busy_s": 2.0, "up_s": 4.0, "host": "h", "service": {"kind": "rollout"},
                    "weights_refused": {"version": "not a number"}}}  # fmt: skip
    beat = WorkerHeartbeat.model_validate_json(json.dumps(raw))
    assert beat.version == 3 and beat.info.busy_s == 2.0 and beat.info.model_extra == {"host": "h"}
    assert beat.info.service is None and beat.info.weights_refused is None  # garbage entries are skipped
    with pytest.raises(ValidationError):  # a negative counter is no heartbeat at all
        HeartbeatInfo.model_validate({"busy_s": -1.0})


# --------------------------------------------------------------------------- ledger record


def test_a_group_goes_through_the_ledger_unchanged_and_garbage_is_refused():
    g = Group(train_by=5, prompt_index=17, cursor=40, version=3)
    back = Group.from_record(g.record())
    assert (back.train_by, back.prompt_index, back.cursor, back.version) == (5, 17, 40, 3)
    assert json.loads(g.record()) == {"train_by": 5, "prompt_index": 17, "cursor": 40, "version": 3}
    # a ledger written before the rename still reads
    assert GroupRecord.model_validate_json('{"tag": 2, "prompt_index": 1, "cursor": 1, "version": 0}').train_by == 2
    for bad in ('{"train_by": -1, "prompt_index": 1, "cursor": 1, "version": 0}',
                '{"train_by": 1, "prompt_index": 1, "cursor": 1}', "not json"):  # fmt: skip
        with pytest.raises(ValueError):
            Group.from_record(bad)


# --------------------------------------------------------------------------- trainer status


def test_the_trainer_status_round_trips_and_names_its_phase():
    s = TrainerStatus(run_id="r", step=2, policy_version=2, phase=TrainerPhase.collecting, waiting="2 groups",
                      last={"loss": 0.5})  # fmt: skip
    back = TrainerStatus.model_validate_json(s.model_dump_json())
    assert back == s and back.phase is TrainerPhase.collecting and str(back.phase) == "collecting"
    with pytest.raises(ValidationError):
        TrainerStatus.model_validate({"run_id": "r", "step": 2, "policy_version": 2, "phase": "dreaming"})


# --------------------------------------------------------------------------- one writer of metrics.jsonl


def test_trackers_write_the_rows_and_rewind_to_the_checkpoint(tmp_path):
    cfg = TrainerConfig(model=tmp_path / "m", output_dir=tmp_path / "run")
    cfg.output_dir.mkdir()
    trackers = Trackers(cfg)
    for step in (1, 2, 3):
        trackers.log({"step": step, "loss": step / 10})
    trackers.rewind(1, {"step": 1, "loss": 0.1})
    rows = [json.loads(x) for x in (cfg.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 0.1}]
    (cfg.output_dir / "metrics.jsonl").write_text("")  # a crash between step 2's checkpoint and its row
    trackers.rewind(2, {"step": 2, "loss": 0.2})
    assert (cfg.output_dir / "metrics.jsonl").read_text() == '{"step": 2, "loss": 0.2}\n'


def test_a_config_that_asks_for_the_per_round_layout_is_told_it_is_gone(tmp_path):
    with pytest.raises(ValidationError, match="layout: removed; the trainer always trains on the packed layout"):
        TrainerConfig(model=tmp_path, output_dir=tmp_path, layout="per_round")
