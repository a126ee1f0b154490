"""The docs site builds (``mkdocs build --strict``: a broken link, a missing anchor or a bad API reference fails), and
every project path, module and ``python -m`` command that README, CONTRIBUTING and the docs name exists."""

import os
import re
import subprocess
import sys

from conftest import REPO

PAGES = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").rglob("*.md"))]
PATH = re.compile(r"(?<![\w./-])((?:pipeline|conf|tests|bench|docs)/[\w./*-]*)(<?)")  # <: a placeholder
COMMAND = re.compile(r"-m (pipeline(?:\.\w+)*)")
DOTTED = re.compile(r"(?<![\w./-])(?<!-m )pipeline(?:\.\w+)+")  # commands: COMMAND


def _module_file(dotted: str):
    """The source file of module ``dotted`` in the repository, or None."""
    base = REPO.joinpath(*dotted.split("."))
    for file in (base.with_suffix(".py"), base / "__init__.py"):
        if file.is_file():
            return file
    return None


def _stale(text: str) -> list[str]:
    """The references in ``text`` that do not resolve in the repository."""
    paths = [p.rstrip(".") + ("*" if placeholder else "") for p, placeholder in PATH.findall(text)]
    bad = [p for p in paths if not any(REPO.glob(p))]  # globs: tests/test_trust_*.py, tests/test_<name>.py
    for module in COMMAND.findall(text):
        base = REPO.joinpath(*module.split("."))
        if not (base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()):
            bad.append(f"python -m {module}")
    for dotted in DOTTED.findall(text):
        parts = dotted.split(".")
        k = max(i for i in range(1, len(parts) + 1) if _module_file(".".join(parts[:i])))
        if k < len(parts):  # module.attribute: the name must appear in the module's source
            if not re.search(rf"\b{parts[k]}\b", _module_file(".".join(parts[:k])).read_text()):
                bad.append(dotted)
    return bad


def test_every_named_path_module_and_command_exists():
    stale = {page.relative_to(REPO).as_posix(): _stale(page.read_text()) for page in PAGES}
    assert not {page: refs for page, refs in stale.items() if refs}


def test_the_path_check_catches_stale_references():
    old = "`pipeline/resume.py`, `python -m pipeline.compare`, `pipeline.record.naming.no_such_function`"
    assert _stale(old) == [
        "pipeline/resume.py",
        "python -m pipeline.compare",
        "pipeline.record.naming.no_such_function",
    ]
    now = "`pipeline/modes/<mode>/`, `tests/test_<name>.py`, `python -m pipeline.run.resume`, `pipeline.core.registry.stage`"
    assert _stale(now) == []


def test_docs_build_strict_offline(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "frechet_distance" in api and "kernel_distance" in api  # mkdocstrings rendered the metrics math
    assert "fonts.googleapis.com" not in (tmp_path / "site" / "index.html").read_text()  # nothing fetched to read it
