"""Every checked-in config parses: a stale key breaks a deploy with nothing else to catch it."""

from pathlib import Path

import pytest

from services.trainer.config import SFTConfig, TrainerConfig
from shared.config import ConfigError, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "deploy" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 1 and cfg.mixed_precision == "bf16"
    if cfg.distributed_type.value == "DEEPSPEED":
        # the trainer accumulates itself; DeepSpeed must not accumulate again
        assert cfg.deepspeed_config["gradient_accumulation_steps"] == 1


def test_yaml_env_and_overrides_precedence(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model: m\noutput_dir: o\noptim:\n  lr: 1.0e-5\n  warmup_steps: 3\n")
    env = {"GTPO_OPTIM__LR": "2e-5", "GTPO_SEED": "7", "GTPO_REWARD_TIMEOUT_S": "x"}  # the last: the reward service's
    cfg = load_config(TrainerConfig, f, ["optim.lr=3e-5", "loss.norm=step"], environ=env)
    assert cfg.optim.lr == 3e-5 and cfg.seed == 7 and cfg.optim.warmup_steps == 3 and cfg.loss.norm == "step"
    assert "lr: 3.0e-05" in dump_config(cfg)


def test_bad_values_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(TrainerConfig, None, ["model=m", "output_dir=o", "optim.lr=-1"], environ={})
    with pytest.raises(ConfigError, match="loss.eps_low"):
        load_config(TrainerConfig, None, ["model=m", "output_dir=o", "loss.eps_low=1.5"], environ={})
    with pytest.raises(ConfigError, match="key=value"):
        load_config(SFTConfig, None, ["steps"], environ={})
    with pytest.raises(ConfigError, match="data"):
        load_config(SFTConfig, None, ["model=m", "output_dir=o"], environ={})


def test_a_threshold_spread_the_decoding_cannot_honour_is_refused():
    from services.trainer.config import RolloutSampling

    with pytest.raises(ValueError, match="threshold_spread: only the dynamic strategy"):
        RolloutSampling(strategy="sequential", threshold_spread=0.2)
    with pytest.raises(ValueError, match="threshold_spread: 0.5 is more than confidence_threshold=0.4"):
        RolloutSampling(confidence_threshold=0.4, threshold_spread=0.5)
    assert RolloutSampling(confidence_threshold=0.4, threshold_spread=0.4).threshold_spread == 0.4


def test_floor_correct_without_the_accuracy_reward_is_refused_naming_the_field():
    from services.trainer.config import RLConfig

    args = ["model=m", "output_dir=o", "data=d.json", "loss.floor_correct=true"]
    with pytest.raises(ConfigError, match="loss.floor_correct: needs the accuracy reward"):
        load_config(RLConfig, None, [*args, 'reward_weights={"speed": 1.0}'], environ={})
    assert load_config(RLConfig, None, args, environ={}).loss.floor_correct
