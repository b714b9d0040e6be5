"""The package layout is the data flow: no module imports from a stage after its own.

    shared (config, registry, paths) -> data -> models -> train -> embed -> index -> search
    (+ baselines/, the adapters search runs) -> metrics (score) -> results -> report
    -> drivers: pipeline (run, compare) -> tune | serving -> serve/ (the Ray Serve app) -> cli
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = [
    ["cir_bench.config", "cir_bench.registry", "cir_bench.paths", "cir_bench", "tune_configs"],
    ["cir_bench.data"], ["cir_bench.models"], ["cir_bench.train"], ["cir_bench.embed"], ["cir_bench.index"],
    ["baselines"], ["cir_bench.search"], ["cir_bench.metrics"], ["cir_bench.results"], ["cir_bench.report"],
    ["cir_bench.pipeline"], ["cir_bench.tune", "cir_bench.serving"], ["serve"], ["cir_bench.cli"],
]


def _unit(module: str) -> tuple[int, str]:
    """(stage rank, unit) of a dotted module name; the unit is the longest listed prefix."""
    best = None
    for rank, units in enumerate(STAGES):
        for unit in units:
            if (module == unit or module.startswith(unit + ".")) and (best is None or len(unit) > len(best[1])):
                best = (rank, unit)
    if best is None:
        raise AssertionError(f"module {module} is in no stage of tests/test_layout.py")
    return best


def _modules() -> list[tuple[str, Path]]:
    out = []
    for package in ("cir_bench", "baselines", "serve", "tune_configs"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out.append((".".join(parts), path))
    return out


def _imports(module: str, path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the module's package
                base = module.split(".")
                is_package = path.name == "__init__.py"
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                names.append(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                names.append(node.module)
    return [n for n in names if n.split(".")[0] in ("cir_bench", "baselines", "serve", "tune_configs")]


def test_package_root_holds_only_what_every_stage_shares():
    modules = sorted(p.name for p in (ROOT / "cir_bench").glob("*.py"))
    assert modules == ["__init__.py", "cli.py", "config.py", "paths.py", "registry.py"]


@pytest.mark.parametrize("module, path", _modules(), ids=lambda v: v if isinstance(v, str) else "")
def test_no_module_imports_from_a_later_stage(module, path):
    rank, unit = _unit(module)
    for imported in _imports(module, path):
        other_rank, other_unit = _unit(imported)
        assert other_unit == unit or other_rank < rank, \
            f"{module} (stage {unit}) imports {imported} (stage {other_unit}): a reach-back up the chain"


def test_docs_links_stay_inside_the_repository():
    """README.md and docs/*.md link only to files of the repository, and those exist."""
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) >= 6
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert "shared/docs" not in text, f"{page.name} points outside the repository"
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            assert "://" not in target and not target.startswith(("/", "..")), f"{page.name} links to {target}"
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), f"{page.name}: dead link {target}"
