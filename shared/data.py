"""Datasets for `gtpo train`, `gtpo sft` and `gtpo eval`: where the rows come from and which columns they use.

A source (the `data:` setting) is one of

* a local file: a JSON list of objects, or JSONL (one object a line);
* a local folder written by `datasets`' `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
* `hf:org/name[:config][:split]`, a dataset on the Hugging Face hub, loaded with `datasets.load_dataset`.

`datasets` is imported only for the last two (pip extra `gtpo[datasets]`); nothing is downloaded unless a `hf:`
source is named. A split left out is the caller's default (`train` for training, `test` for eval); a folder holding
several splits is read the same way (`folder:split` picks one).

Column mapping: RL and eval rows become `{question, ground_truth_answer}` from `question_field` and `answer_field`;
`answer_extract` turns a solution text into its answer (`boxed`: the last `\\boxed{}`, as the reward service reads
answers; `gsm8k`: the text after the last `####`). Every row is checked on load; a missing column is an error
naming the source, the row and the column.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

from shared.answers import extract_last_boxed

QUESTION_FIELD = "question"
"""The column of the question (RL, eval) unless `question_field` names another."""
ANSWER_FIELD = "ground_truth_answer"
"""The column of the reference answer (RL, eval) unless `answer_field` names another."""

MAX_ROW_BYTES = 4 * 1024 * 1024
"""The longest row a data file may hold (a JSONL line in bytes; a column's text in characters) unless
`max_row_bytes` says otherwise: a question this long is an error in the data, and tokenizing and decoding it would
exhaust memory long before it reported anything. A trace-SFT row of 100k tokens takes about 1.5 MB."""

HUB_PREFIX = "hf:"
HUB_PROBE_S = 5.0
"""How long the hub may take to answer at all before an `hf:` source is read from the local cache alone: an
unreachable hub then fails at once, in one line, not after the hub client's half a minute of logged retries."""
AnswerExtract = Literal["none", "boxed", "gsm8k"]


class DataError(ValueError):
    """A data source or row is unusable; the message names the source, the row (or line) and the column."""


def read_jsonl(path: str | Path, *, max_row_bytes: int = MAX_ROW_BYTES) -> list[dict[str, Any]]:
    """Rows of a JSONL file (blank lines skipped); a bad line (not JSON, not an object, longer than
    `max_row_bytes`, nested deeper than the parser goes) is an error naming it."""
    rows = []
    with Path(path).open("rb") as f:
        # a bounded readline: a line of gigabytes is refused after reading max_row_bytes of it, not all of it
        for n, line in enumerate(iter(lambda: f.readline(max_row_bytes + 2), b""), start=1):
            body = line.rstrip(b"\r\n")
            if len(body) > max_row_bytes:
                raise DataError(f"{path}:{n}: the row is over max_row_bytes={max_row_bytes} bytes{_column_at(body)}")
            if not body.strip():
                continue
            row = _parse(body, f"{path}:{n}")
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: each line must be a JSON object")
            check_row(row, f"{path}:{n}", max_row_bytes)
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


_KEY = re.compile(rb'"([^"\\]{1,200})"\s*:')


def _column_at(prefix: bytes) -> str:
    """Which column the cut of an over-long JSONL line falls in: the last key before it (a key's quotes are
    never escaped; quotes inside a value are).

    >>> _column_at(b'{"answer": "4", "question": "xxxxxxxx')
    " (in column 'question')"
    """
    keys = _KEY.findall(prefix)
    return f" (in column {keys[-1].decode('utf-8', 'backslashreplace')!r})" if keys else ""


def _parse(text: str | bytes, where: str) -> Any:
    try:
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read (lists or objects inside each other)") from None


def check_row(row: Mapping[str, Any], where: str, max_row_bytes: int = MAX_ROW_BYTES) -> None:
    """Refuse a row with a column whose text is longer than `max_row_bytes` characters, naming the column.

    >>> check_row({"question": "x" * 9}, "d.json row 3", 8)
    Traceback (most recent call last):
    ...
    shared.data.DataError: d.json row 3: column 'question' is 9 characters, over max_row_bytes=8
    """
    for column, value in row.items():
        if isinstance(value, str | bytes) and len(value) > max_row_bytes:
            raise DataError(
                f"{where}: column {column!r} is {len(value)} characters, over max_row_bytes={max_row_bytes}"
            )


def read_json_or_jsonl(path: str | Path, *, max_row_bytes: int = MAX_ROW_BYTES) -> list[dict[str, Any]]:
    """A JSON list of objects or JSONL, told apart by the first character."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(4096).lstrip()
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e})") from None
    if not head.startswith(b"["):
        return read_jsonl(path, max_row_bytes=max_row_bytes)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e})") from None
    rows = _parse(text, str(path))
    if not isinstance(rows, list):
        raise DataError(f"{path}: not a JSON list")
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path} row {i}: each entry must be a JSON object")
        check_row(row, f"{path} row {i}", max_row_bytes)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def parse_hub(source: str) -> tuple[str, str | None, str | None]:
    """`hf:org/name[:config][:split]` -> (name, config, split); empty parts are None.

    >>> parse_hub("hf:openai/gsm8k:main:test"), parse_hub("hf:org/set"), parse_hub("hf:org/set::validation")
    (('openai/gsm8k', 'main', 'test'), ('org/set', None, None), ('org/set', None, 'validation'))
    """
    parts = source[len(HUB_PREFIX) :].split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(f"data: {source!r}: expected hf:org/name[:config][:split]")
    name, config, split = (parts + [""] * 2)[:3]
    return name, config or None, split or None


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError(
            "data: hub datasets and save_to_disk folders need the datasets package; install it with "
            "`pip install 'gtpo[datasets]'` (or `pip install datasets`)"
        ) from None
    return datasets


def _pick_split(loaded, source: str, split: str | None, default_split: str):
    """One split of a DatasetDict (`split`, else `default_split`, else its only split); a Dataset as it is."""
    if not hasattr(loaded, "keys"):
        if split is not None:
            raise DataError(f"data: {source} holds one split, not several; drop ':{split}'")
        return loaded
    splits = list(loaded.keys())
    want = split or (default_split if default_split in splits else splits[0] if len(splits) == 1 else None)
    if want not in splits:
        raise DataError(f"data: {source} has splits {', '.join(splits)}: name one ({source}:{splits[0]})")
    return loaded[want]


def _hub_unreachable(endpoint: str) -> str | None:
    """Why `endpoint` gives no HTTP answer within `HUB_PROBE_S` (one try, the environment's proxy), or None when
    it answers anything at all."""
    import httpx

    try:
        httpx.head(endpoint, timeout=HUB_PROBE_S)
    except httpx.HTTPError as e:
        return str(e) or type(e).__name__
    return None


@contextmanager
def _offline(ds):
    """The hub client and `datasets` in offline mode (the local cache only) for the duration."""
    from huggingface_hub import constants as hub

    saved = hub.HF_HUB_OFFLINE, ds.config.HF_HUB_OFFLINE, ds.config.HF_DATASETS_OFFLINE
    hub.HF_HUB_OFFLINE = ds.config.HF_HUB_OFFLINE = ds.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, ds.config.HF_HUB_OFFLINE, ds.config.HF_DATASETS_OFFLINE = saved


def _read_hub(source: str, default_split: str) -> list[dict[str, Any]]:
    """The rows of `hf:org/name[:config][:split]`; from the local cache alone when offline mode is on or the hub
    does not answer, so that either fails at once with one line naming the dataset."""
    from huggingface_hub import constants as hub

    name, config, split = parse_hub(source)
    ds = _datasets()
    offline = "HF_HUB_OFFLINE is set" if ds.config.HF_HUB_OFFLINE else None
    if offline is None and (why := _hub_unreachable(hub.ENDPOINT)) is not None:
        offline = f"the hub {hub.ENDPOINT} is unreachable ({why})"
    try:
        with _offline(ds) if offline else nullcontext():
            loaded = ds.load_dataset(name, config, split=split or default_split)
    except Exception as e:  # the hub, the network, a missing config: all surface as the source's error
        if offline:
            raise DataError(f"data: {source}: {offline}, and the local cache cannot serve {name} ({e})") from None
        raise DataError(f"data: {source}: {type(e).__name__}: {e}") from None
    return [dict(r) for r in loaded]


def _on_disk(path: Path) -> bool:
    return any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def read_rows(
    source: str | Path, *, default_split: str = "train", max_row_bytes: int = MAX_ROW_BYTES
) -> list[dict[str, Any]]:
    """The rows of `source` (see the module docstring) as dicts, before any column mapping; a row longer than
    `max_row_bytes` is an error naming it (and its column where the source has columns)."""
    text = str(source)
    if text.startswith(HUB_PREFIX):
        return _checked(_read_hub(text, default_split), text, max_row_bytes)
    path, split = Path(text), None
    if not path.exists() and ":" in path.name:  # `folder:split`
        head, _, split = text.rpartition(":")
        path = Path(head)
    if path.is_dir():
        if not _on_disk(path):
            raise DataError(f"data: {path} is a folder but not one written by datasets' save_to_disk")
        loaded = _pick_split(_datasets().load_from_disk(str(path)), str(path), split, default_split)
        rows = _checked([dict(r) for r in loaded], text, max_row_bytes)
        if not rows:
            raise DataError(f"data: {text}: no rows")
        return rows
    if split is not None or not path.exists():
        raise DataError(f"data: {text}: no such file or folder (a hub dataset is hf:org/name)")
    return read_json_or_jsonl(path, max_row_bytes=max_row_bytes)


def _checked(rows: list[dict[str, Any]], source: str, max_row_bytes: int) -> list[dict[str, Any]]:
    for i, row in enumerate(rows, start=1):
        check_row(row, f"data: {source} row {i}", max_row_bytes)
    return rows


def extract_answer(text: Any, how: AnswerExtract) -> str | None:
    """The reference answer in a column's value: as it is (`none`), the last `\\boxed{}`, or after `####`.

    >>> extract_answer("so $\\\\boxed{12}$", "boxed"), extract_answer("3 + 4 = 7\\n#### 7", "gsm8k"), extract_answer(5, "none")
    ('12', '7', '5')
    """
    text = str(text)
    if how == "boxed":
        return extract_last_boxed(text)
    if how == "gsm8k":
        head, sep, tail = text.rpartition("####")
        return (tail.strip().replace(",", "") or None) if sep else None
    return text


def map_columns(
    rows: list[Mapping[str, Any]],
    source: str | Path,
    *,
    question_field: str = QUESTION_FIELD,
    answer_field: str = ANSWER_FIELD,
    answer_extract: AnswerExtract = "none",
) -> list[dict[str, str]]:
    """`{question, ground_truth_answer}` rows from `question_field` and `answer_field` (through `answer_extract`).

    Raises:
        DataError: a row (1-based) without one of the columns (naming it and the columns the row has), with an
            empty value, or whose answer the extractor finds nothing in.
    """
    out = []
    for i, row in enumerate(rows, start=1):
        for field, what in ((question_field, "question_field"), (answer_field, "answer_field")):
            if field not in row:
                raise DataError(
                    f"data: {source} row {i}: no column {field!r} ({what}); the row has {', '.join(map(str, row))}"
                )
            if row[field] is None:
                raise DataError(f"data: {source} row {i}: column {field!r} ({what}) is empty")
        try:  # str() of a deeply nested list recurses
            answer = extract_answer(row[answer_field], answer_extract)
            question = str(row[question_field])
        except RecursionError:
            raise DataError(f"data: {source} row {i}: a column nests lists or objects too deeply") from None
        if answer is None:
            raise DataError(
                f"data: {source} row {i}: column {answer_field!r} has no answer for answer_extract={answer_extract}"
            )
        out.append({"question": question, "ground_truth_answer": answer})
    if not out:
        raise DataError(f"data: {source}: no rows")
    return out


def load_qa(
    source: str | Path,
    *,
    question_field: str = QUESTION_FIELD,
    answer_field: str = ANSWER_FIELD,
    answer_extract: AnswerExtract = "none",
    default_split: str = "train",
    max_row_bytes: int = MAX_ROW_BYTES,
    code_format: str | None = None,
) -> list[dict[str, str]]:
    """`read_rows` then `map_columns`: the RL / eval rows of a source; with `code_format`, the rows of a code
    dataset with their tests as the answer (`shared.code_data.code_rows`; the column fields are then unused)."""
    rows = read_rows(source, default_split=default_split, max_row_bytes=max_row_bytes)
    if code_format is not None:
        from shared.code_data import CodeDataError, code_rows

        try:  # one error type for every data problem (code_data does not import this module: no cycle)
            return code_rows(rows, str(source), code_format)  # type: ignore[arg-type]  # code_rows checks the name
        except CodeDataError as e:
            raise DataError(str(e)) from None
    return map_columns(rows, source, question_field=question_field, answer_field=answer_field,
                       answer_extract=answer_extract)  # fmt: skip
