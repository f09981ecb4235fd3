"""Trainer settings, declared once. Pure pydantic: importing this never imports torch."""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from shared.config.loader import ENV_PREFIX, CommandConfig, command_prefix
from shared.config.settings import BearerToken, RedisConfig, default_reward_weights
from shared.contracts.agreement import TrainerSide
from shared.contracts.wire import MIN_TEMPERATURE, SamplingParams
from shared.data import ANSWER_FIELD, MAX_ROW_BYTES, QUESTION_FIELD
from shared.prompts import PROMPT_TEMPLATE


def _tracker_list(value):
    """`"tensorboard,wandb"` -> `["tensorboard", "wandb"]`: a `key=value` argument reads as one word."""
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


def _trackers_installed(names: list[str]) -> list[str]:
    from services.trainer.learner.tracking import check_installed

    check_installed(names)  # at load time: `gtpo up` fails before it starts any process
    return list(dict.fromkeys(names))


DataSource = Annotated[str, BeforeValidator(lambda v: str(v) if isinstance(v, PurePath) else v)]
"""A dataset (shared/data.py): a JSON / JSONL file, a `datasets` save_to_disk folder, or hf:org/name[:config][:split];
a Path is taken as its text, so configs written when this field was a Path still load."""

TrackerNames = Annotated[
    list[Literal["tensorboard", "wandb", "mlflow", "trackio"]],
    BeforeValidator(_tracker_list),
    AfterValidator(_trackers_installed),
]
"""Experiment trackers by name (services/trainer/learner/tracking.py)."""


class LossConfig(BaseModel):
    """Knobs of ``gtpo_loss``; the defaults are DiPO's clip and an on-policy, KL-free update."""

    model_config = ConfigDict(extra="forbid")

    eps_low: float = Field(0.2, ge=0.0, lt=1.0, description="lower clip: the ratio is clipped below at 1 - eps_low")
    eps_high: float = Field(
        0.28, ge=0.0, description="upper clip: the ratio is clipped above at 1 + eps_high (DAPO clip-higher)"
    )
    advantage: Literal["zscore", "mean"] = Field(
        "zscore", description="group z-score of the reward (GRPO) or mean-centred only (Dr.GRPO, nanochat)"
    )
    floor_correct: bool = Field(
        False,
        description="never give a correct response (accuracy reward 1) a negative advantage: a speed or length "
        "reward then ranks correct answers by pulling the better ones up, not by pushing a correct one down",
    )
    norm: Literal["token", "step", "dipo", "length"] = Field(
        "token",
        description="token: mean over all target tokens; step: per response, the sum over its rounds with targets "
        "of the mean over the round's targets, then the mean over responses; dipo: DiPO exactly, step divided by "
        "the block size B (DiPO divides every response by B whatever its rounds: the same direction as step, "
        "1/B the size, which the gradient clip and Adam's eps see); length: per-response sum / max response "
        "length (TraceRL)",
    )
    nll_coef: float = Field(
        0.0,
        ge=0.0,
        description="LightningRL: weight of a token-level NLL on the target tokens of correct responses (accuracy "
        "1), averaged over the update's correct target tokens and added to the loss; 0 = off (LightningRL: 0.1)",
    )
    beta: float = Field(0.0, ge=0.0, description="weight of the k3 KL to a frozen reference policy; 0 = off")
    objective: Literal["standard", "decoupled"] = Field(
        "standard",
        description="standard: PPO, the ratio pi_theta / pi_prox clipped, for on-policy samples (engine == trainer, "
        "sampled by the current weights). decoupled (AReaL, for stale or engine-mismatched samples): the same "
        "clipped surrogate times the importance weight min(pi_prox / pi_behav, tis_cap), pi_behav being the "
        "engine's log-prob at unmask time (Rollout.logprobs, required on every rollout). pi_prox is the trainer's "
        "weights at the start of the step: recomputed (one extra forward) when the step makes several updates, "
        "otherwise pi_theta.detach() exactly. On-policy, both give the same loss up to the engine's float error",
    )
    tis_cap: float = Field(
        2.0,
        ge=1.0,
        description="decoupled: the importance weight pi_prox / pi_behav is truncated at this (TIS; a cap below 1 "
        "would down-weight on-policy tokens too); unused by the standard objective, which has no such weight",
    )
    estimator: Literal["gtpo", "tracerl_shrink", "random_mask", "coupled"] = Field(
        "gtpo",
        description="how a token's log-prob is computed (services/trainer/learner/baselines.py): gtpo = in the state it was "
        "unmasked in (exact at shrink 1); tracerl_shrink = TraceRL's merged steps (shrink >= 2); random_mask = d1 / "
        "diffu-GRPO (response fully masked, prompt masked with prompt_mask); coupled = DiffuCoder's coupled-GRPO "
        "(complementary masks). Baselines for the ablation (bench/algorithms.py); only gtpo is exact",
    )
    prompt_mask: float = Field(
        0.15, ge=0.0, lt=1.0, description="estimator=random_mask: each prompt token masked with this probability (d1)"
    )
    log_ratio_clamp: float = Field(
        10.0, gt=0.0, description="clamp of log(pi_theta / pi_prox) before exp, so one stale token cannot overflow"
    )
    reward_norm: Literal["total", "per_component"] = Field(
        "total",
        description="total: the group normalises each response's total reward (GRPO). per_component (LightningRL): "
        "each raw reward component is normalised within its group on its own (z-score, or mean-centred under "
        "advantage: mean; a component constant in the group gives 0), then the components are summed with the "
        "reward_weights, which must be the weights the reward service scored with (the trainer checks each total). "
        "A group is then dropped by dynamic sampling only if no weighted component varies in it",
    )


