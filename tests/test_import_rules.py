"""The import rules of docs/architecture.md, read from the code (AST): arrows run one way.

A failure names the module and the import that breaks a rule; fix the import, or change the rule here
and in docs/architecture.md together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "orpo_dist"

# module -> the only orpo_dist modules it may import (anywhere in the file, function bodies included)
ONLY = {
    "loss": set(),  # the objective: pure torch
    "layouts": set(),  # the batch contract: pure torch
    "logps": {"loss"},
    "templates": set(),
    "safe_load": set(),
    "throughput": set(),
    "builtin": set(),
    "console": set(),
    "cpu_launch": set(),
    "report": {"console", "exits", "config.yaml_safe"},  # reads a run's files (YAML safely); one line on a fault
    "preemption": {"distributed"},  # all_sum, imported inside `check` (the CLI imports it before torch)
}
# package prefix -> what its modules may import besides themselves
PACKAGES = {
    "config": set(),  # the config imports nothing else of ours
}
# module -> who may import it
IMPORTED_ONLY_BY = {
    "trainer": {"orpo_dist", "cli", "trl_api"},  # the API layers: the package, the command line, the TRL drop-in
    "cli": {"train"},
}
MODEL_SIDE = ("modeling", "logps", "loss")  # never import a layout: the trainer joins them


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "orpo_dist"


MODULES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(module: str, top_level_only: bool = False) -> set[str]:
    """The orpo_dist modules `module` imports, as names relative to the package ("config.schema")."""
    tree = ast.parse(MODULES[module].read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("orpo_dist"):
            base = node.module.removeprefix("orpo_dist").removeprefix(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}".lstrip(".")
                found.add(sub if sub in MODULES else base or "orpo_dist")
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("orpo_dist.") for a in node.names if a.name.startswith("orpo_dist.")}
    return found - {module}


def test_every_module_parses_and_the_rules_name_real_modules():
    for name in [*ONLY, *IMPORTED_ONLY_BY, *MODEL_SIDE]:
        assert name in MODULES, f"the rules name {name}, which is not a module of orpo_dist"


@pytest.mark.parametrize("module", sorted(ONLY))
def test_leaf_modules_import_only_what_they_may(module):
    extra = imports(module) - ONLY[module]
    assert not extra, f"orpo_dist/{module}.py imports {sorted(extra)}; it may import only {sorted(ONLY[module])}"


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_packages_stay_inside_themselves(package):
    for module in MODULES:
        if module == package or module.startswith(package + "."):
            outside = {m for m in imports(module) if m != package and not m.startswith(package + ".")}
            outside -= PACKAGES[package]
            assert not outside, f"orpo_dist/{module} imports {sorted(outside)}: {package} imports nothing else of ours"


def test_the_top_modules_are_imported_only_from_above():
    for target, allowed in IMPORTED_ONLY_BY.items():
        importers = {m for m in MODULES if target in imports(m)} - allowed
        assert not importers, f"{sorted(importers)} import orpo_dist.{target}; only {sorted(allowed)} may"


def test_the_model_side_never_imports_a_layout():
    for module in MODEL_SIDE:
        assert "layouts" not in imports(module), f"orpo_dist/{module}.py imports layouts"


def test_no_import_cycles_at_module_level():
    graph = {m: {d for d in imports(m, top_level_only=True) if d in MODULES} for m in MODULES}
    # a package's __init__ importing its own submodules is how packages are built, not a cycle back
    for m in graph:
        graph[m] = {d for d in graph[m] if not d.startswith(m + ".") and m != "orpo_dist"}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = path[path.index(d) :] + [d] if d in path else [m, d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_a_forbidden_arrow_is_seen(tmp_path, monkeypatch):
    """The checker itself: a loss.py that imported config would be caught."""
    fake = tmp_path / "loss.py"
    fake.write_text("import torch\nfrom orpo_dist.config import Config\n")
    monkeypatch.setitem(MODULES, "loss", fake)
    assert imports("loss") == {"config"}


def test_every_import_of_ours_names_something_that_exists():
    """Imports inside functions run only when that path runs: a name moved to another module (say
    `Preemption` out of distributed.py) would fail there, late. Every `from orpo_dist... import name` in the
    package, the tests, bench/ and scripts/ must resolve now."""
    import importlib

    repo = PACKAGE.parent
    files = [*PACKAGE.rglob("*.py"), *(repo / "tests").glob("*.py"), *(repo / "bench").glob("*.py"),
             *(repo / "scripts").glob("*.py")]  # fmt: skip
    missing = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("orpo_dist")):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if alias.name != "*" and not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"{path.relative_to(repo)}:{node.lineno}: {node.module} has no {alias.name}")
    assert not missing, missing
