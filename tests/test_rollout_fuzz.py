"""Fuzzing the rollout HTTP surface with hypothesis: bodies built of non-finite numbers, huge integers, odd Unicode
(lone surrogates included, as JSON escapes) and near-valid settings never get a 5xx, and every answer is JSON.

The service runs the tiny model with small limits, so a body that passes validation generates in milliseconds.
"""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from services.rollout.app import create_app
from services.rollout.engines.torch_engine import TorchEngine
from services.rollout.settings import RolloutSettings

TOKEN = "fuzz"
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("fuzz-ckpts")
    shutil.copytree(tiny_dir, root / "v0")
    shutil.copytree(tiny_dir, root / "v1")
    return root


@pytest.fixture(scope="module")
def client(root, tiny):
    limits = {"max_new_tokens": 8, "max_prompt_tokens": 32, "max_prompts": 4}
    app = create_app(RolloutSettings(model=root / "v0", checkpoint_root=root, api_token=TOKEN, **limits),
                     engine=TorchEngine(tiny))  # fmt: skip
    with TestClient(app) as c:
        yield c


HUGE = 10**4000  # parses (under Python's 4300-digit limit) but fits no field
specials = st.sampled_from("\x00\u202e\u200b\ufeff\U0010ffff\r")
odd_text = st.text(st.integers(0, 9).flatmap(lambda i: specials if i == 9 else st.characters()), max_size=12)
broken_text = st.builds(lambda a, s, b: a + s + b, odd_text, st.characters(categories=["Cs"]), odd_text)
"""Text holding a lone surrogate: valid JSON ("\\ud800"), but no Unicode string."""
numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 2**31, 2**62 + 1, 2**64, HUGE, 5e-324, 1e-40, -0.0, 1e308]),
)
wild = st.one_of(
    numbers, odd_text, broken_text, st.booleans(), st.none(), st.lists(broken_text, max_size=2),
    st.lists(st.integers(-5, 400), max_size=3),
)  # fmt: skip

SAMPLING = {
    "block_size": st.integers(1, 8),
    "strategy": st.sampled_from(["low_confidence_dynamic", "low_confidence_static", "sequential", "nope"]),
    "confidence_threshold": st.floats(0, 1),
    "denoising_steps": st.integers(1, 8),
    "temperature": st.floats(0, 3),
    "top_k": st.integers(0, 400),
    "top_p": st.floats(0.05, 1),
    "max_new_tokens": st.integers(1, 10),
    "stop_token_ids": st.lists(st.integers(0, 330), max_size=3),
    "n": st.integers(1, 3),
    "seed": st.integers(0, 2**62),
    "logprobs": st.booleans(),
}


def maybe_wild(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly values a client would send, sometimes anything."""
    return st.integers(0, 9).flatmap(lambda i: wild if i == 9 else valid)  # one_of would weigh them 1:1


params = st.fixed_dictionaries(
    {"max_new_tokens": maybe_wild(SAMPLING["max_new_tokens"])},
    optional={k: maybe_wild(v) for k, v in SAMPLING.items() if k != "max_new_tokens"},
)
prompts = {
    "prompts": maybe_wild(st.lists(odd_text, min_size=1, max_size=3)),
    "prompt_ids": maybe_wild(st.lists(st.lists(st.integers(0, 330), min_size=1, max_size=34), min_size=1, max_size=3)),
}
optional = {"chat": maybe_wild(st.booleans())}
generate_bodies = st.one_of(
    *(
        st.fixed_dictionaries({kind: value, "params": maybe_wild(params)}, optional=optional)
        for kind, value in prompts.items()
    ),  # fmt: skip
    st.fixed_dictionaries({}, optional={**prompts, **optional, "params": maybe_wild(params), "extra": wild}),
)
weights_fields = {
    "version": maybe_wild(st.integers(0, 10)),
    "path": maybe_wild(st.sampled_from(["v0", "v1", ".", "..", "v0/config.json", "/etc", "nope"]) | odd_text),
}
weights_bodies = st.one_of(
    st.fixed_dictionaries(weights_fields, optional={"rollback": maybe_wild(st.booleans())}),
    st.fixed_dictionaries({}, optional={**weights_fields, "rollback": wild, "extra": wild}),
)


def encode(body: object) -> bytes:
    """JSON as a client may send it: NaN / Infinity literals, integers of any size, lone surrogates escaped."""
    return json.dumps(body, allow_nan=True, ensure_ascii=True).encode()


def check(r) -> None:
    event(f"HTTP {r.status_code}")  # pytest --hypothesis-show-statistics: how many examples got how far
    assert r.status_code < 500, r.text
    json.loads(r.content)  # every answer is JSON, whatever the request held


@FUZZ
@given(body=generate_bodies)
def test_generate_never_answers_5xx(client, body):
    r = client.post("/v1/generate", content=encode(body), headers={"content-type": "application/json"})
    check(r)
    if r.status_code == 200:
        out = r.json()["rollouts"]
        assert all(len(x["token_ids"]) <= 8 for group in out for x in group)


@FUZZ
@given(body=weights_bodies, token=st.sampled_from([TOKEN, "wrong", None]))
def test_weights_never_answer_5xx(client, body, token):
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    check(client.post("/v1/weights", content=encode(body), headers=headers))
