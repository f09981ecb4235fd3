"""A synthetic arithmetic word-problem task with `\\boxed{}` answers, in the RL datasets' JSON format.

Rows are `{"question", "ground_truth_answer"}` like MATH500 / GSM8K in the GTPO and TraceRL repositories; SFT rows
add `response` (the boxed answer). Train and held-out splits never share a question, and everything is a pure
function of the seed. Two ways to hold out (`TaskSpec.split`):

* "questions": held-out questions are texts never seen in training (another wording, name or object around the
  numbers), while the arithmetic facts themselves occur in training, as in any grade-school test set;
* "pairs": held-out questions use operand pairs that never occur in training, so the model must have learned
  the operation itself, not a table of facts (a tiny model trained for minutes does not).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# short on purpose: the tiny model reads every byte, and the demo has minutes, not hours
TEMPLATES = {
    "+": ["{n} has {a} {t}, gets {b} more. Total?", "{a} {t}, then {b} more come. How many?",
          "{n} had {a} {t} and found {b}. How many now?"],
    "-": ["{n} has {a} {t}, loses {b}. Left?", "{a} {t}, {b} go away. How many stay?"],
    "*": ["{a} boxes of {b} {t}. How many {t}?"],
}  # fmt: skip
NAMES = ("Ann", "Bob", "Cy", "Dee", "Eve", "Flo")
THINGS = ("pens", "cups", "eggs", "hats", "cats")


class TaskError(ValueError):
    """The task cannot be built as specified; the message starts with the field to change."""


@dataclass(frozen=True)
class TaskSpec:
    """Difficulty knobs."""

    max_operand: int = 40
    ops: str = "+-"
    seed: int = 0
    max_second: int | None = None
    """Second operand in 1..max_second (None: 0..max_operand, like the first); small = "a few more" problems."""
    split: Literal["questions", "pairs"] = "questions"
    """What the held-out split withholds: question texts, or whole operand pairs (see the module docstring)."""
    boxed_rate: float = 1.0
    """Share of SFT answers written as `\\boxed{N}`; the rest are the bare number, as in mixed-format corpora.
    The accuracy reward only accepts boxed answers, so RL has a format to learn as well as arithmetic."""


def _answer(a: int, b: int, op: str) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _pairs(spec: TaskSpec) -> list[tuple[int, int, str]]:
    out = []
    for op in spec.ops:
        if op not in TEMPLATES:
            raise TaskError(f"ops: unknown operation {op!r}; allowed: {''.join(TEMPLATES)}")
        top = min(spec.max_operand, 12) if op == "*" else spec.max_operand
        seconds = range(1, spec.max_second + 1) if spec.max_second is not None else range(top + 1)
        for a in range(top + 1):
            for b in seconds:
                if op != "-" or a >= b:  # no negative answers
                    out.append((a, b, op))
    return out


def _question(rng: random.Random, a: int, b: int, op: str) -> dict:
    q = rng.choice(TEMPLATES[op]).format(a=a, b=b, n=rng.choice(NAMES), t=rng.choice(THINGS))
    return {"question": q, "ground_truth_answer": str(_answer(a, b, op))}


def make_splits(spec: TaskSpec, n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows): `n_train` rows drawn with repetition, `n_test` distinct held-out questions
    (at most a fifth of the operand pairs with split="pairs"); no held-out question text occurs in train."""
    if spec.split not in ("questions", "pairs"):
        raise TaskError(f"split: {spec.split!r} is not 'questions' or 'pairs'")
    rng = random.Random(spec.seed)
    pairs = _pairs(spec)
    rng.shuffle(pairs)
    if spec.split == "pairs":
        n_test = min(n_test, len(pairs) // 5)
        test = [_question(rng, *p) for p in pairs[:n_test]]
        train_pairs = pairs[n_test:]
    else:
        found: dict[str, dict] = {}  # distinct texts, in the order drawn
        for _ in range(50 * n_test):  # stops early when the space of texts is small
            if len(found) == n_test:
                break
            row = _question(rng, *pairs[rng.randrange(len(pairs))])
            found.setdefault(row["question"], row)
        test = list(found.values())
        train_pairs = pairs
    held = {r["question"] for r in test}
    train: list[dict] = []
    for _ in range(100 * n_train + 1000):  # bounded: the held-out split may have taken every text
        if len(train) == n_train:
            return train, test
        row = _question(rng, *train_pairs[rng.randrange(len(train_pairs))])
        if row["question"] not in held:
            train.append(row)
    raise TaskError(f"n_test: {len(test)} held-out questions leave (almost) no question text for training; "
                     "lower n_test or widen the task (max_operand, ops)")  # fmt: skip


def sft_row(row: dict, boxed: bool = True) -> dict:
    """The SFT example of a task row: the question, answered with the boxed number (or the bare number)."""
    answer = row["ground_truth_answer"]
    return {"prompt": row["question"], "response": f"\\boxed{{{answer}}}" if boxed else answer}


def write_task(out: str | Path, spec: TaskSpec, n_train: int = 4000, n_test: int = 200) -> dict[str, Path]:
    """Write train.json, test.json (RL / eval format) and sft.jsonl; returns their paths."""
    train, test = make_splits(spec, n_train, n_test)
    return write_splits(out, train, test, sft_row, spec.seed, spec.boxed_rate)


def write_splits(out: str | Path, train: list[dict], test: list[dict], sft_row, seed: int, rate: float,
                 keys: tuple[str, ...] | None = None) -> dict[str, Path]:  # fmt: skip
    """Write train.json and test.json (their `keys`, or whole rows) and sft.jsonl: each train row as
    `sft_row(row, formatted)`, formatted with probability `rate` (a draw seeded by `seed + 1`); returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.json", "test": out / "test.json", "sft": out / "sft.jsonl"}
    pick = (lambda rows: rows) if keys is None else (lambda rows: [{k: r[k] for k in keys} for r in rows])
    paths["train"].write_text(json.dumps(pick(train), indent=0))
    paths["test"].write_text(json.dumps(pick(test), indent=0))
    rng = random.Random(seed + 1)
    paths["sft"].write_text("".join(json.dumps(sft_row(r, rng.random() < rate)) + "\n" for r in train))
    return paths
