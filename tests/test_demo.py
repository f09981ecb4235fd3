"""The demo's pieces: the task, eval, plots, and a shortened demo end to end through the real services."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from services.demo.plots import PANELS, read_metrics, rl_figure
from services.demo.tasks import TaskSpec, make_splits, sft_row, write_task
from services.eval.evaluate import evaluate, load_rows
from shared.contracts.wire import SamplingParams


def test_task_splits_are_disjoint_deterministic_and_in_the_rl_format(tmp_path):
    train, test = make_splits(TaskSpec(max_operand=12, ops="+-", seed=3), 500, 40)
    assert {"question", "ground_truth_answer"} == set(train[0]) and len(train) == 500 and len(test) == 40
    assert len({r["question"] for r in test}) == 40  # distinct held-out questions
    assert not {r["question"] for r in test} & {r["question"] for r in train}
    assert make_splits(TaskSpec(max_operand=12, ops="+-", seed=3), 500, 40) == (train, test)
    for r in train[:50] + test:
        nums = [int(x) for x in r["question"].replace(",", " ").replace(".", " ").split() if x.isdigit()]
        assert int(r["ground_truth_answer"]) in (nums[0] + nums[1], nums[0] - nums[1])
    assert sft_row(train[0])["response"] == f"\\boxed{{{train[0]['ground_truth_answer']}}}"
    paths = write_task(tmp_path, TaskSpec(), 20, 5)
    assert len(load_rows(str(paths["test"]))) == 5 and paths["sft"].read_text().count("\n") == 20
    with pytest.raises(ValueError, match="ops"):
        make_splits(TaskSpec(ops="/"), 5, 5)
    with pytest.raises(ValueError, match="split"):
        make_splits(TaskSpec(split="nope"), 5, 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_test: 45 held-out questions leave"):
        make_splits(TaskSpec(max_operand=2, ops="*"), 10, 1000)  # 45 texts in all: none left for training


def test_demo_names_the_field_of_an_impossible_task(tmp_path):
    from typer.testing import CliRunner

    from services.cli import app

    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "ops=/"])
    assert res.exit_code == 2 and "ops: unknown operation '/'" in res.output


def test_pairs_split_holds_out_whole_operand_pairs():
    def pairs(rows):
        return {tuple(int(x) for x in r["question"].replace(",", " ").replace(".", " ").split() if x.isdigit())
                for r in rows}  # fmt: skip

    train, test = make_splits(TaskSpec(max_operand=9, ops="+", split="pairs"), 400, 1000)
    assert len(test) == 20  # capped at a fifth of the 100 pairs
    assert not pairs(train) & pairs(test)
    train, test = make_splits(TaskSpec(max_operand=9, ops="+"), 4000, 200)
    assert pairs(test) <= pairs(train)  # the questions split holds out texts, not the facts behind them


def test_eval_scores_with_the_reward_checker(tiny_dir):
    rows = [{"question": "1+1=", "ground_truth_answer": "2"}, {"question": "2+2=", "ground_truth_answer": "4"}]
    res = evaluate(tiny_dir, rows, k=3, params=SamplingParams(max_new_tokens=8), template="{question}", chat=False)
    assert res.questions == 2 and res.k == 3 and res.reward_errors == 0
    assert res.avg_at_k == 0.0 and res.pass_at_k == 0.0  # random weights never box the right answer
    assert 0 < res.mean_length <= 8 and res.tokens_per_step >= 1.0
    with pytest.raises(ValueError, match="preset"):
        load_rows("NOPE500")


def test_plots_have_one_labelled_curve_per_metric_and_run(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": s, "reward_mean": 0.1 * s, "accuracy": 0.05 * s, "tokens_per_step": 1 + 0.1 * s} for s in range(1, 6)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({**rows[-1], "reward_mean": 9}) + "\n")
    assert read_metrics(path)[-1]["reward_mean"] == 9  # the last record of a step wins
    fig = rl_figure({"GTPO": read_metrics(path)})
    assert len(fig.axes) == len(PANELS)
    for ax, (key, label) in zip(fig.axes, PANELS, strict=True):
        assert ax.get_xlabel() == "RL step" and ax.get_ylabel() == label
        (line,) = ax.get_lines()
        assert list(line.get_ydata()) == [r[key] for r in read_metrics(path)]
        assert ax.get_legend() is None  # one run: the panel title says it all
    other = [{**r, "tokens_per_step": 2.0} for r in rows[:3]]
    fig = rl_figure({"GTPO": read_metrics(path), "GTPO + speed": other})
    ax = fig.axes[PANELS.index(("tokens_per_step", "tokens per denoising step"))]
    assert [ln.get_label() for ln in ax.get_lines()] == ["GTPO", "GTPO + speed"]
    assert list(ax.get_lines()[1].get_ydata()) == [2.0] * 3
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["GTPO", "GTPO + speed"]


def test_shortened_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("REDIS_URL", None)  # the demo's embedded default
    args = ["sft_steps=4", "sft_batch=8", "rl_steps=2", "prompts_per_step=2", "group_size=2", "eval_k=1",
            "n_train=40", "n_test=4", "max_new_tokens=8"]  # fmt: skip
    demo = [sys.executable, "-m", "services", "demo", "--out", str(out), "--speed"]
    res = subprocess.run([*demo, "--speed-method", "spread,dirl_floor", *args], env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {"sft", "gtpo", "gtpo_spread", "gtpo_dirl_floor"} <= set(summary) and summary["config"]["speed"] is True
    assert summary["sft"]["questions"] == 4 and 0 <= summary["gtpo_dirl_floor"]["boxed_rate"] <= 1
    assert [p["arm"] for p in summary["pareto"]] == ["gtpo", "gtpo_spread", "gtpo_dirl_floor"]
    for name in ("rl_curves.png", "rl_timing.png", "speed_pareto.png"):
        assert (out / name).stat().st_size > 10_000
    for arm, spread, weights, floor in (("rl", 0.0, {"accuracy": 1.0}, False),
                                        ("rl_spread", 0.2, {"accuracy": 1.0}, False),
                                        ("rl_dirl_floor", 0.2, {"accuracy": 1.0, "speed": 1.0}, True)):  # fmt: skip
        assert len(read_metrics(out / arm / "metrics.jsonl")) == 2
        run = yaml.safe_load((out / arm / "run.yaml").read_text())
        assert (run["rollout"]["threshold_spread"], run["reward_weights"]) == (spread, weights)
        assert run["loss"]["floor_correct"] is floor and run["loss"]["reward_norm"] == "total"
    assert "DiRL speed + floor" in res.stdout and "Pareto" in res.stdout
    assert "held-out evaluation" in res.stdout

    # --reuse: everything finished is read back, nothing is trained again
    before = {arm: (out / arm / "metrics.jsonl").stat().st_mtime_ns for arm in ("rl", "rl_dirl_floor")}
    res = subprocess.run([*demo, "--speed-method", "dirl_floor", "--reuse", *args], env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "SFT: reusing" in res.stdout and "GTPO: reusing" in res.stdout
    assert {arm: (out / arm / "metrics.jsonl").stat().st_mtime_ns for arm in before} == before
    summary = json.loads((out / "summary.json").read_text())
    assert {p["arm"] for p in summary["pareto"]} == {"gtpo", "gtpo_spread", "gtpo_dirl_floor"}  # spread: found
    # a finished stage made with other settings is refused, naming the field
    res = subprocess.run([*demo, "--speed-method", "gated", "--reuse", *args, "rl_steps=3"], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 2 and "rl_steps: 2 there, 3 now" in res.stderr, res.stderr[-2000:]


def test_demo_names_an_unknown_speed_method(tmp_path):
    from typer.testing import CliRunner

    from services.cli import app

    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--speed", "--speed-method", "gated,fast"])
    assert res.exit_code == 2 and "unknown method 'fast'" in res.output
