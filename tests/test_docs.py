"""The algorithm notes the code cites are in the repository: every ``docs/methods.md §N.M`` that a
source or test comment names is a heading of docs/methods.md."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"docs/methods\.md §\s?(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{2,4} §(\d+(?:\.\d+)*)\b", re.MULTILINE)


def cited_sections() -> dict[str, list[str]]:
    cited: dict[str, list[str]] = {}
    for folder in ("src", "tests", "docs"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in (".py", ".md", ".yaml") or not path.is_file():
                continue
            for section in CITATION.findall(path.read_text(encoding="utf-8")):
                cited.setdefault(section.rstrip("."), []).append(str(path.relative_to(ROOT)))
    return cited


def test_every_cited_section_of_the_algorithm_notes_exists():
    headings = set(HEADING.findall((ROOT / "docs" / "methods.md").read_text(encoding="utf-8")))
    cited = cited_sections()
    assert len(cited) >= 10, "the code cites the notes by section; the citation pattern no longer matches"
    missing = {s: files for s, files in cited.items() if s not in headings}
    assert not missing, f"cited but not in docs/methods.md: {missing}"


def test_the_notes_are_not_the_shared_copy():
    """The notes are the project's own text, not a copy of the shared brief (few long lines in common)."""
    shared = ROOT.parent / "shared" / "docs" / "METHODS.md"
    ours = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8").splitlines()
    if not shared.is_file():
        pytest.skip("the shared brief is not beside the checkout")
    theirs = {line.strip() for line in shared.read_text(encoding="utf-8").splitlines() if len(line.strip()) > 40}
    long_lines = [line.strip() for line in ours if len(line.strip()) > 40]
    common = sum(line in theirs for line in long_lines)
    assert common < 0.1 * len(long_lines)
