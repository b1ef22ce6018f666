"""Functions short enough to read at a glance: none of nyxray's is over 60 lines (docstring
included), but the numeric kernels listed here, whose steps only make sense together."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "nyxray"
LIMIT = 60
KERNELS = {"methods/sparsify.py:_sorted_prefix"}  # the replay of torch's CPU sort, one loop


def long_functions() -> dict[str, int]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > LIMIT:
                found[f"{path.relative_to(ROOT).as_posix()}:{node.name}"] = node.end_lineno - node.lineno + 1
    return found


def test_no_function_is_over_60_lines_but_the_numeric_kernels():
    found = long_functions()
    assert set(found) - KERNELS == set(), found
    assert KERNELS <= set(found), "a listed kernel is short now: drop it from KERNELS"
