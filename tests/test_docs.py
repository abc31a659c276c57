"""The README is a front door and the docs say what the code does: the two commands first, two
screens at most, every link resolving, and the tables the code renders equal to their copies."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))
SCREENS = 2 * 50  # two screens of 50 lines


def test_the_readme_starts_with_the_two_commands_and_fits_two_screens() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    first_block = text.split("```")[1]
    assert [line.split()[:2] for line in first_block.strip().splitlines()[1:]] == [
        ["make", "serve"], ["make", "test"]]
    assert text.count("\n") <= SCREENS


@pytest.mark.parametrize("page", [REPO / "README.md", *DOCS], ids=lambda p: p.name)
def test_every_relative_link_resolves(page: Path) -> None:
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
        if not target.startswith(("http://", "https://")):
            assert (page.parent / target).exists(), f"{page.name} links to {target}"


def test_every_docs_page_is_linked_from_the_readme_or_the_docs_index() -> None:
    linked = (REPO / "README.md").read_text() + (REPO / "docs" / "README.md").read_text()
    for page in DOCS:
        if page.name != "README.md":
            assert f"{page.name})" in linked, page.name


def test_the_presets_table_is_the_registry() -> None:
    from chat_templates.presets import docs_table

    assert docs_table() in (REPO / "docs" / "prompts.md").read_text(encoding="utf-8")
