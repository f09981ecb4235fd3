"""The rollout service over real HTTP semantics (ASGI, lifespan run): generate, weights auth and confinement."""

import shutil

import pytest
from fastapi.testclient import TestClient

from services.rollout.app import create_app
from services.rollout.engines.torch_engine import TorchEngine
from services.rollout.settings import RolloutSettings
from shared.contracts.wire import GenerateResponse

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_dir):
    """A checkpoint root holding the start model and a second version."""
    root = tmp_path_factory.mktemp("ckpts")
    shutil.copytree(tiny_dir, root / "v0")
    shutil.copytree(tiny_dir, root / "v1")
    return root


@pytest.fixture(scope="module")
def client(root, tiny):
    settings = RolloutSettings(model=root / "v0", checkpoint_root=root, api_token=TOKEN, max_prompts=16)
    with TestClient(create_app(settings, engine=TorchEngine(tiny))) as c:
        yield c


def test_generate_text_and_ids(client):
    r = client.post("/v1/generate", json={"prompts": ["1+1="], "params": {"n": 2, "seed": 1, "max_new_tokens": 6}})
    assert r.status_code == 200, r.text
    body = GenerateResponse.model_validate(r.json())
    assert len(body.rollouts) == 1 and len(body.rollouts[0]) == 2
    assert all(len(x.step_map) == len(x.token_ids) for x in body.rollouts[0])
    ids = body.rollouts[0][0].prompt_ids
    again = client.post("/v1/generate", json={"prompt_ids": [ids], "params": {"seed": 1, "max_new_tokens": 6}})
    assert again.json()["rollouts"][0][0]["token_ids"] == body.rollouts[0][0].token_ids  # same seed, same output


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompts": ["x"], "params": {"top_p": 0}}, "top_p"),
        ({"prompts": ["x"], "params": {"block_size": 0}}, "block_size"),
        ({"prompts": ["x"], "prompt_ids": [[1]]}, "exactly one"),
        ({"prompt_ids": [[1, 10**9]]}, "prompt_ids"),
        ({"prompt_ids": [[]]}, "prompt_ids"),
        ({"prompts": ["x"] * 9, "params": {"n": 2}}, "at most 16"),
        ({"prompts": ["x"], "params": {"denoising_steps": 8}}, "denoising_steps"),
    ],
)
def test_bad_requests_are_422_naming_the_field(client, body, field):
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 422 and field in r.text


def test_weights_need_the_token_and_stay_in_the_root(client, root, tmp_path):
    body = {"version": 1, "path": str(root / "v1")}
    assert client.post("/v1/weights", json=body).status_code == 401
    assert client.post("/v1/weights", json=body, headers={"Authorization": "Bearer nope"}).status_code == 403
    auth = {"Authorization": f"Bearer {TOKEN}"}
    outside = tmp_path / "evil"
    shutil.copytree(root / "v1", outside)
    r = client.post("/v1/weights", json={"version": 2, "path": str(outside)}, headers=auth)
    assert r.status_code == 403 and "outside the checkpoint root" in r.text
    r = client.post("/v1/weights", json={"version": 2, "path": "../../etc"}, headers=auth)
    assert r.status_code == 403
    r = client.post("/v1/weights", json={"version": 3, "path": "v0/tokenizer_config.json"}, headers=auth)
    assert r.status_code == 422
    r = client.post("/v1/weights", json=body, headers=auth)
    assert r.status_code == 200 and r.json()["version"] == 1
    gen = client.post("/v1/generate", json={"prompts": ["q"], "params": {"max_new_tokens": 4}})
    assert gen.json()["policy_version"] == 1


def test_weights_disabled_without_configured_token(tiny, root):
    settings = RolloutSettings(model=root / "v0", checkpoint_root=root)
    with TestClient(create_app(settings, engine=TorchEngine(tiny))) as c:
        r = c.post("/v1/weights", json={"version": 1, "path": str(root / "v1")}, headers={"Authorization": "Bearer x"})
        assert r.status_code == 403 and "disabled" in r.text


def test_health_ready_metrics_and_openapi(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["status"] == "ready"
    client.post("/v1/generate", json={"prompts": ["a"], "params": {"max_new_tokens": 4}})
    text = client.get("/metrics").text
    assert "gtpo_rollout_requests_total" in text and "gtpo_rollout_tokens_total" in text
    assert "/v1/generate" in client.get("/openapi.json").json()["paths"]


# --------------------------------------------------------------------------- schemathesis: no 5xx on any input

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from shared.model.tiny import init_tiny  # noqa: E402

# schemathesis runs the app's lifespan itself (which loads the model), so the app is built at collection time from a
# small checkpoint; generation is capped so fuzzed sizes stay fast
_FUZZ_ROOT = Path(tempfile.mkdtemp(prefix="gtpo-fuzz-"))
init_tiny(_FUZZ_ROOT / "v0", seed=0)
_FUZZ_APP = create_app(
    RolloutSettings(
        model=_FUZZ_ROOT / "v0",
        checkpoint_root=_FUZZ_ROOT,
        api_token=TOKEN,
        max_prompts=4,
        max_new_tokens=16,
        max_prompt_tokens=64,
        device="cpu",
    )  # fmt: skip
)
schema = schemathesis.openapi.from_asgi("/openapi.json", _FUZZ_APP)


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_no_server_errors(case):
    case.call_and_validate(checks=[not_a_server_error])
