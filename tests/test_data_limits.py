"""Rows too long and JSON too deep: a one-line error naming the file, the line (or row) and the column, from the
shared loader (so `gtpo eval`, RL and SFT data alike), never a traceback or memory exhaustion."""

import json

import pytest
from typer.testing import CliRunner

from services.cli import app
from shared.data import MAX_ROW_BYTES, DataError, load_qa, read_rows

DEEP = "[" * 100_000 + "]" * 100_000  # 200 KB, far under the row limit, far over Python's recursion limit


def _jsonl(path, *rows: str):
    path.write_text("".join(r + "\n" for r in rows))
    return path


def _row(question: str, answer: str = "2") -> str:
    return json.dumps({"question": question, "ground_truth_answer": answer})


def _eval(*args):
    res = CliRunner().invoke(app, ["eval", *map(str, args)])
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), repr(res.exception)
    return res


def _one_line_error(res, *needles):
    out = res.output
    assert res.exit_code == 2, out
    lines = [line for line in out.strip().splitlines() if "Loading weights" not in line]  # transformers' bar
    assert "Traceback" not in out and len(lines) == 1, out[:2000]
    for needle in needles:
        assert needle in out, (needle, out[:2000])


def test_a_row_over_the_default_limit_is_refused_naming_its_line_and_column(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", _row("1+1"), "", _row("x" * (MAX_ROW_BYTES + 10)))
    with pytest.raises(DataError) as err:
        read_rows(data)
    assert str(err.value) == f"{data}:3: the row is over max_row_bytes={MAX_ROW_BYTES} bytes (in column 'question')"
    with pytest.raises(DataError, match=r"d.jsonl:3: the row is over max_row_bytes=100 bytes"):
        load_qa(data, max_row_bytes=100)  # the RL loader (driver.load_prompts) and eval go through here
    assert len(read_rows(data, max_row_bytes=MAX_ROW_BYTES + 100)) == 2  # configurable


def test_a_json_list_row_over_the_limit_names_its_row_and_column(tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"question": "1+1", "answer": "2"}, {"question": "2+2", "answer": "4" * 300}]))
    with pytest.raises(DataError) as err:
        read_rows(data, max_row_bytes=200)
    assert str(err.value) == f"{data} row 2: column 'answer' is 300 characters, over max_row_bytes=200"


@pytest.mark.parametrize("layout", ["jsonl", "json"])
def test_json_nested_100000_deep_is_a_clear_error(tmp_path, layout):
    if layout == "jsonl":
        data = _jsonl(tmp_path / "d.jsonl", _row("1+1"), '{"question": ' + DEEP + ', "ground_truth_answer": "2"}')
        where = f"{data}:2"
    else:
        data = tmp_path / "d.json"
        data.write_text(f'[{_row("1+1")}, {{"question": {DEEP}}}]')
        where = str(data)
    with pytest.raises(DataError) as err:
        read_rows(data)
    assert str(err.value) == f"{where}: JSON nested too deeply to read (lists or objects inside each other)"
    _one_line_error(_eval(data, "--model", tmp_path), "gtpo eval:", where, "nested too deeply")


def test_gtpo_eval_refuses_a_long_row_in_one_line(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", _row("1+1"), _row("7 " * 600))
    _one_line_error(_eval(data, "--model", tmp_path, "--max-row-bytes", "1000"),
                    f"gtpo eval: {data}:2: the row is over max_row_bytes=1000 bytes (in column 'question')")  # fmt: skip


def test_gtpo_eval_refuses_a_prompt_over_max_prompt_tokens_naming_row_and_column(tmp_path, tiny_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"problem": q, "answer": "2"}) + "\n" for q in ["1+1", "1+1 " * 200]))
    res = _eval(data, "--model", tiny_dir, "--question-field", "problem", "--answer-field", "answer", "--raw",
                "--max-prompt-tokens", "100", "--k", "1", "--max-new-tokens", "4")  # fmt: skip
    _one_line_error(res, "gtpo eval: dataset row 2: column 'problem' makes a prompt of", "over max_prompt_tokens=100")
