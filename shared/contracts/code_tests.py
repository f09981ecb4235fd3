"""What a code item is tested with, as it travels in a task's `reference` (a JSON object), and program extraction.

Both ends use this one model: the data layer writes it into `Task.reference` / `ScoreItem.reference`, the reward
service's `code` reward reads it back. Two test forms:

* **function tests** (HumanEval / MBPP): `asserts` (each one a test, MBPP's `test_list`) and/or `test` (one test:
  HumanEval's `check(candidate)` body, called as `check(<entry_point>)`), run after the program in one process;
* **stdin/stdout cases** (LiveCodeBench, competitive programming): each case runs the program on `input` and its
  output must equal `output` (trailing whitespace of each line and trailing blank lines ignored).
"""

from __future__ import annotations

import json
import re

from pydantic import BaseModel, ConfigDict, Field, model_validator

CODE_MARK = "gtpo.code/1"
"""The `kind` of a code reference, so that a reward can tell one from a maths answer."""

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


class StdioCase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str = Field("", max_length=1_000_000)
    output: str = Field(max_length=1_000_000)


class CodeTests(BaseModel):
    """How one code item is checked. `prompt` is code placed before the program when the program does not define
    `entry_point` itself (HumanEval: the signature and docstring it completes); `setup` runs before the program, in
    its namespace (MBPP's `test_setup_code`)."""

    model_config = ConfigDict(extra="forbid")

    kind: str = CODE_MARK
    prompt: str = ""
    entry_point: str | None = None
    setup: str = ""
    asserts: list[str] = Field(default_factory=list, max_length=1000)
    test: str = ""
    cases: list[StdioCase] = Field(default_factory=list, max_length=1000)

    @model_validator(mode="after")
    def _one_form(self) -> CodeTests:
        if self.kind != CODE_MARK:
            raise ValueError(f"kind: must be {CODE_MARK!r}")
        functions = bool(self.asserts or self.test)
        if functions == bool(self.cases):
            raise ValueError("give function tests (asserts / test) or stdin/stdout cases, exactly one of the two")
        if self.test and not self.entry_point:
            raise ValueError("test: a check(candidate) test needs entry_point")
        return self

    @property
    def units(self) -> int:
        """How many tests the fraction passed is out of."""
        return len(self.cases) or len(self.asserts) + bool(self.test)

    def dumps(self) -> str:
        return self.model_dump_json(exclude_defaults=False)


def is_code_reference(reference: str | None) -> bool:
    """Cheap test: the reference is a code-tests object (a JSON object naming `CODE_MARK`)."""
    return reference is not None and reference.lstrip().startswith("{") and CODE_MARK in reference[:4096]


def load_tests(reference: str) -> CodeTests:
    """Raises ValueError (pydantic's included) when `reference` is not a valid code-tests object."""
    return CodeTests.model_validate(json.loads(reference))


def extract_program(response: str, block: str = "last") -> str | None:
    """The program in a response: its last (or first) fenced code block, preferring python-tagged blocks.

    `block`: `last`, `first`, or `all` (every python block joined). A response without any fence is None (no program),
    and an unclosed final fence counts up to the end of the response (a truncated answer).

    >>> extract_program("try:\\n```python\\nx = 1\\n```\\nor\\n```py\\nx = 2\\n```")
    'x = 2\\n'
    >>> extract_program("no code") is None
    True
    """
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(response)]
    if not blocks:
        return None
    python = [code for lang, code in blocks if lang in ("python", "py", "python3")]
    chosen = python or [code for _, code in blocks]
    if block == "first":
        return chosen[0]
    if block == "all":
        return "\n".join(chosen)
    if block == "last":
        return chosen[-1]
    raise ValueError(f"block: last, first or all, got {block!r}")


def outputs_match(got: str, expected: str) -> bool:
    """Stdout equality up to trailing whitespace on each line and trailing blank lines.

    >>> outputs_match("1 2 \\n3\\n\\n", "1 2\\n3"), outputs_match("12", "1 2")
    (True, False)
    """

    def norm(s: str) -> list[str]:
        lines = [line.rstrip() for line in s.replace("\r\n", "\n").split("\n")]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    return norm(got) == norm(expected)
