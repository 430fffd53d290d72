"""The docs match the code: the README links every page of docs/, every relative link resolves, and the
module table of docs/architecture.md lists every module of the package with its size (within 25%)."""

from __future__ import annotations

import re
from pathlib import Path

from helpers import REPO

DOCS = REPO / "docs"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _links(page: Path) -> list[str]:
    return [m.group(1) for m in LINK.finditer(page.read_text()) if "://" not in m.group(1)]


def test_the_readme_links_every_docs_page():
    linked = {(REPO / link).resolve() for link in _links(REPO / "README.md")}
    missing = sorted(p.name for p in DOCS.glob("*.md") if p.resolve() not in linked)
    assert not missing, f"README.md does not link docs/{missing}"


def test_every_relative_link_resolves():
    broken = [
        f"{page.relative_to(REPO)} -> {link}"
        for page in [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
        for link in _links(page)
        if not (page.parent / link).exists()
    ]
    assert not broken, broken


def test_the_module_table_lists_every_module_with_its_size():
    rows = re.findall(r"^\| `([\w/]+\.py)` \| ~(\d+) \|", (DOCS / "architecture.md").read_text(), re.M)
    table = {name: int(lines) for name, lines in rows}
    package = REPO / "orpo_dist"
    modules = {str(p.relative_to(package)): len(p.read_text().splitlines()) for p in package.rglob("*.py")}
    assert sorted(set(modules) - set(table)) == [], "modules missing from docs/architecture.md's table"
    assert sorted(set(table) - set(modules)) == [], "docs/architecture.md lists modules that do not exist"
    off = {m: (table[m], n) for m, n in modules.items() if abs(table[m] - n) > max(15, 0.25 * n)}
    assert not off, f"docs/architecture.md line counts (table, real) are off: {off}"
