"""The demo's code task: disjoint splits, SFT rows fenced at the given rate, and its reference programs pass their
own tests in the sandbox while bare (unfenced) answers and wrong functions score 0."""

import json

import pytest

from services.demo.code_task import CodeTaskError, CodeTaskSpec, make_code_splits, write_code_task
from services.reward.code import CodeRunner
from services.reward.sandbox import available
from services.reward.scoring import check_programs
from shared.contracts.code_tests import load_tests
from shared.contracts.wire import ScoreItem, ScoreStatus

BACKEND = next((b for b in ("bwrap", "unshare") if available(b)), "insecure")


def test_splits_share_no_question_and_tests_check_the_function():
    train, test = make_code_splits(CodeTaskSpec(max_operand=9, ops="+-*", seed=3), 200, 20)
    assert len(test) == 20 and len(train) == 200
    assert not {r["question"] for r in test} & {r["question"] for r in train}
    for row in test:
        asserts = load_tests(row["ground_truth_answer"]).asserts
        assert len(asserts) == 5 and asserts[0].startswith("assert f(0) == ")
        exec("\n".join([row["solution"], *asserts]), {})  # the reference one-liner passes its own asserts
    with pytest.raises(CodeTaskError, match="ops"):
        make_code_splits(CodeTaskSpec(ops="/"), 10, 2)


def test_written_task_and_sft_rows(tmp_path):
    paths = write_code_task(tmp_path, CodeTaskSpec(max_operand=9, fence_rate=0.5, seed=1), 100, 5)
    test = json.loads(paths["test"].read_text())
    assert set(test[0]) == {"question", "ground_truth_answer"}  # the solution never reaches the RL data
    sft = [json.loads(line) for line in paths["sft"].read_text().splitlines()]
    fenced = sum(r["response"].startswith("```\n") for r in sft)
    assert 30 <= fenced <= 70  # half, give or take the draw
    assert all(r["response"].strip("`\n").startswith("f=lambda x:x+") for r in sft)


def test_reference_programs_pass_and_bare_or_wrong_ones_do_not():
    train, test = make_code_splits(CodeTaskSpec(max_operand=9, ops="+-*", seed=0), 0, 6)
    items = []
    for r in test:
        items.append(ScoreItem(id="good", response=f"```\n{r['solution']}\n```", reference=r["ground_truth_answer"]))
        items.append(ScoreItem(id="bare", response=r["solution"], reference=r["ground_truth_answer"]))
        items.append(ScoreItem(id="off", response="```\nf=lambda x:x+100\n```", reference=r["ground_truth_answer"]))
    runner = CodeRunner(BACKEND, workers=4, unit_s=2.0)
    try:
        got = check_programs(items, runner)
    finally:
        runner.close()
    assert all(v is not None and v.status == ScoreStatus.ok for v in got)
    assert [v.score for v in got] == [1.0, 0.0, 0.0] * len(test)


def test_the_format_rate_of_a_code_sample_is_a_fenced_program():
    from services.eval.evaluate import answer_in_format

    assert answer_in_format("```python\nf=lambda x:x+1\n```", "code")
    assert not answer_in_format("f=lambda x:x+1", "code")  # a bare line: no program for the reward either
    assert not answer_in_format("```python\nf=lambda x:x+1\n```", "accuracy")  # maths wants a box
    assert answer_in_format("so \\boxed{4}", "accuracy") and not answer_in_format("\\boxed{ }", "accuracy")
