"""The demo's code task (`gtpo demo --task code`): tiny one-line functions over small integers, checked by asserts.

A question asks for `f` in words ("Write f: add 3 to x."); the answer is a fenced one-liner (`f=lambda x:x+3`)
and the item's tests are asserts on a few inputs (a `CodeTests` reference), so the reward service's `code`
reward scores it in the sandbox like any MBPP item. As the maths task's `boxed_rate`, `fence_rate` is the share of
SFT answers written inside a code fence; the rest are the bare line, which the reward rejects (no program found),
so RL has a format to learn as well as the functions. Train and held-out splits never share a question text, and
everything is a pure function of the seed. Rows use the RL datasets' format (`question`, `ground_truth_answer`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from shared.contracts.code_tests import CodeTests

TEMPLATES = {
    "+": ["Write f: add {a} to x.", "Write f(x) = x plus {a}.", "f returns x + {a}. Write f."],
    "-": ["Write f: take {a} from x.", "Write f(x) = x minus {a}.", "f returns x - {a}. Write f."],
    "*": ["Write f: multiply x by {a}.", "Write f(x) = x times {a}.", "f returns x * {a}. Write f."],
}
INPUTS = (0, 1, 2, 5, 7)
"""The arguments each function is tested on (one assert each: the score is the fraction right)."""


class CodeTaskError(ValueError):
    """The task cannot be built as specified; the message starts with the field to change."""


@dataclass(frozen=True)
class CodeTaskSpec:
    max_operand: int = 9
    ops: str = "+"
    seed: int = 0
    fence_rate: float = 0.65


def _apply(x: int, a: int, op: str) -> int:
    return x + a if op == "+" else x - a if op == "-" else x * a


def program(a: int, op: str) -> str:
    """The reference one-liner.

    >>> program(3, "+")
    'f=lambda x:x+3'
    """
    return f"f=lambda x:x{op}{a}"


def make_code_splits(spec: CodeTaskSpec, n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows): held-out question texts never occur in train (the functions themselves do)."""
    unknown = [op for op in spec.ops if op not in TEMPLATES]
    if unknown or not spec.ops:
        raise CodeTaskError(f"ops: unknown operation(s) {unknown}; allowed: {''.join(TEMPLATES)}")
    rng = random.Random(spec.seed)
    texts = [(a, op, t) for op in spec.ops for a in range(spec.max_operand + 1) for t in TEMPLATES[op]]
    rng.shuffle(texts)
    n_test = min(n_test, len(texts) // 4)
    if n_test < 1:
        raise CodeTaskError("max_operand: too few distinct questions to hold any out; raise it or add ops")
    held = texts[:n_test]
    test = [_fixed(a, op, t) for a, op, t in held]
    train = [_fixed(*texts[n_test + rng.randrange(len(texts) - n_test)]) for _ in range(n_train)]
    return train, test


def _fixed(a: int, op: str, template: str) -> dict:
    tests = CodeTests(asserts=[f"assert f({x}) == {_apply(x, a, op)}" for x in INPUTS])
    return {"question": template.format(a=a), "ground_truth_answer": tests.dumps(), "solution": program(a, op)}


def sft_row(task_row: dict, fenced: bool = True) -> dict:
    """The SFT example: the question answered with the one-liner, in a code fence (or bare)."""
    answer = task_row["solution"]
    return {"prompt": task_row["question"], "response": f"```\n{answer}\n```" if fenced else answer}


def write_code_task(out: str | Path, spec: CodeTaskSpec, n_train: int = 4000, n_test: int = 200) -> dict[str, Path]:
    """Write train.json, test.json (RL / eval format, tests in the reference) and sft.jsonl; returns their paths."""
    from services.demo.tasks import write_splits

    train, test = make_code_splits(spec, n_train, n_test)
    return write_splits(out, train, test, sft_row, spec.seed, spec.fence_rate, keys=("question", "ground_truth_answer"))
