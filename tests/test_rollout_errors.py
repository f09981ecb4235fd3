"""No 5xx from any input: the rollout app's contracts refuse non-finite and out-of-range numbers, its error
handlers render any value, odd text is refused or served, and the shared health router and error handlers
(shared/http.py) work on any app."""

from __future__ import annotations

import json
import math

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

from services.rollout.app import create_app
from services.rollout.engines.torch_engine import TorchEngine
from services.rollout.settings import RolloutSettings
from shared.http import health_router, install_error_handlers, safe_jsonable


@pytest.fixture(scope="module")
def client(tiny_dir, tiny):
    settings = RolloutSettings(model=tiny_dir, api_token="t", max_new_tokens=16, max_prompt_tokens=64, max_prompts=4)
    with TestClient(create_app(settings, engine=TorchEngine(tiny))) as c:
        yield c


def raw(client, text: str, path: str = "/v1/generate"):
    """POST `text` as a JSON body as it is (NaN, 10**5000 and lone surrogates are legal to send)."""
    return client.post(path, content=text.encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    "body, field",
    [
        ('{"prompt_ids": [[1]], "params": {"temperature": NaN}}', "temperature"),
        ('{"prompt_ids": [[1]], "params": {"temperature": Infinity}}', "temperature"),
        ('{"prompt_ids": [[1]], "params": {"top_p": -Infinity}}', "top_p"),
        ('{"prompt_ids": [[1]], "params": {"confidence_threshold": NaN}}', "confidence_threshold"),
        ('{"prompt_ids": [[1]], "params": {"temperature": 1e400}}', "temperature"),
        ('{"prompt_ids": [[1]], "params": {"seed": ' + "9" * 4000 + "}}", "seed"),
        ('{"prompt_ids": [[1]], "params": {"top_k": 100000000000000000000}}', "top_k"),
        ('{"prompt_ids": [[1]], "params": {"stop_token_ids": [-1]}}', "stop_token_ids"),
        ('{"prompt_ids": [[1]], "params": {"stop_token_ids": [4294967296]}}', "stop_token_ids"),
        ('{"prompt_ids": [[1, 18446744073709551616]]}', "prompt_ids"),
        ('{"prompt_ids": [[1, 320]], "params": {"max_new_tokens": 4}}', "prompt_ids: token ids must be in [0, 320)"),
        ('{"prompt_ids": [[1, -5]]}', "prompt_ids"),
        ('{"prompt_ids": [[1]], "params": {"max_new_tokens": 17}}', "max_new_tokens"),
        ('{"prompt_ids": [[1]], "params": {"max_new_tokens": 1e300}}', "max_new_tokens"),
        ('{"prompt_ids": [' + ",".join(["[1]"] * 5) + "]}", "prompts x n"),
        ('{"params": {"max_new_tokens": 4}, "prompt_ids": [[' + ",".join(["1"] * 65) + "]]}", "prompt_ids[0]: needs"),
        ('{"prompts": ["a\\ud800b"]}', "prompts"),
        ('{"prompts": ["\\udcff"], "chat": false}', "prompts"),
        (
            '{"prompts": [""], "chat": false, "params": {"max_new_tokens": 4}}',
            "prompts[0]: needs 1 to 64 tokens, got 0",
        ),
        ('{"prompts": ["x"], "\\ud800": 1}', "\\ud800"),
    ],
)
def test_bad_numbers_and_text_are_422_naming_the_field(client, body, field):
    r = raw(client, body)
    assert r.status_code == 422, r.text
    assert field in r.text
    json.loads(r.content)  # always valid JSON, whatever the input held


@pytest.mark.parametrize("temperature", [5e-324, 1e-45, 1e-40, 1e-30, 1e-8])
def test_a_vanishingly_small_temperature_is_served(client, temperature):
    body = {"prompt_ids": [[5, 6, 7]], "params": {"temperature": temperature, "logprobs": True, "max_new_tokens": 8}}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    assert all(math.isfinite(x) for x in r.json()["rollouts"][0][0]["logprobs"])


