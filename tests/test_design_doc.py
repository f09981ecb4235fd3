"""The repository carries the design document its docstrings cite: every "docs/design.md section N" in the code,
tests, benches and docs names a section that exists (issue 33, item 7)."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CITE = re.compile(r"docs/design\.md\s+sections?\s+(\d+)(?:\s+and\s+(\d+))?")


def cited_sections(text: str) -> set[int]:
    """Section numbers `text` cites.

    >>> sorted(cited_sections("(docs/design.md section 2) and (docs/design.md\\nsections 2 and 3)"))
    [2, 3]
    """
    return {int(n) for m in CITE.finditer(text) for n in m.groups() if n}


def test_every_cited_section_of_the_design_document_exists():
    design = (REPO / "docs" / "design.md").read_text()
    have = {int(n) for n in re.findall(r"^## (\d+)\. ", design, re.M)}
    files = [p for d in ("services", "shared", "tests", "bench", "scripts", "docs") for p in (REPO / d).rglob("*")
             if p.suffix in (".py", ".md")] + [REPO / "README.md"]  # fmt: skip
    cited = {(str(p.relative_to(REPO)), n) for p in files for n in cited_sections(p.read_text())}
    assert len(cited) > 20  # the docstrings cite it: a pattern that matched nothing would prove nothing
    assert sorted((f, n) for f, n in cited if n not in have) == []


def test_the_pattern_reads_both_forms():
    assert cited_sections("(docs/design.md section 7)") == {7}
    assert cited_sections("docs/design.md sections 2 and 3") == {2, 3}
    assert cited_sections("design.md section 9") == set()
