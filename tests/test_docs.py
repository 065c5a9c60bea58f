"""The README and docs/ hold together: every link between them (and to files of the repository) leads
somewhere, every `#anchor` names a heading of its page, and the README stays a front door."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
README_MAX_LINES = 250


def slug(title: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces as dashes."""
    text = re.sub(r"[`*]", "", title.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def headings(page: Path) -> set[str]:
    found, code = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            code = not code
        elif not code and re.match(r"#{1,6} ", line):
            found.add(slug(line.split(" ", 1)[1]))
    return found


def links(page: Path) -> list[str]:
    """Every link target outside code blocks."""
    found, code = [], False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            code = not code
        elif not code:
            found += LINK.findall(line)
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_of_the_page_leads_to_a_file_and_a_heading_that_exist(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:: not followed here
            continue
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in headings(destination):
            broken.append(f"{target}: no such heading")
    assert broken == [], broken


def test_the_readme_is_a_front_door_that_links_every_page_of_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    assert readme.index("bin/dev") < readme.index("## Commands")  # the two commands come first
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, page.name
