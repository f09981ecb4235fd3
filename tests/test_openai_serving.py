"""The rollout service's OpenAI-compatible endpoints, driven by the real `openai` client over HTTP (uvicorn on
127.0.0.1 in a thread) on the tiny model: models, completions, chat, the `gtpo` step-map field, and errors with the
same limits and shapes as /v1/generate."""

import socket
import threading
import time

import httpx
import openai
import pytest

from services.rollout.app import create_app
from services.rollout.engines.torch_engine import TorchEngine
from services.rollout.settings import RolloutSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url(tiny_dir, tiny):
    import uvicorn

    settings = RolloutSettings(model=tiny_dir, served_model_name="tiny", max_prompts=8, max_new_tokens=32,
                               max_prompt_tokens=64, device="cpu")  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(create_app(settings, engine=TorchEngine(tiny)), host="127.0.0.1",
                                           port=free_port(), log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    for _ in range(200):
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completions_with_step_maps_and_reproducible_seeds(client):
    r = client.completions.create(model="tiny", prompt=["1+1=", "2+2="], max_tokens=8, n=2, seed=3, temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and r.object == "text_completion"
    for c in r.choices:
        ext = c.model_extra["gtpo"]
        assert len(ext["step_map"]) == len(ext["token_ids"]) <= 8 and ext["tokens_per_step"] >= 1.0
        assert c.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == sum(len(c.model_extra["gtpo"]["token_ids"]) for c in r.choices)
    again = client.completions.create(model="tiny", prompt="1+1=", max_tokens=8, seed=3)
    assert again.choices[0].text == r.choices[0].text  # the same seed, the same first choice
    greedy = [client.completions.create(model="tiny", prompt="1+1=", max_tokens=8, temperature=0).choices[0].text
              for _ in range(2)]  # fmt: skip
    assert greedy[0] == greedy[1]


def test_stop_strings_cut_the_text_as_openai_does(client):
    full = client.completions.create(model="tiny", prompt="ab", max_tokens=16, temperature=0).choices[0].text
    if len(full) < 2:
        pytest.skip("the tiny model answered with less than two characters")
    stop = full[1]
    cut = client.completions.create(model="tiny", prompt="ab", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_chat_uses_the_chat_template_and_diffusion_extensions(client):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "1+1="}], max_tokens=8, temperature=0,
        extra_body={"block_size": 4, "strategy": "low_confidence_static", "denoising_steps": 4},
    )  # fmt: skip
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    ext = r.choices[0].model_extra["gtpo"]
    assert ext["tokens_per_step"] == 1.0  # static, 4 steps per 4-token block: one token a step
    assert r.usage.prompt_tokens > len("1+1=")  # the template wrapped the message


def refused(error: type, call, needle: str) -> None:
    """`call` raises `error` whose body is /v1/generate's shape, {"detail": ...}, holding `needle`."""
    with pytest.raises(error) as e:
        call()
    assert needle in str(e.value.response.json()["detail"]), e.value.response.text


def test_errors_are_the_same_shapes_and_limits_as_generate(client, base_url):
    comp, chat = client.completions.create, client.chat.completions.create
    refused(openai.NotFoundError, lambda: comp(model="other", prompt="x", max_tokens=4), "GET /v1/models lists 'tiny'")
    refused(openai.UnprocessableEntityError, lambda: comp(model="tiny", prompt="x", max_tokens=33),
            "max_tokens: at most 32")  # fmt: skip
    refused(openai.UnprocessableEntityError, lambda: comp(model="tiny", prompt=["x"] * 5, n=2, max_tokens=4),
            "at most 8 choices")  # fmt: skip
    refused(openai.UnprocessableEntityError,
            lambda: chat(model="tiny", messages=[{"role": "user", "content": "x"}], stream=True), "stream: not supported")  # fmt: skip
    refused(openai.UnprocessableEntityError, lambda: comp(model="tiny", prompt="x" * 200, max_tokens=4),
            "prompt: needs 1 to 64 tokens")  # fmt: skip
    refused(openai.UnprocessableEntityError,
            lambda: comp(model="tiny", prompt="x", max_tokens=4, extra_body={"block_size": 4, "denoising_steps": 8}),
            "denoising_steps")  # fmt: skip
    r = httpx.post(f"{base_url}/v1/completions", json={"model": "tiny", "prompt": [[1, 10**9]], "max_tokens": 4})
    assert r.status_code == 422 and "prompt" in r.text
    r = httpx.post(f"{base_url}/v1/completions", json={"model": "tiny", "prompt": [1, 2**20], "max_tokens": 4})
    assert r.status_code == 422 and "prompt_ids: token ids must be in" in r.text  # the engine's vocabulary check
    r = httpx.post(f"{base_url}/v1/chat/completions", json={"model": "tiny"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "messages"
