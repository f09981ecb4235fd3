"""Peak memory per GPU of one GTPO training step, part by part, from a model config and the memory settings.

`gtpo plan-memory` prints it. The model follows what the trainer does (services/trainer/learner/trainer.py): parameters in
fp32 (mixed precision autocasts the matmuls), AdamW state in fp32, gradients set to None after each update, the
packed forward of one response [clean | c noisy copies] (P + L(1 + c) tokens), the LM head only at the targets.

Activations are counted per decoder layer and token from what autograd keeps in a Qwen3 / SDAR layer (docs/design.md
section 3's packed layout does not change the layer). The fp32 count was checked against the resident memory
that `bench/memory.py` measures on CPU (README "Memory" gives the agreement); the bf16 counts follow the same
tensors at their autocast dtypes and are not calibrated on a GPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.trainer.config import LORA_TARGETS

GIB = 2**30
FP32 = 4
BF16 = 2
ADAM_STATES = 2  # exp_avg and exp_avg_sq, each fp32


class ModelShape(BaseModel):
    """The sizes of a Qwen3 / SDAR decoder that memory depends on (read from its config.json)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: int = Field(ge=1)
    hidden: int = Field(ge=1)
    intermediate: int = Field(ge=1)
    heads: int = Field(ge=1)
    kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    vocab: int = Field(ge=1)
    tied: bool = False

    @classmethod
    def from_config(cls, cfg: dict) -> ModelShape:
        """From a transformers / SDAR config.json dict (`head_dim` defaults to hidden / heads, as in Qwen3)."""
        missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                               "vocab_size") if k not in cfg]  # fmt: skip
        if missing:
            raise ValueError(f"config.json: missing {', '.join(missing)}")
        heads = int(cfg["num_attention_heads"])
        return cls(
            layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
            heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab=cfg["vocab_size"],
            tied=bool(cfg.get("tie_word_embeddings", False)),
        )  # fmt: skip

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelShape:
        """From a checkpoint directory (or a config.json path)."""
        return cls.from_config(read_model_config(path))

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


def read_model_config(path: str | Path) -> dict:
    """The config.json of a checkpoint directory, or that file itself (only sizes are read: no weights, no torch)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"model: no config.json at {file}")
    return json.loads(file.read_text())


def linear_shapes(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of one decoder block, by its module name."""
    h, q, kv, i = shape.hidden, shape.q_width, shape.kv_width, shape.intermediate
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip


def param_count(shape: ModelShape) -> int:
    """Every parameter: embeddings, LM head (unless tied), per layer the linears, two RMSNorms and q/k norms.

    >>> param_count(ModelShape(layers=1, hidden=4, intermediate=8, heads=2, kv_heads=1, head_dim=2, vocab=10))
    240
    """
    per_layer = sum(a * b for a, b in linear_shapes(shape).values()) + 2 * shape.hidden + 2 * shape.head_dim
    embed = shape.vocab * shape.hidden
    return embed * (1 if shape.tied else 2) + shape.layers * per_layer + shape.hidden


def lora_param_count(shape: ModelShape, r: int, targets: tuple[str, ...] | list[str] = LORA_TARGETS) -> int:
    """LoRA parameters: r x (in + out) per targeted linear per layer (A is r x in, B is out x r).

    >>> lora_param_count(ModelShape(layers=2, hidden=4, intermediate=8, heads=2, kv_heads=1, head_dim=2, vocab=10), 1,
    ...                  ["q_proj"])
    16
    """
    linears = linear_shapes(shape)
    unknown = sorted(set(targets) - set(linears))
    if unknown:
        raise ValueError(f"lora target_modules: {unknown} are not linears of a decoder layer ({', '.join(linears)})")
    return shape.layers * sum(r * sum(linears[t]) for t in targets)


