"""Every checked-in config parses: a stale key breaks a deploy with nothing else to catch it."""

from pathlib import Path

import pytest

from services.trainer.config import SFTConfig, TrainerConfig
from shared.config.loader import ConfigError, dump_config, load_config

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


# --------------------------------------------------------------------------- values typed by their field

RL_ARGS = ["model=m", "output_dir=o", "data=d.jsonl"]
TRICKY_TEXT = ["abc #def", "*", "@x", "a: b", "12345", "true", "null", "[1", "{x}", " lead", "é-ü", "%25&?=", "'q'"]


def _rl(env=None, args=()):
    from services.trainer.config import RLConfig

    return load_config(RLConfig, None, [*RL_ARGS, *args], environ=env or {})


@pytest.mark.parametrize("token", [t for t in TRICKY_TEXT if t.isascii() and t == t.strip()])  # what a header carries
def test_a_token_from_the_environment_or_an_argument_stays_byte_for_byte(token):
    assert _rl({"GTPO_API_TOKEN": token}).api_token.get_secret_value() == token
    assert _rl(args=[f"api_token={token}"]).api_token.get_secret_value() == token
    assert _rl({"GTPO_PROMPT_TEMPLATE": token}).prompt_template == token
    assert _rl({"GTPO_REF_MODEL": token}).ref_model == Path(token)  # paths are text too


def test_numbers_booleans_lists_and_mappings_are_parsed_for_fields_of_those_types():
    env = {"GTPO_OPTIM__LR": "1e-5", "GTPO_STEPS": "4", "GTPO_DYNAMIC_SAMPLING": "false",
           "GTPO_OPTIM__BETAS": "[0.8, 0.9]", "GTPO_LOSS": '{"norm": "step"}', "GTPO_OPTIM__MAX_GRAD_NORM": "null",
           "GTPO_REDIS__MAX_DELIVERIES": "7", "GTPO_ROLLOUT__GROUP_SIZE": "4"}  # fmt: skip
    cfg = _rl(env, ["reward_weights.speed=0.5", "rollout_urls=[http://a:1, http://b:2]", "health_port="])
    assert (cfg.optim.lr, cfg.steps, cfg.dynamic_sampling, cfg.optim.betas) == (1e-5, 4, False, (0.8, 0.9))
    assert cfg.loss.norm == "step" and cfg.optim.max_grad_norm is None and cfg.redis.max_deliveries == 7
    assert cfg.rollout.group_size == 4 and cfg.reward_weights == {"speed": 0.5}  # a mapping entry: its value type
    assert cfg.rollout_urls == ["http://a:1", "http://b:2"] and cfg.health_port is None
    assert _rl({"GTPO_API_TOKEN": ""}).api_token is None  # empty clears an optional field


def test_a_value_that_does_not_parse_names_the_variable():
    with pytest.raises(ConfigError, match=r"^GTPO_OPTIM__BETAS: not valid YAML"):
        _rl({"GTPO_OPTIM__BETAS": "[0.8"})
    with pytest.raises(ConfigError, match=r"^invalid RLConfig: steps: Input should be a valid integer.*\(got 'x'\)$"):
        _rl({"GTPO_STEPS": "x"})


# --------------------------------------------------------------------------- unknown and foreign variables


def test_a_misspelt_variable_names_itself_and_the_nearest_setting():
    with pytest.raises(
        ConfigError, match=r"^GTPO_STEPZ: not a setting of RLConfig \(stepz\); did you mean GTPO_STEPS\?$"
    ):
        _rl({"GTPO_STEPZ": "4"})
    with pytest.raises(ConfigError, match=r"GTPO_OPTIM__LRR: .*did you mean GTPO_OPTIM__LR\?"):
        _rl({"GTPO_OPTIM__LRR": "1"})
    with pytest.raises(ConfigError, match=r"^GTPO_ZZZ: not a setting of RLConfig \(zzz\)$"):
        _rl({"GTPO_ZZZ": "1"})
    with pytest.raises(ConfigError, match=r"GTPO_SEED__X: .*seed is a single value"):
        _rl({"GTPO_SEED__X": "1"})


def test_the_services_and_the_other_trainer_commands_variables_are_left_alone():
    from services.trainer.config import RLConfig

    services = {"GTPO_REWARD_WEIGHTS": "not even json {", "GTPO_REWARD_TIMEOUT_S": "x", "GTPO_ROLLOUT_API_TOKEN": "t",
                "GTPO_ROLLOUT_PORT": "no", "GTPO_IMAGE": "gtpo", "GTPO_VERSION": "1"}  # fmt: skip
    cfg = _rl(services)
    assert cfg.reward_weights == {"accuracy": 1.0} and cfg.api_token is None
    sft = load_config(SFTConfig, None, RL_ARGS, environ={**services, "GTPO_RUN_ID": "r", "GTPO_API_TOKEN": "t"},
                      siblings=(RLConfig,))  # fmt: skip
    assert sft.steps == 100
    with pytest.raises(ConfigError, match="GTPO_RUN_ID: not a setting of SFTConfig"):
        load_config(SFTConfig, None, RL_ARGS, environ={"GTPO_RUN_ID": "r"})  # no siblings named: a typo


