"""The package layout is the data flow: no module imports from a stage after its own.

    shared (config, registry, paths, cluster) -> data -> models -> train -> embed -> index -> search
    (+ baselines/, the adapters search runs) -> metrics (score) -> results -> report
    -> drivers: pipeline (run, compare) -> tune | serving -> serve/ (the Ray Serve app) -> cli
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the repository's folders serve/, baselines/ and tune_configs/ install as these packages
INSTALLED_AS = {"cir_bench": "cir_bench", "baselines": "cir_bench_baselines", "serve": "cir_bench_serve",
                "tune_configs": "cir_bench_tune_configs"}
STAGES = [
    ["cir_bench.config", "cir_bench.registry", "cir_bench.paths", "cir_bench.cluster", "cir_bench",
     "cir_bench_tune_configs"],
    ["cir_bench.data"], ["cir_bench.models"], ["cir_bench.train"], ["cir_bench.embed"], ["cir_bench.index"],
    ["cir_bench_baselines"], ["cir_bench.search"], ["cir_bench.metrics"], ["cir_bench.results"], ["cir_bench.report"],
    ["cir_bench.pipeline"], ["cir_bench.tune", "cir_bench.serving"], ["cir_bench_serve"], ["cir_bench.cli"],
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
    for folder, package in INSTALLED_AS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [package, *path.relative_to(ROOT / folder).with_suffix("").parts]
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
    return [n for n in names if n.split(".")[0] in (*INSTALLED_AS, *INSTALLED_AS.values())]


def test_package_root_holds_only_what_every_stage_shares():
    modules = sorted(p.name for p in (ROOT / "cir_bench").glob("*.py"))
    assert modules == ["__init__.py", "cli.py", "config.py", "paths.py", "registry.py", "wheelhouse.py"]


def test_the_wheelhouse_tool_imports_nothing_of_cir_bench():
    """It runs before the project is installed where it is used: pip and packaging only."""
    path = ROOT / "cir_bench" / "wheelhouse.py"
    assert _imports("cir_bench.wheelhouse", path) == []


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


def _called_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            func = node.func
            names.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
    return names


def test_serving_ranks_with_the_search_stage_and_computes_no_score_of_its_own():
    """One function per ranking: the served index stage scores filtered_knn and
    soft_filtered_knn with cir_bench.search.label_filters (what the offline methods call) and
    the teacher inverts with BackwardSearch; no module of serving/ or serve/ takes a head's
    argmax, softmax or top-k itself, or inverts by gradient."""
    scoring = {"argmax", "softmax", "log_softmax", "cross_entropy", "topk", "sort", "argsort", "backward", "grad"}
    paths = sorted((ROOT / "cir_bench" / "serving").rglob("*.py")) + sorted((ROOT / "serve").rglob("*.py"))
    for path in paths:
        own = _called_names(path) & scoring
        assert not own, f"{path.relative_to(ROOT)} calls {sorted(own)}: rankings belong to cir_bench.search"
    tree = ast.parse((ROOT / "cir_bench" / "serving" / "components.py").read_text(encoding="utf-8"))
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module == "cir_bench.search.label_filters" for a in node.names}
    assert {"hard_filter_scores", "soft_filter_scores", "database_labels", "database_log_probs"} <= imported
    for module in ("filtered_knn", "soft_filtered_knn"):
        offline = _called_names(ROOT / "cir_bench" / "search" / f"{module}.py")
        assert offline & {"hard_filter_scores", "soft_filter_scores"}, f"{module} does not use label_filters"


# messages of third-party errors that carry no fields: Ray raises a bare RuntimeError when its
# HAProxy fails to start, with HAProxy's own [ALERT] lines in the text; whatever torch.compile's
# stack raises is shown by its first line
THIRD_PARTY_MESSAGES = {("cir_bench_serve.driver", "RuntimeError"), ("cir_bench.search.backward_engines", "Exception")}


@pytest.mark.parametrize("module, path", _modules(), ids=lambda v: v if isinstance(v, str) else "")
def test_no_code_reads_an_error_message_to_decide(module, path):
    """Errors carry fields (``RequestError.field/.message``, ``ConfigError.key/.source``,
    ``CompileUnavailable``): no module splits, searches or matches the text of an error it
    caught (``str(err).split``, ``"x" in str(err)``, ``re.search(..., str(err))``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def handler_of(node: ast.AST, name: str) -> str | None:
        """The exception type caught as ``name`` by the handler around ``node``."""
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.ExceptHandler) and node.name == name:
                return ast.unparse(node.type) if node.type is not None else "BaseException"
        return None

    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "str" and len(node.args) == 1
                and isinstance(node.args[0], ast.Name)):
            continue
        caught = handler_of(node, node.args[0].id)
        if caught is None:
            continue
        parent = parents.get(node)
        reads = (isinstance(parent, ast.Attribute) and parent.attr in ("split", "splitlines", "startswith",
                                                                       "endswith", "find", "index", "partition")
                 or isinstance(parent, ast.Compare) and parent.comparators and node in parent.comparators
                 and any(isinstance(op, (ast.In, ast.NotIn)) for op in parent.ops)
                 or isinstance(parent, ast.Call) and getattr(parent.func, "attr", "") in ("search", "match",
                                                                                         "findall", "fullmatch"))
        if reads and (module, caught) not in THIRD_PARTY_MESSAGES:
            raise AssertionError(f"{module}:{node.lineno} reads the message of a caught {caught} to decide: "
                                 "give the error a field")