class MemorySettings(BaseModel):
    """What sets the memory of one training step on one GPU."""

    model_config = ConfigDict(extra="forbid")

    prompt_len: int = Field(1024, ge=1, description="P: prompt tokens")
    gen_len: int = Field(8192, ge=1, description="L: generated tokens")
    block_size: int = Field(4, ge=1)
    rounds: int | None = Field(
        None, ge=1, description="R: denoising rounds per block, the packed layout's noisy copies (None: block_size)"
    )
    copies_per_forward: int | None = Field(None, ge=1, description="c: copies per forward (None: R)")
    micro_batch_size: int = Field(1, ge=1, description="responses per forward")
    responses_per_update: int = Field(128, ge=1, description="responses of one optimizer update, all GPUs")
    gpus: int = Field(1, ge=1)
    zero: Literal[0, 1, 2, 3] = Field(
        0, description="0: data parallel; 1/2/3: optimizer / + gradients / + weights sharded (3 = ZeRO-3 or FSDP2)"
    )
    lora_r: int | None = Field(None, ge=1, description="LoRA rank; None = full fine-tuning")
    lora_targets: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    checkpointing: bool = False
    precision: Literal["bf16", "fp32"] = Field("bf16", description="bf16: autocast (CUDA default); fp32: CPU")
    attention: Literal["flex", "sdpa"] = Field("flex", description="sdpa keeps a dense S x S mask per row")
    reference: bool = Field(False, description="a KL term (beta > 0) without LoRA: a second, frozen copy")
    value_head: bool = Field(False, description="TraceRL's value model (value.py): a hidden-wide head, replicated")

    @property
    def r(self) -> int:
        return self.rounds or self.block_size

    @property
    def c(self) -> int:
        return min(self.copies_per_forward or self.r, self.r)


class MemoryPlan(BaseModel):
    """Bytes per GPU of each part, and the step's estimated peak."""

    weights: int
    gradients: int
    optimizer: int
    activations: int = Field(description="what the forward keeps for the backward (layers, mask, LM head)")
    transient: int = Field(
        description="the largest short-lived buffer on top (log-softmax backward, a recomputed layer)"
    )
    peak: int
    forward_tokens: int
    forwards_per_update: int

    def rows(self) -> list[tuple[str, float]]:
        """(part, GiB) rows for printing."""
        parts = ("weights", "gradients", "optimizer", "activations", "transient", "peak")
        return [(p, getattr(self, p) / GIB) for p in parts]


def forward_tokens(prompt_len: int, gen_len: int, copies: int) -> int:
    """Tokens of one packed forward: the clean sequence and `copies` noisy copies of the response.

    >>> forward_tokens(1024, 8192, 4)
    41984
    """
    return prompt_len + gen_len * (1 + copies)


def layer_elements(shape: ModelShape) -> int:
    """Elements per token one decoder layer keeps for its backward (no checkpointing).

    4 h: the residual stream and the normalised input of each of the two RMSNorms; 8 q: queries before and after
    q_norm, rotate_half, after RoPE, keys and values repeated to the query heads, the attention output and its
    reshaped copy; 5 kv: keys before and after k_norm, rotate_half, after RoPE, values; 4 I: gate, silu(gate), up
    and their product.
    """
    return 4 * shape.hidden + 8 * shape.q_width + 5 * shape.kv_width + 4 * shape.intermediate


def frozen_norm_elements(shape: ModelShape) -> int:
    """Elements per token and layer a frozen base does not keep: the four RMSNorms' normalised outputs (2 h, q and
    kv), which only their weights' gradients need (LoRA trains none of them)."""
    return 2 * shape.hidden + shape.q_width + shape.kv_width


def layer_bytes(shape: ModelShape, precision: str, lora: bool = False) -> int:
    """Bytes per token one decoder layer keeps. bf16 autocast: the residual stream and norms stay fp32 (4 h), the
    matmul inputs get a bf16 copy (2 h), q/k norms upcast to fp32 (q + kv extra), the rest is bf16. Under LoRA the
    frozen norms keep less (`frozen_norm_elements`, at fp32)."""
    saved = FP32 * frozen_norm_elements(shape) if lora else 0
    if precision == "fp32":
        return FP32 * layer_elements(shape) - saved
    h, q, kv, i = shape.hidden, shape.q_width, shape.kv_width, shape.intermediate
    return FP32 * (4 * h + q + kv) + BF16 * (2 * h + 8 * q + 5 * kv + 4 * i) - saved


