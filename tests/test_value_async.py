"""The value model under the asynchronous driver (k = 2) through the real stack: every group trained exactly once,
within the staleness bound, with the critic's values computed by the trainer on every step and checkpointed."""

import json

import pytest
from test_async_driver import DECOUPLED, AsyncStack, _assert_within_bound
from test_services_e2e import _assert_exactly_once, _config

pytestmark = pytest.mark.redis


def test_k2_with_a_value_model_trains_once_within_the_bound(tmp_path, tiny_dir, redis_url):
    cfg = _config(tmp_path, tiny_dir, "async-value", steps=3, max_staleness=2, loss=DECOUPLED, value={"lr": 1e-2})
    stack = AsyncStack(cfg, redis_url, rollout_workers=1, reward_workers=1)
    try:
        stack.start()
        assert stack.wait_trainer(300) == 0, stack.logs()
    finally:
        stack.stop()
    _assert_exactly_once(cfg.output_dir, 3, 2)
    _assert_within_bound(cfg.output_dir, 2)
    rows = [json.loads(line) for line in (cfg.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["value_loss"] >= 0 and "adv_var_group" in r for r in rows)
    state = json.loads((cfg.output_dir / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert any(v != 0.0 for v in state["extra"]["value_model"]["weight"])  # the critic trained and was saved
