"""`gtpo launch`: node rank / node count / main address per scheduler scheme, the accelerate command it builds, and
the process supervision that lets a SIGTERM reach the trainer."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import typer
from procs import start_supervisor, wait_until
from typer.testing import CliRunner

from services.trainer.launch import (
    DEFAULT_PORT,
    DistSpec,
    LaunchError,
    build_accelerate_argv,
    child_environ,
    is_deepspeed,
    launch_command,
    resolve_dist,
    wait_for_host,
)

REPO = Path(__file__).resolve().parents[1]
ACC = REPO / "deploy" / "accelerate"


# ---------------------------------------------------------------------------------------------- resolve_dist


def test_single_node_default():
    assert resolve_dist({}) == DistSpec("single", 1, 0, "127.0.0.1", DEFAULT_PORT, None)
    spec = resolve_dist({"MASTER_PORT": "29600", "NPROC_PER_NODE": "2", "NNODES": "1"})
    assert spec == DistSpec("single", 1, 0, "127.0.0.1", 29600, 2)


def test_indexed_job_worker_finds_index_zero_under_the_headless_service():
    env = {"JOB_COMPLETION_INDEX": "1", "NNODES": "2", "HEADLESS_SERVICE": "gtpo-trainer", "JOB_NAME": "gtpo-trainer",
           "MASTER_PORT": "29500", "NPROC_PER_NODE": "8", "HOSTNAME": "ignored-when-job-name-is-set-1"}  # fmt: skip
    assert resolve_dist(env) == DistSpec("indexed-job", 2, 1, "gtpo-trainer-0.gtpo-trainer", 29500, 8)
    # index 0 names itself the same way: every node agrees on one address
    assert resolve_dist({**env, "JOB_COMPLETION_INDEX": "0"}).master_addr == "gtpo-trainer-0.gtpo-trainer"


def test_indexed_job_name_from_the_pod_hostname():
    # the Job controller names Indexed Job pods' hostnames <job>-<index>
    env = {"JOB_COMPLETION_INDEX": "3", "NNODES": "4", "HEADLESS_SERVICE": "svc", "HOSTNAME": "my-run-trainer-3"}
    spec = resolve_dist(env)
    assert (spec.scheme, spec.nnodes, spec.node_rank, spec.master_addr) == ("indexed-job", 4, 3, "my-run-trainer-0.svc")
    assert spec.master_port == DEFAULT_PORT and spec.nproc_per_node is None


def test_indexed_job_single_node_needs_no_service():
    assert resolve_dist({"JOB_COMPLETION_INDEX": "0"}) == DistSpec("indexed-job", 1, 0, "127.0.0.1", DEFAULT_PORT)
    assert resolve_dist({"JOB_COMPLETION_INDEX": "0", "NNODES": "1"}).master_addr == "127.0.0.1"


def test_indexed_job_explicit_master_addr_wins():
    env = {"JOB_COMPLETION_INDEX": "1", "NNODES": "2", "MASTER_ADDR": "10.0.0.5"}
    assert resolve_dist(env).master_addr == "10.0.0.5"


def test_pytorchjob_node_level_world_size_and_rank():
    # training-operator < 1.7: one pod per node, WORLD_SIZE = pods, RANK = pod index, master = the master pod's Service
    env = {"MASTER_ADDR": "run-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "3", "RANK": "2"}
    assert resolve_dist(env) == DistSpec("pytorchjob", 3, 2, "run-master-0", 23456, None)
    assert resolve_dist({**env, "NPROC_PER_NODE": "4"}).nproc_per_node == 4


def test_pytorchjob_with_pet_variables_uses_them():
    # training-operator >= 1.7 sets WORLD_SIZE = pods x nproc (process level) and the PET_* node-level variables
    env = {"MASTER_ADDR": "run-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "16", "RANK": "1",
           "PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_NPROC_PER_NODE": "8"}  # fmt: skip
    assert resolve_dist(env) == DistSpec("pet", 2, 1, "run-master-0", 23456, 8)


def test_kubeflow_trainer_v2_pet_variables():
    env = {"PET_NNODES": "4", "PET_NODE_RANK": "3", "PET_MASTER_ADDR": "job-node-0-0.job", "PET_MASTER_PORT": "29400",
           "PET_NPROC_PER_NODE": "8", "JOB_COMPLETION_INDEX": "0"}  # fmt: skip
    assert resolve_dist(env) == DistSpec("pet", 4, 3, "job-node-0-0.job", 29400, 8)


@pytest.mark.parametrize("value", ["auto", "gpu", "cpu"])
def test_pet_nproc_words_mean_decide_on_the_node(value):
    env = {"PET_NNODES": "1", "PET_NPROC_PER_NODE": value}
    assert resolve_dist(env).nproc_per_node is None


def test_pet_fixed_elastic_range():
    env = {"PET_NNODES": "2:2", "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "m"}
    assert resolve_dist(env).nnodes == 2
    with pytest.raises(LaunchError, match="elastic"):
        resolve_dist({**env, "PET_NNODES": "1:4"})


def test_scheme_precedence():
    pet = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "pet-master"}
    pytorchjob = {"MASTER_ADDR": "ptj-master", "WORLD_SIZE": "3", "RANK": "2"}
    indexed = {"JOB_COMPLETION_INDEX": "0", "NNODES": "5", "HEADLESS_SERVICE": "svc", "JOB_NAME": "j"}
    assert resolve_dist({**indexed, **pytorchjob, **pet}).scheme == "pet"
    assert resolve_dist({**indexed, **pytorchjob}).scheme == "pytorchjob"
    assert resolve_dist(indexed).scheme == "indexed-job"
    # MASTER_PORT alone (set in the Indexed Job) does not make a PyTorchJob
    assert resolve_dist({**indexed, "MASTER_PORT": "29501"}).scheme == "indexed-job"


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"JOB_COMPLETION_INDEX": "2", "NNODES": "2", "HEADLESS_SERVICE": "s", "JOB_NAME": "j"}, "outside 0..1"),
        ({"JOB_COMPLETION_INDEX": "1", "NNODES": "2", "JOB_NAME": "j"}, "HEADLESS_SERVICE"),
        ({"JOB_COMPLETION_INDEX": "1", "NNODES": "2", "HEADLESS_SERVICE": "s", "HOSTNAME": "pod-x"}, "JOB_NAME"),
        ({"JOB_COMPLETION_INDEX": "one"}, "JOB_COMPLETION_INDEX='one'"),
        ({"NNODES": "2"}, "no rank"),
        ({"NNODES": "0"}, "NNODES=0"),
        ({"PET_NNODES": "2", "PET_MASTER_ADDR": "m"}, "PET_NODE_RANK"),
        ({"PET_NNODES": "2", "PET_NODE_RANK": "1"}, "PET_MASTER_ADDR"),
        ({"MASTER_ADDR": "m", "WORLD_SIZE": "2", "RANK": "2"}, "outside"),
        ({"MASTER_PORT": "70000"}, "not a TCP port"),
        ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE=0"),
    ],
)
def test_inconsistent_environments_name_the_variable(env, match):
    with pytest.raises(LaunchError, match=match):
        resolve_dist(env)


def test_child_environment_drops_node_level_variables():
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "m", "MASTER_PORT": "1", "LOCAL_RANK": "0",
           "PET_NNODES": "2", "PET_NODE_RANK": "1", "REDIS_URL": "redis://r", "GTPO_API_TOKEN": "t", "PATH": "/bin"}  # fmt: skip
    assert child_environ(env) == {"REDIS_URL": "redis://r", "GTPO_API_TOKEN": "t", "PATH": "/bin"}


# ---------------------------------------------------------------------------------------------- the accelerate command


def test_argv_single_cpu_node():
    spec = DistSpec("single", 1, 0, "127.0.0.1", 29500, 1)
    argv = build_accelerate_argv(spec, accelerate_config=Path("deploy/accelerate/ddp.yaml"),
                                 train_config=Path("/config/run.yaml"), cpu=True, python="py")  # fmt: skip
    assert argv == ["py", "-m", "accelerate.commands.launch", "--config_file", "deploy/accelerate/ddp.yaml",
                    "--num_machines", "1", "--machine_rank", "0", "--main_process_ip", "127.0.0.1",
                    "--main_process_port", "29500", "--num_processes", "1", "--cpu",
                    "-m", "services", "train", "--config", "/config/run.yaml"]  # fmt: skip


def test_argv_multinode_deepspeed_uses_the_standard_launcher():
    spec = DistSpec("indexed-job", 2, 1, "gtpo-trainer-0.gtpo-trainer", 29500, 8)
    argv = build_accelerate_argv(spec, accelerate_config=ACC / "zero2.yaml", train_config=Path("run.yaml"),
                                 resume=True, overrides=["steps=3", "optim.lr=1e-5"], deepspeed=True, python="py")  # fmt: skip
    flags = dict(zip(argv[3:15:2], argv[4:16:2], strict=True))
    assert flags == {"--config_file": str(ACC / "zero2.yaml"), "--num_machines": "2", "--machine_rank": "1",
                     "--main_process_ip": "gtpo-trainer-0.gtpo-trainer", "--main_process_port": "29500",
                     "--num_processes": "16"}  # fmt: skip
    assert argv[15:17] == ["--deepspeed_multinode_launcher", "standard"]
    assert argv[17:] == ["-m", "services", "train", "--config", "run.yaml", "--resume", "steps=3", "optim.lr=1e-5"]
    assert "--cpu" not in argv


def test_argv_single_node_deepspeed_needs_no_multinode_launcher():
    spec = DistSpec("single", 1, 0, "127.0.0.1", 29500, 8)
    argv = build_accelerate_argv(
        spec, accelerate_config=ACC / "zero3.yaml", train_config=Path("r.yaml"), deepspeed=True
    )
    assert "--deepspeed_multinode_launcher" not in argv and argv[argv.index("--num_processes") + 1] == "8"


def test_argv_needs_a_process_count():
    with pytest.raises(ValueError, match="nproc_per_node"):
        build_accelerate_argv(
            DistSpec("single", 1, 0, "127.0.0.1", 1), accelerate_config=Path("a"), train_config=Path("b")
        )


def test_deepspeed_detection_on_the_shipped_configs():
    assert {p.name for p in ACC.glob("*.yaml") if is_deepspeed(p)} == {"zero2.yaml", "zero3.yaml"}


def test_real_accelerate_accepts_the_command(tmp_path):
    """The argv goes through the installed accelerate's parser and launcher and reaches `gtpo train` (its own
    --dry-run prints the resolved config, so nothing trains)."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: m\noutput_dir: o\ndata: d.jsonl\n")
    spec = DistSpec("single", 1, 0, "127.0.0.1", 29500, 1)
    argv = build_accelerate_argv(spec, accelerate_config=ACC / "ddp.yaml", train_config=cfg, cpu=True,
                                 overrides=["steps=3", "--dry-run"])  # fmt: skip
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "steps: 3" in out.stdout and "model: m" in out.stdout
    # and through the supervisor (in its own process: it reaps every child of the process it runs in)
    code = "import sys; from services.trainer.launch import run_supervised; sys.exit(run_supervised(sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "steps: 3" in out.stdout, out.stderr[-2000:]
    failing = subprocess.run([sys.executable, "-c", code, sys.executable, "-c", "import sys; sys.exit(3)"], cwd=REPO)
    assert failing.returncode == 3


