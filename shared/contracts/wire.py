"""Wire contracts shared by every producer and consumer (docs/design.md section 2).

Pure pydantic: importing this module never imports torch.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_ID = 2**31 - 1
"""Token ids, step numbers and top-k fit a signed 32-bit integer (what the engines' tensors hold)."""
MAX_SEED = 2**62
"""Seeds and versions fit a signed 64-bit integer with room to spare (msgpack, torch generators, Redis scores)."""

RUN_MAX = 128
"""A run identity (`WeightsVersion.run`) has at most this many characters."""

TokenId = Annotated[int, Field(ge=0, le=MAX_ID)]

MIN_TEMPERATURE = 1e-5
"""Temperatures below this decode greedily, as T = 0 (vLLM's rule too). logits / T leaves float32 long before T
reaches 0 (1e-45 is still a float32 and overflows every logit above 5e-7; 1e-300 rounds to 0), and the limit
T -> 0+ is the argmax anyway. At or above it, |logits| < 3e33 keeps logits / T finite. Greedy decoding has no
distribution to train, so RL refuses it (``RolloutSampling.temperature``); the transform is
``shared.model.sampling.sampling_log_probs``."""


class Strategy(str, Enum):
    """Which masked positions a denoising forward unmasks."""

    low_confidence_dynamic = "low_confidence_dynamic"
    """The most confident masked position plus every masked position with confidence >= threshold."""
    low_confidence_static = "low_confidence_static"
    """The `max(1, block_size // denoising_steps)` most confident masked positions."""
    sequential = "sequential"
    """The `max(1, block_size // denoising_steps)` left-most masked positions."""


class SamplingParams(BaseModel):
    """How one request is decoded. Defaults are the RL defaults (T=1, no top-k, top-p 1: unbiased)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    block_size: int | None = Field(None, ge=1, le=256, description="tokens per block; None = the model's block size")
    strategy: Strategy = Field(Strategy.low_confidence_dynamic, description="unmasking strategy")
    confidence_threshold: float = Field(0.9, ge=0.0, le=1.0, description="dynamic strategy: unmask when p >= this")
    denoising_steps: int | None = Field(
        None, ge=1, le=256, description="static/sequential: steps per block; None = block_size (one token per step)"
    )
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 = greedy")
    top_k: int = Field(0, ge=0, le=MAX_ID, description="0 = disabled")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="1 = disabled")
    max_new_tokens: int = Field(256, ge=1, le=131072, description="response tokens at most")
    stop_token_ids: list[TokenId] | None = Field(
        None,
        max_length=1024,
        description="the response ends at the first of these (kept); None = the model's end tokens, [] = none",
    )
    n: int = Field(1, ge=1, le=1024, description="samples per prompt")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="same seed, same output; None = random")
    logprobs: bool = Field(False, description="return each token's log-prob under the sampling distribution")

    @model_validator(mode="after")
    def _check(self) -> SamplingParams:
        if self.block_size is not None and self.denoising_steps is not None and self.denoising_steps > self.block_size:
            raise ValueError(
                f"denoising_steps: must be between 1 and block_size={self.block_size}, got {self.denoising_steps}"
            )
        return self

    def resolved(self, model_block_size: int, default_stop_ids: list[int]) -> SamplingParams:
        """Fill the model-dependent defaults (block size, denoising steps, stop tokens)."""
        b = self.block_size or model_block_size
        stops = list(default_stop_ids) if self.stop_token_ids is None else self.stop_token_ids
        # validate again: denoising_steps must fit the model's block size
        return SamplingParams.model_validate(
            {
                **self.model_dump(),
                "block_size": b,
                "denoising_steps": self.denoising_steps or b,
                "stop_token_ids": stops,
            }
        )

    def tokens_per_step(self) -> int:
        """Static / sequential: positions unmasked per forward (LMDeploy's `max(1, B // steps)`)."""
        assert self.block_size is not None and self.denoising_steps is not None, "call resolved() first"
        return max(1, self.block_size // self.denoising_steps)


class GenerationRequest(BaseModel):
    """One prompt (already tokenised) with its sampling settings."""

    model_config = ConfigDict(extra="forbid")

    prompt_ids: list[TokenId] = Field(min_length=1)
    params: SamplingParams = Field(default_factory=SamplingParams)


class Rollout(BaseModel):
    """One sampled response with its trajectory (docs/design.md section 2).

    `step_map[i]` is the 1-based denoising step (global over the response) at which `token_ids[i]` was
    unmasked. `tail_ids` / `tail_steps` are the positions of the last block after the cut (stop token or
    `max_new_tokens`): they were sampled and attended to, so the trainer must place them, never train them.
    """

    # a non-finite log-prob is an engine bug: refused here, it never reaches the trainer
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt_ids: list[TokenId]
    token_ids: list[TokenId]
    step_map: list[Annotated[int, Field(le=MAX_ID)]]
    tail_ids: list[TokenId] = Field(default_factory=list)
    tail_steps: list[Annotated[int, Field(le=MAX_ID)]] = Field(default_factory=list)
    text: str = ""
    finish_reason: Literal["stop", "length"]
    policy_version: int = Field(0, ge=0, le=MAX_SEED)
    policy_run: str | None = Field(
        None, max_length=RUN_MAX, description="the run whose weights generated it (WeightsVersion.run); None = unknown"
    )
    params: SamplingParams
    seed: int = Field(ge=0, le=MAX_SEED, description="the seed of this sample's generator (reproduces it)")
    logprobs: list[float] | None = None
    token_versions: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] | None = Field(
        None,
        description="per response token, the policy version whose weights sampled it (rollout.swap_at_block: a "
        "response may span versions, changing only at block boundaries); None = every token is `policy_version`'s",
    )

    @model_validator(mode="after")
    def _check(self) -> Rollout:
        if self.params.block_size is None:
            raise ValueError("params.block_size: a rollout records the block size it was decoded with")
        if len(self.step_map) != len(self.token_ids):
            raise ValueError(f"step_map: needs one step per token ({len(self.token_ids)}), got {len(self.step_map)}")
        if len(self.tail_steps) != len(self.tail_ids):
            raise ValueError(
                f"tail_steps: needs one step per tail token ({len(self.tail_ids)}), got {len(self.tail_steps)}"
            )
        if self.logprobs is not None and len(self.logprobs) != len(self.token_ids):
            raise ValueError(f"logprobs: needs one value per token ({len(self.token_ids)}), got {len(self.logprobs)}")
        check_step_map(len(self.prompt_ids), self.step_map + self.tail_steps, self.params.block_size)
        if self.token_versions is not None:
            check_token_versions(len(self.prompt_ids), self.token_versions, len(self.token_ids),
                                 self.params.block_size, self.policy_version)  # fmt: skip
        return self

    def versions(self) -> list[int]:
        """The version that sampled each response token (`token_versions`, else `policy_version` throughout)."""
        if self.token_versions is not None:
            return list(self.token_versions)
        return [self.policy_version] * len(self.token_ids)


def check_step_map(prompt_len: int, steps: list[int], block_size: int) -> None:
    """Raise ValueError unless `steps` is 1-based and every block's steps come after the previous block's.

    Args:
        prompt_len: P; response token i sits at absolute position P + i, in block (P + i) // block_size.
        steps: one step per response position (response then tail).
    """
    if any(s < 1 for s in steps):
        raise ValueError(f"step_map: steps are 1-based, got {min(steps)}")
    prev_max, cur_block, cur_min, cur_max = 0, None, 0, 0
    for i, s in enumerate(steps):
        b = (prompt_len + i) // block_size
        if b != cur_block:
            prev_max, cur_block, cur_min, cur_max = max(prev_max, cur_max), b, s, s
        cur_min, cur_max = min(cur_min, s), max(cur_max, s)
        if cur_min <= prev_max:
            raise ValueError(f"step_map: block {b} has step {cur_min}, not after the previous block's {prev_max}")


def check_token_versions(prompt_len: int, versions: list[int], n_tokens: int, block_size: int, start: int) -> None:
    """Raise ValueError unless `versions` has one version per response token, starts at `start` (the rollout's
    `policy_version`: the version it started with, its oldest), never decreases, and changes only where a block
    starts (weights are swapped between blocks, never inside one).

    >>> check_token_versions(2, [3, 3, 4, 4, 4, 4], 6, 4, 3)  # positions 2,3 | 4..7: the swap at position 4
    >>> check_token_versions(2, [3, 4, 4], 3, 4, 3)
    Traceback (most recent call last):
    ...
    ValueError: token_versions: changes from v3 to v4 inside block 0 (response token 1)
    """
    if len(versions) != n_tokens:
        raise ValueError(f"token_versions: needs one version per token ({n_tokens}), got {len(versions)}")
    if versions and versions[0] != start:
        raise ValueError(f"token_versions: starts at v{versions[0]}, the rollout's policy_version is v{start}")
    for i in range(1, len(versions)):
        if versions[i] == versions[i - 1]:
            continue
        if versions[i] < versions[i - 1]:
            raise ValueError(f"token_versions: goes back from v{versions[i - 1]} to v{versions[i]} at token {i}")
        if (prompt_len + i) % block_size:
            raise ValueError(f"token_versions: changes from v{versions[i - 1]} to v{versions[i]} inside block "
                             f"{(prompt_len + i) // block_size} (response token {i})")  # fmt: skip


def describe_validation_error(err: ValidationError) -> str:
    """One line per bad field: `field: message (got value)`, for CLI and HTTP errors."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "value"
        lines.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def brief_error(err: Exception) -> str:
    """One line for an error that may echo a huge or secret input: per bad field (at most 5) its location and
    message without the input, else the exception's message cut to 1,000 characters (dead-letter reasons, 422s).

    >>> try:
    ...     ScoreItem(id="", response="x")
    ... except ValidationError as e:
    ...     print(brief_error(e))
    id: String should have at least 1 character
    """
    if isinstance(err, ValidationError):
        return "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"] for e in err.errors()[:5]
        )
    return str(err)[:1000]


# --------------------------------------------------------------------------- reward service


class ScoreStatus(str, Enum):
    """How the scoring of one item ended (the wire values are these strings)."""

    ok = "ok"
    """Every weighted component was computed."""
    timeout = "timeout"
    """The accuracy check ran past its time limit or the request deadline: never a silent 0."""
    error = "error"
    """A component could not be computed (no reference, no budget, a crashed or refused check)."""

    def __str__(self) -> str:  # the value, in f-strings and metric labels alike, on every Python version
        return self.value


MAX_COUNT = 2**31 - 1
"""Counts in a ScoreItem above this are refused: no response is that long, and every consumer's integers hold it."""


class ScoreItem(BaseModel):
    """One response to score, with what the reward functions may need."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=256, description="echoed back in the result")
    response: str = Field(max_length=4_000_000, description="the decoded response text")
    reference: str | None = Field(None, max_length=100_000, description="ground-truth answer (accuracy)")
    token_count: int = Field(0, ge=0, le=MAX_COUNT, description="response tokens (length rewards)")
    steps: int = Field(0, ge=0, le=MAX_COUNT, description="denoising steps that produced them (speed rewards)")
    block_size: int = Field(4, ge=1, le=MAX_COUNT, description="the decoding block size (speed rewards)")
    max_new_tokens: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="the generation budget (cosine, soft_overlong)"
    )
    finish_reason: Literal["stop", "length"] | None = None


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class ScoreRequest(BaseModel):
    """A batch of responses; `weights` overrides the service's configured reward weights for this call."""

    model_config = ConfigDict(extra="forbid")

    items: list[ScoreItem] = Field(min_length=1, max_length=4096)
    weights: dict[str, FiniteFloat] | None = Field(
        None, description="reward name -> weight; None = the configured ones"
    )


class ScoreResult(BaseModel):
    """The weighted total and each component; `status` is never hidden behind a zero."""

    model_config = ConfigDict(extra="forbid")

    id: str
    total: float
    components: dict[str, float]
    status: ScoreStatus
    detail: str | None = Field(None, description="what went wrong when status is not ok")


class ScoreResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")

    results: list[ScoreResult]


# --------------------------------------------------------------------------- queue messages (Redis streams)


class WorkerKind(str, Enum):
    """The three kinds of process that consume the streams and heartbeat in the registry."""

    rollout = "rollout"
    reward = "reward"
    trainer = "trainer"

    def __str__(self) -> str:
        return self.value


class HeartbeatInfo(BaseModel):
    """What a worker says about itself in its heartbeat (`shared.queues.worker.Worker.heartbeat_info`): the two counters
    the trainer computes busy fractions from, its `ServiceInfo` (the trainer's start-up check) and, for a rollout
    worker, the last weights version it refused. Any other key is kept for status pages.

    A `service` or `weights_refused` entry that is not valid (another version's worker) reads as None: the worker
    still counts as alive (it may hold old weights that must not be pruned), only that entry goes unchecked.
    """

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    busy_s: float | None = Field(None, ge=0, description="seconds spent working since it started")
    up_s: float | None = Field(None, ge=0, description="seconds since it started")
    service: ServiceInfo | None = Field(None, description="what it runs with, where the trainer must agree")
    weights_refused: WeightsRefusal | None = Field(None, description="rollout: the last version it refused")

    @field_validator("service", "weights_refused", mode="wrap")
    @classmethod
    def _unreadable_is_none(cls, value, handler):
        try:
            return handler(value)
        except ValidationError:
            return None


class WorkerHeartbeat(BaseModel):
    """The value at `Keys.worker(kind, id)` (`WeightRegistry.heartbeat`): alive, serving weights `version`."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    kind: str = Field(min_length=1, max_length=64, pattern=r"^[^:]+$")
    id: str = Field(min_length=1, max_length=512)
    version: int | None = Field(None, ge=0, le=MAX_SEED, description="the weights it serves; None = none yet")
    info: HeartbeatInfo = Field(default_factory=HeartbeatInfo)
    ts: float = Field(ge=0, description="when it was written (Unix seconds)")


class TaskMessage(BaseModel):
    """tasks stream: one sample to generate. `task_id` = `run:train_by:prompt:sample` is the idempotency key."""

    model_config = ConfigDict(extra="forbid")

    task_id: str = Field(min_length=1, max_length=512)
    run_id: str = Field(min_length=1, max_length=64)
    train_by: int = Field(ge=0, le=MAX_SEED, description="the last trainer step that may train it (`Group.train_by`)")
    prompt_index: int = Field(ge=0, le=MAX_SEED, description="position of the prompt in the dataset")
    sample_index: int = Field(ge=0, le=MAX_ID)
    group_size: int = Field(ge=1, le=MAX_ID)
    prompt_ids: list[int] = Field(min_length=1, description="checked against the vocabulary by the worker")
    prompt_text: str = ""
    reference: str | None = None
    params: SamplingParams = Field(description="n = 1; the seed is this sample's")
    policy_version: int = Field(
        ge=0, le=MAX_SEED, description="the trainer's version when enqueued; generate with >= this"
    )
    attempt: int = Field(0, ge=0, le=MAX_ID, description="re-enqueued after a stale or dead-lettered sample")
    policy_run: str | None = Field(
        None, max_length=RUN_MAX, description="generate with weights of this run only (WeightsVersion.run)"
    )


class RolloutMessage(BaseModel):
    """rollouts stream: a task with its rollout (the generating version is `rollout.policy_version`)."""

    model_config = ConfigDict(extra="forbid")

    task: TaskMessage
    rollout: Rollout
    worker: str = Field(description="the rollout worker that produced it")


class ScoredMessage(BaseModel):
    """scored stream: a rollout with its reward, and the reward weights it was scored with."""

    model_config = ConfigDict(extra="forbid")

    task: TaskMessage
    rollout: Rollout
    score: ScoreResult
    reward_weights: dict[str, FiniteFloat] | None = Field(
        None, description="the reward worker's weights (what `score.total` sums); None = unknown (never trained)"
    )


def same_rewards(a: dict[str, float] | None, b: dict[str, float] | None) -> bool:
    """Whether two reward weightings score alike: the same weight for every reward, a zero weight = absent.

    >>> same_rewards({"accuracy": 1, "format": 0.0}, {"accuracy": 1.0}), same_rewards({"accuracy": 1.0}, None)
    (True, False)
    """
    if a is None or b is None:
        return False
    return {k: v for k, v in a.items() if v != 0} == {k: v for k, v in b.items() if v != 0}


SHA256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
"""A sha256 digest as lowercase hex."""


class WeightsVersion(BaseModel):
    """What the trainer publishes after each update: rollout workers load `path` and acknowledge `version`."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=0, le=MAX_SEED)
    path: str = Field(
        min_length=1,
        max_length=4096,
        description="an SDAR-layout checkpoint directory under the shared checkpoint root",
    )
    step: int = Field(0, ge=0, le=MAX_SEED)
    run: str | None = Field(
        None,
        max_length=RUN_MAX,
        description="the identity of the run that published it: a version number names weights within one run only",
    )
    url: str | None = Field(
        None,
        max_length=4096,
        description="weights.transport=http: where its files are served (`{url}/manifest`, `{url}/files/{name}`); "
        "None = read `path` from the shared volume",
    )
    digest: SHA256 | None = Field(None, description="sha256 of its `WeightsManifest` (`WeightsManifest.digest`)")


class WeightsFile(BaseModel):
    """One file of a served weights version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        min_length=1, max_length=1024, pattern=r"^[A-Za-z0-9._/-]+$", description="relative to the version folder"
    )
    size: int = Field(ge=0)
    sha256: SHA256

    @field_validator("name")
    @classmethod
    def _relative(cls, name: str) -> str:
        # a worker writes the file under this name: no absolute path, no `.` or `..` part, no empty part
        if any(part in ("", ".", "..") for part in name.split("/")):
            raise ValueError(f"name: {name!r} must be a relative path without '.', '..' or empty parts")
        return name


class WeightsManifest(BaseModel):
    """`GET /v1/weights/{version}/manifest` on the trainer (weights.transport=http): every file of the version
    folder, hashed once when the version is published. A worker verifies each file against it, and the manifest
    against `WeightsVersion.digest`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(ge=0, le=MAX_SEED)
    run: str | None = Field(None, max_length=RUN_MAX)
    files: list[WeightsFile] = Field(min_length=1, max_length=4096)

    def digest(self) -> str:
        """sha256 of the canonical JSON of this manifest (what `WeightsVersion.digest` holds)."""
        import hashlib

        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()

    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


# --------------------------------------------------------------------------- rollout service (HTTP)


class GenerateRequest(BaseModel):
    """`POST /v1/generate`: prompts as text (chat template applied unless `chat` is false) or as token ids."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[Annotated[str, Field(max_length=1_000_000)]] | None = Field(None, min_length=1, max_length=1024)
    prompt_ids: list[list[TokenId]] | None = Field(None, min_length=1, max_length=1024)
    chat: bool = Field(True, description="wrap text prompts in the model's chat template")
    params: SamplingParams = Field(default_factory=SamplingParams)

    @model_validator(mode="after")
    def _one_kind(self) -> GenerateRequest:
        if (self.prompts is None) == (self.prompt_ids is None):
            raise ValueError("prompts / prompt_ids: give exactly one of them")
        if self.prompt_ids is not None and any(len(p) == 0 for p in self.prompt_ids):
            raise ValueError("prompt_ids: every prompt needs at least one token")
        return self


class GenerateResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rollouts: list[list[Rollout]] = Field(description="params.n rollouts per prompt, in prompt order")
    policy_version: int


class WeightsRequest(BaseModel):
    """`POST /v1/weights`: load version `version` from `path` (under the service's checkpoint root).

    Versions only move forward within a run: an older version than the one served, or the served version from
    another path, is refused (409) unless `rollback` is set; a version of another `run` replaces any (a new run).
    """

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=0, le=MAX_SEED)
    path: str = Field(min_length=1, max_length=4096, description="a checkpoint folder, absolute or under the root")
    rollback: bool = Field(False, description="allow an older version, or the served version from another path")
    run: str | None = Field(None, max_length=RUN_MAX, description="the run that published it (WeightsVersion.run)")

    @field_validator("path")
    @classmethod
    def _no_nul(cls, path: str) -> str:
        # pydantic already refuses lone surrogates in a str; a NUL is valid text but no file name
        if "\x00" in path:
            raise ValueError("path: holds a NUL character")
        return path


class WeightsResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(description="the version now served")
    path: str = Field(description="its checkpoint folder, resolved")
    seconds: float = Field(description="load time; 0 when that version was already served from that path")
    previous: int | None = Field(None, description="the version served before; None = the start model")


class ServiceInfo(BaseModel):
    """What a rollout or reward service runs with, where the trainer must agree: `GET /info`, and the `service`
    entry of its workers' heartbeats (for workers reached through Redis only). Checked by `gtpo up` and the trainer
    before the first step (shared/contracts/agreement.py)."""

    model_config = ConfigDict(extra="ignore")  # a newer service may say more; what is checked stays

    kind: WorkerKind = Field(description="rollout or reward")
    worker_id: str = Field(description="its id in the registry (`gtpo status`)")
    namespace: str = Field(description="redis.namespace: the streams it reads and writes")
    codec: Literal["json", "msgpack"] = Field(description="redis.codec: how it encodes the messages it writes")
    block_size: int | None = Field(None, ge=1, description="rollout: the served model's block size")
    mask_token_id: int | None = Field(None, ge=0, description="rollout: the served model's mask token id")
    rewards: list[str] = Field(default_factory=list, description="reward: every reward name it can score")
    weights: dict[str, float] = Field(
        default_factory=dict, description="reward: the weights it scores the stream with (a request may name others)"
    )
    checkpoint_root: str | None = Field(
        None, description="rollout: the folder it loads weight versions from (the trainer's must lie inside it)"
    )


class WeightsRefusal(BaseModel):
    """A weights version a rollout worker refused to load (the `weights_refused` entry of its heartbeat): the
    trainer says it, naming the path and the worker's root, instead of waiting for rollouts that never come."""

    model_config = ConfigDict(extra="ignore")

    version: int = Field(description="the refused version")
    path: str = Field(description="its folder, as the registry names it")
    root: str = Field(description="the worker's checkpoint root")
    reason: str = Field(description="why it was refused")


# --------------------------------------------------------------------------- the trainer's own records


class GroupRecord(BaseModel):
    """A prompt group in the run's Redis ledger (`Keys.run_groups`), written before its tasks are published and
    read back when a trainer rebuilds its buffer after a restart (services/trainer/orchestrator/collect.py)."""

    model_config = ConfigDict(extra="forbid")

    # "tag": the name before issue 33, in ledgers and checkpoints a run upgraded mid-way still holds
    train_by: int = Field(
        ge=0, le=MAX_SEED, validation_alias=AliasChoices("train_by", "tag"),
        description="the last trainer step that may train it",
    )  # fmt: skip
    prompt_index: int = Field(ge=0, le=MAX_SEED, description="the prompt, as an index into the dataset")
    cursor: int = Field(ge=0, le=MAX_SEED, description="its position in the prompt stream")
    version: int = Field(ge=0, le=MAX_SEED, description="the trainer's policy version when it was enqueued")


class TrainerPhase(str, Enum):
    """What the round driver is doing (`Driver.phase`)."""

    starting = "starting"
    collecting = "collecting"
    training = "training"
    checkpointing = "checkpointing"
    idle = "idle"
    """Between steps."""
    stopped = "stopped"

    def __str__(self) -> str:
        return self.value


class TrainerStatus(BaseModel):
    """The round driver's status: `/status` of the trainer's HTTP side and the value at `Keys.trainer_status` that
    `gtpo status` reads (services/status_view.py)."""

    model_config = ConfigDict(extra="ignore")

    run_id: str
    run: str | None = Field(None, description="the run's identity (`WeightsVersion.run`)")
    step: int = Field(ge=0)
    policy_version: int = Field(ge=0)
    max_staleness: int = Field(0, ge=0)
    phase: TrainerPhase = TrainerPhase.idle
    waiting: str = Field("", description="what it does or waits for, in words")
    groups_buffered: int = Field(0, ge=0)
    groups_open: int = Field(0, ge=0)
    samples_in_flight: int = Field(0, ge=0)
    last: dict[str, Any] | None = Field(None, description="the last step's metrics row")
    ts: float | None = Field(None, description="when it was written (Unix seconds)")


class StepSample(BaseModel):
    """One scored response of a step's batch."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")  # a -inf log-prob survives the broadcast

    rollout: Rollout
    reward: FiniteFloat = Field(description="the weighted total (`ScoreResult.total`)")
    components: dict[str, float] = Field(default_factory=dict, description="the raw `ScoreResult.components`")
    correct: bool | None = Field(None, description="the accuracy verdict; None = no accuracy component was scored")


class StepBatch(BaseModel):
    """What one RL step trains: complete prompt groups with their scores, as the round driver collected them. The
    main process builds it; with several processes it is what rank 0 broadcasts, so every rank trains the same."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    groups: list[list[StepSample]]
    reward_weights: dict[str, FiniteFloat] | None = Field(
        None, description="the weights the components were scored with (`loss.reward_norm: per_component`)"
    )
    metrics: dict[str, float] = Field(default_factory=dict, description="the collection's metrics for the row")

    @classmethod
    def of(
        cls,
        groups: list[list[Rollout]],
        rewards: list[list[float]],
        correct: list[list[bool]] | None = None,
        components: list[list[dict[str, float]]] | None = None,
        **fields: Any,
    ) -> StepBatch:
        """A batch from parallel lists grouped alike (scripts and tests build batches this way).

        Raises:
            ValueError: the lists are not grouped like `groups`.
        """
        shape = [len(g) for g in groups]
        for name, values in (("rewards", rewards), ("correct", correct), ("components", components)):
            if values is not None and [len(v) for v in values] != shape:
                raise ValueError(f"{name}: need one per rollout, grouped like the rollouts (got {len(values)} groups)")
        return cls(groups=[
            [StepSample(rollout=r, reward=rewards[i][j], correct=None if correct is None else correct[i][j],
                        components={} if components is None else components[i][j]) for j, r in enumerate(g)]
            for i, g in enumerate(groups)
        ], **fields)  # fmt: skip


HeartbeatInfo.model_rebuild()
WorkerHeartbeat.model_rebuild()
