"""The house's rules, checked on the source."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = REPO / "pipeline" / "modes"
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
        for name in (
            getattr(node, "id", None),
            getattr(node, "attr", None),
            node.name if isinstance(node, ast.alias) else None,
        ):
            if isinstance(name, str) and DIFFUSERS_CLASS.search(name):
                found.append((node.lineno, name))
    return found


def test_modes_name_no_family():
    """Family knowledge lives in pipeline/models/: the modes name no family and no diffusers pipeline class,
    attention processor or label embedding (comments and docstrings may)."""
    files = sorted(MODES.rglob("*.py"))
    assert files
    bad = [
        f"{f.relative_to(MODES.parents[1])}:{line}: {what}"
        for f in files
        for line, what in _family_knowledge(ast.parse(f.read_text(encoding="utf-8")))
    ]
    assert not bad, "family knowledge outside pipeline/models/:\n" + "\n".join(bad)


# ------------------------------------------------------------------------------------------------ the lead's checks
def _house():
    """bench/house.py's measurements of the working tree (rooms, arrows, circles, imports inside functions)."""
    spec = importlib.util.spec_from_file_location("house", REPO / "bench" / "house.py")
    house = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(house)
    return house.measure(REPO)


def test_import_contracts_hold():
    """The layers and forbidden imports of ``[tool.importlinter]`` in pyproject.toml, checked by import-linter."""
    code = (
        "import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_no_import_circles_and_few_imports_inside_functions():
    house = _house()
    assert house["circles"] == [], house["circles"]
    # an import inside a function only for a heavy optional dependency, never to dodge a circle (docs/design.md)
    assert house["imports_inside_functions"] <= 15, house["imports_inside_functions"]
    assert sorted(house["loose_modules"]) == ["__main__", "config", "errors"]


def test_ruff_lint_and_format():
    ruff = [sys.executable, "-m", "ruff"]
    lint = subprocess.run([*ruff, "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout[-3000:]
    fmt = subprocess.run([*ruff, "format", "--check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout[-3000:]


DATASET_NAMES = {"shapes", "folder"}
DATASET_CODE = {"parse_caption", "ShapesDataset", "FolderDataset", "ShapesGroundTruth", "FolderObjectMasks"}


def test_only_the_data_room_names_a_dataset():
    """Dataset knowledge sits behind the ground-truth door (pipeline/data/): no stage compares a dataset name or
    parses captions. Docstrings may name datasets."""
    found = []
    for room in ("modes", "models", "run", "record", "core", "metrics"):
        for path in sorted((REPO / "pipeline" / room).rglob("*.py")):
            tree = ast.parse(path.read_text())
            docs = _docstrings(tree)
            for node in ast.walk(tree):
                name = getattr(node, "id", None) or getattr(node, "attr", None) or getattr(node, "name", None)
                if isinstance(node, ast.Constant) and node.value in DATASET_NAMES and id(node) not in docs:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
                elif isinstance(name, str) and name.split(".")[-1] in DATASET_CODE:
                    found.append(f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}: {name}")
    assert not found, "dataset knowledge outside pipeline/data/:\n" + "\n".join(found)
