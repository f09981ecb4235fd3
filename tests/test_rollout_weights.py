"""`POST /v1/weights` through the ASGI app: every folder that cannot be loaded is a 4xx naming the cause with the
old weights still served, every file opened lies under the checkpoint root, and versions only move forward."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from services.rollout.app import create_app
from services.rollout.engines.torch_engine import TorchEngine
from services.rollout.settings import RolloutSettings

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_dir) -> Path:
    """A checkpoint root: the start model v0, a good second checkpoint, and a folder outside it."""
    root = tmp_path_factory.mktemp("ckpts")
    shutil.copytree(tiny_dir, root / "v0")
    shutil.copytree(tiny_dir, root / "good")
    return root


@pytest.fixture
def client(root, tiny):
    """A fresh service (its own engine, serving the start model) per test: versions only move forward."""
    settings = RolloutSettings(model=root / "v0", checkpoint_root=root, api_token=TOKEN)
    with TestClient(create_app(settings, engine=TorchEngine(tiny))) as c:
        yield c


def push(client, path, version, **extra):
    return client.post("/v1/weights", json={"version": version, "path": str(path), **extra}, headers=AUTH)


def sample(client) -> tuple[list[int], int]:
    """A seeded sample (the same weights give the same tokens) and the version that produced it."""
    body = {"prompt_ids": [[5, 6, 7]], "params": {"seed": 3, "max_new_tokens": 8, "stop_token_ids": []}}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()["rollouts"][0][0]["token_ids"], r.json()["policy_version"]


def copy(root: Path, name: str) -> Path:
    out = root / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(root / "v0", out)
    return out


def truncated(root):
    d = copy(root, "truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    return d


def header_only(root):
    d = copy(root, "header-only")
    (d / "model.safetensors").write_bytes(b"\x10\x00")
    return d


def shape_mismatch(root):
    d = copy(root, "shape")
    tensors = load_file(d / "model.safetensors")
    tensors[Q_PROJ] = tensors[Q_PROJ][:-1].clone()
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return d


def missing_tensor(root):
    d = copy(root, "missing-tensor")
    tensors = load_file(d / "model.safetensors")
    del tensors[Q_PROJ]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return d


def config_list(root):
    d = copy(root, "config-list")
    (d / "config.json").write_text("[1, 2]")
    return d


def config_not_json(root):
    d = copy(root, "config-broken")
    (d / "config.json").write_bytes(b"{\xff not json")
    return d


def config_deep(root):
    d = copy(root, "config-deep")
    (d / "config.json").write_text("[" * 10_000 + "]" * 10_000)
    return d


def config_wrong_model(root):
    d = copy(root, "config-llama")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    return d


def no_config(root):
    d = copy(root, "no-config")
    (d / "config.json").unlink()
    return d


def no_weights(root):
    d = copy(root, "no-weights")
    (d / "model.safetensors").unlink()
    return d


def a_file(root):
    return root / "v0" / "config.json"


def missing_folder(root):
    return root / "never-written"


def fifo_inside(root):
    d = copy(root, "fifo")
    os.mkfifo(d / "tokenizer.json.tmp")  # a loader opening it would block forever
    return d


def dangling_link(root):
    d = copy(root, "dangling")
    (d / "extra.json").symlink_to(root / "gone.json")
    return d


def link_loop(root):
    d = root / "loop"
    if not d.is_symlink():
        d.symlink_to(d)
    return d


def index_shard_outside(root, outside):
    d = copy(root, "index-outside")
    shutil.copy(d / "model.safetensors", outside / "shard.safetensors")
    (d / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {Q_PROJ: f"../../{outside.name}/shard.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def index_not_a_map(root):
    d = copy(root, "index-bad")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a"]}))
    return d


def file_link_outside(root, outside):
    """The probe's escape: a folder under the root whose weights file is a symlink to one outside it."""
    d = copy(root, "file-link")
    shutil.copy(d / "model.safetensors", outside / "model.safetensors")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").symlink_to(outside / "model.safetensors")
    return d


