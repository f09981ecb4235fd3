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
    from services.trainer.config import RLConfig

    f = tmp_path / "run.yaml"
    f.write_text("model: m\noutput_dir: o\ndata: d\noptim:\n  lr: 1.0e-5\n  warmup_steps: 3\n")
    env = {"GTPO_TRAIN__OPTIM__LR": "2e-5", "GTPO_TRAIN__SEED": "7", "GTPO_REWARD__TIMEOUT_S": "x"}  # the last: reward's
    cfg = load_config(RLConfig, f, ["optim.lr=3e-5", "loss.norm=step"], environ=env)
    assert cfg.optim.lr == 3e-5 and cfg.seed == 7 and cfg.optim.warmup_steps == 3 and cfg.loss.norm == "step"
    assert "lr: 3.0e-05" in dump_config(cfg)
    # the learner's own config is no command: it reads no environment at all
    learner = tmp_path / "learner.yaml"
    learner.write_text("model: m\noutput_dir: o\n")
    assert load_config(TrainerConfig, learner, environ={**env, "GTPO_SEED": "7"}).seed == 0


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
    assert _rl({"GTPO_TRAIN__API_TOKEN": token}).api_token.get_secret_value() == token
    assert _rl(args=[f"api_token={token}"]).api_token.get_secret_value() == token
    assert _rl({"GTPO_TRAIN__PROMPT_TEMPLATE": token}).prompt_template == token
    assert _rl({"GTPO_TRAIN__REF_MODEL": token}).ref_model == Path(token)  # paths are text too


def test_numbers_booleans_lists_and_mappings_are_parsed_for_fields_of_those_types():
    env = {"GTPO_TRAIN__OPTIM__LR": "1e-5", "GTPO_TRAIN__STEPS": "4", "GTPO_TRAIN__DYNAMIC_SAMPLING": "false",
           "GTPO_TRAIN__OPTIM__BETAS": "[0.8, 0.9]", "GTPO_TRAIN__LOSS": '{"norm": "step"}',
           "GTPO_TRAIN__OPTIM__MAX_GRAD_NORM": "null", "GTPO_TRAIN__REDIS__MAX_DELIVERIES": "7",
           "GTPO_TRAIN__ROLLOUT__GROUP_SIZE": "4"}  # fmt: skip
    cfg = _rl(env, ["reward_weights.speed=0.5", "rollout_urls=[http://a:1, http://b:2]", "health_port="])
    assert (cfg.optim.lr, cfg.steps, cfg.dynamic_sampling, cfg.optim.betas) == (1e-5, 4, False, (0.8, 0.9))
    assert cfg.loss.norm == "step" and cfg.optim.max_grad_norm is None and cfg.redis.max_deliveries == 7
    assert cfg.rollout.group_size == 4 and cfg.reward_weights == {"speed": 0.5}  # a mapping entry: its value type
    assert cfg.rollout_urls == ["http://a:1", "http://b:2"] and cfg.health_port is None
    assert _rl({"GTPO_TRAIN__API_TOKEN": ""}).api_token is None  # empty clears an optional field


def test_a_value_that_does_not_parse_names_the_variable():
    with pytest.raises(ConfigError, match=r"^GTPO_TRAIN__OPTIM__BETAS: not valid YAML"):
        _rl({"GTPO_TRAIN__OPTIM__BETAS": "[0.8"})
    with pytest.raises(ConfigError, match=r"^invalid RLConfig: steps: Input should be a valid integer.*\(got 'x'\)$"):
        _rl({"GTPO_TRAIN__STEPS": "x"})


# --------------------------------------------------------------------------- unknown and foreign variables


def test_a_misspelt_variable_names_itself_and_the_nearest_setting():
    with pytest.raises(
        ConfigError, match=r"^GTPO_TRAIN__STEPZ: not a setting of RLConfig \(stepz\); did you mean GTPO_TRAIN__STEPS\?$"
    ):
        _rl({"GTPO_TRAIN__STEPZ": "4"})
    with pytest.raises(ConfigError, match=r"GTPO_TRAIN__OPTIM__LRR: .*did you mean GTPO_TRAIN__OPTIM__LR\?"):
        _rl({"GTPO_TRAIN__OPTIM__LRR": "1"})
    with pytest.raises(ConfigError, match=r"^GTPO_TRAIN__ZZZ: not a setting of RLConfig \(zzz\)$"):
        _rl({"GTPO_TRAIN__ZZZ": "1"})
    with pytest.raises(ConfigError, match=r"GTPO_TRAIN__SEED__X: .*seed is a single value"):
        _rl({"GTPO_TRAIN__SEED__X": "1"})


def test_each_command_reads_only_its_own_prefix():
    """One prefix per command: no variable is read by two of them, so none needs a special case."""
    from services.trainer.config import RLConfig

    others = {"GTPO_REWARD__WEIGHTS": "not even json {", "GTPO_ROLLOUT__GROUP_SIZE": "4", "GTPO_ROLLOUT__PORT": "no",
              "GTPO_SFT__STEPS": "3", "GTPO_EVAL__K": "x", "GTPO_IMAGE": "gtpo", "GTPO_VERSION": "1"}  # fmt: skip
    cfg = _rl(others)
    assert cfg.reward_weights == {"accuracy": 1.0} and cfg.rollout.group_size == 8 and cfg.steps == 10
    sft = load_config(SFTConfig, None, RL_ARGS, environ={**others, "GTPO_TRAIN__RUN_ID": "r", "GTPO_TRAIN__STEPS": "9"})
    assert sft.steps == 3
    assert load_config(RLConfig, None, RL_ARGS, environ={"GTPO_SFT__STEPS": "3", "GTPO_TRAIN__STEPS": "9"}).steps == 9


