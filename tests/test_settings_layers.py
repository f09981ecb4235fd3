"""One loader for every command and service: defaults < YAML < `GTPO_<NAME>__*` environment < `key=value`, the same
four layers giving the same answer for a trainer command (`gtpo train`) and a service (`gtpo serve rollout|reward`)."""

import pytest

from services.reward.settings import RewardSettings
from services.rollout.settings import RolloutSettings
from services.trainer.config import RLConfig
from shared.config.loader import ConfigError, load_config

REQUIRED = {RLConfig: ["model=m", "output_dir=o", "data=d.json"], RolloutSettings: ["model=m"], RewardSettings: []}
PREFIX = {RLConfig: "GTPO_TRAIN__", RolloutSettings: "GTPO_ROLLOUT__", RewardSettings: "GTPO_REWARD__"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in [n for n in __import__("os").environ if n.startswith("GTPO_")]:
        monkeypatch.delenv(name)


@pytest.mark.parametrize("model", [RLConfig, RolloutSettings, RewardSettings], ids=lambda m: m.__name__)
def test_each_layer_beats_the_one_below(model, tmp_path):
    # redis: the block every side shares. claim_idle_ms: defaults only; max_deliveries: YAML; namespace: YAML and
    # environment; codec: YAML, environment and an argument (defaults: 60000, 5, gtpo, msgpack)
    f = tmp_path / "layers.yaml"
    f.write_text("redis:\n  max_deliveries: 7\n  namespace: from-yaml\n  codec: json\n")
    p = PREFIX[model]
    env = {f"{p}REDIS__NAMESPACE": "from-env", f"{p}REDIS__CODEC": "json"}
    cfg = load_config(model, f, [*REQUIRED[model], "redis.codec=msgpack"], environ=env)
    assert cfg.redis.model_dump(exclude={"url"}) == {
        "namespace": "from-env", "codec": "msgpack", "claim_idle_ms": 60_000, "max_deliveries": 7,
        "reconnect_s": 120.0,
        "outage_s": 120.0,
    }  # fmt: skip
    # without the argument the environment's value stands; without the variable, the file's
    assert load_config(model, f, REQUIRED[model], environ=env).redis.codec == "json"
    assert load_config(model, f, REQUIRED[model], environ={}).redis.namespace == "from-yaml"
    # a section given whole merges into the one below; a mapping-typed value replaces it
    merged = load_config(model, f, [*REQUIRED[model], "redis={codec: msgpack}"], environ=env).redis
    assert (merged.codec, merged.namespace, merged.max_deliveries) == ("msgpack", "from-env", 7)


@pytest.mark.parametrize("model", [RolloutSettings, RewardSettings], ids=lambda m: m.__name__)
def test_a_service_built_directly_reads_the_environment_the_same_way(model, monkeypatch):
    p = PREFIX[model]
    monkeypatch.setenv(f"{p}REDIS__MAX_DELIVERIES", "9")
    monkeypatch.setenv(f"{p}REDIS", "{namespace: flow-yaml}")  # YAML flow mapping: typed like a trainer variable
    monkeypatch.setenv("GTPO_TRAIN__ROLLOUT__GROUP_SIZE", "4")  # the trainer's `rollout` section: not this service's
    kwargs = {"model": "m"} if model is RolloutSettings else {}
    built = model(**kwargs, redis={"codec": "json", "namespace": "kw"})  # keyword arguments beat the variables
    assert (built.redis.codec, built.redis.namespace, built.redis.max_deliveries) == ("json", "kw", 9)
    loaded = model(**kwargs)
    assert loaded.redis.namespace == "flow-yaml" and loaded.redis.max_deliveries == 9
    assert loaded == load_config(model, None, [f"{k}={v}" for k, v in kwargs.items()]).model_copy(
        update={"worker_id": loaded.worker_id}
    )
    monkeypatch.setenv(f"{p}PORTT", "1")
    with pytest.raises(ConfigError, match=rf"^{p}PORTT: not a setting of {model.__name__} \(portt\); did you mean "):
        model(**kwargs)


def test_an_explicit_environment_replaces_the_process_one_for_a_service(monkeypatch):
    monkeypatch.setenv("GTPO_REWARD__BATCH", "3")
    assert load_config(RewardSettings, environ={}).batch == 32  # the default: os.environ is not read
    assert load_config(RewardSettings).batch == 3


def test_a_mapping_given_whole_replaces_the_one_below_and_a_dotted_entry_adds_to_it(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model: m\noutput_dir: o\ndata: d.json\nreward_weights: {accuracy: 1.0, cosine: 0.5}\n")
    # (GTPO_REWARD__WEIGHTS is the reward service's variable, not the trainer's reward_weights)
    env = {"GTPO_REWARD__WEIGHTS": '{"format": 1}'}
    assert load_config(RLConfig, f, ['reward_weights={"speed": 1}'], environ=env).reward_weights == {"speed": 1.0}
    assert load_config(RLConfig, f, ["reward_weights.speed=2"], environ=env).reward_weights == {
        "accuracy": 1.0, "cosine": 0.5, "speed": 2.0,
    }  # fmt: skip


def test_the_lmdeploy_engine_options_are_rollout_settings_and_reach_the_engine(monkeypatch, tmp_path):
    """`GTPO_ROLLOUT__LMDEPLOY__TP=2` (or `lmdeploy.tp=2`) is in the resolved settings and in the options object the
    LMDeploy engine is built with; the torch engine gets only its own options."""
    from services.rollout.engines import create_engine
    from services.rollout.engines import lmdeploy_engine as lm
    from services.rollout.settings import LMDeployOptions

    env = {"GTPO_ROLLOUT__LMDEPLOY__TP": "2", "GTPO_ROLLOUT__LMDEPLOY__EAGER_MODE": "true"}
    cfg = load_config(RolloutSettings, None, ["model=m", "engine=lmdeploy", "max_batch_size=8",
                                              "lmdeploy.cache_max_entry_count=0.5"], environ=env)  # fmt: skip
    assert (cfg.lmdeploy.tp, cfg.lmdeploy.eager_mode, cfg.lmdeploy.cache_max_entry_count) == (2, True, 0.5)
    built = {}
    monkeypatch.setattr(lm.patch, "import_lmdeploy", lambda: None)  # the options object, not a GPU engine
    monkeypatch.setattr(lm.LMDeployEngine, "__init__", lambda self, path, options, policy_version: built.update(
        path=path, options=options))  # fmt: skip
    create_engine(cfg.engine, tmp_path, **cfg.engine_options())
    assert built["options"] == LMDeployOptions(tp=2, eager_mode=True, cache_max_entry_count=0.5, max_batch_size=8)
    torch_side = load_config(RolloutSettings, None, ["model=m"], environ=env).engine_options()
    assert torch_side == {"device": "auto", "max_batch_size": 32}
    with pytest.raises(ConfigError, match=r"GTPO_ROLLOUT__LMDEPLOY__TPP: .*did you mean GTPO_ROLLOUT__LMDEPLOY__TP\?"):
        load_config(RolloutSettings, None, ["model=m"], environ={"GTPO_ROLLOUT__LMDEPLOY__TPP": "2"})
