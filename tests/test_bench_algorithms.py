"""The objectives ablation (bench/algorithms.py): arms differ only in their objective, the summary by hand, and one
arm's RL step + evaluation through the real engine, scorer and trainer (no wall-clock assertion)."""

import pytest

from bench.algorithms import ARMS, Setup, run_arm, summarize, table, trainer_config


def test_arms_differ_from_gtpo_only_in_their_objective(tmp_path):
    setup = Setup()
    base = trainer_config(setup, "gtpo", tmp_path, tmp_path / "o", 0).model_dump()
    for arm in ARMS:
        cfg = trainer_config(setup, arm, tmp_path, tmp_path / "o", 0).model_dump()
        diff = {k for k in base if base[k] != cfg[k]}
        loss_diff = {k for k in base["loss"] if base["loss"][k] != cfg["loss"][k]}
        assert diff <= {"loss", "shrink", "value"} and loss_diff <= {"estimator"}, arm
    assert trainer_config(setup, "gtpo_value", tmp_path, tmp_path, 0).value.lr == pytest.approx(5 * setup.rl_lr)


def _run(arm, seed, correct, boxed, per_question, adv_var, grads, group=None):
    steps = [{"reward_mean": 0.5, "tokens": 10.0 * (i + 1), "grad_norm": g, "adv_var": adv_var, "adv_var_group": group,
              "generate_s": 1.0, "score_s": 0.5, "train_s": 2.0} for i, g in enumerate(grads)]  # fmt: skip
    ev = {"per_question": per_question, "avg_at_k": sum(per_question) / len(per_question), "boxed": boxed,
          "correct": correct, "boxed_rate": 0.5, "tokens_per_step": 2.0}  # fmt: skip
    return {"arm": arm, "seed": seed, "steps": steps, "eval": ev}


def test_summary_by_hand():
    runs = [_run("gtpo_value", 0, 3, 4, [1.0, 0.5], 0.2, [1.0, 3.0], group=0.4),
            _run("gtpo_value", 1, 1, 4, [0.0, 0.0], 0.4, [2.0, 2.0], group=0.6),
            _run("coupled", 0, 0, 0, [0.0, 0.0], 1.0, [1.0, 1.0])]  # fmt: skip
    s = summarize(runs)
    v = s["gtpo_value"]
    assert v["seeds"] == 2 and v["avg_at_k"] == pytest.approx(1.5 / 4) and v["boxed_accuracy"] == pytest.approx(4 / 8)
    assert v["avg_at_k_per_seed"] == [0.75, 0.0] and v["train_tokens_per_step"] == pytest.approx(15.0)
    assert v["adv_var"] == pytest.approx(0.3) and v["adv_var_group"] == pytest.approx(0.5)
    assert v["grad_norm_mean"] == pytest.approx(2.0) and v["grad_norm_var"] == pytest.approx(0.5)  # 1, 3, 2, 2
    assert v["rl_s_per_step"] == pytest.approx(3.5) and s["coupled"]["boxed_accuracy"] == 0.0
    assert s["coupled"]["adv_var_group"] is None
    md = table(s).splitlines()
    assert len(md) == 4 and md[2].startswith("| GTPO + value model | 2 | 37.5 (") and "| - |" in md[2]  # no GTPO run
    assert v["vs_gtpo"] is None


def test_the_change_against_gtpo_is_paired_by_seed_and_question():
    runs = [_run("gtpo", 0, 1, 2, [1.0, 0.5], 0.1, [1.0]), _run("gtpo", 1, 1, 2, [0.0, 0.25], 0.1, [1.0]),
            _run("coupled", 0, 1, 2, [0.5, 0.5], 0.1, [1.0]), _run("coupled", 1, 1, 2, [0.5, 0.25], 0.1, [1.0]),
            _run("sft", 2, 1, 2, [1.0, 1.0], 0.0, [])]  # fmt: skip
    s = summarize(runs)
    # differences (seed 0) -0.5, 0; (seed 1) +0.5, 0: mean 0; the sft run's seed 2 has no GTPO twin
    assert s["coupled"]["vs_gtpo"]["mean"] == pytest.approx(0.0) and s["gtpo"]["vs_gtpo"] is None
    lo, hi = s["coupled"]["vs_gtpo"]["ci"]
    assert -0.5 <= lo <= 0.0 <= hi <= 0.5 and s["sft"]["vs_gtpo"] is None
    assert "| +0.0 [" in table(s).splitlines()[3]


