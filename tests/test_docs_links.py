"""Every relative link in README.md, docs/*.md and benchmarks/README.md points to a file that exists.

A `page.md#anchor` link must also name a heading of that page (GitHub's slug: lower case,
punctuation dropped, spaces to hyphens), so moving a section does not leave a dead link.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks (a `[x](y)` in code is not a link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {
        _slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$", _prose(page.read_text(encoding="utf-8")), re.M)
    }


def _links(page: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(page.read_text(encoding="utf-8"))) if not re.match(r"[a-z]+:", t)]


def test_the_premise_the_pages_have_relative_links():
    assert all(page.exists() for page in PAGES)
    assert len([link for page in PAGES for link in _links(page)]) >= 20
    assert (
        _slug("What bigbatch promises when things go wrong") == "what-bigbatch-promises-when-things-go-wrong"
    )
    assert _slug("BatchLoss: memory and time") == "batchloss-memory-and-time"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page):
    dead = []
    for link in _links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            dead.append(
                f"{link} (no file {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target})"
            )
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            dead.append(f"{link} (no heading #{anchor} in {target.relative_to(ROOT)})")
    assert not dead, f"{page.relative_to(ROOT)}: dead links: {dead}"
