"""Column mapping for code datasets: rows become `{question, ground_truth_answer}` with the answer a `CodeTests`
JSON object (shared/contracts/code_tests.py), so code data travels through the same data layer, tasks and reward items as
maths, and the reward service's `code` reward reads the tests back from the reference.

Formats (`code_format`):

* `humaneval` (openai_humaneval): `prompt`, `test` (a `check(candidate)` function), `entry_point`;
* `mbpp` (mbpp / mbpp sanitized): `text` or `prompt`, `test_list`, optional `test_setup_code` (and
  `challenge_test_list`, added to the asserts);
* `livecodebench` (code_generation_lite): `question_content`, `public_test_cases` and `private_test_cases` as JSON
  lists of `{input, output, testtype}` (only `stdin` tests; the hub's compressed private cases, a pickled blob, are
  not read: nothing here unpickles data);
* `trace` (the format of the TraceRL / GTPO repositories' code sets, Gen-Verse/PrimeIntellect, LiveCodeBench, MBPP,
  HumanEval): `question`, `test_method` (`function` | `stdio`), `test_list` and optional `prefix`, or
  `test_input` / `test_output`;
* `primeintellect` (PrimeIntellect verifiable coding problems / SYNTHETIC-1): `prompt`, `verification_info` (a JSON
  object, or its text) with `test_cases: [{input, output, type: stdin_stdout}]`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import ValidationError

from shared.contracts.code_tests import CodeTests, StdioCase
from shared.contracts.wire import ScoreItem

REFERENCE_CHARS = next(m.max_length for m in ScoreItem.model_fields["reference"].metadata if hasattr(m, "max_length"))
"""The contract's cap on a reference (`ScoreItem.reference`): a row whose tests are longer cannot be scored."""
CodeFormat = Literal["humaneval", "mbpp", "livecodebench", "trace", "primeintellect"]


class CodeDataError(ValueError):
    """A code row cannot be turned into tests; the message names the source, the row and the column."""


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _humaneval(row: Mapping[str, Any]) -> tuple[str, CodeTests]:
    tests = CodeTests(prompt=row["prompt"], test=row["test"], entry_point=row["entry_point"])
    return row["prompt"], tests


def _mbpp(row: Mapping[str, Any]) -> tuple[str, CodeTests]:
    asserts = [*row["test_list"], *(row.get("challenge_test_list") or [])]
    question = row.get("text") or row["prompt"]
    # MBPP's prompt shows the first test, so that the model knows the function's name and signature
    return f"{question}\nYour code should pass this test:\n{asserts[0]}", CodeTests(
        asserts=asserts, setup=row.get("test_setup_code") or ""
    )


def _livecodebench(row: Mapping[str, Any]) -> tuple[str, CodeTests]:
    cases = [*_json(row.get("public_test_cases") or "[]")]
    private = row.get("private_test_cases")
    if isinstance(private, str) and private.lstrip().startswith("["):
        cases += json.loads(private)
    if any(c.get("testtype", "stdin") != "stdin" for c in cases):
        raise ValueError("only stdin tests are supported (this row has functional tests)")
    return row["question_content"], CodeTests(cases=[StdioCase(input=c["input"], output=c["output"]) for c in cases])


def _trace(row: Mapping[str, Any]) -> tuple[str, CodeTests]:
    if row["test_method"] == "stdio":
        pairs = zip(row["test_input"], row["test_output"], strict=True)
        return row["question"], CodeTests(cases=[StdioCase(input=i, output=o) for i, o in pairs])
    if row["test_method"] != "function":
        raise ValueError(f"test_method: function or stdio, got {row['test_method']!r}")
    return row["question"], CodeTests(asserts=list(row["test_list"]), prompt=row.get("prefix") or "")


def _primeintellect(row: Mapping[str, Any]) -> tuple[str, CodeTests]:
    info = _json(row["verification_info"])
    cases = info["test_cases"]
    if any(c.get("type", "stdin_stdout") != "stdin_stdout" for c in cases):
        raise ValueError("only stdin_stdout test cases are supported")
    return row["prompt"], CodeTests(cases=[StdioCase(input=c["input"], output=c["output"]) for c in cases])


FORMATS: dict[str, Callable[[Mapping[str, Any]], tuple[str, CodeTests]]] = {
    "humaneval": _humaneval,
    "mbpp": _mbpp,
    "livecodebench": _livecodebench,
    "trace": _trace,
    "primeintellect": _primeintellect,
}


def code_rows(rows: list[Mapping[str, Any]], source: str, code_format: CodeFormat) -> list[dict[str, str]]:
    """`{question, ground_truth_answer}` rows whose answer is the row's tests as a `CodeTests` JSON object.

    Raises:
        CodeDataError: an unknown format, or a row (1-based) missing a column or with tests that cannot be read.
    """
    if code_format not in FORMATS:
        raise CodeDataError(f"code_format: one of {', '.join(FORMATS)}, got {code_format!r}")
    out = []
    for i, row in enumerate(rows, start=1):
        try:
            question, tests = FORMATS[code_format](row)
        except KeyError as e:
            have = ", ".join(map(str, row))
            raise CodeDataError(f"data: {source} row {i}: no column {e} ({code_format}); the row has {have}") from None
        except (ValueError, TypeError, ValidationError) as e:
            raise CodeDataError(f"data: {source} row {i}: unusable tests ({code_format}): {e}"[:500]) from None
        answer = tests.dumps()
        if len(answer) > REFERENCE_CHARS:  # caught here, by row, not as a dead letter in the middle of a run
            raise CodeDataError(f"data: {source} row {i}: its tests take {len(answer)} characters, over the "
                                f"{REFERENCE_CHARS} a reward item's reference may hold; drop the row")  # fmt: skip
        out.append({"question": str(question), "ground_truth_answer": answer})
    if not out:
        raise CodeDataError(f"data: {source}: no rows")
    return out
