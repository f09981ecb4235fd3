"""Data sources and column mapping: local JSON / JSONL, a `datasets` save_to_disk folder (made here, no network),
hub names parsed but never fetched; a missing column is an error naming the source, the row and the column."""

import doctest
import json

import pytest

import shared.data as data_mod
from services.eval.evaluate import load_rows
from services.trainer.config import RLConfig, SFTConfig
from services.trainer.orchestrator.driver import load_prompts
from shared.data import DataError, load_qa, parse_hub, read_rows

MATH_ROWS = [
    {"problem": "What is 1+1?", "solution": "We add: $1+1=\\boxed{2}$.", "level": 1},
    {"problem": "Half of 1?", "solution": "First \\boxed{1}, no: \\boxed{\\frac{1}{2}}", "level": 2},
]


def test_doctests():
    assert doctest.testmod(data_mod).failed == 0


def test_json_list_and_jsonl_give_the_same_rows(tmp_path):
    rows = [{"question": "1+1", "ground_truth_answer": 2}, {"question": "2+2", "ground_truth_answer": "4"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n\n" for r in rows))
    expected = [{"question": "1+1", "ground_truth_answer": "2"}, {"question": "2+2", "ground_truth_answer": "4"}]
    assert load_qa(tmp_path / "a.json") == load_qa(tmp_path / "a.jsonl") == expected


def test_column_mapping_with_the_boxed_extractor(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MATH_ROWS))
    rows = load_qa(path, question_field="problem", answer_field="solution", answer_extract="boxed")
    # the last \boxed{} of each solution, as the reward service's accuracy check reads a response
    assert rows == [{"question": "What is 1+1?", "ground_truth_answer": "2"},
                    {"question": "Half of 1?", "ground_truth_answer": "\\frac{1}{2}"}]  # fmt: skip
    gsm = tmp_path / "gsm.json"
    gsm.write_text(json.dumps([{"question": "q", "answer": "12 * 100 = 1,200\n#### 1,200"}]))
    assert load_qa(gsm, answer_field="answer", answer_extract="gsm8k")[0]["ground_truth_answer"] == "1200"


def test_missing_column_names_the_source_the_row_and_the_column(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*MATH_ROWS, {"problem": "3?", "answer": "3"}]))
    with pytest.raises(DataError) as e:
        load_qa(path, question_field="problem", answer_field="solution", answer_extract="boxed")
    assert str(e.value) == f"data: {path} row 3: no column 'solution' (answer_field); the row has problem, answer"
    with pytest.raises(DataError, match=r"row 1: no column 'question' \(question_field\)"):
        load_qa(path)
    path.write_text(json.dumps({"problem": "p", "solution": "no box here"}) + "\n")
    with pytest.raises(DataError, match="row 1: column 'solution' has no answer for answer_extract=boxed"):
        load_qa(path, question_field="problem", answer_field="solution", answer_extract="boxed")


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        read_rows(tmp_path / "absent.jsonl")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        read_rows(tmp_path / "plain")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n[1]\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: each line must be a JSON object"):
        read_rows(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="expected hf:org/name"):
        parse_hub("hf:a:b:c:d")
    assert parse_hub("hf:HuggingFaceH4/MATH-500::test") == ("HuggingFaceH4/MATH-500", None, "test")


def _save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    one = tmp_path / "one"
    datasets.Dataset.from_list(MATH_ROWS).save_to_disk(str(one))
    several = tmp_path / "several"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(MATH_ROWS),
        "test": datasets.Dataset.from_list(MATH_ROWS[:1]),
    }).save_to_disk(str(several))  # fmt: skip
    return one, several


def test_a_save_to_disk_folder_and_its_splits(tmp_path):
    one, several = _save_to_disk(tmp_path)
    columns = {"question_field": "problem", "answer_field": "solution", "answer_extract": "boxed"}
    assert [r["ground_truth_answer"] for r in load_qa(one, **columns)] == ["2", "\\frac{1}{2}"]
    assert len(load_qa(several, **columns)) == 2  # training reads `train` by default
    assert len(load_qa(f"{several}:test", **columns)) == 1
    assert len(load_rows(str(several), **columns)) == 1  # `gtpo eval` reads `test` by default
    with pytest.raises(DataError, match=r"has splits train, test: name one"):
        read_rows(f"{several}:validation")
    with pytest.raises(DataError, match="holds one split"):
        read_rows(f"{one}:train")


def test_rl_and_sft_configs_take_every_kind_of_source(tmp_path, tiny):
    from services.trainer.learner.sft import prepare_rows

    one, _ = _save_to_disk(tmp_path)
    # a Path still works (configs built in code when `data` was a Path), and so does hf: text, byte for byte
    assert RLConfig(model="m", output_dir="o", data=tmp_path / "x.jsonl").data == str(tmp_path / "x.jsonl")
    assert RLConfig(model="m", output_dir="o", data="hf:org/set:main:train").data == "hf:org/set:main:train"
    cfg = RLConfig(model="m", output_dir="o", data=one, question_field="problem", answer_field="solution",
                   answer_extract="boxed")  # fmt: skip
    prompts = load_prompts(cfg.data, question_field=cfg.question_field, answer_field=cfg.answer_field,
                           answer_extract=cfg.answer_extract)  # fmt: skip
    assert [(p.question, p.answer) for p in prompts] == [("What is 1+1?", "2"), ("Half of 1?", "\\frac{1}{2}")]
    sft = SFTConfig(model="m", output_dir="o", data=one, prompt_field="problem", response_field="solution",
                    chat_template=False)  # fmt: skip
    rows = prepare_rows(sft, tiny.tokenizer, tiny.spec.block_size)
    prompt_ids, response_ids = rows[0]
    assert tiny.tokenizer.decode(prompt_ids) == "What is 1+1?"
    assert tiny.tokenizer.decode(response_ids).startswith(MATH_ROWS[0]["solution"])
    bad = sft.model_copy(update={"response_field": "answer"})
    with pytest.raises(DataError, match=r":1: no column 'answer' \(response_field\); the row has problem, solution"):
        prepare_rows(bad, tiny.tokenizer, tiny.spec.block_size)


def test_hub_sources_need_datasets_only_when_named(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: a file source still loads
    (tmp_path / "a.json").write_text(json.dumps([{"question": "q", "ground_truth_answer": "1"}]))
    assert load_qa(tmp_path / "a.json") == [{"question": "q", "ground_truth_answer": "1"}]
    with pytest.raises(DataError, match=r"pip install 'gtpo\[datasets\]'"):
        read_rows("hf:org/set")