# ---------------------------------------------------------------------------------------------- the Typer command


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        pass

    app.command("launch")(launch_command)  # exactly how services/cli.py registers it
    return app


@pytest.fixture
def in_run_dir(tmp_path, monkeypatch):
    """A working directory holding a valid `run.yaml` (the launcher validates it before anything else)."""
    monkeypatch.chdir(tmp_path)  # the accelerate config is found relative to the checkout too
    (tmp_path / "run.yaml").write_text("model: m\noutput_dir: o\ndata: d.jsonl\n")
    for name in [n for n in os.environ if n.startswith("GTPO_")]:
        monkeypatch.delenv(name)
    return tmp_path


def test_launch_command_dry_run(in_run_dir, monkeypatch):
    for name in ("PET_NNODES", "MASTER_ADDR", "WORLD_SIZE", "RANK", "JOB_COMPLETION_INDEX", "NNODES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NPROC_PER_NODE", "1")
    r = CliRunner().invoke(_app(), ["launch", "--config", "run.yaml", "--dry-run", "--resume", "steps=2"])
    assert r.exit_code == 0, r.output
    assert "scheme=single nnodes=1 node_rank=0 master=127.0.0.1:29500 nproc_per_node=1" in r.output
    assert str(ACC / "ddp.yaml") in r.output
    assert "--num_processes 1 --cpu -m services train --config run.yaml --resume steps=2" in r.output


