"""`--resume` never starts over and never loads damaged state: checkpoints carry a sha256 manifest checked on load,
a missing or corrupt file is an error naming it (exit 2 from the CLI, no traceback), and a resume with no checkpoint
in a folder an earlier run wrote refuses unless `--fresh`, which moves the earlier run aside."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.trainer.config import SFTConfig
from services.trainer.learner.checkpoint import (
    MANIFEST_FILE,
    CheckpointError,
    CheckpointMissing,
    checkpoint_problems,
    load_checkpoint,
)
from services.trainer.learner.sft import run_sft

REPO = Path(__file__).resolve().parents[1]


def _config(tiny_dir: Path, data: Path, out: Path, steps: int) -> SFTConfig:
    return SFTConfig(model=tiny_dir, data=data, output_dir=out, steps=steps, batch_size=4, micro_batch_size=4,
                     save_every=1, chat_template=False, keep_last=3)  # fmt: skip


@pytest.fixture(scope="module")
def template(tiny_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A two-step SFT run (checkpoints step-1 and step-2) and its data file, copied by each test."""
    root = tmp_path_factory.mktemp("resume")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "response": str(2 * a)}) + "\n" for a in range(16)))
    run_sft(_config(tiny_dir, data, root / "run", 2), progress=False)
    return root / "run", data


def _copy(template, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(template[0], run)
    return run


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _flip_tensor_byte(file: Path) -> None:
    """Flip one byte of tensor data, past the safetensors header (which stays valid)."""
    raw = bytearray(file.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    pos = 8 + header + (len(raw) - 8 - header) // 2
    raw[pos] ^= 0x40
    file.write_bytes(bytes(raw))


def test_every_file_is_in_the_manifest_and_a_whole_checkpoint_verifies(template):
    ckpt = template[0] / "checkpoints" / "step-00000002"
    files = json.loads((ckpt / MANIFEST_FILE).read_text())["files"]
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST_FILE}
    assert set(files) == on_disk and "model/model.safetensors" in files
    assert checkpoint_problems(ckpt) == []


def test_flipped_tensor_bytes_are_caught_and_named(template, tmp_path, tiny_dir):
    run = _copy(template, tmp_path)
    model_file = run / "checkpoints" / "step-00000002" / "model" / "model.safetensors"
    _flip_tensor_byte(model_file)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt: its sha256"):
        load_checkpoint(model_file.parent.parent)
    # no silent fallback to step-1 either: the newest checkpoint is the one named
    with pytest.raises(CheckpointError, match=r"step-00000002.*model\.safetensors"):
        run_sft(_config(tiny_dir, template[1], run, 3), resume=True, progress=False)


def test_a_deleted_model_file_is_named(template, tmp_path, tiny_dir):
    run = _copy(template, tmp_path)
    (run / "checkpoints" / "step-00000002" / "model" / "model.safetensors").unlink()
    with pytest.raises(CheckpointMissing, match=r"model\.safetensors is missing"):
        run_sft(_config(tiny_dir, template[1], run, 3), resume=True, progress=False)


def test_a_deleted_rng_file_is_a_cli_error_without_traceback(template, tmp_path, tiny_dir):
    run = _copy(template, tmp_path)
    (run / "checkpoints" / "step-00000002" / "rng.json").unlink()
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(_config(tiny_dir, template[1], run, 3).model_dump_json())  # JSON is YAML
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "services", "sft", "--config", str(cfg), "--resume"], env=env,
                         capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    assert "rng.json" in out.stderr and "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    both = subprocess.run([sys.executable, "-m", "services", "sft", "--config", str(cfg), "--resume", "--fresh"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert both.returncode == 2 and "choose one" in both.stderr, both.stderr[-2000:]


def test_resume_without_a_whole_checkpoint_refuses_and_fresh_moves_the_old_run_aside(template, tmp_path, tiny_dir):
    run = _copy(template, tmp_path)
    cfg = _config(tiny_dir, template[1], run, 1)
    (run / "checkpoints" / "step-00000002" / "trainer_state.json").unlink()  # state file missing
    with pytest.raises(CheckpointMissing, match=r"step-00000002.trainer_state\.json is missing"):
        run_sft(cfg, resume=True, progress=False)
    shutil.rmtree(run / "checkpoints")  # no checkpoint at all, but the earlier run's metrics are there
    old_rows = _rows(run / "metrics.jsonl")
    assert len(old_rows) == 2
    with pytest.raises(CheckpointMissing, match=r"no checkpoint under .*metrics\.jsonl.*--fresh"):
        run_sft(cfg, resume=True, progress=False)
    assert _rows(run / "metrics.jsonl") == old_rows  # nothing appended by the refused resume

    history = run_sft(cfg, fresh=True, progress=False)
    assert len(history) == 1
    assert [r["step"] for r in _rows(run / "metrics.jsonl")] == [1]  # a new file, not appended to
    (previous,) = run.glob("previous-*")
    assert _rows(previous / "metrics.jsonl") == old_rows  # moved aside, not deleted
    # a folder no run wrote: an always-`--resume` deployment (compose, Kubernetes) still makes its first start
    assert len(run_sft(_config(tiny_dir, template[1], tmp_path / "new", 1), resume=True, progress=False)) == 1