def test_one_arm_trains_and_evaluates_in_process(tiny_dir, tmp_path):
    from services.reward.verify import VerifierPool

    setup = Setup(rl_steps=1, prompts_per_step=2, group_size=2, eval_k=1, max_new_tokens=8)
    rows = [{"question": f"What is {a} + 1?", "ground_truth_answer": str(a + 1)} for a in range(3)]
    with VerifierPool(workers=1, timeout_s=5.0) as pool:
        out = run_arm(setup, "coupled", tiny_dir, rows, rows[:2], tmp_path / "arm", 0, pool)
    (step,) = out["steps"]
    assert step["tokens"] > 0 and step["adv_var"] >= 0 and 0 <= step["reward_mean"] <= 1
    assert out["eval"]["questions"] == 2 and len(out["eval"]["per_question"]) == 2


def test_a_finished_arm_is_read_back_only_under_the_same_setup(tmp_path, monkeypatch):
    """Seeds run as parallel processes, then one call over every seed summarises: each arm's record is reused when
    the setup matches (threads and the seed list aside) and run again when it does not."""
    import bench.algorithms as alg

    calls = []

    def fake_run_arm(setup, arm, model, train, test, out, seed, pool):  # the record's contents, not a training run
        calls.append((arm, seed, setup.rl_steps))
        return _run(arm, seed, 1, 2, [0.5], 0.1, [1.0])

    monkeypatch.setattr(alg, "run_arm", fake_run_arm)
    out = tmp_path / "seed0" / "gtpo"
    out.mkdir(parents=True)
    first = alg.cached_arm(Setup(seeds=[0], threads=1), "gtpo", tmp_path, [], [], out, 0, None)
    again = alg.cached_arm(Setup(seeds=[0, 1, 2], threads=2), "gtpo", tmp_path, [], [], out, 0, None)
    budget = Setup().rl_steps
    assert again == first and calls == [("gtpo", 0, budget)]
    alg.cached_arm(Setup(rl_steps=30), "gtpo", tmp_path, [], [], out, 0, None)  # another budget: run again
    assert calls == [("gtpo", 0, budget), ("gtpo", 0, 30)]


def test_the_sft_row_has_its_evaluation_and_no_step_figures(tmp_path):
    from bench.algorithms import plot

    runs = [_run("sft", 0, 1, 4, [0.25, 0.0], 0.0, []), _run("gtpo", 0, 2, 4, [0.5, 0.0], 0.1, [1.0, 2.0])]
    s = summarize(runs)
    assert s["sft"]["avg_at_k"] == pytest.approx(0.125) and s["sft"]["boxed_accuracy"] == pytest.approx(0.25)
    assert s["sft"]["rl_s_per_step"] is None and s["sft"]["adv_var"] is None and s["sft"]["grad_norm_var"] is None
    row = table(s).splitlines()[2]
    assert row.startswith("| SFT (no RL) | 1 | 12.5 (") and row.endswith("| - | - | - | - | - / - |")
    assert plot(runs, tmp_path / "c.png").exists()


def test_set_field_converts_to_the_field_type_and_names_a_bad_one():
    from bench.algorithms import set_field

    setup = Setup()
    for item in ("max_operand=14", "ops=+-", "rl_lr=1e-3", "boxed_rate=0.5"):
        set_field(setup, item)
    assert (setup.max_operand, setup.ops, setup.rl_lr, setup.boxed_rate) == (14, "+-", 1e-3, 0.5)
    with pytest.raises(ValueError, match="max_operand: 'nine' is not a int"):
        set_field(setup, "max_operand=nine")
    with pytest.raises(ValueError, match="FIELD one of"):
        set_field(setup, "seeds=1")


def test_decided_after_counts_tokens_unmasked_after_the_last_digit_by_hand():
    from types import SimpleNamespace

    from bench.algorithms import decided_after, oracle_share

    class Chars:  # one character per token id, as the tiny model's tokenizer
        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    def rollout(text, steps):
        return SimpleNamespace(token_ids=[ord(c) for c in text], step_map=steps)

    rollouts = [rollout("{12}.", [1, 2, 3, 3, 4]),  # last digit at step 3: "." (step 4) only -> 1 of 5
                rollout("{7}..", [1, 1, 2, 2, 2]),  # last digit at step 1: "}", ".", "." -> 3 of 5
                rollout("{x}", [1, 2, 3])]  # no digit: none of 3
    counts = decided_after(rollouts, Chars())
    assert counts == [(1, 5), (3, 5), (0, 3)]
    # advantages 2, -1, -1: (1*4 + 3*1 + 0) / (5*4 + 5*1 + 3*1) = 7 / 28
    assert oracle_share(counts, [2.0, -1.0, -1.0]) == pytest.approx(0.25) and oracle_share(counts, [0.0] * 3) == 0.0
