"""The reward service over HTTP, through the real ASGI app and its lifespan (pool included), plus schemathesis
fuzzing of its OpenAPI schema for server errors."""

import asyncio
import json

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from services.reward.app import create_app
from services.reward.rewards import REWARDS
from services.reward.settings import RewardSettings

SETTINGS = {"workers": 1, "timeout_s": 2.0, "max_items": 8, "max_body_bytes": 1 << 20}


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(RewardSettings(**SETTINGS))) as c:  # runs the lifespan: pool up, then down
        yield c


def score(client, items, weights=None):
    body = {"items": items} if weights is None else {"items": items, "weights": weights}
    return client.post("/v1/score", json=body)


def test_score_happy_path(client):
    items = [
        {"id": "right", "response": r"so \boxed{\frac{1}{2}}", "reference": "0.5", "token_count": 10},
        {"id": "wrong", "response": r"\boxed{2}", "reference": "3"},
        {"id": "nobox", "response": "it is 3", "reference": "3"},
    ]
    r = score(client, items, {"accuracy": 1.0, "format": 0.5, "boxed": 1.0})
    assert r.status_code == 200
    out = {x["id"]: x for x in r.json()["results"]}
    assert list(out) == ["right", "wrong", "nobox"]
    assert out["right"] == {
        "id": "right",
        "total": pytest.approx(1.6),
        "components": {"accuracy": 1.0, "format": 1.0, "boxed": 0.1},
        "status": "ok",
        "detail": None,
    }
    assert (out["wrong"]["total"], out["nobox"]["total"]) == (pytest.approx(0.6), 0.0)


def test_score_uses_configured_weights_by_default(client):
    r = score(client, [{"id": "a", "response": r"\boxed{3}", "reference": "3"}])
    assert r.status_code == 200 and r.json()["results"][0]["components"] == {"accuracy": 1.0}


def test_score_reports_timeouts_and_errors_explicitly(client):
    items = [
        {"id": "tower", "response": r"\boxed{10^{10^{10^{10}}}}", "reference": "5"},
        {"id": "huge", "response": "\\boxed{" + "1" * 5000 + "}", "reference": "5"},
        {"id": "noref", "response": r"\boxed{5}"},
    ]
    out = {x["id"]: x for x in score(client, items).json()["results"]}
    assert (out["tower"]["status"], out["tower"]["total"]) == ("timeout", 0.0)
    assert (out["huge"]["status"], out["huge"]["total"]) == ("error", 0.0) and "too large" in out["huge"]["detail"]
    assert out["noref"]["status"] == "error" and "no reference" in out["noref"]["detail"]


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"items": [{"id": "a", "response": "x"}], "weights": {"acuracy": 1.0}}, "unknown reward 'acuracy'"),
        ({"items": [{"id": "a", "response": "x"}], "weights": {}}, "at least one reward"),
        ({"items": [{"id": "a", "response": "x"}], "weights": {"accuracy": 1e300}}, "finite"),
        ({"items": []}, "at least 1 item"),
        ({"items": [{"id": str(i), "response": "x"} for i in range(9)]}, "at most 8 per request, got 9"),
        ({"items": [{"id": "a", "response": "x", "steps": -1}]}, "greater than or equal to 0"),
        ({"items": [{"id": "a", "response": "x"}], "extra": 1}, "Extra inputs are not permitted"),
    ],
)
def test_score_422_with_a_message(client, body, needle):
    r = client.post("/v1/score", json=body)
    assert r.status_code == 422
    assert needle in json.dumps(r.json())


def test_body_too_large_is_413(client):
    r = score(client, [{"id": "a", "response": "x" * (2 << 20)}])
    assert r.status_code == 413


