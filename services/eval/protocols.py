"""Evaluation protocols by name: every decoding and sampling setting a paper's table was produced with.

`gtpo eval --protocol NAME` starts from one of these; a flag given explicitly on the command line replaces that one
setting (and the card records the result). The sources are the papers' own repositories, read into
/work/shared/reference (gtpo_tracerl.md sections 9-10, anchors_turn3.md, lmdeploy_sdar.md); docs/evaluation.md has
the same table for readers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.contracts.wire import SamplingParams, Strategy


@dataclass(frozen=True)
class Decoding:
    """One decoding a protocol reports a column for (TraDo reports static and dynamic side by side)."""

    name: str
    params: SamplingParams


@dataclass(frozen=True)
class Protocol:
    name: str
    k: int
    """Samples per question."""
    decodings: tuple[Decoding, ...]
    metrics: tuple[str, ...]
    """The headline metrics the paper reports."""
    source: str
    """Where each setting comes from."""
    notes: tuple[str, ...] = field(default_factory=tuple)
    """What gtpo cannot reproduce exactly, said out loud."""


def _p(**kw) -> SamplingParams:
    return SamplingParams(block_size=4, denoising_steps=4, top_p=1.0, **kw)


PROTOCOLS: dict[str, Protocol] = {
    "dirl": Protocol(
        name="dirl",
        k=16,
        decodings=(
            Decoding(
                "dynamic",
                _p(
                    temperature=1.0,
                    top_k=50,
                    max_new_tokens=8192,
                    strategy=Strategy.low_confidence_dynamic,
                    confidence_threshold=0.9,
                ),
            ),
        ),  # fmt: skip
        metrics=("avg_at_k", "tokens_per_step", "mean_length", "truncation_rate"),
        source="DiRL README (16 samples per task, T=1.0, 8,192 tokens) and GTPO-Trainer configs/rl.yaml `evaluation`"
        " (top_k 50, top_p 1.0, block 4, 4 denoising steps, low_confidence_dynamic 0.9); eval/eval_lmdeploy.py",
        notes=("DiRL also bans EOS for the first 128 tokens (min_new_tokens 128); gtpo has no minimum length.",),
    ),
    "sdar-greedy": Protocol(
        name="sdar-greedy",
        k=1,
        decodings=(
            Decoding(
                "static", _p(temperature=1.0, top_k=1, max_new_tokens=4096, strategy=Strategy.low_confidence_static)
            ),
        ),  # fmt: skip
        metrics=("avg_at_k", "tokens_per_step"),
        source="SDAR issue 1 ('greedy' = top-k 1 with temperature > 0); SDAR issues 10/12 (4,096 generation tokens"
        " for the chat models); block 4, 4 denoising steps (SDAR generate.py defaults)",
        notes=("top-k 1 at T=1: the argmax token, one token per denoising step (static).",),
    ),
    "trado": Protocol(
        name="trado",
        k=3,
        decodings=(
            Decoding(
                "static", _p(temperature=1.0, top_k=1, max_new_tokens=2000, strategy=Strategy.low_confidence_static)
            ),
            Decoding(
                "dynamic",
                _p(
                    temperature=1.0,
                    top_k=0,
                    max_new_tokens=2000,
                    strategy=Strategy.low_confidence_dynamic,
                    confidence_threshold=0.9,
                ),
            ),
        ),  # fmt: skip
        metrics=("avg_at_k", "tokens_per_step"),
        source="dLLM-RL eval.py and configs/rl_trado.yaml `evaluation` (3 samples per question, 2,000 tokens,"
        " top_k [0, 1] paired with [low_confidence_dynamic, low_confidence_static], threshold 0.9, block 4)",
    ),
    "lightningrl": Protocol(
        name="lightningrl",
        k=1,
        decodings=(
            Decoding(
                "greedy",
                SamplingParams(
                    block_size=32,
                    denoising_steps=32,
                    temperature=0.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=8192,
                    strategy=Strategy.low_confidence_dynamic,
                    confidence_threshold=0.9,
                ),
            ),
        ),  # fmt: skip
        metrics=("avg_at_k", "tokens_per_forward", "aup", "tokens_per_second"),
        source="LightningRL README and configs/lightningrl.yaml (greedy evaluation; SDAR-8B block 32, 32 steps per"
        " block, 8,192 tokens; reports TPF, AUP and tokens/s on one H100); AUP as d3LLM defines it",
        notes=(
            "The dynamic threshold is not stated in the notes; 0.9 (the SDAR/TraDo default) is used.",
            "A model whose block size is not 32 still decodes with 32-token blocks: override --block-size.",
        ),
    ),
}


def get_protocol(name: str) -> Protocol:
    """Raises ValueError naming the known protocols."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"--protocol: one of {', '.join(PROTOCOLS)}, got {name!r}") from None


def apply_overrides(protocol: Protocol, k: int | None, overrides: dict[str, object]) -> Protocol:
    """The protocol with the explicitly given settings replaced in every decoding (None values are not given).

    Raises:
        pydantic.ValidationError: an override the settings refuse.
    """
    given = {key: v for key, v in overrides.items() if v is not None}
    decodings = tuple(
        Decoding(d.name, SamplingParams.model_validate({**d.params.model_dump(), **given})) for d in protocol.decodings
    )
    return Protocol(protocol.name, k or protocol.k, decodings, protocol.metrics, protocol.source, protocol.notes)


def custom(k: int, params: SamplingParams) -> Protocol:
    """No named protocol: the settings given on the command line (or their defaults)."""
    return Protocol("custom", k, (Decoding("custom", params),), ("avg_at_k", "pass_at_k"), "command-line settings")


def protocol_table() -> str:
    """The protocols as a markdown table (docs/evaluation.md and the README hold this text; a test keeps them so)."""
    lines = [
        "| protocol | k | decoding | T | top-k | top-p | max tokens | block / steps | strategy (threshold) | reports |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in PROTOCOLS.values():
        for d in p.decodings:
            s = d.params
            strat = s.strategy.value + (f" ({s.confidence_threshold})" if s.strategy.value.endswith("dynamic") else "")
            lines.append(
                f"| {p.name} | {p.k} | {d.name} | {s.temperature} | {s.top_k} | {s.top_p} | {s.max_new_tokens} "
                f"| {s.block_size} / {s.denoising_steps} | {strat} | {', '.join(p.metrics)} |"
            )
    return "\n".join(lines)


def sweep(protocol: Protocol, thresholds: list[float]) -> Protocol:
    """Each decoding once per dynamic threshold (named `DECODING@T`): the accuracy-parallelism points AUP integrates.

    Raises:
        ValueError: no thresholds, or one outside [0, 1].
    """
    if not thresholds or any(not 0.0 <= t <= 1.0 for t in thresholds):
        raise ValueError(f"--aup-thresholds: comma-separated numbers in [0, 1], got {thresholds}")
    decodings = tuple(
        Decoding(f"{d.name}@{t:g}", d.params.model_copy(update={"confidence_threshold": t,
                                                               "strategy": Strategy.low_confidence_dynamic}))
        for d in protocol.decodings for t in thresholds
    )  # fmt: skip
    return Protocol(protocol.name, protocol.k, decodings, protocol.metrics, protocol.source, protocol.notes)
