"""`api_token`: every field that holds one (the trainer's, the rollout service's) refuses what an HTTP header cannot
carry when the settings load, naming the field and not the token; the trainer's log never shows the token."""

import json
import logging
import os
import socket

import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from services.cli import app
from shared.contracts.wire import WeightsVersion

TOKEN = "s3cr3t-tok"
BAD = [f"{TOKEN} ", f" {TOKEN}", f"{TOKEN}\n", f"{TOKEN}\x7f", "tök"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in [n for n in os.environ if n.startswith("GTPO_") or n == "REDIS_URL"]:
        monkeypatch.delenv(name)


@pytest.fixture
def run_yaml(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"question": "1+1", "ground_truth_answer": "2"}) + "\n")
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {tmp_path / 'm'}\noutput_dir: {tmp_path / 'o'}\ndata: {tmp_path / 'd.jsonl'}\n")
    return path


def _config_error(result) -> str:
    out = result.output
    assert result.exit_code == 2, out
    assert "Traceback" not in out and TOKEN not in out and "tök" not in out, out
    assert "api_token: must be printable ASCII" in out, out
    return out


@pytest.mark.parametrize("bad", BAD, ids=repr)
def test_trainer_commands_refuse_a_token_a_header_cannot_carry(run_yaml, bad):
    for command in (["train"], ["up"]):
        _config_error(CliRunner().invoke(app, [*command, "--config", str(run_yaml), "--dry-run", f"api_token={bad}"]))
        env = {"GTPO_API_TOKEN": bad}
        _config_error(CliRunner().invoke(app, [*command, "--config", str(run_yaml), "--dry-run"], env=env))


@pytest.mark.parametrize("bad", BAD, ids=repr)
def test_the_rollout_service_refuses_a_token_a_header_cannot_carry(bad):
    _config_error(CliRunner().invoke(app, ["serve", "rollout", "model=m", f"api_token={bad}", "--dry-run"]))
    env = {"GTPO_ROLLOUT_API_TOKEN": bad}
    _config_error(CliRunner().invoke(app, ["serve", "rollout", "model=m", "--dry-run"], env=env))


def test_a_good_token_is_kept_and_hidden(run_yaml):
    res = CliRunner().invoke(app, ["train", "--config", str(run_yaml), "--dry-run", f"api_token={TOKEN}"])
    assert res.exit_code == 0 and TOKEN not in res.output and "api_token: '**********'" in res.output


def test_the_trainer_log_never_shows_the_token(caplog):
    """Whatever reaches the push (a token built past the settings), the HTTP library's complaint that quotes the
    header is logged without it."""
    from services.trainer.orchestrator.publish import push_weights

    version = WeightsVersion(version=1, path="/ckpt/step-1/model", step=1)
    with socket.socket() as listener, caplog.at_level(logging.WARNING, logger="gtpo.trainer"):
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # the connection opens; the request line and headers are then refused by httpx itself
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        assert not push_weights(url, version, SecretStr(f"{TOKEN} "), attempts=1)
    assert caplog.records and TOKEN not in caplog.text, caplog.text
