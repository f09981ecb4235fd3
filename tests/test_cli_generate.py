"""`gtpo generate` end to end on the tiny preset (CliRunner, real engine)."""

import json

from typer.testing import CliRunner

from services.cli import app

runner = CliRunner()


def test_generate_prints_rollouts_with_step_maps(tiny_dir):
    args = [
        "generate",
        "--model",
        str(tiny_dir),
        "--prompt",
        "12+7=",
        "--n",
        "2",
        "--seed",
        "3",
        "--max-new-tokens",
        "6",
    ]
    res = runner.invoke(app, [*args, "--json", "--raw"])
    assert res.exit_code == 0, res.output
    rollouts = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert len(rollouts) == 2 and rollouts[0]["seed"] == 3
    assert all(len(r["step_map"]) == len(r["token_ids"]) <= 6 for r in rollouts)
    again = runner.invoke(app, [*args, "--json", "--raw"])
    assert again.stdout == res.stdout  # same seed, same output
    table = runner.invoke(app, args)
    assert table.exit_code == 0 and "tokens/step" in table.output


def test_generate_rejects_bad_sampling_value_naming_the_field(tiny_dir):
    res = runner.invoke(app, ["generate", "--model", str(tiny_dir), "--prompt", "x", "--top-p", "0"])
    assert res.exit_code == 2 and "top_p" in res.output


def test_generate_rejects_missing_model_dir(tmp_path):
    res = runner.invoke(app, ["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"])
    assert res.exit_code == 2 and "model:" in res.output


def test_generate_prompts_are_encoded_like_every_other_caller(tiny_dir, tiny):
    """`--raw` gives the text's own ids (no BOS), `--chat` the chat template: what the rollout service, SFT and
    evaluation send for the same prompt (`shared.prompts.encode_prompt`)."""
    from shared.prompts import encode_prompt

    args = ["generate", "--model", str(tiny_dir), "--prompt", "12+7=", "--seed", "0", "--max-new-tokens", "4", "--json"]
    for flag, chat in (("--raw", False), ("--chat", True)):
        res = runner.invoke(app, [*args, flag])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout.splitlines()[0])["prompt_ids"] == encode_prompt(tiny.tokenizer, "12+7=", chat=chat)
    raw = runner.invoke(app, [*args, "--raw"])
    assert (
        json.loads(raw.stdout.splitlines()[0])["prompt_ids"]
        == tiny.tokenizer("12+7=", add_special_tokens=False)["input_ids"]
    )
