"""The `attngraph` command: info and render, in-process and as `python -m attngraph.cli`."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import attngraph as ag
from attngraph.cli import SUBCOMMANDS, graph_cost, main

REPO = pathlib.Path(__file__).resolve().parents[1]


def _toy() -> ag.Graph:
    g = ag.Graph("toy")
    x = g.input("x", ("B", "T", 16))
    w = g.param("w", (16, 16))
    b = g.param("b", (16,), init="zeros")
    g.const("table", np.arange(6, dtype=np.int64).reshape(2, 3))
    with g.scope("block"):
        h = ag.tanh(x @ w + b)            # matmul (B, T, 16)x(16, 16), add, tanh
        h = h.reshape("B*T", 16)           # reshape: no flops rule
    g.output("y", h)
    g.output("x2", ag.exp(x))
    return g


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "toy.json"
    _toy().save(path)
    return path


def _expected_flops(B: int, T: int) -> int:
    g = _toy()
    return graph_cost(g, {"B": B, "T": T}).flops


def test_info(saved, capsys):
    assert main(["info", str(saved), "--dim", "B=8", "--dim", "T=128"]) == 0
    out = capsys.readouterr().out
    assert "graph 'toy'" in out
    assert re.search(r"^  x\s+float32 \(B, T, 16\)$", out, flags=re.M)
    assert re.search(r"^  y\s+float32 \(B\*T, 16\)$", out, flags=re.M)
    assert re.search(r"^  x2\s+float32 \(B, T, 16\)$", out, flags=re.M)
    ops = re.findall(r"^  (\w+)\s+(\d+)$", out.split("ops (")[1].split("parameters")[0], flags=re.M)
    assert ops == [("add", "1"), ("exp", "1"), ("matmul", "1"), ("reshape", "1"), ("tanh", "1")]
    assert "parameters: 2 tensors, 272 values, 1.06 KiB" in out
    assert "constants: 1 tensor, 6 values, 48 B" in out
    assert "B=8, T=128" in out and "unbound" not in out
    flops = _expected_flops(8, 128)
    assert f"({flops:,})" in out
    assert "not counted (no flops rule): reshape" in out
    # activations: every op output, 4 bytes each: matmul, add, tanh, reshape, exp of B*T*16
    assert f"activations (one run): {5 * 8 * 128 * 16 * 4 // 1024} KiB" in out


def test_flops_come_from_the_ops():
    g = _toy()
    cost = graph_cost(g, {"B": 2, "T": 3})
    n = 2 * 3 * 16
    matmul = ag.ir.get_op("matmul").flops
    mm = ag.ir.eval_dim(matmul([g.nodes[0].type, g.nodes[1].type],
                               [next(x for x in g.nodes if x.op == "matmul").type]), {"B": 2, "T": 3})
    assert mm > 0
    assert cost.flops == mm + 3 * n            # + add, tanh, exp (one flop per element each)
    assert cost.not_counted == {"reshape": 1}
    assert cost.activation_bytes == 5 * n * 4 and cost.input_bytes == n * 4


def test_info_unbound_dims_count_as_one(saved, capsys):
    assert main(["info", str(saved), "--dim", "B=4"]) == 0
    out = capsys.readouterr().out
    assert "B=4, T=1" in out
    assert "unbound, counted as 1: T" in out and "--dim T=N" in out
    assert f"({_expected_flops(4, 1):,})" in out


def test_info_mentions_dims_the_graph_lacks(saved, capsys):
    assert main(["info", str(saved), "--dim", "Q=3"]) == 0
    assert "no dim named Q" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["B", "B=", "B=x", "=3", "B=-1", "1B=2"])
def test_info_bad_dim(saved, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["info", str(saved), "--dim", bad])
    assert exc.value.code == 2
    assert "NAME=SIZE" in capsys.readouterr().err


def test_info_missing_file(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attngraph: error: ") and "does not exist" in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("damage", ["json", "weights", "op"])
def test_info_corrupt_file(saved, damage, capsys):
    if damage == "json":
        saved.write_text("{ not json")
    elif damage == "weights":
        weights = saved.with_suffix(".safetensors")
        weights.write_bytes(weights.read_bytes()[:30])
    else:
        saved.write_text(saved.read_text().replace('"op": "tanh"', '"op": "tanhh"'))
    assert main(["info", str(saved)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attngraph: error: ") and err.count("\n") == 1


def test_render_svg(saved, tmp_path, capsys):
    out = tmp_path / "toy.svg"
    assert main(["render", str(saved), "-o", str(out), "--max-depth", "0"]) == 0
    printed = capsys.readouterr()
    if shutil.which("dot"):
        assert out.exists() and "<svg" in out.read_text()
        assert f"wrote {out}" in printed.out
    else:
        assert (tmp_path / "toy.dot").exists() and "apt-get install graphviz" in printed.err


def test_render_default_output_and_dot(saved, capsys):
    assert main(["render", str(saved), "-o", str(saved.with_suffix(".gv")), "--no-source", "--title", "T!"]) == 0
    text = saved.with_suffix(".gv").read_text()
    assert "<B>T!</B>" in text and "toy.json" not in text and "test_cli.py" not in text
    if shutil.which("dot"):
        assert main(["render", str(saved)]) == 0
        assert saved.with_suffix(".svg").exists()


def test_render_without_dot_warns_on_one_line(saved, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    assert main(["render", str(saved), "-o", str(tmp_path / "g.png")]) == 0
    captured = capsys.readouterr()
    assert (tmp_path / "g.dot").exists()
    assert captured.err.startswith("attngraph: warning: ") and "brew install graphviz" in captured.err
    assert f"wrote {tmp_path / 'g.dot'}" in captured.out


def test_render_errors(saved, tmp_path, capsys):
    assert main(["render", str(saved), "-o", str(tmp_path / "g.jpeg")]) == 2
    assert "attngraph: error: cannot draw to" in capsys.readouterr().err
    assert main(["render", str(saved), "-o", str(tmp_path / "g.svg"), "--max-depth", "-1"]) == 2
    assert "--max-depth" in capsys.readouterr().err
    assert main(["render", str(tmp_path / "missing.json")]) == 2
    assert main(["render", str(saved), "-o", str(tmp_path / "no" / "such" / "dir.dot")]) == 2
    assert capsys.readouterr().err.count("\n") == 2


def test_no_subcommand_prints_help(capsys):
    assert main([]) == 2
    assert "info" in capsys.readouterr().err


def test_subcommands_are_a_table():
    assert {"info", "render"} <= set(SUBCOMMANDS)
    assert all(callable(c.run) and callable(c.configure) for c in SUBCOMMANDS.values())


def _run_module(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "attngraph.cli", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)


def test_python_dash_m(saved):
    ok = _run_module("info", str(saved), "--dim", "B=2", "--dim", "T=3")
    assert ok.returncode == 0, ok.stderr
    assert "graph 'toy'" in ok.stdout and f"({_expected_flops(2, 3):,})" in ok.stdout
    bad = _run_module("info", str(saved.with_name("missing.json")))
    assert bad.returncode == 2
    assert bad.stderr.startswith("attngraph: error:") and "Traceback" not in bad.stderr
