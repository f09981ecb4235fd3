"""The settings of the commands that are neither a trainer run nor a service: `gtpo init-model`, `generate`, `status`,
`eval` and `merge-lora` (`launch`'s are in services/trainer/launch.py). Each goes through the one loader (shared/config/loader.py): its defaults < `GTPO_<COMMAND>__*`
variables < its flags, and `--dry-run` prints what that resolved to. Pure pydantic: importing this loads no model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_serializer, model_validator

from services.status_view import TIMEOUT_S
from shared.config.loader import CommandConfig, command_prefix
from shared.config.settings import DEFAULT_NAMESPACE, RedisUrl
from shared.contracts.wire import SamplingParams
from shared.data import ANSWER_FIELD, MAX_ROW_BYTES, QUESTION_FIELD
from shared.prompts import MAX_PROMPT_TOKENS, PROMPT_TEMPLATE


class InitModelSettings(CommandConfig):
    """`gtpo init-model PRESET --out DIR`: a randomly initialised checkpoint (`GTPO_INIT_MODEL__*`)."""

    env_prefix: ClassVar[str | None] = command_prefix("init_model")

    preset: Literal["tiny", "tiny-sdar"] = Field(description="tiny: the demo's CPU model; tiny-sdar: LMDeploy's head size")
    out: Path = Field(description="checkpoint directory to write (SDAR layout)")
    seed: int = Field(0, ge=0, description="torch seed for the random initial weights")
    force: bool = Field(False, description="overwrite a directory that already holds a checkpoint")


GENERATE_DEFAULTS = {"max_new_tokens": 32, "logprobs": True}
"""`gtpo generate`'s sampling where the engines' default differs: short answers, each token's log-prob shown."""


class GenerateSettings(CommandConfig):
    """`gtpo generate`: decode prompts with the torch engine (`GTPO_GENERATE__PARAMS__TOP_K=5`)."""

    env_prefix: ClassVar[str | None] = command_prefix("generate")

    model: Path = Field(description="SDAR-layout checkpoint directory")
    prompt: list[str] = Field(min_length=1, description="prompt texts, one request each")
    params: SamplingParams = Field(description="how each prompt is decoded (GENERATE_DEFAULTS below the settings)")
    chat: bool = Field(True, description="wrap the prompt in the tokenizer's chat template")
    device: str = Field("auto", description="auto | cpu | cuda[:N]")
    json_lines: bool = Field(False, description="print one rollout JSON per line instead of tables")

    @model_validator(mode="before")
    @classmethod
    def _params_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("params", {}), dict):
            return {**data, "params": {**GENERATE_DEFAULTS, **data.get("params", {})}}
        return data


class StatusSettings(CommandConfig):
    """`gtpo status`: the live view of a run's queues and workers (`GTPO_STATUS__NAMESPACE=run1`)."""

    env_prefix: ClassVar[str | None] = command_prefix("status")

    redis_url: RedisUrl | None = Field(None, description="the run's Redis; None = $REDIS_URL")
    namespace: str = Field(DEFAULT_NAMESPACE, min_length=1, description="the run's redis.namespace")
    watch: bool = Field(False, description="keep the view live, redrawn every interval seconds")
    interval: float = Field(1.0, ge=0.1, description="seconds between redraws with watch")
    timeout: float = Field(TIMEOUT_S, ge=0.1, description="seconds to wait for Redis (then exit 1)")

    @field_serializer("redis_url", when_used="json")
    def _show_url(self, url: RedisUrl | None) -> str | None:
        return None if url is None else str(url)  # the host and database, never the password


class EvalSettings(CommandConfig):
    """`gtpo eval DATASET`: one checkpoint on one protocol (`GTPO_EVAL__K=8`); `sampling` replaces single settings
    of the protocol's decodings (`--temperature 0` sets `sampling.temperature`)."""

    env_prefix: ClassVar[str | None] = command_prefix("eval")

    dataset: str = Field(min_length=1, description="a JSON/JSONL file, a save_to_disk folder, hf:..., or a preset")
    model: Path | None = Field(None, description="checkpoint directory (also the tokenizer for rollout_url)")
    protocol: str | None = Field(None, description="dirl | sdar-greedy | trado | lightningrl; None = the flags alone")
    k: int | None = Field(None, ge=1, description="samples per question; None = the protocol's, else 4")
    sampling: dict[str, float | int | str | None] = Field(
        default_factory=dict, description="SamplingParams fields over the protocol's (max_new_tokens 512 without one)"
    )
    template: str = Field(PROMPT_TEMPLATE, description="user message; {question} is replaced")
    chat: bool = Field(True, description="wrap the user message in the tokenizer's chat template")
    rollout_url: str | None = Field(None, description="generate through a running rollout service")
    engines: list[str] = Field(default_factory=lambda: ["torch"], min_length=1, description="torch, reference, lmdeploy")
    limit: int | None = Field(None, ge=1, description="first N questions only")
    out: Path | None = Field(None, description="the eval card (JSON); None = evals/<time>-<protocol>.json")
    seed: int = Field(0, ge=0)
    question_field: str = Field(QUESTION_FIELD, min_length=1)
    answer_field: str = Field(ANSWER_FIELD, min_length=1)
    answer_extract: Literal["none", "boxed", "gsm8k"] = Field("none")
    max_row_bytes: int = Field(MAX_ROW_BYTES, ge=1, description="refuse a longer row (a JSONL line, a column's text)")
    max_prompt_tokens: int = Field(MAX_PROMPT_TOKENS, ge=1, description="refuse a longer prompt (template included)")
    aup_thresholds: list[float] | None = Field(None, min_length=1, description="decode once per dynamic threshold")
    code_format: str | None = Field(
        None, description="a code dataset: humaneval | mbpp | livecodebench | trace | primeintellect (docs/code_rl.md)"
    )


class MergeLoraSettings(CommandConfig):
    """`gtpo merge-lora CHECKPOINT --out DIR`: a LoRA adapter merged into its base (`GTPO_MERGE_LORA__*`)."""

    env_prefix: ClassVar[str | None] = command_prefix("merge_lora")

    checkpoint: Path = Field(description="a trainer checkpoint (with adapter/) or a LoRA adapter folder")
    out: Path = Field(description="folder for the merged SDAR-layout checkpoint")
    base: Path | None = Field(None, description="the base model; None = the adapter's own record")
