"""No function outside scripts/ is over 60 lines (issue 33), counted as the anchors' survey counts them: from the
`def` line to the last line, docstring included."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 60
ROOTS = ("services", "shared", "bench")


def long_functions(root: Path, limit: int = MAX_LINES) -> list[str]:
    """`path:line name (n lines)` of every function or method under `root` longer than `limit` lines."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_the_counter_sees_a_long_function(tmp_path):
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "m.py").write_text(f"def short():\n    pass\n\n\nclass C:\n    def long(self):\n{body}\n")
    found = long_functions(tmp_path)
    assert [f.split(" ", 1)[1] for f in found] == [f"long ({MAX_LINES + 1} lines)"]


def test_no_function_is_over_60_lines():
    found = [f for root in ROOTS for f in long_functions(REPO / root)]
    assert found == [], "split these functions:\n" + "\n".join(found)
