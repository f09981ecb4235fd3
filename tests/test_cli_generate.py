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
    assert res.exit_code == 2 and "--model" in res.output
