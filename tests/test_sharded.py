"""Sharded training with real processes on CPU (gloo), launched with the configs of deploy/accelerate/ as shipped
(only the process count and the precision are set on the command line). FSDP2: the update equals one process's, a
run killed mid-step resumes exactly, a checkpoint reshards onto another process count. DeepSpeed ZeRO-2/3: the
steps equal one process's and a checkpoint resumes exactly. What cannot resume is refused by name. The shard reader
and the row split are checked on hand-made files."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.trainer.learner import sharding
from services.trainer.learner.checkpoint import CheckpointError, latest_checkpoint
from shared.process import free_port

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STEPS = 6


def _launch(processes: int, accelerate_config: str = "fsdp") -> list[str]:
    """`accelerate launch` with a shipped config (deploy/accelerate/NAME.yaml) on `processes` CPU processes."""
    path = REPO / "deploy" / "accelerate" / f"{accelerate_config}.yaml"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path),
            "--num_processes", str(processes), "--mixed_precision", "no", "--main_process_port", str(free_port())]  # fmt: skip


def _sft(cfg: Path, *extra: str, processes: int = 2, accelerate_config: str = "fsdp") -> list[str]:
    launcher = _launch(processes, accelerate_config) if processes > 1 else [sys.executable]
    return [*launcher, "-m", "services", "sft", "--config", str(cfg), *extra]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=ENV, timeout=300, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _losses(run: Path) -> dict[int, float]:
    rows = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    return {int(m["step"]): m["loss"] for m in rows}  # a resumed run rewrites the steps after its checkpoint


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:08d}" / "model" / "model.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def sft_runs(tiny_dir, tmp_path_factory):
    """Config writer and two finished runs of the same SFT job: FSDP2 on 2 processes, and 1 process."""
    root = tmp_path_factory.mktemp("sharded")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "response": str(2 * a)}) + "\n" for a in range(40)))
    base = {"model": str(tiny_dir), "data": str(data), "steps": STEPS, "batch_size": 8, "save_every": 1,
            "micro_batch_size": 4, "keep_last": 10, "optim": {"lr": 3e-3}}  # fmt: skip

    def config(name: str, **changes) -> Path:
        cfg = root / f"{name}.yaml"
        cfg.write_text(json.dumps({**base, "output_dir": str(root / name), **changes}))
        return cfg

    _run(_sft(config("fsdp")))
    _run(_sft(config("one"), processes=1))
    return root, config


def test_shard_rows_split_as_torch_chunk():
    assert [sharding.shard_rows(5, 2, r) for r in range(2)] == [(0, 3), (3, 2)]
    assert [sharding.shard_rows(2, 4, r) for r in range(4)] == [(0, 1), (1, 1), (2, 0), (2, 0)]
    assert sharding.shard_rows(0, 2, 1) == (0, 0)
    for n in (1, 7, 160):
        for w in (1, 2, 3, 8):
            sizes = [c.shape[0] for c in torch.arange(n).chunk(w)] + [0] * w
            assert [sharding.shard_rows(n, w, r)[1] for r in range(w)] == sizes[:w]


def test_shard_reader_gathers_rows_across_rank_files(tmp_path):
    """A 5-row tensor saved 3 + 2 by two ranks: any row range reads back from both files, scalars from rank 0."""
    full = torch.arange(15.0).view(5, 3)
    for rank, (first, rows) in enumerate([(0, 3), (3, 2)]):
        save_file({"model.w": full[first : first + rows].clone(), "optim.w.step": torch.tensor(7.0)},
                  str(tmp_path / f"rank-{rank:05d}.safetensors"))  # fmt: skip
        rng = {"format": 1, "python": None}
        (tmp_path / f"rank-{rank:05d}.json").write_text(json.dumps({"format": 1, "rows": {"model.w": [first, rows]},
                                                                    "rng": rng}))  # fmt: skip
    (tmp_path / "meta.json").write_text(json.dumps({"format": 1, "kind": "fsdp2", "world": 2}))
    reader = sharding.ShardReader(tmp_path)
    assert torch.equal(reader.rows("model.w", 1, 3), full[1:4])  # rows 1, 2 from rank 0, row 3 from rank 1
    assert torch.equal(reader.rows("model.w", 3, 2), full[3:5])
    assert torch.equal(reader.rows("model.w", 0, 5), full)
    assert reader.rows("model.w", 5, 0).shape == (0, 3)
    assert float(reader.whole("optim.w.step")) == 7.0
    assert torch.equal(reader.like("model.w", torch.zeros(5, 3)), full)  # an unsharded run takes it whole
    (tmp_path / "rank-00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="rank-00001.safetensors.*2 processes"):
        sharding.ShardReader(tmp_path)


@pytest.mark.parametrize(("accelerate_config", "kind"), [("fsdp", "fsdp2"), ("zero3", "deepspeed")])
def test_sharded_rl_update_equals_one_process(tiny_dir, tmp_path, accelerate_config, kind):
    """One packed GTPO update on 2 sharded processes gives the 1-process parameters within fp32 tolerance."""
    if kind == "deepspeed":
        pytest.importorskip("deepspeed")
    script = REPO / "tests" / "scripts" / "rl_step.py"
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    _run([sys.executable, str(script), str(tiny_dir), str(one)])
    out = _run([*_launch(2, accelerate_config), str(script), str(tiny_dir), str(two)])
    assert f"rank 1/2 sharding {kind}" in out.stdout  # really sharded, not DDP under a sharded config
    a, b, init = load_file(one), load_file(two), load_file(tiny_dir / "model.safetensors")
    assert _max_diff(a, b) <= 1e-5
    assert all(not torch.equal(a[k], init[k]) for k in a if k in init)


def test_fsdp2_sft_equals_one_process_and_checkpoints_shards(sft_runs):
    root, _ = sft_runs
    fsdp, one = _losses(root / "fsdp"), _losses(root / "one")
    assert sorted(fsdp) == list(range(1, STEPS + 1))
    assert all(abs(fsdp[s] - one[s]) <= 1e-5 * abs(one[s]) for s in one), (fsdp, one)
    # Adam's first step is lr * g / (|g| + eps): a coordinate with |g| near eps moves by a share of lr (3e-3) on
    # fp32 summation-order noise; a wrong reduction would move whole coordinates by lr
    assert _max_diff(_weights(root / "fsdp", 1), _weights(root / "one", 1)) <= 5e-5
    ckpt = latest_checkpoint(root / "fsdp" / "checkpoints")
    assert sharding.checkpoint_kind(ckpt) == sharding.FSDP2
    assert not (ckpt / "optimizer.safetensors").exists()  # the optimizer state lives in the shards only
    ranks = [load_file(ckpt / "shards" / f"rank-{r:05d}.safetensors") for r in range(2)]
    embed = _weights(root / "fsdp", STEPS)["model.embed_tokens.weight"]
    halves = [r["model.model.embed_tokens.weight"] for r in ranks]
    assert [h.shape[0] for h in halves] == [embed.shape[0] // 2] * 2  # each rank wrote its own rows
    assert torch.equal(torch.cat(halves), embed)  # and model/ holds the gathered whole
    assert "optim.model.embed_tokens.weight.exp_avg" in ranks[1]


def test_fsdp2_sigkill_then_resume_continues_exactly(sft_runs):
    root, config = sft_runs
    cfg = config("killed")
    proc = subprocess.Popen(_sft(cfg), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    marker = root / "killed" / "checkpoints" / "step-00000003" / "trainer_state.json"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-step
    proc.wait(timeout=30)
    assert marker.exists(), "the run never reached step 3"
    assert not (root / "killed" / "checkpoints" / f"step-{STEPS:08d}").exists(), "killed too late to test resume"
    _run(_sft(cfg, "--resume"))
    assert _losses(root / "killed") == _losses(root / "fsdp")  # exact: same floats, every step
    a, b = _weights(root / "fsdp", STEPS), _weights(root / "killed", STEPS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((root / "killed" / "checkpoints").glob(".*partial*"))  # a save cut short is cleaned up


def test_fsdp2_checkpoint_reshards_onto_one_process(sft_runs):
    """The 2-process checkpoint of step 3 resumes on 1 process (no FSDP): the same state, so steps 4.. follow the
    sharded run within fp32 tolerance."""
    root, config = sft_runs
    cfg = config("resharded")
    (root / "resharded" / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        root / "fsdp" / "checkpoints" / "step-00000003", root / "resharded" / "checkpoints" / "step-00000003"
    )
    out = _run(_sft(cfg, "--resume", processes=1))
    assert "resumed from" in out.stdout + out.stderr
    fsdp, resumed = _losses(root / "fsdp"), _losses(root / "resharded")
    assert sorted(resumed) == list(range(4, STEPS + 1))
    assert all(abs(resumed[s] - fsdp[s]) <= 1e-5 * abs(fsdp[s]) for s in resumed), (resumed, fsdp)
    assert _max_diff(_weights(root / "fsdp", STEPS), _weights(root / "resharded", STEPS)) <= 1e-5
    assert sharding.checkpoint_kind(latest_checkpoint(root / "resharded" / "checkpoints")) is None


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_matches_one_process_and_resumes_exactly(sft_runs, stage):
    """DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU processes with the shipped config: the steps match one process, and the
    checkpoint of step 1 (the engine's own partitions, written by both ranks) resumes to the same losses and
    weights as the uninterrupted run."""
    pytest.importorskip("deepspeed")
    root, config = sft_runs
    steps = 3
    straight = config(stage, steps=steps)
    _run(_sft(straight, accelerate_config=stage))
    run = root / stage
    ckpt = run / "checkpoints" / "step-00000001"
    assert sharding.checkpoint_kind(ckpt) == sharding.DEEPSPEED
    assert json.loads((ckpt / "deepspeed" / "meta.json").read_text())["world"] == 2
    assert len(list((ckpt / "deepspeed" / "state").glob("zero_pp_rank_*_optim_states.pt"))) == 2  # one per rank
    one, losses = _losses(root / "one"), _losses(run)
    assert sorted(losses) == list(range(1, steps + 1))
    assert all(abs(losses[s] - one[s]) <= 1e-5 * abs(one[s]) for s in losses), (losses, one)
    assert _max_diff(_weights(run, 1), _weights(root / "one", 1)) <= 5e-5  # see the FSDP2 test
    resumed = config(f"{stage}-resumed", steps=steps)
    (root / f"{stage}-resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, root / f"{stage}-resumed" / "checkpoints" / ckpt.name)
    _run(_sft(resumed, "--resume", accelerate_config=stage))
    again = _losses(root / f"{stage}-resumed")
    assert again == {s: losses[s] for s in range(2, steps + 1)}
    a, b = _weights(run, steps), _weights(root / f"{stage}-resumed", steps)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unsharded_checkpoint_is_refused_under_fsdp2_naming_both(sft_runs):
    root, config = sft_runs
    cfg = config("refused")
    (root / "refused" / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "one" / "checkpoints" / "step-00000002", root / "refused" / "checkpoints" / "step-00000002")
    out = subprocess.run(_sft(cfg, "--resume"), env=ENV, timeout=300, capture_output=True, text=True)
    assert out.returncode != 0
    assert "unsharded state" in out.stderr and "fsdp2 on 2 processes" in out.stderr, out.stderr[-2000:]


def test_resume_rules_name_both_layouts(tmp_path):
    assert sharding.resume_problem(sharding.FSDP2, None, 1) is None  # reshards into an unsharded run
    assert sharding.resume_problem(sharding.FSDP2, sharding.FSDP2, 8) is None
    assert sharding.resume_problem(None, None, 4) is None  # DDP as today
    assert "DeepSpeed partitions" in sharding.resume_problem(sharding.DEEPSPEED, sharding.FSDP2, 2)
    assert "FSDP2 shards" in sharding.resume_problem(sharding.FSDP2, sharding.DEEPSPEED, 2)
    (tmp_path / "deepspeed").mkdir()
    (tmp_path / "deepspeed" / "meta.json").write_text(json.dumps({"format": 1, "kind": "deepspeed", "world": 8}))
    assert sharding.checkpoint_kind(tmp_path) == sharding.DEEPSPEED
    with pytest.raises(CheckpointError, match="written by 8 DeepSpeed processes; this run has 4"):
        sharding.load_deepspeed(tmp_path / "deepspeed", engine=None, world=4)
