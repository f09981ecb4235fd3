"""Code datasets through the data layer (every format's column mapping, errors naming the row and column) and the
unbiased pass@k estimator, checked against hand-computed binomials."""

import json
from math import comb

import pytest

from services.eval.code import mean_pass_at_k, pass_at_k
from shared.code_data import CodeDataError, code_rows
from shared.contracts.code_tests import CodeTests, extract_program, is_code_reference, load_tests, outputs_match
from shared.data import load_qa


def read_tests(row: dict) -> CodeTests:
    assert is_code_reference(row["ground_truth_answer"])
    return load_tests(row["ground_truth_answer"])


def test_humaneval_and_mbpp_rows_keep_their_tests():
    he = code_rows([{"prompt": "def f(x):\n", "test": "def check(c):\n    assert c(1) == 2\n", "entry_point": "f"}],
                   "he", "humaneval")[0]  # fmt: skip
    t = read_tests(he)
    assert (he["question"], t.entry_point, t.units, t.prompt) == ("def f(x):\n", "f", 1, "def f(x):\n")
    mb = code_rows([{"text": "Square it.", "test_list": ["assert sq(2) == 4", "assert sq(3) == 9"],
                     "test_setup_code": "", "challenge_test_list": ["assert sq(0) == 0"]}], "mb", "mbpp")[0]  # fmt: skip
    assert mb["question"] == "Square it.\nYour code should pass this test:\nassert sq(2) == 4"
    assert read_tests(mb).asserts == ["assert sq(2) == 4", "assert sq(3) == 9", "assert sq(0) == 0"]


def test_stdin_formats_become_cases():
    lcb = {"question_content": "Add.", "public_test_cases": json.dumps([{"input": "1 2\n", "output": "3\n",
           "testtype": "stdin"}]), "private_test_cases": json.dumps([{"input": "2 2\n", "output": "4\n",
           "testtype": "stdin"}])}  # fmt: skip
    trace = {
        "question": "Add.",
        "test_method": "stdio",
        "test_input": ["1 2\n", "2 2\n"],
        "test_output": ["3\n", "4\n"],
    }
    prime = {"prompt": "Add.", "verification_info": json.dumps({"language": "python", "test_cases": [
        {"input": "1 2\n", "output": "3\n", "type": "stdin_stdout"}, {"input": "2 2\n", "output": "4\n",
         "type": "stdin_stdout"}]})}  # fmt: skip
    for row, fmt in ((lcb, "livecodebench"), (trace, "trace"), (prime, "primeintellect")):
        t = read_tests(code_rows([row], fmt, fmt)[0])
        assert [(c.input, c.output) for c in t.cases] == [("1 2\n", "3\n"), ("2 2\n", "4\n")], fmt
    fn = code_rows([{"question": "q", "test_method": "function", "test_list": ["assert f() == 1"], "prefix": "import os"}],
                   "t", "trace")[0]  # fmt: skip
    assert (read_tests(fn).asserts, read_tests(fn).prompt) == (["assert f() == 1"], "import os")


def test_bad_rows_name_the_row_and_the_column():
    with pytest.raises(CodeDataError, match=r"src row 2: no column 'entry_point'"):
        code_rows([{"prompt": "p", "test": "t", "entry_point": "f"}, {"prompt": "p", "test": "t"}], "src", "humaneval")
    with pytest.raises(CodeDataError, match="row 1: unusable tests.*only stdin"):
        code_rows([{"question_content": "q", "public_test_cases": '[{"input": "", "output": "", "testtype": "functional"}]'}],
                  "src", "livecodebench")  # fmt: skip
    with pytest.raises(CodeDataError, match="(?s)row 1: unusable tests.*exactly one"):
        code_rows([{"question": "q", "test_method": "function", "test_list": []}], "src", "trace")
    with pytest.raises(CodeDataError, match="row 1: its tests take .* over the 100000"):
        code_rows([{"text": "t", "test_list": ["assert f() == '" + "x" * 100_000 + "'"]}], "src", "mbpp")
    with pytest.raises(CodeDataError, match="code_format: one of"):
        code_rows([{}], "src", "apps")  # type: ignore[arg-type]


def test_load_qa_reads_a_code_file(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps({"text": "t", "test_list": ["assert g() == 1"]}) + "\n")
    (row,) = load_qa(path, code_format="mbpp")
    assert read_tests(row).asserts == ["assert g() == 1"]


def test_program_extraction_and_output_matching():
    text = "```\nprint(0)\n```\nthen\n```python\nprint(1)\n```\nand\n```python\nprint(2)\n```"
    assert extract_program(text) == "print(2)\n"
    assert extract_program(text, "first") == "print(1)\n"
    assert extract_program(text, "all") == "print(1)\n\nprint(2)\n"
    assert extract_program("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # cut at the budget
    assert extract_program("plain") is None
    assert outputs_match("a  \nb\n\n", "a\nb") and not outputs_match("a\nb", "a\nc") and not outputs_match("ab", "a b")


@pytest.mark.parametrize(("n", "c", "k"), [(5, 2, 1), (5, 2, 2), (5, 2, 3), (10, 3, 5), (20, 1, 10), (3, 0, 3)])
def test_pass_at_k_is_one_minus_the_binomial_ratio(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # c / n
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 4) == 1.0  # fewer wrong samples than k: some draw of 4 always holds a right one
    assert mean_pass_at_k([[True, False, False, False], [True, True, True, True]], 2) == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)


@pytest.mark.parametrize("module", ["services.eval.code", "shared.contracts.code_tests", "services.reward.code"])
def test_doctests_pass(module):
    import doctest
    import importlib

    assert doctest.testmod(importlib.import_module(module)).failed == 0


def test_eval_scores_code_rows_with_the_code_reward(tmp_path):
    """`gtpo eval`'s scoring: code references go to the sandbox, a sample is correct when every test passes."""
    from services.eval.evaluate import score_questions
    from services.reward.verify import VerifierPool
    from shared.contracts.wire import Rollout, SamplingParams

    rows = code_rows([{"text": "t", "test_list": ["assert g(2) == 4", "assert g(3) == 9"]}], "mb", "mbpp")

    def rollout(text: str, seed: int) -> Rollout:
        return Rollout(prompt_ids=[1], token_ids=[2, 3], step_map=[1, 2], text=text, finish_reason="stop",
                       params=SamplingParams(max_new_tokens=8, block_size=4), seed=seed)  # fmt: skip

    group = [rollout("```python\ndef g(x):\n    return x * x\n```", 0), rollout("```python\ndef g(x):\n    return 4\n```", 1),
             rollout("no code", 2)]  # fmt: skip
    with VerifierPool(workers=1) as pool:
        (question,), errors = score_questions(rows, [group], pool)
    assert errors == 0
    assert [s.correct for s in question.samples] == [True, False, False]
    assert mean_pass_at_k([[s.correct for s in question.samples]], 1) == pytest.approx(1 / 3)
