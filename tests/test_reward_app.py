"""The reward service over HTTP, through the real ASGI app and its lifespan (pool included): scoring, 4xx for every
bad input (non-finite numbers, huge integers, lone surrogates), the request deadline under concurrent requests whose
checks hang, and fuzzing (raw JSON bodies with hypothesis, the OpenAPI schema with schemathesis) for server errors."""

import asyncio
import json
import time
from dataclasses import dataclass

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reward_checks import HANG, with_faults
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


@pytest.mark.parametrize(
    "raw, field",
    [
        ('"token_count": 1e400', "token_count"),
        ('"token_count": -1e400', "token_count"),
        ('"steps": NaN', "steps"),
        ('"block_size": Infinity', "block_size"),
        ('"max_new_tokens": -Infinity', "max_new_tokens"),
        (f'"token_count": {2**63}', "token_count"),
        (f'"steps": {2**64 + 1}', "steps"),
        (f'"block_size": {10**30}', "block_size"),
        (f'"max_new_tokens": -{2**63 + 1}', "max_new_tokens"),
        ('"token_count": 1e20', "token_count"),
        ('"token_count": 2.5', "token_count"),
    ],
)
def test_hostile_numbers_in_items_are_422_naming_the_field(client, raw, field):
    body = '{"items": [{"id": "a", "response": "\\\\boxed{1}", "reference": "1", ' + raw + "}]}"
    r = client.post("/v1/score", content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    [err] = r.json()["detail"]
    assert err["loc"] == ["body", "items", 0, field]


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_non_finite_weights_are_422_naming_the_weight(client, raw):
    body = '{"items": [{"id": "a", "response": "x"}], "weights": {"format": 1, "accuracy": ' + raw + "}}"
    r = client.post("/v1/score", content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    [err] = r.json()["detail"]
    assert err["loc"] == ["body", "weights", "accuracy"] and "finite" in err["msg"]
    assert err["input"] in ("nan", "inf", "-inf")


def test_huge_weights_and_ints_past_the_digit_limit_are_4xx(client):
    r = score(client, [{"id": "a", "response": "x"}], {"accuracy": 1e308})
    assert r.status_code == 422 and "finite with |w| <= 1e+06" in r.text
    body = b'{"items": [{"id": "a", "response": "x", "token_count": ' + b"9" * 5000 + b"}]}"
    r = client.post("/v1/score", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400  # Python's JSON parser refuses a 5000-digit integer before any field is read


@pytest.mark.parametrize("field", ["response", "reference"])
def test_lone_surrogates_in_text_are_422_naming_the_field(client, field):
    item = {"id": "a", "response": "\\boxed{1}", "reference": "1", field: "\\boxed{\udc80}\ud800"}
    body = json.dumps({"items": [item]}).encode()  # ensure_ascii: the surrogates travel as \udc80 \ud800 escapes
    r = client.post("/v1/score", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    [err] = r.json()["detail"]
    assert err["loc"] == ["body", "items", 0, field] and err["input"] == "\\boxed{\udc80}\ud800"


def test_odd_but_valid_unicode_is_scored(client):
    text = "\u202e\ufeff\x00 \U0001f600 e\u0301 \\boxed{\uff11}"
    r = score(client, [{"id": "\U0001f600\u202e", "response": text, "reference": "1"}])
    assert r.status_code == 200, r.text
    [res] = r.json()["results"]
    assert res["id"] == "\U0001f600\u202e" and res["status"] in ("ok", "error", "timeout")


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


# --------------------------------------------------------------------------- request deadline

DEADLINE_SETTINGS = {"workers": 2, "timeout_s": 60.0, "deadline_s": 3.0, "max_items": 64}
"""A hard limit far past the test's own timeout: only the request deadline can end a request whose check hangs."""


def wait_ready_workers(client, n: int) -> None:
    for _ in range(600):
        if client.get("/ready").json().get("ready_workers") == n:
            return
        time.sleep(0.1)
    raise AssertionError(f"{n} verifier workers never became ready")


def hung_items(tag: str, n: int) -> list[dict]:
    return [{"id": f"{tag}-hang-{i}", "response": f"\\boxed{{{HANG}-{tag}-{i}}}", "reference": "1"} for i in range(n)]


@pytest.mark.timeout(180)
def test_request_deadline_holds_under_concurrent_requests_with_hanging_checks():
    """Checks that hang (SIGALRM blocked: only the 60 s hard limit would stop them) in 24 concurrent requests
    sharing 2 workers: every response comes back with `timeout` for each hanging item, the items that need no check
    scored as usual, and no 5xx. Before that, alone, a request's easy item is ok and its hanging one times out."""
    with TestClient(create_app(RewardSettings(**DEADLINE_SETTINGS), check=with_faults)) as client:
        wait_ready_workers(client, 2)
        easy = {"id": "easy", "response": r"so \boxed{\frac{1}{2}}", "reference": "0.5"}
        r = score(client, [easy, *hung_items("alone", 1)])
        assert r.status_code == 200, r.text
        easy_res, hung_res = r.json()["results"]
        assert (easy_res["status"], easy_res["total"]) == ("ok", 1.0)
        assert hung_res["status"] == "timeout" and hung_res["total"] == 0.0
        assert hung_res["detail"] == "accuracy check: the request deadline passed while the check was running"

        def request(k: int) -> list[dict]:
            nobox = [{"id": f"{k}-nobox-{i}", "response": "it is 1", "reference": "1"} for i in range(4)]
            noref = [{"id": f"{k}-noref-{i}", "response": r"\boxed{1}"} for i in range(4)]
            return [*hung_items(str(k), 8), *nobox, *noref]

        async def storm() -> list[httpx.Response]:
            transport = httpx.ASGITransport(app=client.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://reward", timeout=120) as ac:
                return await asyncio.gather(*(ac.post("/v1/score", json={"items": request(k)}) for k in range(24)))

        responses = asyncio.run(storm())
        for k, resp in enumerate(responses):
            assert resp.status_code == 200, resp.text
            results = resp.json()["results"]
            assert [x["id"] for x in results] == [item["id"] for item in request(k)]
            statuses = [x["status"] for x in results]
            assert statuses == ["timeout"] * 8 + ["ok"] * 4 + ["error"] * 4
            assert all("request deadline passed" in x["detail"] and x["total"] == 0.0 for x in results[:8])
            assert all(x["components"] == {"accuracy": 0.0} for x in results[8:12])
        assert client.get("/ready").status_code == 200  # the pool is still up (both workers hung till their limit)


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


@dataclass(frozen=True)
class Raw:
    """Bytes written into the body as they are: what `json.dumps` cannot produce (1e400, bad UTF-8)."""

    data: bytes


def to_json(value) -> bytes:
    """JSON text of `value` as a hostile client writes it: NaN / Infinity, integers of any size, lone surrogates
    (as `\\udxxx` escapes), and `Raw` bytes verbatim."""
    if isinstance(value, Raw):
        return value.data
    if isinstance(value, dict):
        return b"{" + b",".join(to_json(str(k)) + b":" + to_json(v) for k, v in value.items()) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(to_json(v) for v in value) + b"]"
    return json.dumps(value, ensure_ascii=True, allow_nan=True).encode("ascii")


ODD_CHARS = st.one_of(
    st.characters(),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=()),  # lone surrogates
    st.sampled_from(["\x00", "\u202e", "\ufeff", "\U0001f600", "\\", '"', "{", "}"]),
)
ODD_TEXT = st.text(ODD_CHARS, max_size=24)
RAW_NUMBERS = st.sampled_from(
    [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1e20", b"-0", b"1.5", b"0e0"]
    + [str(n).encode() for n in (2**31, 2**63, 2**64, -(2**63) - 1, 10**40)]
    + [b'"\xff\xfe"', b'"\xed\xa0\x80"']  # not UTF-8 / an encoded surrogate
).map(Raw)
ODD_VALUE = st.one_of(
    RAW_NUMBERS,
    st.integers(),
    st.integers(min_value=2**62, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    ODD_TEXT,
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)
ODD_ITEMS = st.fixed_dictionaries(
    {"id": st.one_of(ODD_TEXT, ODD_VALUE), "response": st.one_of(ODD_TEXT, LATEXISH.map(lambda a: f"\\boxed{{{a}}}"))},
    optional={
        "reference": st.one_of(ODD_TEXT, LATEXISH, ODD_VALUE),
        "token_count": ODD_VALUE,
        "steps": ODD_VALUE,
        "block_size": ODD_VALUE,
        "max_new_tokens": ODD_VALUE,
        "finish_reason": st.one_of(st.sampled_from(["stop", "length"]), ODD_VALUE),
    },
)
ODD_BODIES = st.fixed_dictionaries(
    {"items": st.lists(ODD_ITEMS, max_size=3)},
    optional={
        "weights": st.one_of(
            ODD_VALUE, st.dictionaries(st.one_of(st.sampled_from(sorted(REWARDS)), ODD_TEXT), ODD_VALUE, max_size=3)
        )
    },
)


@given(body=ODD_BODIES)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_hostile_bodies_never_get_a_server_error(client, body):
    """Raw bodies with non-finite numbers, huge integers, bad UTF-8 and lone surrogates in every field: a 4xx with a
    JSON error (each field error naming its location) or a scored 200, never a 5xx."""
    r = client.post("/v1/score", content=to_json(body), headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text
    detail = r.json().get("detail")
    if r.status_code == 422 and isinstance(detail, list):
        assert detail and all(e["loc"] and e["msg"] for e in detail)
    elif r.status_code == 200:
        assert len(r.json()["results"]) == len(body["items"])
    else:
        assert r.status_code in (400, 422) and isinstance(detail, str) and detail


# its own app: schemathesis runs (and ends) the lifespan itself, once per operation; building the app starts
# nothing (the pool starts in the lifespan). `schemathesis.pytest.from_fixture` fails on pytest 9.2.
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(RewardSettings(**SETTINGS)))


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_no_server_errors(case):
    case.call_and_validate(checks=[not_a_server_error])
