"""`gtpo init-model`: writes a loadable SDAR checkpoint; unknown presets fail clearly."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from services.cli import app
from shared.model.sdar import DiffusionSpec, load_model

runner = CliRunner()


def test_init_model_tiny(tmp_path):
    out = tmp_path / "tiny"
    result = runner.invoke(app, ["init-model", "tiny", "--out", str(out), "--seed", "1"])
    assert result.exit_code == 0, result.output
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    for label in ("parameters", "vocab size", "block size", "mask id", "259"):
        assert label in result.output
    loaded = load_model(out)
    assert loaded.spec == DiffusionSpec(block_size=4, mask_token_id=259)
    assert loaded.model.config.vocab_size == 320


def test_init_model_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "tiny"
    assert runner.invoke(app, ["init-model", "tiny", "--out", str(out)]).exit_code == 0
    again = runner.invoke(app, ["init-model", "tiny", "--out", str(out)])
    assert again.exit_code == 1
    assert "--force" in again.output
    assert runner.invoke(app, ["init-model", "tiny", "--out", str(out), "--force", "--seed", "2"]).exit_code == 0


def test_init_model_unknown_preset(tmp_path):
    result = runner.invoke(app, ["init-model", "huge", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "huge" in result.output
    assert "preset:" in result.output and "tiny" in result.output
    assert not (tmp_path / "x").exists()


def test_cli_module_does_not_import_torch():
    code = "import sys, services.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
