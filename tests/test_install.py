"""ops/ ships as attngraph.ops in both install modes: a regular install and an editable one."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = "import attngraph, attngraph.ops as o; print(o.__file__); print(len(attngraph.ir.all_ops()))"


def _probe(env=None, cwd=None):
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=cwd, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    path, count = out.stdout.split()
    return Path(path), int(count)


@pytest.mark.slow
def test_regular_install_ships_ops_as_a_subpackage(tmp_path):
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(REPO)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(4, "--no-build-isolation")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (target / "attngraph" / "ops" / "softmax.py").exists()
    assert not (target / "ops").exists()  # no top-level package called `ops`
    for init in (REPO / "attngraph").rglob("__init__.py"):
        package = init.parent.relative_to(REPO)
        assert (target / package / "__init__.py").exists(), f"{package} is missing from pyproject's packages"
    env = dict(os.environ, PYTHONPATH=str(target))
    path, count = _probe(env=env, cwd=tmp_path)
    assert path == target / "attngraph" / "ops" / "__init__.py"
    assert count >= 55


def test_editable_install_or_checkout_finds_ops(tmp_path):
    try:
        direct = json.loads(metadata.distribution("attngraph").read_text("direct_url.json") or "{}")
    except metadata.PackageNotFoundError:
        direct = {}
    if direct.get("dir_info", {}).get("editable"):
        # Outside the checkout, only the editable finder can resolve attngraph.ops → ops/.
        path, count = _probe(cwd=tmp_path)
        assert path == REPO / "ops" / "__init__.py"
    # From the checkout itself (repo root first on sys.path) the same folder is used.
    env = dict(os.environ, PYTHONPATH=str(REPO))
    path, count = _probe(env=env, cwd=REPO)
    assert path == REPO / "ops" / "__init__.py" and count >= 55


def test_openmp_workers_wait_passively_unless_the_user_chose(tmp_path):
    """Spinning OpenMP workers starve the BLAS threads between kernels (34x slower models on 2
    cores): importing attngraph makes them wait passively, but keeps a value the user set."""
    import os
    import subprocess
    import sys

    code = "import os, attngraph; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, OMP_WAIT_POLICY="ACTIVE"),
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"