def activation_bytes(shape: ModelShape, s: MemorySettings) -> tuple[int, int]:
    """(kept, transient) bytes of the largest forward of one micro-batch.

    kept: every layer's saved tensors (checkpointing: only each layer's fp32 input), the final norm, the attention
    mask (sdpa: dense S x S fp32), the hidden states at the targets and the fp32 log-softmax over the vocabulary at
    each target (T = L c / R targets in a forward of c of the R copies). transient: the log-softmax backward's two
    T x V buffers, or with checkpointing the recomputed layer, whichever is larger.
    """
    n = s.micro_batch_size
    tokens = forward_tokens(s.prompt_len, s.gen_len, s.c)
    targets = math.ceil(s.gen_len * s.c / s.r)
    per_layer = layer_bytes(shape, s.precision, lora=s.lora_r is not None) * tokens
    layers = shape.layers * (FP32 * shape.hidden * tokens if s.checkpointing else per_layer)
    mask = FP32 * tokens * tokens if s.attention == "sdpa" else 0
    head = FP32 * (2 * shape.hidden * tokens + shape.hidden * targets + shape.vocab * targets)
    logits_backward = 2 * FP32 * shape.vocab * targets
    transient = max(logits_backward, per_layer) if s.checkpointing else logits_backward
    return n * (layers + mask + head), n * transient


def plan(shape: ModelShape, s: MemorySettings) -> MemoryPlan:
    """Peak bytes per GPU: weights + optimizer + max(gradients, accumulated gradients + activations + transient).

    Gradients accumulate over an update's forwards: when it has more than one (copies_per_forward < R, or more
    than one micro-batch per GPU), the whole gradient is live during every later forward; with one forward only
    the LM head's (computed first in the backward) is. ZeRO stage z shards the optimizer (z >= 1), the gradients
    (z >= 2) and the weights (z = 3) over the GPUs.
    """
    if s.lora_r is not None and s.zero > 0:
        raise ValueError(
            f"zero: {s.zero} with lora_r: the trainer trains LoRA with plain data parallel only (zero=0); its "
            "optimizer state is small"
        )
    total = param_count(shape)
    trainable = total if s.lora_r is None else lora_param_count(shape, s.lora_r, s.lora_targets)
    g = s.gpus
    weights = FP32 * (total + (trainable if s.lora_r is not None else 0))
    weights = weights // (g if s.zero == 3 else 1)
    if s.reference and s.lora_r is None:
        weights += FP32 * total  # the frozen reference is not sharded by the trainer
    grads = FP32 * trainable // (g if s.zero >= 2 else 1)
    optim = ADAM_STATES * FP32 * trainable // (g if s.zero >= 1 else 1)
    if s.value_head:  # its weight, gradient and Adam state on every GPU (hidden floats each: not worth sharding)
        head = FP32 * shape.hidden
        weights, grads, optim = weights + head, grads + head, optim + ADAM_STATES * head
    kept, transient = activation_bytes(shape, s)
    micro = math.ceil(math.ceil(s.responses_per_update / g) / s.micro_batch_size)
    forwards = micro * math.ceil(s.r / s.c)
    head_grad = 0 if s.lora_r is not None else FP32 * shape.vocab * shape.hidden // (g if s.zero >= 2 else 1)
    live_grads = grads if forwards > 1 else head_grad
    peak = weights + optim + max(grads, live_grads + kept + transient)
    return MemoryPlan(weights=weights, gradients=grads, optimizer=optim, activations=kept, transient=transient,
                      peak=peak, forward_tokens=forward_tokens(s.prompt_len, s.gen_len, s.c),
                      forwards_per_update=forwards)  # fmt: skip