class OptimConfig(BaseModel):
    """AdamW and its learning-rate schedule."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-6, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1)")
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the global gradient norm; None = off")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up, in optimizer updates")
    schedule: Literal["constant", "cosine"] = "constant"
    total_updates: int | None = Field(None, ge=1, description="cosine: updates until the LR reaches min_lr_ratio")
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every linear layer of a Qwen3 / SDAR decoder block (the embeddings and the LM head stay frozen)."""


class LoraSettings(BaseModel):
    """LoRA (peft): only low-rank adapters on the target layers train; the base stays frozen and is the KL reference."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="the adapter's output is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input while training")
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_TARGETS), min_length=1, description="linear layers (by name) that get one"
    )
    publish: Literal["adapter", "merged"] = Field(
        "adapter",
        description="weight versions: adapter = only the adapter's tensors (the torch engine applies them in place); "
        "merged = the merged SDAR weights as well (LMDeploy, whose dLLM engine cannot swap adapters, loads those)",
    )


class ValueConfig(BaseModel):
    """TraceRL's value model (services/trainer/learner/value.py): a critic over the denoising steps, GAE advantages."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(5e-6, gt=0, description="the critic's own AdamW learning rate (TraceRL: 5e-6)")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="discount over the response's denoising steps (TraceRL: 1)")
    lam: float = Field(1.0, ge=0.0, le=1.0, description="GAE lambda over the steps (TraceRL: 1)")
    reward: Literal["group", "raw"] = Field(
        "group",
        description="the return the critic learns: group = the response's group advantage (TraceRL's code: the "
        "value model on top of the group baseline); raw = the reward itself (the value model is the only baseline)",
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip of the critic's gradient norm; None = off")


class CommonConfig(CommandConfig):
    """What every trainer command (`gtpo sft`, `gtpo train`) needs: the model, where to write, how to update."""

    model_config = ConfigDict(extra="forbid")

    model: Path = Field(description="SDAR-layout checkpoint directory to start from")
    output_dir: Path = Field(description="checkpoints, metrics.jsonl and plots go here")
    seed: int = Field(0, ge=0, description="every random draw derives from (seed, step, rank)")
    optim: OptimConfig = Field(default_factory=OptimConfig)
    updates_per_step: int = Field(1, ge=1, description="optimizer updates per step: the batch is split in this many")
    micro_batch_size: int = Field(4, ge=1, description="responses per forward on one process")

    @model_validator(mode="before")
    @classmethod
    def _layout_removed(cls, data):
        # the per-round layout was a test oracle exposed as an option (issue 33); it lives in tests/oracles/
        if isinstance(data, dict) and "layout" in data:
            raise ValueError(
                "layout: removed; the trainer always trains on the packed layout (one forward per response, or "
                "`copies_per_forward` rounds per forward: copies_per_forward=1 is one forward per round)"
            )
        return data

    shrink: int = Field(1, ge=1, description="merge this many consecutive steps of a block into one round")
    attention: Literal["auto", "sdpa", "flex"] = Field("auto", description="auto: flex on CUDA, sdpa on CPU")
    mixed_precision: Literal["auto", "no", "bf16"] = Field("auto", description="auto: bf16 on CUDA, fp32 on CPU")
    keep_last: int = Field(3, ge=1, description="checkpoints kept")
    gradient_checkpointing: bool = Field(
        False,
        description="recompute each decoder layer's activations in the backward instead of keeping them (about "
        "1/3 more compute, the same gradients); `gtpo plan-memory` estimates what it saves",
    )
    copies_per_forward: int | None = Field(
        None,
        ge=1,
        description="c: a response's R noisy copies go through forwards of at most c copies, each with the clean "
        "sequence again (None: all R in one forward, the packed layout; 1: one forward per round). The same "
        "log-probs and gradients; smaller c = less activation memory, more compute for the repeated clean sequence",
    )
    log_with: TrackerNames = Field(
        default_factory=list,
        description="experiment trackers that get every metrics.jsonl row and the config as hyper-parameters "
        "(none by default; `log_with=tensorboard,wandb` works too); each needs its extra: pip install 'gtpo[wandb]'",
    )
    tracker_project: str = Field("gtpo", min_length=1, description="the trackers' project (W&B, trackio) or experiment")
    lora: LoraSettings | None = Field(None, description="train LoRA adapters instead of every weight; None = full")
    max_row_bytes: int = Field(
        MAX_ROW_BYTES, ge=1, description="data: a longer row (a JSONL line, a column's text) is refused, naming it"
    )


RL_STEP_FIELDS = ("loss", "passes", "ref_model", "value")
"""The RL step's own settings: `gtpo sft` refuses them (a KL weight there would load a reference nothing uses)."""


class TrainerConfig(CommonConfig):
    """What the learner needs for an RL step (`Learner.rl_step`): the common settings, the loss, the passes over
    a batch and the KL reference. `RLConfig` adds the run around it; tests and benches build this one directly."""

    loss: LossConfig = Field(default_factory=LossConfig)
    passes: int = Field(1, ge=1, description="passes over one RL batch; each pass makes updates_per_step updates")
    ref_model: Path | None = Field(None, description="frozen reference for the KL term; None = the start model")
    value: ValueConfig | None = Field(
        None, description="TraceRL's value model (a critic head on the policy's features, GAE over steps); None = off"
    )

    @model_validator(mode="after")
    def _check_lora_reference(self) -> TrainerConfig:
        # with LoRA the reference is the frozen base itself (adapters off); a second model would be a second copy
        if self.lora is not None and self.ref_model is not None:
            raise ValueError(
                f"ref_model: with lora the KL reference is the start model with its adapters disabled; "
                f"leave ref_model unset (got {self.ref_model})"
            )
        return self


class SFTConfig(CommonConfig):
    """`gtpo sft`: SDAR's random-masking objective (rows with prompt/response or messages) and trace-SFT (rows that
    carry a rollout's `token_ids` and `step_map`). Environment: `GTPO_SFT__<KEY>`."""

    env_prefix: ClassVar[str | None] = command_prefix("sft")
    legacy_env_prefix: ClassVar[str | None] = ENV_PREFIX
    foreign_fields: ClassVar[dict[str, str]] = dict.fromkeys(
        RL_STEP_FIELDS, "an RL setting (gtpo train): SFT has no policy loss, KL reference or passes"
    )

    sft_mask_eps: float = Field(1e-3, gt=0, lt=1, description="mask rate t ~ U(eps, 1) of the random-masking objective")
    data: DataSource = Field(
        description="{prompt, response} | {messages} | a rollout with step_map, as JSON / JSONL, a datasets "
        "save_to_disk folder or hf:org/name[:config][:split]"
    )
    steps: int = Field(100, ge=1, description="optimizer steps (x updates_per_step updates)")
    batch_size: int = Field(32, ge=1, description="responses per step, over all processes")
    save_every: int = Field(50, ge=1, description="checkpoint every this many steps (and at the end)")
    chat_template: bool = Field(True, description="wrap prompts with the tokenizer's chat template")
    max_tokens: int = Field(4096, ge=8, description="drop examples longer than this (prompt + response)")
    prompt_field: str = Field("prompt", min_length=1, description="the column of the prompt text")
    response_field: str = Field("response", min_length=1, description="the column of the response text")


class RolloutSampling(SamplingParams):
    """How the rollout workers sample for RL: `SamplingParams` itself (defaults: unbiased, T=1, no top-k / top-p),
    with the group size and the threshold spread; `params` makes each task's request from it."""

    group_size: int = Field(8, ge=2, description="responses per prompt (the GRPO group)")
    threshold_spread: float = Field(
        0.0,
        ge=0,
        le=1,
        description="dynamic strategy: the group's samples decode at thresholds evenly spaced from "
        "confidence_threshold down to confidence_threshold - this, so a group holds faster and slower unmasking "
        "orders for the speed reward to tell apart (0: every sample at confidence_threshold). LMDeploy's threshold "
        "is engine-wide, so there each distinct threshold rebuilds the engine: use it with the torch engine",
    )
    logprobs: bool = Field(True, description="always on: the behaviour log-probs of the decoupled objective")

    def params(self, **update) -> SamplingParams:
        """One task's request: these settings (one sample, log-probs on) with `update` (its seed and threshold)."""
        mine = self.model_dump(include=set(SamplingParams.model_fields))
        return SamplingParams.model_validate({**mine, **update})

    @model_validator(mode="after")
    def _check_derived(self) -> RolloutSampling:
        # values, not "was it given": a dumped config (gtpo up, a checkpoint's copy) must load again as it was
        for name, value in (("n", self.n != 1), ("seed", self.seed is not None), ("logprobs", not self.logprobs)):
            if value:
                raise ValueError(
                    f"rollout.{name}: set per task by the trainer (n=1, a seed derived from seed, logprobs on); "
                    "leave it out (rollout.group_size is the samples per prompt)"
                )
        return self

    @model_validator(mode="after")
    def _check_sampled(self) -> RolloutSampling:
        # greedy decoding is a point mass: no distribution for the ratio, the importance weight or the KL
        if self.temperature < MIN_TEMPERATURE:
            raise ValueError(
                f"rollout.temperature: RL needs sampled rollouts, temperature >= {MIN_TEMPERATURE}; got "
                f"{self.temperature} (greedy decoding has no distribution to train; use it for evaluation)"
            )
        return self

    @model_validator(mode="after")
    def _check_spread(self) -> RolloutSampling:
        # a spread the strategy ignores, or one that reaches below 0, would be silently not what was asked for
        if self.threshold_spread and self.strategy != "low_confidence_dynamic":
            raise ValueError(f"threshold_spread: only the dynamic strategy has a threshold, not {self.strategy.value}")
        if self.threshold_spread > self.confidence_threshold:
            raise ValueError(
                f"threshold_spread: {self.threshold_spread} is more than confidence_threshold="
                f"{self.confidence_threshold}; thresholds cannot go below 0"
            )
        return self


class WeightsTransport(BaseModel):
    """How rollout workers get each published weights version (docs/design.md section 7): `volume` = they read the
    checkpoint folder from a volume they share with the trainer; `http` = the trainer serves the folder's files from
    its HTTP server (`health_port`) and each worker fetches, verifies (size, sha256) and caches them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    transport: Literal["volume", "http"] = Field("volume", description="volume | http")
    url: str | None = Field(
        None,
        max_length=2048,
        description="transport=http: the trainer's base URL as rollout workers reach it; None = "
        "http://127.0.0.1:<health_port> (one host)",
    )
    final_wait_s: float = Field(
        60.0,
        ge=0,
        description="transport=http: after the last step, keep serving the last version until every live rollout "
        "worker serves it, at most this long (a rollout service that outlives the run then has the final weights)",
    )

    def base_url(self, health_port: int | None) -> str:
        return self.url or f"http://127.0.0.1:{health_port}"


class RLConfig(TrainerConfig):
    """`gtpo train` (and `gtpo up`, `gtpo launch`): GTPO rounds through the rollout and reward services over Redis.
    Environment: `GTPO_TRAIN__<KEY>`, e.g. `GTPO_TRAIN__ROLLOUT__GROUP_SIZE=16`."""

    env_prefix: ClassVar[str | None] = command_prefix("train")
    legacy_env_prefix: ClassVar[str | None] = ENV_PREFIX
    foreign_fields: ClassVar[dict[str, str]] = {"sft_mask_eps": "an SFT setting (gtpo sft): RL masks nothing at random"}

    run_id: str = Field("run", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    data: DataSource = Field(
        description="questions and reference answers: JSON list / JSONL, a datasets save_to_disk folder, or "
        "hf:org/name[:config][:split] (see question_field, answer_field, answer_extract)"
    )
    prompt_template: str = Field(PROMPT_TEMPLATE, description="user message; {question} is replaced")
    chat_template: bool = Field(True, description="wrap the user message in the tokenizer's chat template")
    steps: int = Field(10, ge=1, description="RL steps (each: collect, train, publish weights)")
    prompts_per_step: int = Field(8, ge=1, description="groups trained per step")
    oversample: float = Field(
        2.0, ge=1.0, description="enqueue up to this many times the groups to refill dropped ones"
    )
    rollout: RolloutSampling = Field(default_factory=RolloutSampling)
    dynamic_sampling: bool = Field(True, description="drop (and refill) groups whose rewards all agree: no signal")
    max_staleness: int = Field(
        0,
        ge=0,
        description="k: rollouts may be generated up to k policy versions before the one that trains them, so "
        "collection runs up to k steps ahead of training and rollout overlaps training; 0 = synchronous",
    )
    lease_ttl_s: float = Field(
        30.0, ge=1.0, description="a trainer that has not renewed its lease for this long loses the run to another"
    )
    step_timeout_s: float = Field(1800.0, gt=0, description="then train on the groups that are complete and say so")
    redis: RedisConfig = Field(default_factory=RedisConfig)
    rollout_urls: list[str] = Field(default_factory=list, description="also push new weights to these over HTTP")
    api_token: BearerToken | None = Field(None, description="bearer token for the rollout services' /v1/weights")
    health_port: int | None = Field(None, ge=0, le=65535, description="/health /status /metrics; None = off")
    weights: WeightsTransport = Field(
        default_factory=WeightsTransport, description="how rollout workers get each version: volume | http"
    )
    reward_weights: dict[str, float] = Field(
        default_factory=default_reward_weights, description="`gtpo up`: the reward workers' weights"
    )
    prompt_filter_tpf: tuple[float, float] | None = Field(
        None,
        description="LightningRL's prompt filter by tokens per step: [low, high]; a group whose samples' mean "
        "tokens per denoising step (the speed reward's measure, 1 to the block size) lies outside it is dropped "
        "and refilled like a zero-variance group; None = off",
    )
    zero_truncated: bool = Field(
        False,
        description="`gtpo up`: the reward workers score a response that hit max_new_tokens 0 in every component "
        "(DiRL: total 0, a speed reward included); accuracy alone already scores it 0",
    )
    question_field: str = Field(QUESTION_FIELD, min_length=1, description="data: the column of the question")
    answer_field: str = Field(ANSWER_FIELD, min_length=1, description="data: the column of the answer")
    answer_extract: Literal["none", "boxed", "gsm8k"] = Field(
        "none",
        description="data: the answer column as it is, or a solution text's last \\boxed{} (MATH-style), or what "
        "follows its last #### (GSM8K)",
    )

    def trainer_side(self, spec=None) -> TrainerSide:
        """This run's side of the start-up agreement check (shared/contracts/agreement.py).

        Args:
            spec: the model's DiffusionSpec; None where it is not loaded (`gtpo up`, a simulated trainer).
        """
        return TrainerSide(namespace=self.redis.namespace, codec=self.redis.codec, reward_weights=self.reward_weights,
                           block_size=None if spec is None else spec.block_size,
                           mask_token_id=None if spec is None else spec.mask_token_id,
                           weights_dir=str((self.output_dir / "checkpoints").resolve()))  # fmt: skip

    @model_validator(mode="after")
    def _check_staleness(self) -> RLConfig:
        # samples up to k versions old are off-policy: without the behaviour correction the update is biased
        if self.max_staleness >= 1 and self.loss.objective != "decoupled":
            raise ValueError(
                f"max_staleness: {self.max_staleness} needs loss.objective=decoupled (stale samples need the "
                "importance weight pi_prox / pi_behav), got loss.objective=standard"
            )
        return self

    @model_validator(mode="after")
    def _check_transport(self) -> RLConfig:
        if self.weights.transport == "http" and not self.health_port:
            raise ValueError("weights.transport: http serves the weights from the trainer's health_port; set it")
        return self

    @model_validator(mode="after")
    def _check_tpf_window(self) -> RLConfig:
        w = self.prompt_filter_tpf
        if w is not None and not 0 < w[0] <= w[1]:
            raise ValueError(f"prompt_filter_tpf: need 0 < low <= high, got {list(w)}")
        return self

    @model_validator(mode="after")
    def _check_floor_correct(self) -> RLConfig:
        # Only `gtpo up` scores with these weights; the driver re-checks the scores it actually receives.
        if self.loss.floor_correct and "accuracy" not in self.reward_weights:
            raise ValueError("loss.floor_correct: needs the accuracy reward in reward_weights (it tells who is right)")
        if self.loss.nll_coef > 0 and "accuracy" not in self.reward_weights:
            raise ValueError("loss.nll_coef: needs the accuracy reward in reward_weights (it tells who is right)")
        return self
