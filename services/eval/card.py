"""Eval cards: one JSON per evaluated decoding, holding everything needed to trust or redo its numbers.

A card records every setting (protocol, decoding, k, sampling parameters, prompt template), the engine and its
version, the model's weight hash, the data's hash, the seeds, every question's per-sample results and the metrics
with their 95% bootstrap intervals. `compare_cards` puts two cards side by side: per metric the difference with its
paired interval, and a refusal when anything but the model differs (different settings make the difference
meaningless, which is how published numbers stop reproducing).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.eval.metrics import bootstrap_ci, mean, paired_bootstrap_ci

CARD_VERSION = 1

PER_QUESTION_METRICS = ("avg_at_k", "pass_at_k", "boxed_rate", "mean_length", "tokens_per_step", "truncation_rate")
"""Metrics that are a mean over questions of a per-question value, so they get (paired) bootstrap intervals."""
ACCURACIES = ("avg_at_k", "pass_at_k")


class SampleResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = Field(description="the sample's generator seed (reproduces it with n=1)")
    correct: bool
    boxed: bool = Field(description="the response has a non-empty final \\boxed{}")
    length: int = Field(description="response tokens")
    steps: int = Field(description="denoising forwards that produced them")
    finish_reason: Literal["stop", "length"]
    tokens_sha256: str = Field(description="hash of the response token ids: engines agree iff these are equal")
    text: str = Field("", description="the response (cut to 2,000 characters)")


class QuestionResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int
    question_sha256: str
    samples: list[SampleResult]

    def value(self, metric: str) -> float:
        """This question's contribution to a per-question metric."""
        s = self.samples
        if metric == "avg_at_k":
            return mean([float(x.correct) for x in s])
        if metric == "pass_at_k":
            return float(any(x.correct for x in s))
        if metric == "boxed_rate":
            return mean([float(x.boxed) for x in s])
        if metric == "mean_length":
            return mean([float(x.length) for x in s])
        if metric == "tokens_per_step":
            return mean([x.length / max(1, x.steps) for x in s])
        if metric == "truncation_rate":
            return mean([float(x.finish_reason == "length") for x in s])
        raise KeyError(metric)