def folder_link_outside(root, outside):
    shutil.copytree(root / "v0", outside / "ckpt", dirs_exist_ok=True)
    link = root / "folder-link"
    if not link.is_symlink():
        link.symlink_to(outside / "ckpt")
    return link


@pytest.mark.parametrize(
    "make, status, needle",
    [
        (truncated, 422, "truncated"),
        (header_only, 422, "truncated or not safetensors"),
        (shape_mismatch, 422, f"{Q_PROJ} has shape [127, 128], the served model [128, 128]"),
        (missing_tensor, 422, f"{Q_PROJ} is missing"),
        (config_list, 422, "config.json: must hold a JSON object, got list"),
        (config_not_json, 422, "config.json: not valid JSON"),
        (config_deep, 422, "config.json: not valid JSON"),
        (config_wrong_model, 422, "unsupported model_type 'llama'"),
        (no_config, 422, "no config.json"),
        (no_weights, 422, "holds no safetensors weights"),
        (a_file, 422, "is not a folder"),
        (missing_folder, 422, "does not exist"),
        (fifo_inside, 422, "tokenizer.json.tmp is not a regular file"),
        (dangling_link, 422, "extra.json cannot be read"),
        (link_loop, 422, "cannot be resolved"),
        (index_not_a_map, 422, "weight_map must map names to files"),
    ],
)
def test_an_unloadable_folder_is_422_naming_the_cause_and_the_old_weights_stay(client, root, make, status, needle):
    before = sample(client)
    r = push(client, make(root), 1)
    assert r.status_code == status and needle in r.json()["detail"], r.text
    assert sample(client) == before  # same tokens from the same seed, same version: nothing changed
    assert 'gtpo_rollout_weight_load_failures_total{source="http"} 1.0' in client.get("/metrics").text


@pytest.mark.parametrize("make", [file_link_outside, folder_link_outside, index_shard_outside])
def test_every_file_opened_must_resolve_under_the_root(client, root, tmp_path, make):
    before = sample(client)
    r = push(client, make(root, tmp_path), 1)
    assert r.status_code == 403 and "outside the checkpoint root" in r.text, r.text
    assert sample(client) == before


@pytest.mark.parametrize("name", ["with space", "ünïcødé-ckpt", "-leading-dash", "new\nline", "...", "a" * 200])
def test_odd_folder_names_load(client, root, name):
    folder = copy(root, name)
    r = push(client, folder, 1)
    assert r.status_code == 200, r.text
    assert r.json() == {"version": 1, "path": str(folder.resolve()), "seconds": r.json()["seconds"], "previous": None}
    assert sample(client)[1] == 1


@pytest.mark.parametrize("path", [".", "", "\x00", "/", "a" * 5000, "v0/../../"])
def test_odd_path_strings_are_4xx(client, path):
    r = push(client, path, 1)
    assert 400 <= r.status_code < 500, r.text


def test_versions_only_move_forward_unless_rollback(client, root):
    v5 = copy(root, "v5")
    assert push(client, v5, 5).status_code == 200
    again = push(client, v5, 5)  # the trainer pushes over HTTP and the registry announces it too
    assert again.status_code == 200 and again.json()["seconds"] == 0.0 and again.json()["previous"] == 5

    older = push(client, root / "good", 3)
    assert older.status_code == 409 and "older than the served 5" in older.text
    other = push(client, root / "good", 5)
    assert other.status_code == 409 and "already served from" in other.text and "rollback" in other.text
    assert sample(client)[1] == 5

    back = push(client, root / "good", 3, rollback=True)
    assert back.status_code == 200 and back.json()["previous"] == 5
    assert sample(client)[1] == 3
    assert push(client, v5, 6).status_code == 200


def test_the_token_is_checked_before_the_body(client):
    r = client.post("/v1/weights", content=b'{"version": NaN, "path": 1}', headers={"content-type": "application/json"})
    assert r.status_code == 401
