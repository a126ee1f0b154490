"""README opens with the two fresh-machine commands, CI runs the second one verbatim, and what README quotes of the
main job's summary is what the main job prints."""

import re

import pytest
from conftest import REPO, compose_cfg

from pipeline.core.registry import MODE_PACKAGES
from pipeline.record.naming import run_name
from pipeline.record.tracking import format_value
from pipeline.run.runner import run_pipeline, selected_modes

README = (REPO / "README.md").read_text()


def _summary_block() -> str:
    """The ```text block of the section '## One result': the main job's summary as README shows it."""
    section = README.split("## One result", 1)[1]
    return section.split("```text", 1)[1].split("```", 1)[0]


def test_ci_runs_the_readme_test_command():
    readme = README.splitlines()
    block = readme[readme.index("```bash") + 1 : readme.index("```bash") + 3]
    assert "python -m pipeline" in block[0] and "pytest" in block[1]
    assert block[1] in (REPO / ".ci" / "run").read_text().splitlines()


def test_readme_is_a_front_door():
    lines = README.splitlines()
    assert len(lines) <= 150, len(lines)
    assert max(len(line) for line in lines) <= 120
    assert re.findall(r"^- \*\*(\w+)\*\*:", README, flags=re.M) == list(MODE_PACKAGES)


def test_the_quoted_run_name_is_the_main_jobs():
    quoted = re.search(r"MLflow run  <run id>  \((.+)\)", _summary_block()).group(1)
    cfg = compose_cfg(["mode=[schedule,metrics]"])
    assert quoted == run_name(cfg, selected_modes(cfg))


@pytest.mark.timeout(300)
def test_the_quoted_schedule_values_are_the_main_jobs(tmp_path, outputs):
    """Every ``schedule/<name> = <number>`` README quotes, against a schedule run of the main job's model and solver,
    formatted as the summary formats it (the metric values are left out of README: they live in docs with their
    commit)."""
    quoted = dict(re.findall(r"(schedule/\w+) = (-?[0-9.e+-]+)", _summary_block()))
    assert len(quoted) == 3, quoted
    assert not re.search(r"metrics/\w+ = -?[0-9]", _summary_block()), "a metric value no test checks"
    cfg = compose_cfg(["mode=[schedule]", "mode.schedule.compare=[]"], outputs)
    results = run_pipeline(cfg, tmp_path / "run").results
    assert {k: format_value(results[k]) for k in quoted} == quoted


def test_the_family_table_is_the_registrys():
    """README's family × mode table is what ``python -m pipeline.models`` prints from the adapter's registry."""
    from pipeline.models.family import family_table

    readme = (REPO / "README.md").read_text()
    table = re.search(r"<!-- family-table -->\n(.*?)<!-- /family-table -->", readme, re.S)
    assert table is not None, "README.md lost its <!-- family-table --> markers"
    assert table.group(1).strip() == family_table(), (
        "regenerate it: python -m pipeline.models --update-readme README.md"
    )
