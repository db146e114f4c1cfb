"""The user docs (README.md, docs/*.md) describe current behaviour: no issue numbers, no commit hashes,
a README short enough to read, and relative links that point at files that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 300

# "issue 12", "Issue #12", "issues 12 and 13"; "#15", "#15's" (not a markdown heading, not "#key=...")
ISSUE_RE = re.compile(r"\bissues?\s+#?\d+|(?<![\w&#/])#\d+\b", re.IGNORECASE)
# a commit hash: 7 to 40 lowercase hex characters with at least one digit and one letter, as a word, or
# any 7 to 40 hex characters after "commit" (an all-digit hash such as 0452611)
HASH_RE = re.compile(
    r"(?<![\w/.-])(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![\w/-])"
    r"|\bcommits?\s+(?:at\s+)?[0-9a-fA-F]{7,40}\b",
    re.IGNORECASE,
)
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def history_marks(text: str) -> list[str]:
    """Issue numbers and commit hashes in `text`, as `line N: match` strings."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for m in ISSUE_RE.finditer(line):
            found.append(f"line {n}: issue number {m.group(0)!r}")
        for m in HASH_RE.finditer(line):
            found.append(f"line {n}: commit hash {m.group(0)!r}")
    return found


@pytest.mark.parametrize(
    "text",
    ["see issue 12", "Issue #7 fixed it", "as in #15", "#15's second round", "at commit 0452611",
     "main 5bb0124 measured", "full hash 51fc2b0e4d0c9a7b3f1e2d4c5b6a7980f1e2d3c4"],
)
def test_history_marks_are_found(text):
    assert history_marks(text), text


@pytest.mark.parametrize(
    "text",
    ["## Dataset layout", "`#key=KEY` opens a sample", "key `0010000000042`", "shard 00000000",
     "[lang](#language-id-of-short-captions)", "sha256 of the bytes", "1,022 pairs", "the decade",
     "https://example.org/a/0452611b", "bench/dedup.py --sizes 10M"],
)
def test_current_text_passes(text):
    assert not history_marks(text), history_marks(text)


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_state_current_behaviour_only(path):
    marks = history_marks(path.read_text(encoding="utf-8"))
    assert not marks, f"{path.relative_to(ROOT)}: history belongs in CHANGELOG.md and git:\n" + "\n".join(marks)


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}); move topics to docs/"


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    text = path.read_text(encoding="utf-8")
    missing = []
    for target in LINK_RE.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (path.parent / target.split("#")[0]).exists():
            missing.append(target)
    assert not missing, f"{path.relative_to(ROOT)} links to missing files: {missing}"
