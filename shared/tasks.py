"""A synthetic arithmetic word-problem task with `\\boxed{}` answers, in the RL datasets' JSON format.

Rows are `{"question", "ground_truth_answer"}` like MATH500 / GSM8K in the GTPO and TraceRL repositories; SFT rows
add `response` (the boxed answer). Train and held-out splits never share a question (the held-out split is drawn
from a disjoint set of operand pairs), and everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

# short on purpose: the tiny model reads every byte, and the demo has minutes, not hours
TEMPLATES = {
    "+": ["Ann has {a} apples, gets {b} more. Total?", "{a} birds, then {b} more come. How many?"],
    "-": ["Ann has {a} apples, eats {b}. Left?", "{a} people, {b} leave. How many stay?"],
    "*": ["{a} boxes of {b} pens. How many pens?"],
}


@dataclass(frozen=True)
class TaskSpec:
    """Difficulty knobs."""

    max_operand: int = 40
    ops: str = "+-"
    seed: int = 0
    max_second: int | None = None
    """Second operand in 1..max_second (None: 0..max_operand, like the first); small = "a few more" problems."""
    boxed_rate: float = 1.0
    """Share of SFT answers written as `\\boxed{N}`; the rest are the bare number, as in mixed-format corpora.
    The accuracy reward only accepts boxed answers, so RL has a format to learn as well as arithmetic."""


def _answer(a: int, b: int, op: str) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _pairs(spec: TaskSpec) -> list[tuple[int, int, str]]:
    out = []
    for op in spec.ops:
        if op not in TEMPLATES:
            raise ValueError(f"ops: unknown operation {op!r}; allowed: {''.join(TEMPLATES)}")
        top = min(spec.max_operand, 12) if op == "*" else spec.max_operand
        seconds = range(1, spec.max_second + 1) if spec.max_second is not None else range(top + 1)
        for a in range(top + 1):
            for b in seconds:
                if op != "-" or a >= b:  # no negative answers
                    out.append((a, b, op))
    return out


def make_splits(spec: TaskSpec, n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows); held-out operand triples never occur in train."""
    rng = random.Random(spec.seed)
    pairs = _pairs(spec)
    rng.shuffle(pairs)
    n_test = min(n_test, len(pairs) // 5)
    test_pairs, train_pairs = pairs[:n_test], pairs[n_test:]

    def row(a: int, b: int, op: str) -> dict:
        q = rng.choice(TEMPLATES[op]).format(a=a, b=b)
        return {"question": q, "ground_truth_answer": str(_answer(a, b, op))}

    train = [row(*train_pairs[rng.randrange(len(train_pairs))]) for _ in range(n_train)]
    test = [row(*p) for p in test_pairs]
    return train, test


def sft_row(row: dict, boxed: bool = True) -> dict:
    """The SFT example of a task row: the question, answered with the boxed number (or the bare number)."""
    answer = row["ground_truth_answer"]
    return {"prompt": row["question"], "response": f"\\boxed{{{answer}}}" if boxed else answer}


def write_task(out: str | Path, spec: TaskSpec, n_train: int = 4000, n_test: int = 200) -> dict[str, Path]:
    """Write train.json, test.json (RL / eval format) and sft.jsonl; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = make_splits(spec, n_train, n_test)
    paths = {"train": out / "train.json", "test": out / "test.json", "sft": out / "sft.jsonl"}
    paths["train"].write_text(json.dumps(train, indent=0))
    paths["test"].write_text(json.dumps(test, indent=0))
    rng = random.Random(spec.seed + 1)
    paths["sft"].write_text("".join(json.dumps(sft_row(r, rng.random() < spec.boxed_rate)) + "\n" for r in train))
    return paths
