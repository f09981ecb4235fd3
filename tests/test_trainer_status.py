"""The trainer's HTTP side through ASGI: health, readiness, status (whatever the metrics hold) and Prometheus
metrics, and fuzzed paths and query strings that never give a server error."""

import string

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from services.trainer.orchestrator.status_server import TrainerMetrics, create_app
from shared.contracts.wire import TrainerStatus


def _app(last: dict | None, ready_reason: str | None = None):
    status = TrainerStatus(run_id="r", step=3, policy_version=3, groups_buffered=2, samples_in_flight=7,
                           groups_open=1, last=last)  # fmt: skip
    metrics = TrainerMetrics(lambda: status)
    return TestClient(create_app(lambda: status, lambda: ready_reason, metrics)), metrics


def test_health_ready_and_status():
    client, _ = _app({"loss": float("nan"), "reward_mean": 0.5, "time": 1.0})
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    body = client.get("/status").json()  # a diverged loss is shown, not a 500
    assert body["last"]["loss"] == "nan" and body["groups_buffered"] == 2
    not_ready, _ = _app(None, ready_reason="starting")
    r = not_ready.get("/ready")
    assert r.status_code == 503 and r.json()["reason"] == "starting"


def test_metrics_are_prometheus_text_with_phases_and_staleness():
    client, metrics = _app({"loss": 0.25, "reward_mean": 0.5, "time": 1.0, "step": 3})
    metrics.observe_step({"wait": 2.0, "train": 1.0, "checkpoint": 0.5}, staleness=[0, 1, 1, 2])
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    gauges = {s.name: s.value for f in families.values() for s in f.samples}
    assert gauges["gtpo_trainer_step"] == 3 and gauges["gtpo_trainer_samples_in_flight"] == 7
    assert gauges["gtpo_trainer_last_loss"] == 0.25 and "gtpo_trainer_last_time" not in gauges
    phase = {(s.labels.get("phase"), s.name): s.value for s in families["gtpo_trainer_phase_seconds"].samples}
    assert phase[("wait", "gtpo_trainer_phase_seconds_sum")] == 2.0
    stale = {s.labels.get("le"): s.value for s in families["gtpo_trainer_sample_staleness"].samples if s.labels}
    assert stale["0.0"] == 1 and stale["1.0"] == 3 and stale["+Inf"] == 4


URL_TEXT = st.text(string.ascii_letters + string.digits + "-._~%/?&=+:@!$'()*,;", max_size=40)


@given(path=URL_TEXT, query=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
       last=st.dictionaries(st.text(max_size=8), st.one_of(st.floats(), st.integers(), st.text(), st.none()),
                            max_size=4))  # fmt: skip
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_never_a_server_error(path, query, last):
    client, _ = _app(last)
    for route in ("/health", "/ready", "/status", "/metrics", "/" + path.lstrip("/")):
        r = client.get(route, params=query)  # query values are percent-encoded, any text goes
        assert r.status_code < 500, (route, r.text)
