"""Layering: the analysis package shares only two leaf modules with the pipeline, and the pipeline never
imports the analysis (but for the `isoflop` command itself, which dispatches to both). Keeps `isoflop analyze`
free of torch and training code, and the two packages separable. No two modules import each other, however
indirectly. The files are parsed, not imported, so imports inside functions count too."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = {"pipeline.errors", "pipeline.mlflow_keys"}  # what analysis may import from pipeline
ANALYSIS = sorted((ROOT / "analysis").glob("*.py"))
PIPELINE = sorted((ROOT / "pipeline").rglob("*.py"))
ENTRY_POINT = ROOT / "pipeline" / "cli.py"  # `isoflop analyze` and `isoflop runs` hand over to the analysis
MODEL_PACKAGE = ROOT / "pipeline" / "model"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every absolute import in the file; `from a import b` gives a.b too,
    since b may be a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def top_level(name: str) -> str:
    return name.partition(".")[0]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(paths: list[Path], root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its file (type-only imports under TYPE_CHECKING
    left out: they never run). `from package import module` counts as importing the module."""
    modules = {module_name(p, root): p for p in paths}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
                     for stmt in node.body for n in ast.walk(stmt)}
        graph[name] = set()
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                candidates = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            graph[name] |= {c for c in candidates if c in modules and c != name and not name.startswith(c + ".")}
    return graph


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, colouring modules on the stack)."""
    on_stack, done = [], set()

    def visit(module: str) -> list[str] | None:
        if module in on_stack:
            return on_stack[on_stack.index(module):] + [module]
        if module in done:
            return None
        on_stack.append(module)
        for target in sorted(graph.get(module, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        on_stack.pop()
        done.add(module)
        return None

    return next((c for c in map(visit, sorted(graph)) if c), None)


def test_the_files_are_found():
    assert len(ANALYSIS) >= 10 and len(PIPELINE) >= 10


@pytest.mark.parametrize("path", ANALYSIS, ids=lambda p: p.name)
def test_analysis_imports_only_the_shared_leaf_modules_of_pipeline(path):
    from_pipeline = {(line, name) for line, name in imported_modules(path) if top_level(name) == "pipeline"}
    # `from pipeline.errors import RunsError` yields pipeline.errors and pipeline.errors.RunsError: judge the module
    bad = [(line, name) for line, name in from_pipeline
           if not any(name == m or name.startswith(m + ".") for m in SHARED)]
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}; analysis may use only {sorted(SHARED)}"


@pytest.mark.parametrize("path", [p for p in PIPELINE if p != ENTRY_POINT], ids=lambda p: str(p.relative_to(ROOT / "pipeline")))
def test_pipeline_never_imports_analysis(path):
    bad = sorted({(line, name) for line, name in imported_modules(path) if top_level(name) == "analysis"})
    assert not bad, f"{path.relative_to(ROOT)} imports the analysis package: {bad}"


@pytest.mark.parametrize("name", sorted(SHARED) + ["pipeline"])
def test_the_shared_modules_import_only_the_standard_library_and_each_other(name):
    """Importing pipeline.errors runs pipeline/__init__.py first, so it must stay as light as the leaves."""
    path = ROOT / (name.replace(".", "/") + ".py" if "." in name else "pipeline/__init__.py")
    outside = sorted({(line, mod) for line, mod in imported_modules(path)
                      if mod not in SHARED and mod.rpartition(".")[0] not in SHARED
                      and top_level(mod) not in sys.stdlib_module_names and top_level(mod) != "__future__"})
    assert not outside, f"{path.relative_to(ROOT)} imports {outside}"


def test_importing_the_analysis_loads_no_training_code():
    """The same rule at run time, transitive imports included."""
    modules = [f"analysis.{p.stem}" for p in ANALYSIS if p.stem != "__init__"]
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            "print(' '.join(sorted(m for m in sys.modules if m.partition('.')[0] in "
            "('pipeline', 'torch', 'deepspeed', 'ray'))))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert set(loaded.stdout.split()) <= SHARED | {"pipeline"}, loaded.stdout


def test_no_import_circle_among_pipeline_and_analysis_modules():
    cycle = find_cycle(import_graph(PIPELINE + ANALYSIS))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_circle_check_finds_a_circle_through_a_function_level_import(tmp_path):
    """The check sees what the old run_folder <-> export pair did: one side imported the other inside a function."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "run_folder.py").write_text("def load():\n    from pkg.export import load_export\n")
    (package / "export.py").write_text("from pkg.run_folder import TrainedModel\n")
    (package / "leaf.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import other\n")
    (package / "other.py").write_text("import pkg.leaf\n")
    graph = import_graph(sorted(package.glob("*.py")), root=tmp_path)
    assert find_cycle(graph) in (["pkg.export", "pkg.run_folder", "pkg.export"],
                                 ["pkg.run_folder", "pkg.export", "pkg.run_folder"])
    assert "pkg.other" not in graph["pkg.leaf"]  # a type-only import is no edge


def test_the_model_package_loads_no_config_or_orchestration_libraries():
    """The Transformer, the families, FLOPs and samplers import without pydantic, YAML, Ray or MLflow."""
    modules = [module_name(p) for p in sorted(MODEL_PACKAGE.glob("*.py"))]
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            "print(' '.join(sorted(m for m in sys.modules if m.partition('.')[0] in "
            "('pydantic', 'yaml', 'ray', 'mlflow', 'deepspeed'))))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == [], loaded.stdout
