"""The floors of DESIGN.md, read from the imports: an import never runs upward. The engine and what lies below
it never import the front ends (the API, the app, the command line) or the benchmarks, and nothing in
coe_core imports the app, so the engine runs (and ``coe chat`` starts) without Gradio."""

from __future__ import annotations

import ast
from pathlib import Path

from coe_core.config import PACKAGE_ROOT

CORE = PACKAGE_ROOT / "coe_core"
#: below the engine: these never import what sits on or above it
LOWER_FLOORS = ("config.py", "events.py", "hf_spaces.py", "experts", "store", "tiers", "routing", "serving")
ABOVE_THE_ENGINE = ("coe_core.engine", "coe_core.api", "coe_core.cli", "coe_core.bench", "app")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, also inside functions (a lazy import is still an import)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def files_under(*parts: str) -> list[Path]:
    paths = [CORE / part for part in parts]
    return sorted(f for p in paths for f in ([p] if p.is_file() else p.rglob("*.py")))


def upward(path: Path, above: tuple[str, ...]) -> list[str]:
    return sorted(m for m in imported_modules(path) if any(m == a or m.startswith(a + ".") for a in above))


def test_nothing_below_the_engine_imports_the_engine_or_a_front_end():
    files = files_under(*LOWER_FLOORS)
    assert len(files) > 40  # the scan found the packages
    leaks = {str(f.relative_to(PACKAGE_ROOT)): upward(f, ABOVE_THE_ENGINE) for f in files}
    assert {f: m for f, m in leaks.items() if m} == {}


def test_the_core_package_never_imports_the_app_but_where_the_cli_serves_it():
    leaks = {str(f.relative_to(PACKAGE_ROOT)): upward(f, ("app",)) for f in files_under(".")}
    assert {f: m for f, m in leaks.items() if m} == {"coe_core/cli/serve.py": ["app.__main__"]}