class EvalCard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    card_version: int = CARD_VERSION
    protocol: str
    decoding: str
    settings: dict[str, Any] = Field(description="k, seed, sampling params, template, chat, answer columns")
    engine: dict[str, Any] = Field(description="name, gtpo / torch / transformers versions, device")
    model: dict[str, Any] = Field(description="path and weight_sha256")
    data: dict[str, Any] = Field(description="source, file sha256 (when a file), rows_sha256, questions")
    questions: list[QuestionResult]
    metrics: dict[str, float | None]
    intervals: dict[str, list[float]] = Field(description="metric -> [low, high], 95% bootstrap over questions")
    timing: dict[str, float | int | None] = Field(default_factory=dict, description="seconds, tokens, forwards")
    created: str = ""

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=1))

    @classmethod
    def read(cls, path: Path) -> EvalCard:
        """Raises ValueError naming the file when it is not a card."""
        try:
            return cls.model_validate_json(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not an eval card ({type(e).__name__}: {str(e)[:300]})") from None


def per_question_metrics(questions: list[QuestionResult]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Each per-question metric's mean and its 95% bootstrap interval over questions."""
    metrics, intervals = {}, {}
    for m in PER_QUESTION_METRICS:
        values = [q.value(m) for q in questions]
        metrics[m] = mean(values)
        intervals[m] = list(bootstrap_ci(values))
    return metrics, intervals


# --------------------------------------------------------------------------- hashes


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def sha256_tokens(ids: list[int]) -> str:
    return sha256_text(",".join(map(str, ids)))


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_sha256(model_dir: Path) -> str | None:
    """One hash over the checkpoint's weight files (name and bytes, sorted by name); None when there are none."""
    files = sorted(p for p in Path(model_dir).glob("*") if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file())
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()


def rows_sha256(rows: list[dict]) -> str:
    """Hash of the evaluated questions and answers, in order (covers --limit and the column mapping)."""
    body = [[str(r["question"]), str(r["ground_truth_answer"])] for r in rows]
    return sha256_text(json.dumps(body, ensure_ascii=False, separators=(",", ":")))


# --------------------------------------------------------------------------- comparing two cards

COMPARED = ("card_version", "protocol", "decoding", "settings", "engine", "data")
"""Everything that must match for a difference to be the model's: all but `model` (and the results)."""
NOT_COMPARED = ("data.source", "engine.url")
"""Where the same data or service was reached from: the hashes and the engine's versions say what it was."""


def setting_differences(a: EvalCard, b: EvalCard) -> list[str]:
    """Dotted names of the settings in which the cards differ (the model, results and timing excluded)."""
    out: list[str] = []
    for key in COMPARED:
        _diff(getattr(a, key), getattr(b, key), key, out)
    return out


def _diff(x: Any, y: Any, name: str, out: list[str]) -> None:
    if isinstance(x, dict) and isinstance(y, dict):
        for k in sorted(set(x) | set(y)):
            _diff(x.get(k), y.get(k), f"{name}.{k}", out)
    elif x != y and name not in NOT_COMPARED:
        out.append(f"{name} ({x!r} vs {y!r})"[:300])


class Comparison(BaseModel):
    metric: str
    a: float | None
    b: float | None
    difference: float | None
    low: float | None = None
    high: float | None = None


def compare_cards(a: EvalCard, b: EvalCard) -> list[Comparison]:
    """Per metric, b - a; per-question metrics with a paired bootstrap interval over the shared questions.

    Raises:
        ValueError: the cards do not hold the same questions in the same order (no pairing possible).
    """
    qa, qb = [q.question_sha256 for q in a.questions], [q.question_sha256 for q in b.questions]
    if qa != qb:
        raise ValueError("compare: the cards do not hold the same questions in the same order")
    rows = []
    for m in PER_QUESTION_METRICS:
        d, low, high = paired_bootstrap_ci([q.value(m) for q in a.questions], [q.value(m) for q in b.questions])
        rows.append(Comparison(metric=m, a=a.metrics.get(m), b=b.metrics.get(m), difference=d, low=low, high=high))
    for m in sorted((set(a.metrics) | set(b.metrics)) - set(PER_QUESTION_METRICS)):
        x, y = a.metrics.get(m), b.metrics.get(m)
        rows.append(Comparison(metric=m, a=x, b=y, difference=None if x is None or y is None else y - x))
    return rows


class Parity(BaseModel):
    """Two engines on the same questions and seeds: which samples came out token for token the same."""

    samples: int
    identical_samples: int
    questions: int
    identical_questions: int = Field(description="questions whose every sample is identical")
    correctness_agrees: int = Field(description="questions with the same number of correct samples")
    per_question: list[float] = Field(description="per question, the fraction of its samples that are identical")


def parity(a: EvalCard, b: EvalCard) -> Parity:
    """Per-question agreement of two cards of the same questions (raises ValueError otherwise)."""
    if [q.question_sha256 for q in a.questions] != [q.question_sha256 for q in b.questions]:
        raise ValueError("parity: the cards do not hold the same questions in the same order")
    per_q, same, total, agree = [], 0, 0, 0
    for qa, qb in zip(a.questions, b.questions, strict=True):
        eq = [x.tokens_sha256 == y.tokens_sha256 for x, y in zip(qa.samples, qb.samples, strict=True)]
        per_q.append(mean([float(e) for e in eq]))
        same, total = same + sum(eq), total + len(eq)
        agree += sum(x.correct for x in qa.samples) == sum(y.correct for y in qb.samples)
    return Parity(samples=total, identical_samples=same, questions=len(per_q),
                  identical_questions=sum(v == 1.0 for v in per_q), correctness_agrees=agree,
                  per_question=per_q)  # fmt: skip