def test_lone_surrogate_is_a_422_not_a_500(client):
    """`"\\udcff"` is valid JSON; pydantic refuses it, and the 422 echoing it must still encode (ASCII JSON)."""
    body = b'{"items": [{"id": "\\udcff", "response": "\\\\boxed{1}", "reference": "1"}]}'
    r = client.post("/v1/score", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["input"] == "\udcff"


def test_health_ready_metrics(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready" and ready.json()["workers"] == 1
    score(client, [{"id": "a", "response": r"\boxed{1}", "reference": "1"}])
    text = client.get("/metrics").text
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")
    ok = [line for line in text.splitlines() if line.startswith('gtpo_reward_items_total{status="ok"}')]
    assert ok and float(ok[0].split()[-1]) >= 1
    for name in (
        'gtpo_reward_items_total{status="timeout"}',
        'gtpo_reward_items_total{status="error"}',
        "gtpo_reward_score_seconds_bucket",
        "gtpo_reward_score_seconds_count",
        "gtpo_reward_pool_restarts_total",
        "gtpo_reward_pool_kills_total",
        "gtpo_reward_pool_ready_workers",
    ):
        assert name in text, name


def test_event_loop_answers_health_while_scoring(client):
    """The pool call runs in a worker thread: /health is answered while a slow batch is being checked."""

    async def main():
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://reward") as ac:
            item = {"id": "slow", "response": r"\boxed{10^{10^{10^{10}}}}", "reference": "5"}
            slow = asyncio.create_task(ac.post("/v1/score", json={"items": [item]}))
            await asyncio.sleep(0.2)  # let the slow request reach the pool
            health = await ac.get("/health")
            return health, slow.done(), await slow

    health, slow_done_first, slow = asyncio.run(main())
    assert health.status_code == 200 and not slow_done_first
    assert slow.json()["results"][0]["status"] == "timeout"


def test_no_pool_without_lifespan_is_503():
    app = create_app(RewardSettings(**SETTINGS))
    c = TestClient(app)  # not entered: no lifespan, no pool
    assert c.get("/ready").status_code == 503
    assert score(c, [{"id": "a", "response": "x"}]).status_code == 503
    assert c.get("/health").status_code == 200


def test_settings_refuse_unknown_rewards(monkeypatch):
    monkeypatch.setenv("GTPO_REWARD_WEIGHTS", '{"accuracy": 1, "speed": 0.5}')
    assert RewardSettings().weights == {"accuracy": 1.0, "speed": 0.5}
    with pytest.raises(ValueError, match="unknown reward 'sped'"):
        RewardSettings(weights={"sped": 1.0})


# --------------------------------------------------------------------------- schemathesis


LATEX_TOKENS = [*"0123456789+-*/^_{}()[]=,.x ", r"\frac", r"\sqrt", r"\pi", r"\left(", r"\right)", r"\boxed{"]
LATEXISH = st.lists(st.sampled_from(LATEX_TOKENS), max_size=30).map("".join)
ITEMS = st.fixed_dictionaries(
    {
        "id": st.text(min_size=1, max_size=8),
        "response": st.one_of(
            st.builds(lambda pre, ans: f"{pre}\\boxed{{{ans}}}", st.text(max_size=20), LATEXISH), st.text()
        ),
        "reference": st.one_of(st.none(), LATEXISH),
    },
    optional={
        "token_count": st.integers(0, 5000),
        "steps": st.integers(0, 5000),
        "block_size": st.integers(1, 64),
        "max_new_tokens": st.integers(1, 5000),
        "finish_reason": st.sampled_from(["stop", "length"]),
    },
)
WEIGHTS = st.dictionaries(st.sampled_from(sorted(REWARDS)), st.floats(-100, 100), min_size=1)


@given(items=st.lists(ITEMS, min_size=1, max_size=8), weights=WEIGHTS)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_valid_requests_always_score(client, items, weights):
    """Any valid request scores: 200, one result per item in order, and a non-ok result always says why."""
    r = score(client, items, weights)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["id"] for x in results] == [i["id"] for i in items]
    for x in results:
        assert x["status"] in ("ok", "timeout", "error")
        assert set(x["components"]) <= set(weights)
        if x["status"] == "ok":
            assert x["detail"] is None and set(x["components"]) == set(weights)
            assert x["total"] == pytest.approx(sum(weights[k] * v for k, v in x["components"].items()))
        else:
            assert x["total"] == 0.0 and x["detail"]


# its own app: schemathesis runs (and ends) the lifespan itself, once per operation; building the app starts
# nothing (the pool starts in the lifespan). `schemathesis.pytest.from_fixture` fails on pytest 9.2.
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(RewardSettings(**SETTINGS)))


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_no_server_errors(case):
    case.call_and_validate(checks=[not_a_server_error])
