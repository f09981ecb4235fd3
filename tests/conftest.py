"""Shared fixtures: the tiny preset, built once per session, fully offline."""

import os
from pathlib import Path

# One intra-op thread per test process and per service a test starts (they inherit the environment): the suite runs
# two xdist workers, each starting servers, on two cores, and torch's default (a thread per core in every process)
# oversubscribes them; measured 2x faster on tests/test_trainer.py + test_objective.py. Set it to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

pytest_plugins = ["conftest_redis"]

REPO = Path(__file__).resolve().parents[1]
SDAR_8B = REPO.parent / "shared" / "data" / "sdar-8b-chat"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from shared.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from shared.model.sdar import load_model

    return load_model(tiny_dir)


@pytest.fixture(scope="session")
def peaky(tiny_dir):
    """The tiny model with a sharpened LM head: confident predictions, so the dynamic strategy unmasks
    several tokens in one step (random weights alone give one token per step)."""
    import torch

    from shared.model.sdar import load_model

    loaded = load_model(tiny_dir)
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(200.0)
    return loaded


@pytest.fixture(scope="module")
def sharp(tiny_dir):
    """The tiny model with logits x8: with threshold 0.02 the dynamic rule unmasks several tokens per step, so the
    number of rounds varies. Per module: a module may change its weights."""
    import torch

    from shared.model.sdar import load_model

    loaded = load_model(tiny_dir)
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(8.0)
    return loaded