def test_unknown_keys_in_arguments_and_files_name_the_nearest(tmp_path):
    from services.trainer.config import RLConfig

    with pytest.raises(
        ConfigError, match=r"^redis.max_deliverie: RLConfig has no such setting; did you mean redis.max_deliveries\?$"
    ):
        _rl(args=["redis.max_deliverie=3"])
    f = tmp_path / "run.yaml"
    f.write_text("model: m\noutput_dir: o\ndata: d\nprompts_per_stp: 3\noptim: {lrr: 1}\n")
    with pytest.raises(ConfigError) as err:
        load_config(RLConfig, f, environ={})
    assert "prompts_per_stp: unknown key; did you mean prompts_per_step?" in str(err.value)
    assert "optim.lrr: unknown key; did you mean optim.lr?" in str(err.value)


@pytest.mark.parametrize(
    "text, match",
    [("model: [m\n", r"not valid YAML at line 2"), ("- a\n", "top level must be a mapping"),
     ("1: a\n", "setting names must be text"), (b"\xff\xfe", "cannot read it")],
)  # fmt: skip
def test_a_broken_file_is_one_message_naming_it(tmp_path, text, match):
    f = tmp_path / "run.yaml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=rf"^config {f}: .*{match}"):
        load_config(TrainerConfig, f, environ={})
    with pytest.raises(ConfigError, match="cannot read it"):
        load_config(TrainerConfig, tmp_path / "absent.yaml", environ={})


# --------------------------------------------------------------------------- secrets


def test_secrets_are_never_in_errors_or_dumps():
    from services.trainer.config import RLConfig

    secret = "s3cr3t-Tok"
    env = {"GTPO_API_TOKEN": secret, "GTPO_REDIS__URL": f"redis://app:{secret}@r:6379/0"}
    cfg = _rl(env)
    assert cfg.api_token.get_secret_value() == secret and cfg.redis.resolved_url() == f"redis://app:{secret}@r:6379/0"
    shown = dump_config(cfg) + repr(cfg) + str(cfg) + cfg.model_dump_json()
    assert secret not in shown and "url: redis://app:***@r:6379/0" in dump_config(cfg)
    # a section-level error carries the whole input; a wrong type of a secret field carries the secret
    with pytest.raises(ConfigError) as err:
        _rl(env, ["loss.floor_correct=true", 'reward_weights={"speed": 1}'])
    assert "loss.floor_correct: needs the accuracy reward" in str(err.value) and secret not in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(RLConfig, None, [*RL_ARGS, f"redis={{url: ['redis://:{secret}@r'], namespace: 'a b'}}"], environ={})
    assert secret not in str(err.value) and "redis.url: " in str(err.value)
    assert "redis.namespace: String should match pattern" in str(err.value) and "(got 'a b')" in str(err.value)


def test_a_yaml_token_of_the_wrong_type_is_refused_without_showing_it(tmp_path):
    from services.trainer.config import RLConfig

    f = tmp_path / "run.yaml"
    f.write_text("model: m\noutput_dir: o\ndata: d\napi_token: 424242\n")
    with pytest.raises(ConfigError, match=r"^invalid RLConfig: api_token: .*\(got \*{10}\)$") as err:
        load_config(RLConfig, f, environ={})
    assert "424242" not in str(err.value)


def test_redact_url_hides_passwords_only():
    import doctest

    import shared.config.settings as settings_module
    from shared.config.settings import RedisConfig, redact_url

    assert doctest.testmod(settings_module).failed == 0
    assert redact_url("redis://user@h:1/0") == "redis://user@h:1/0"  # a user name alone is not a secret
    assert redact_url("redis://[::1") == "***"  # unparseable: nothing of it
    assert RedisConfig(url="redis://:pw@h:1/0").model_dump_json().count("pw") == 0


def test_bearer_token_refuses_what_a_header_cannot_carry_without_quoting_it():
    from pydantic import BaseModel, ValidationError

    from shared.config.loader import describe_error
    from shared.config.settings import BearerToken

    class Service(BaseModel):
        api_token: BearerToken | None = None

    assert Service(api_token="abc #def").api_token.get_secret_value() == "abc #def"
    for bad in ["line\nbreak", "tab\there", "trailing ", "ünïcode"]:
        with pytest.raises(ValidationError) as err:
            Service(api_token=bad)
        message = describe_error(err.value, Service)
        assert message.startswith("api_token: must be printable ASCII") and message.endswith("(got **********)")
        assert bad not in message


def test_doctests():
    import doctest

    import shared.config.loader as config_module

    assert doctest.testmod(config_module).failed == 0


def test_the_trainer_config_never_imports_torch():
    # what its docstring promises: any process (a launcher, a CPU-only service) can parse a run without torch
    import subprocess
    import sys

    code = "import sys, services.trainer.config, shared.config.loader; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