# the stage boundaries of a served search: what the orchestration hands each component and
# gets back (cir_bench.serving.jobs), in one process and through Ray handles alike
SERVING_BOUNDARIES = {"parse", "search_job", "rank_job", "format_answer", "invert_many", "transform_many",
                      "search_many", "invert", "transform", "rank", "_invert_here", "search"}


def test_no_untyped_mapping_crosses_a_serving_stage_boundary():
    """Requests and jobs travel as frozen dataclasses (ParsedRequest, SearchJob, Searched,
    RankJob, Ranked), not ``dict[str, Any]``: no parameter or return annotation of a stage
    boundary in serving/ or the Serve app is a dict or Mapping."""
    paths = sorted((ROOT / "cir_bench" / "serving").rglob("*.py")) + [ROOT / "serve" / "app.py"]
    checked = 0
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        # SearchService and the HTTP routes are the front door: JSON in, JSON out
        front_door = {id(f) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name in ("SearchService",
                                                                                                  "IngressDeployment")
                      for f in c.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name not in SERVING_BOUNDARIES \
                    or id(node) in front_door:
                continue
            args = [a for a in node.args.args + node.args.kwonlyargs if a.arg not in ("self", "catalog")]
            annotations = [a.annotation for a in args] + ([node.returns] if node.name != "format_answer" else [])
            for ann in annotations:
                text = ast.unparse(ann) if ann is not None else "unannotated"
                assert "dict[" not in text and "Mapping" not in text and text != "unannotated", \
                    f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {text} crosses a stage boundary"
            checked += 1
    assert checked >= 15, checked


@pytest.mark.parametrize("path, limit", [("README.md", 200), ("cir_bench/search/backward.py", 200),
                                         ("cir_bench/cli.py", 450)])
def test_the_front_door_stays_small(path, limit):
    """A newcomer reads the README, the CLI and the method first: the detail lives in docs/,
    the serving driver, baselines/ and Backward Search's step and engine floors."""
    lines = (ROOT / path).read_text(encoding="utf-8").count("\n")
    assert lines <= limit, f"{path}: {lines} lines > {limit}"


def test_the_wheel_lists_every_package_folder():
    """pyproject.toml names each package (the folders serve/, baselines/, tune_configs/ under
    the project's names): a new subpackage not listed would be missing from the wheel."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    folders = {".".join(p.relative_to(ROOT).parent.parts) for p in (ROOT / "cir_bench").rglob("__init__.py")}
    wanted = folders | set(INSTALLED_AS.values()) - {"cir_bench"} | {"cir_bench"}
    assert set(project["packages"]) == wanted
    assert {v: k for k, v in project["package-dir"].items()} == {f: p for f, p in INSTALLED_AS.items() if f != p}


@pytest.mark.parametrize("module", ["cir_bench_baselines.condition_text", "cir_bench_serve.haproxy_guard"])
def test_doctests_of_the_folders_installed_under_other_names(module):
    """serve/ and baselines/ install as cir_bench_serve and cir_bench_baselines: their doctests
    run here under those names (collected from the folders they would load a second time)."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
