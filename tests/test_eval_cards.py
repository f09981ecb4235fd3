"""Eval cards on the tiny model: `gtpo eval --engines torch,reference` (the naive
decoder, services/rollout/engines/reference.py) writes one card per engine and decoding, the
engines agree token for token (greedy and sampled, same seeds), a card survives a round trip, and `--compare` pairs two cards or refuses
(exit 2, naming the settings) when they differ in more than the model."""

import json

import pytest
from typer.testing import CliRunner

from services.cli import app
from services.eval.card import EvalCard, compare_cards, parity, setting_differences

QUESTIONS = [("1+1=", "2"), ("2+3=", "5"), ("7-4=", "3")]


def gtpo(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.fixture(scope="module")
def cards(tiny_dir, tmp_path_factory):
    """Cards of the torch and the reference engine on the same three questions and seed, under the TraDo protocol's
    two decodings: static with top-k 1 (greedy) and dynamic at T=1 (sampled)."""
    tmp = tmp_path_factory.mktemp("cards")
    data = tmp / "d.jsonl"
    data.write_text("".join(json.dumps({"question": q, "ground_truth_answer": a}) + "\n" for q, a in QUESTIONS))
    res = gtpo("eval", data, "--model", tiny_dir, "--raw", "--template", "{question}", "--engines", "torch,reference",
               "--protocol", "trado", "--max-new-tokens", "8", "--k", "2", "--seed", "7", "--out", tmp / "g.json")  # fmt: skip
    assert res.exit_code == 0, res.output
    return {"torch": tmp / "g.torch.static.json", "reference": tmp / "g.reference.static.json", "out": res.output,
            "torch_sampled": tmp / "g.torch.dynamic.json", "reference_sampled": tmp / "g.reference.dynamic.json",
            "parity": tmp / "g.parity.json"}  # fmt: skip


@pytest.mark.parametrize("decoding", ["static", "dynamic"])
def test_engines_agree_token_for_token_greedy_and_sampled(cards, decoding):
    suffix = "" if decoding == "static" else "_sampled"
    a, b = EvalCard.read(cards[f"torch{suffix}"]), EvalCard.read(cards[f"reference{suffix}"])
    assert a.settings["params"]["top_k"] == (1 if decoding == "static" else 0) and a.decoding == decoding
    p = parity(a, b)
    assert (p.samples, p.identical_samples, p.identical_questions, p.correctness_agrees) == (6, 6, 3, 3)
    assert f"parity torch vs reference ({decoding}): 6/6 samples identical" in cards["out"].replace("\n", " ")
    written = json.loads(cards["parity"].read_text())[decoding]
    assert written["engines"] == ["torch", "reference"] and written["per_question"] == [1.0, 1.0, 1.0]
    assert a.metrics["mean_length"] == b.metrics["mean_length"]
    assert [s.seed for q in a.questions for s in q.samples] == [s.seed for q in b.questions for s in q.samples]
    # the naive decoder pays one forward per step per row; the cached engine batches rows into one forward
    assert b.metrics["engine_forwards_per_token"] > a.metrics["engine_forwards_per_token"]
    assert [s.seed for q in a.questions for s in q.samples] == [s.seed for q in b.questions for s in q.samples]
    # the naive decoder pays one forward per step per row; the cached engine batches rows into one forward
    assert b.metrics["engine_forwards_per_token"] >= a.metrics["engine_forwards_per_token"]


def test_a_card_records_every_setting_and_reads_back_the_same(cards, tiny_dir):
    card = EvalCard.read(cards["torch"])
    assert card.protocol == "trado" and card.settings["k"] == 2 and card.settings["seed"] == 7
    assert card.settings["params"]["top_k"] == 1 and card.settings["params"]["strategy"] == "low_confidence_static"
    assert card.settings["params"]["max_new_tokens"] == 8 and card.settings["template"] == "{question}"
    assert card.engine["name"] == "torch" and card.engine["torch"] and card.engine["device"] == "cpu"
    assert len(card.model["weight_sha256"]) == 64 and len(card.data["file_sha256"]) == 64
    assert card.data["questions"] == 3 and len(card.questions) == 3 and len(card.questions[0].samples) == 2
    assert card.metrics["avg_at_k"] == 0.0 and card.intervals["avg_at_k"] == [0.0, 0.0]
    assert card.metrics["tokens_per_forward"] > 0 and card.metrics["tokens_per_second"] > 0
    again = EvalCard.model_validate_json(card.model_dump_json())
    assert again == card
    with pytest.raises(ValueError, match="not an eval card"):
        EvalCard.read(cards["torch"].with_name("d.jsonl"))


def with_results(card: EvalCard, correct: list[list[bool]], **changes) -> EvalCard:
    """`card` with its samples' correctness replaced (and any top-level fields changed)."""
    questions = [q.model_copy(update={"samples": [s.model_copy(update={"correct": c}) for s, c in zip(q.samples, cs, strict=True)]})
                 for q, cs in zip(card.questions, correct, strict=True)]  # fmt: skip
    return card.model_copy(update={"questions": questions, **changes})


def test_compare_pairs_questions_of_two_models(cards, tmp_path):
    base = EvalCard.read(cards["torch"])
    a = with_results(base, [[False, False], [False, False], [True, False]])
    b = with_results(base, [[True, True], [False, False], [True, True]], model={"path": "after", "weight_sha256": "x"})
    b = b.model_copy(update={"data": {**b.data, "source": "elsewhere/d.jsonl"}})  # the same file, reached elsewhere
    assert setting_differences(a, b) == []  # only the model differs
    rows = {r.metric: r for r in compare_cards(a, b)}
    # per question avg@k: a = (0, 0, 0.5), b = (1, 0, 1): differences (1, 0, 0.5), mean 0.5
    assert rows["avg_at_k"].difference == pytest.approx(0.5)
    assert rows["avg_at_k"].low == 0.0 and rows["avg_at_k"].high == 1.0
    assert rows["mean_length"].difference == 0.0 and rows["mean_length"].low == rows["mean_length"].high == 0.0
    a.write(tmp_path / "a.json")
    b.write(tmp_path / "b.json")
    res = gtpo("eval", "--compare", tmp_path / "a.json", tmp_path / "b.json")
    assert res.exit_code == 0 and "avg_at_k" in res.output and "+0.5000" in res.output, res.output


def test_compare_refuses_cards_with_other_settings_unless_forced(cards, tmp_path):
    a = EvalCard.read(cards["torch"])
    b = a.model_copy(update={"settings": {**a.settings, "k": 16, "params": {**a.settings["params"], "top_k": 50}}})
    assert setting_differences(a, b) == ["settings.k (2 vs 16)", "settings.params.top_k (1 vs 50)"]
    a.write(tmp_path / "a.json")
    b.write(tmp_path / "b.json")
    res = gtpo("eval", "--compare", tmp_path / "a.json", tmp_path / "b.json")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "settings.k (2 vs 16)" in res.output and "settings.params.top_k" in res.output and "--force" in res.output
    forced = gtpo("eval", "--compare", tmp_path / "a.json", tmp_path / "b.json", "--force")
    assert forced.exit_code == 0 and "WARNING" in forced.output and "avg_at_k" in forced.output
    # the other engine's card is refused too: the engine is a setting
    res = gtpo("eval", "--compare", cards["torch"], cards["reference"])
    assert res.exit_code == 2 and "engine.name ('torch' vs 'reference')" in res.output
    res = gtpo("eval", "--compare", cards["torch"], tmp_path / "absent.json")
    assert res.exit_code == 2 and "not an eval card" in res.output


def test_eval_without_a_dataset_or_with_a_bad_protocol_names_the_field(tmp_path):
    res = gtpo("eval")
    assert res.exit_code == 2 and "dataset:" in res.output
    res = gtpo("eval", tmp_path / "d.json", "--protocol", "dream", "--dry-run")
    assert res.exit_code == 2 and "--protocol: one of dirl" in res.output
    res = gtpo("eval", tmp_path / "d.json", "--protocol", "trado", "--k", "5", "--dry-run")
    assert res.exit_code == 0 and "k: 5" in res.output and "static:" in res.output and "dynamic:" in res.output


def test_the_demo_tables_read_intervals_from_the_cards(cards, tmp_path):
    from rich.console import Console

    from services.demo.pipeline import _table
    from services.eval.evaluate import result_of

    base = EvalCard.read(cards["torch"])
    after = with_results(base, [[True, True], [False, False], [True, True]])
    base.write(tmp_path / "sft.json")
    after.write(tmp_path / "rl.json")
    results = {"sft": result_of(base.questions, 0), "gtpo": result_of(after.questions, 0)}
    table = _table("t", results, "sft", [("SFT", "sft"), ("GTPO", "gtpo")],
                   {"sft": tmp_path / "sft.json", "gtpo": tmp_path / "rl.json"})  # fmt: skip
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    # avg@k 2/3 with its own interval, and the change +0.667 with its paired interval: per question (1, 0, 1)
    assert "66.7% [0.0%, 100.0%]" in text and "+0.667 [+0.000, +1.000]" in text, text


def test_aup_thresholds_sweep_the_dynamic_threshold(tmp_path):
    res = gtpo("eval", tmp_path / "d.json", "--protocol", "lightningrl", "--aup-thresholds", "0.9,0.5", "--dry-run")
    assert res.exit_code == 0 and "greedy@0.9:" in res.output and "greedy@0.5:" in res.output
    res = gtpo("eval", tmp_path / "d.json", "--aup-thresholds", "0.9,x", "--dry-run")
    assert res.exit_code == 2 and "aup_thresholds:" in res.output