def test_the_old_variable_names_still_work_for_one_release_with_a_warning(caplog):
    from services.reward.settings import RewardSettings
    from services.rollout.settings import RolloutSettings

    cfg = _rl({"GTPO_OPTIM__LR": "2e-5", "GTPO_REWARD_WEIGHTS": "{x", "GTPO_ROLLOUT_PORT": "no"})
    assert cfg.optim.lr == 2e-5 and cfg.reward_weights == {"accuracy": 1.0}  # the services' old names: not its own
    assert caplog.messages == ["GTPO_OPTIM__LR is deprecated (read for one more release): name it GTPO_TRAIN__OPTIM__LR"]
    assert _rl({"GTPO_STEPS": "4", "GTPO_TRAIN__STEPS": "5"}).steps == 5  # the new name wins
    # an old RL name during gtpo sft: not an SFT setting, left alone
    assert load_config(SFTConfig, None, RL_ARGS, environ={"GTPO_STEPS": "4", "GTPO_RUN_ID": "r"}).steps == 4
    caplog.clear()
    assert load_config(RolloutSettings, environ={"GTPO_ROLLOUT_MODEL": "m"}).model.name == "m"
    assert load_config(RewardSettings, environ={"GTPO_REWARD_BATCH": "3"}).batch == 3
    assert [m.split(": name it ")[1] for m in caplog.messages] == ["GTPO_ROLLOUT__MODEL", "GTPO_REWARD__BATCH"]


def test_an_sft_config_refuses_the_rl_settings_naming_the_field(tmp_path):
    """`loss.beta > 0` used to load a reference model in SFT that nothing read: now no SFT setting can say it."""
    from services.trainer.config import RLConfig

    for text in ["loss.beta=0.1", "passes=2", "ref_model=m"]:
        with pytest.raises(ConfigError, match=rf"^{text.split('=')[0]}: .*an RL setting \(gtpo train\)"):
            load_config(SFTConfig, None, [*RL_ARGS, text], environ={})
    f = tmp_path / "sft.yaml"
    f.write_text("model: m\noutput_dir: o\ndata: d\nloss: {beta: 0.1}\n")
    with pytest.raises(ConfigError, match=r"^invalid SFTConfig: loss: an RL setting \(gtpo train\)"):
        load_config(SFTConfig, f, environ={})
    with pytest.raises(ConfigError, match=r"^GTPO_SFT__LOSS__BETA: loss.beta: loss is an RL setting"):
        load_config(SFTConfig, None, RL_ARGS, environ={"GTPO_SFT__LOSS__BETA": "0.1"})
    with pytest.raises(ConfigError, match=r"^sft_mask_eps: an SFT setting \(gtpo sft\)"):
        load_config(RLConfig, None, [*RL_ARGS, "sft_mask_eps=0.1"], environ={})
    assert not hasattr(load_config(SFTConfig, None, RL_ARGS, environ={}), "loss")
    assert not hasattr(load_config(RLConfig, None, RL_ARGS, environ={}), "sft_mask_eps")


def test_the_rl_sampling_is_sampling_params_and_each_task_request_comes_from_it():
    from services.trainer.config import RLConfig, RolloutSampling
    from shared.contracts.wire import SamplingParams, Strategy

    r = load_config(RLConfig, None, [*RL_ARGS, "rollout.top_k=5", "rollout.block_size=8"], environ={}).rollout
    assert isinstance(r, SamplingParams) and (r.top_k, r.block_size, r.group_size) == (5, 8, 8)
    p = r.params(seed=11, confidence_threshold=0.7)
    assert type(p) is SamplingParams and (p.n, p.seed, p.logprobs, p.top_k, p.block_size) == (1, 11, True, 5, 8)
    assert p.confidence_threshold == 0.7 and p.strategy is Strategy.low_confidence_dynamic
    assert load_config(RLConfig, None, [*RL_ARGS, "rollout.n=1", "rollout.logprobs=true"], environ={}).rollout == r.model_copy(
        update={"top_k": 0, "block_size": None})  # its own values, given again (a dumped config loads as it was)
    for name in ["n=2", "seed=1", "logprobs=false"]:
        with pytest.raises(ConfigError, match=rf"rollout.{name.split('=')[0]}: set per task by the trainer"):
            load_config(RLConfig, None, [*RL_ARGS, f"rollout.{name}"], environ={})
    assert set(SamplingParams.model_fields) < set(RolloutSampling.model_fields)  # declared once, in the contract


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
    env = {"GTPO_TRAIN__API_TOKEN": secret, "GTPO_TRAIN__REDIS__URL": f"redis://app:{secret}@r:6379/0"}
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