def test_an_integer_too_long_to_parse_is_400(client):
    r = raw(client, '{"prompt_ids": [[' + "1" * 10_000 + "]]}")
    assert r.status_code == 400 and "parsing the body" in r.text


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("prompts", [["\x00", "\u200b\u202e\ufeff", "😀" * 10, "\U0010ffff"], ["a\r\nb", "ǅ", "\x7f"]])
def test_odd_unicode_prompts_are_served(client, prompts, chat):
    r = client.post("/v1/generate", json={"prompts": prompts, "chat": chat, "params": {"max_new_tokens": 4}})
    assert r.status_code == 200, r.text
    assert len(r.json()["rollouts"]) == len(prompts)


def test_health_and_readiness(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready", "engine": "torch", "policy_version": 0,
                                           "served_version": None}


def test_no_engine_yet_is_503_and_not_ready(tiny_dir):
    app = create_app(RolloutSettings(model=tiny_dir))
    c = TestClient(app)  # no lifespan run: the engine is never loaded
    assert c.get("/health").status_code == 200
    r = c.get("/ready")
    assert r.status_code == 503 and r.json() == {"status": "not ready", "reason": "the engine is not loaded yet"}
    assert c.post("/v1/generate", json={"prompt_ids": [[1]]}).status_code == 503


# --------------------------------------------------------------------------- shared/http.py on a bare app


class Item(BaseModel):
    x: float
    n: int = Field(le=10)


def bare_app(reason: list[str | None]) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(health_router(lambda: reason[0], lambda: {"workers": 2, "status": "overridden"}))

    @app.post("/item")
    async def item(body: Item) -> dict[str, float]:
        return {"x": body.x}

    return app


def test_health_router_says_why_it_is_not_ready():
    reason: list[str | None] = ["redis unreachable"]
    c = TestClient(bare_app(reason))
    r = c.get("/ready")
    assert (r.status_code, r.json()) == (503, {"status": "not ready", "reason": "redis unreachable"})
    reason[0] = None
    assert (c.get("/ready").status_code, c.get("/ready").json()) == (200, {"status": "ready", "workers": 2})
    assert c.get("/health").json() == {"status": "ok"}


@pytest.mark.parametrize(
    "body, echoed",
    [
        ('{"x": 1, "n": NaN}', '"input":"nan"'),  # what crashed the default handler (allow_nan=False)
        ('{"x": 1, "n": ' + "7" * 4000 + "}", '"input":"<integer of 13288 bits>"'),
        ('{"x": {"\\udcff": 1}, "n": 1}', "\\udcff"),
        ('{"x": "' + "y" * 10_000 + '", "n": 1}', "(10000 characters)"),
    ],
)
def test_validation_errors_render_any_input(body, echoed):
    r = TestClient(bare_app([None])).post("/item", content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422 and echoed in r.text, r.text
    detail = json.loads(r.content)["detail"]
    assert all({"type", "loc", "msg"} <= set(e) for e in detail)


def test_an_echoed_lone_surrogate_reads_back_as_sent():
    body = b'{"x": {"\\udcff": 1}, "n": 1}'
    r = TestClient(bare_app([None])).post("/item", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and json.loads(r.content)["detail"][0]["input"] == {"\udcff": 1}


def test_safe_jsonable_leaves_plain_values_alone():
    value = {"a": [1, 2.5, None, True, "ü"], "b": {"c": -(2**63)}}
    assert safe_jsonable(value) == value
    assert safe_jsonable([math.nan, math.inf, 2**65]) == ["nan", "inf", "<integer of 66 bits>"]


def test_a_body_over_the_size_limit_is_413(tiny_dir, tiny):
    settings = RolloutSettings(model=tiny_dir, max_body_bytes=4096)
    with TestClient(create_app(settings, engine=TorchEngine(tiny))) as c:
        r = c.post("/v1/generate", json={"prompts": ["x" * 5000]})
        assert r.status_code == 413, r.text
