"""The house's rules, checked on the source."""

from __future__ import annotations

import ast
import re
from pathlib import Path

MODES = Path(__file__).resolve().parents[1] / "pipeline" / "modes"
FAMILY_NAMES = {"sd", "sdxl", "pixart", "sd3", "flux", "dit", "ddpm", "ldm"}
DIFFUSERS_CLASS = re.compile(r"\w+(Pipeline|AttnProcessor\w*)\b|LabelEmbedding")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants (modules, classes, functions): prose may name families."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _family_knowledge(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for every family-name string and diffusers pipeline/processor class name outside docstrings."""
    docs, found = _docstrings(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if node.value in FAMILY_NAMES or DIFFUSERS_CLASS.search(node.value):
                found.append((node.lineno, repr(node.value)[:80]))
        for name in (getattr(node, "id", None), getattr(node, "attr", None),
                     node.name if isinstance(node, ast.alias) else None):
            if isinstance(name, str) and DIFFUSERS_CLASS.search(name):
                found.append((node.lineno, name))
    return found


def test_modes_name_no_family():
    """Family knowledge lives in pipeline/models/: the modes name no family and no diffusers pipeline class,
    attention processor or label embedding (comments and docstrings may)."""
    files = sorted(MODES.rglob("*.py"))
    assert files
    bad = [f"{f.relative_to(MODES.parents[1])}:{line}: {what}"
           for f in files for line, what in _family_knowledge(ast.parse(f.read_text(encoding="utf-8")))]
    assert not bad, "family knowledge outside pipeline/models/:\n" + "\n".join(bad)

