"""The documentation's Python examples run as written, and its links point somewhere.

Every ```python block that starts with "import" in README.md and docs/*.md runs, as written,
in a temporary working directory (test ids name the file and the block's number in it).

README.md stays a front page (at most README_MAX_LINES lines), and every relative link in
README.md and docs/*.md must name an existing file; `#anchor` links into .md files must name
an existing heading (GitHub's anchor rules).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import smsd

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250

FENCE = re.compile(r"^(```|~~~)")
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _examples() -> list:
    params = []
    for page in PAGES:
        blocks = PYTHON_BLOCK.findall(page.read_text(encoding="utf-8"))
        for i, code in enumerate(blocks):
            if code.startswith("import"):
                params.append(pytest.param(page, code, id=f"{_name(page)}:block{i}"))
    return params


EXAMPLES = _examples()


def test_examples_found():
    assert EXAMPLES, "no runnable ```python blocks found"


@pytest.mark.parametrize(("page", "code"), EXAMPLES)
def test_doc_example_runs(page, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    backend, validating = smsd.get_backend(), smsd.validation_enabled()
    try:
        exec(compile(code, str(page), "exec"), {"__name__": "__doc_example__"})
    finally:  # an example may pick a backend or turn validation off for everything after it
        smsd.set_backend(backend)
        smsd.set_validation(validating)


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, (
        f"README.md has {n} lines (at most {README_MAX_LINES}): move detail into docs/")


def _prose_lines(text: str):
    """The lines outside fenced code blocks."""
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            yield line


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation but '-' and '_' dropped,
    spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link: its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_anchor(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_github_anchor_rules():
    assert github_anchor("Privacy audit: what the server can recover from a shard") == \
        "privacy-audit-what-the-server-can-recover-from-a-shard"
    assert github_anchor("`flwr run` (local simulation SuperLink)") == \
        "flwr-run-local-simulation-superlink"
    assert github_anchor("Results of `make demo`") == "results-of-make-demo"
    assert github_anchor("smsd_C and re-use") == "smsd_c-and-re-use"


def _links(path: Path):
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        for m in re.finditer(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line):
            yield m.group(1)


LINKS = [pytest.param(page, target, id=f"{_name(page)}->{target}")
         for page in PAGES for target in _links(page)
         if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto: ...


def test_links_found():
    assert LINKS


@pytest.mark.parametrize(("page", "target"), LINKS)
def test_relative_link_resolves(page, target):
    file_part, _, anchor = target.partition("#")
    dest = (page.parent / file_part).resolve() if file_part else page
    assert dest.exists(), f"{_name(page)}: link {target!r}: {file_part} does not exist"
    if anchor and dest.suffix == ".md":
        assert anchor in anchors(dest), (
            f"{_name(page)}: link {target!r}: no heading with anchor #{anchor} in "
            f"{dest.relative_to(ROOT).as_posix()} (has: {sorted(anchors(dest))})")
