"""Small modules and short functions keep each piece readable in one sitting: no module of pipeline/ or analysis/
over 400 lines, no function over 60 (argparse builders, a list of options, excepted)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "pipeline").rglob("*.py")) + sorted((ROOT / "analysis").glob("*.py"))
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60
ARGPARSE_BUILDERS = {("pipeline/cli.py", "build_parser")}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_and_function_lengths(path):
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines"
    where = str(path.relative_to(ROOT))
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES and (where, node.name) not in ARGPARSE_BUILDERS]
    assert not long, f"{where}: functions over {MAX_FUNCTION_LINES} lines: {long}"
