"""README opens with the two fresh-machine commands, and CI runs the second one verbatim."""

from conftest import REPO


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text().splitlines()
    block = readme[readme.index("```bash") + 1 : readme.index("```bash") + 3]
    assert "python -m pipeline" in block[0] and "pytest" in block[1]
    assert block[1] in (REPO / ".ci" / "run").read_text().splitlines()
