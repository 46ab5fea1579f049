"""Layering: the analysis package shares only two leaf modules with the pipeline, and the pipeline never
imports the analysis (but for the `isoflop` command itself, which dispatches to both). Keeps `isoflop analyze` free of torch and training code, and the two packages
separable. The files are parsed, not imported, so imports inside functions count too."""
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
def test_the_shared_modules_import_only_the_standard_library(name):
    """Importing pipeline.errors runs pipeline/__init__.py first, so it must stay as light as the leaves."""
    path = ROOT / (name.replace(".", "/") + ".py" if "." in name else "pipeline/__init__.py")
    outside = sorted({(line, mod) for line, mod in imported_modules(path)
                      if top_level(mod) not in sys.stdlib_module_names and top_level(mod) != "__future__"})
    assert not outside, f"{path.relative_to(ROOT)} imports {outside}"


def test_importing_the_analysis_loads_no_training_code():
    """The same rule at run time, transitive imports included."""
    modules = [f"analysis.{p.stem}" for p in ANALYSIS if p.stem != "__init__"]
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            "print(' '.join(sorted(m for m in sys.modules if m.partition('.')[0] in "
            "('pipeline', 'torch', 'deepspeed', 'ray'))))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert set(loaded.stdout.split()) <= SHARED | {"pipeline"}, loaded.stdout