def candidate_settings(s: MemorySettings) -> list[MemorySettings]:
    """The settings `plan-memory` tries for "what fits": full fine-tuning under ZeRO 0 to 3 and LoRA (data parallel,
    as the trainer runs it; the asked-for rank, or 16), each with checkpointing on/off and every c from R down to 1."""
    r = s.lora_r or 16
    out = []
    for zero in (0, 1, 2, 3):
        for lora in (None, r) if zero == 0 else (None,):
            for ckpt in (False, True):
                for c in range(s.r, 0, -1):
                    out.append(s.model_copy(update={"zero": zero, "lora_r": lora, "checkpointing": ckpt,
                                                    "copies_per_forward": c}))  # fmt: skip
    return out


def fitting(shape: ModelShape, s: MemorySettings, budget_bytes: int) -> list[tuple[MemorySettings, MemoryPlan]]:
    """The candidate settings whose peak fits `budget_bytes`, cheapest compute first: no checkpointing before
    checkpointing, larger c (fewer forwards) before smaller, full fine-tuning before LoRA, lower ZeRO stage first."""
    found = [(c, plan(shape, c)) for c in candidate_settings(s)]
    ok = [(c, p) for c, p in found if p.peak <= budget_bytes]
    return sorted(ok, key=lambda cp: (cp[0].checkpointing, -cp[0].c, cp[0].lora_r is not None, cp[0].zero))


RUN_CONFIG_NAMES = {
    "max_new_tokens": "gen_len",
    "rollout.max_new_tokens": "gen_len",
    "denoising_steps": "rounds",
    "rollout.denoising_steps": "rounds",
    "gradient_checkpointing": "checkpointing",
    "mixed_precision": "precision",
    "lora.r": "lora_r",
    "lora.target_modules": "lora_targets",
    "num_processes": "gpus",
    "zero_stage": "zero",
    "prompts_per_step": "responses_per_update",
    "group_size": "responses_per_update",
}
"""The run config's (and accelerate's) names that the planner spells otherwise: named in the error of a wrong key."""


def planner_name(key: str) -> str | None:
    """The planner's name for a run-config key (`max_new_tokens` -> `gen_len`), or None.

    >>> planner_name("rollout.max_new_tokens"), planner_name("gen_len")
    ('gen_len', None)
    """
    return RUN_CONFIG_NAMES.get(key)


def accelerate_layout(cfg: dict) -> dict:
    """`gpus` and `zero` of an accelerate config file's dict: processes over all machines; the DeepSpeed ZeRO stage,
    3 for FSDP (full sharding), 0 for plain data parallel.

    >>> accelerate_layout({"distributed_type": "DEEPSPEED", "num_processes": 8, "deepspeed_config": {"zero_stage": 3}})
    {'gpus': 8, 'zero': 3}
    """
    kind = str(cfg.get("distributed_type", "NO")).upper()
    zero = int((cfg.get("deepspeed_config") or {}).get("zero_stage", 0)) if kind == "DEEPSPEED" else 0
    if kind == "FSDP":
        zero = 3
    return {"gpus": int(cfg.get("num_processes", 1)), "zero": zero}


def settings_from_run(run, accelerate: dict | None = None) -> dict:
    """MemorySettings fields of the run an RL config (`RLConfig`) launches, with its accelerate config's layout.

    One optimizer update trains prompts_per_step x group_size / updates_per_step responses; the planner plans the
    GPU precision (mixed_precision auto -> bf16, attention auto -> flex). The prompt length is not in the run config
    (it is the data's): the planner's default unless given as prompt_len=.
    """
    r = run.rollout
    out = {
        "gen_len": r.max_new_tokens,
        "rounds": r.denoising_steps,
        "copies_per_forward": run.copies_per_forward,
        "micro_batch_size": run.micro_batch_size,
        "responses_per_update": math.ceil(run.prompts_per_step * r.group_size / run.updates_per_step),
        "checkpointing": run.gradient_checkpointing,
        "precision": "fp32" if run.mixed_precision == "no" else "bf16",
        "attention": "sdpa" if run.attention == "sdpa" else "flex",
        "reference": run.loss.beta > 0 and run.lora is None,
        "lora_r": run.lora.r if run.lora is not None else None,
        "value_head": getattr(run, "value", None) is not None,
    }
    if run.lora is not None:
        out["lora_targets"] = list(run.lora.target_modules)
    return out | (accelerate_layout(accelerate) if accelerate else {})
