"""Docs are part of the product: the op reference is current and the README example runs."""

import re
from pathlib import Path

import pytest

import attngraph as ag
from attngraph.op_reference import op_reference_markdown

REPO = Path(__file__).resolve().parents[1]


def test_op_reference_is_current():
    text = (REPO / "docs" / "ops.md").read_text()
    assert text == op_reference_markdown(), "regenerate: python -m attngraph.op_reference > docs/ops.md"


def test_readme_example_runs_and_fails_where_it_says(tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    code = re.search(r"## Twenty lines\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert len(code.strip().splitlines()) <= 22
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "model.py"
    path.write_text(code)
    namespace = {"__name__": "readme"}
    with pytest.raises(ag.errors.ShapeError) as info:
        exec(compile(code, str(path), "exec"), namespace)
    assert namespace["out"]["y"].shape == (2, 10, 64)
    stated = re.search(r"#   in (model\.py:\d+)", code).group(1)
    assert stated in str(info.value) and "inner dims 64 and 32 differ" in str(info.value)
    assert list(tmp_path.glob("attention.*"))


TUTORIALS = sorted((REPO / "docs" / "tutorials").glob("*.md"))


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_code_runs(path, tmp_path, monkeypatch, one_thread):
    """Every ```python block of a tutorial runs, in order, in one namespace (a reader pasting
    them one after another), in an empty working directory."""
    blocks = _python_blocks(path)
    assert blocks, f"{path.name} has no python example"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"tutorial_{path.stem}"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{path.name}[block {i}]", "exec"), namespace)


def test_every_model_family_has_a_tutorial():
    import attngraph.models as models

    have = {p.stem for p in TUTORIALS}
    assert set(models.__all__) <= have, f"missing docs/tutorials/{sorted(set(models.__all__) - have)}.md"
