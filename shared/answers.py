"""Final answers in free text: the last `\\boxed{}` (the reward service's accuracy check, `gtpo eval`, and the data
loader's answer extractor for solution columns all read answers with this one function)."""

from __future__ import annotations

BOXED = "\\boxed"


def extract_last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed` answer in `text`, or None.

    Rules (documented because graders disagree on them):

    * `\\boxed{...}`: braces are matched by hand; a backslash escapes the next character, so `\\{`, `\\}`
      and `\\\\` never count as braces (`\\boxed{\\{1,2\\}}` -> `\\{1,2\\}`).
    * `\\boxed 5` (the command followed by whitespace, as in Hendrycks' MATH grader): the answer is the
      next run of characters up to whitespace or `$`; `\\boxed {5}` is the braced form.
    * Only the **last** `\\boxed` command counts. If it is unbalanced (a truncated response), the result
      is None: an earlier, superseded box is not the final answer.
    * `\\boxedx` is not the command and is skipped. Linear time: the text is scanned at most twice.

    Args:
        text: the response, any size, any characters (unbalanced input is fine).

    >>> extract_last_boxed(r"so \\boxed{1} or rather \\boxed{\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    >>> extract_last_boxed(r"$\\boxed 5$"), extract_last_boxed(r"\\boxed{\\frac{1}{2}"), extract_last_boxed("none")
    ('5', None, None)
    """
    end = len(text)
    while (start := text.rfind(BOXED, 0, end)) >= 0:
        i = start + len(BOXED)
        if i < len(text) and text[i] == "{":
            return _braced(text, i)
        if i < len(text) and text[i].isspace():
            j = _skip_space(text, i)
            return _braced(text, j) if j < len(text) and text[j] == "{" else _bare_token(text, j)
        if i == len(text):
            return None  # the text ends with `\boxed`: a truncated answer
        end = start  # `\boxedx`: some other command; look further left (regions never overlap)
    return None


def _braced(text: str, open_at: int) -> str | None:
    """Content of the brace group opening at `text[open_at] == "{"`, or None if it never closes."""
    depth, i = 0, open_at
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # an escaped character (`\{`, `\}`, `\\`) is never a brace
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
        i += 1
    return None


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _bare_token(text: str, i: int) -> str | None:
    """`\\boxed 5`: the token starting at `i`, up to whitespace or `$` (None if empty)."""
    j = i
    while j < len(text) and not text[j].isspace() and text[j] != "$":
        j += 1
    return text[i:j] or None