def test_launch_command_errors_are_messages(in_run_dir, monkeypatch):
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    monkeypatch.setenv("NNODES", "2")
    for name in ("PET_NNODES", "MASTER_ADDR", "WORLD_SIZE", "RANK", "HEADLESS_SERVICE"):
        monkeypatch.delenv(name, raising=False)
    r = CliRunner().invoke(_app(), ["launch", "--config", "run.yaml", "--dry-run"])
    assert r.exit_code == 2 and "HEADLESS_SERVICE" in r.output
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    monkeypatch.delenv("NNODES")
    r = CliRunner().invoke(_app(), ["launch", "--config", "run.yaml", "--accelerate-config", "nope.yaml", "--dry-run"])
    assert r.exit_code == 2 and "nope.yaml not found" in r.output


def test_multinode_on_cpu_is_refused(in_run_dir, monkeypatch):
    env = {"JOB_COMPLETION_INDEX": "0", "NNODES": "2", "HEADLESS_SERVICE": "svc", "JOB_NAME": "j"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for name in ("PET_NNODES", "MASTER_ADDR", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("services.trainer.launch.cuda_device_count", lambda: 0)
    r = CliRunner().invoke(_app(), ["launch", "--config", "run.yaml", "--dry-run"])
    assert r.exit_code == 2 and "no GPU" in r.output
    monkeypatch.setattr("services.trainer.launch.cuda_device_count", lambda: 8)
    r = CliRunner().invoke(_app(), ["launch", "--config", "run.yaml", "--dry-run"])
    assert r.exit_code == 0 and "--num_processes 16 -m services" in r.output and "--cpu" not in r.output


def test_wait_for_host_gives_up():
    wait_for_host("localhost", 1, timeout_s=0)
    with pytest.raises(LaunchError, match="did not resolve"):
        wait_for_host("gtpo-trainer-0.does-not-exist.invalid", 29500, timeout_s=0, interval_s=0)


# ---------------------------------------------------------------------------------------------- supervision


def test_sigterm_reaches_the_grandchild_and_is_waited_for(tmp_path):
    """Like accelerate's single-process launcher: the child dies on SIGTERM at once, its child (the trainer) takes a
    moment to checkpoint. The supervisor forwards the signal to the group and returns only after the trainer is done."""
    marker = tmp_path / "checkpointed"
    ready = tmp_path / "ready"
    grandchild = textwrap.dedent(f"""
        import pathlib, signal, sys, time
        def term(*_):
            time.sleep(1.0)
            pathlib.Path({str(marker)!r}).write_text("ok")
            sys.exit(0)
        signal.signal(signal.SIGTERM, term)
        pathlib.Path({str(ready)!r}).write_text("up")
        time.sleep(60)
    """)
    child = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}]); time.sleep(60)"
    proc = start_supervisor(child)
    wait_until(ready.exists, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert marker.read_text() == "ok"  # the grandchild finished its handler before the supervisor exited
