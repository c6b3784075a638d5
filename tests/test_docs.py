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
