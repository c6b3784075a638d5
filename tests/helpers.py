"""Small helpers the tests share: run one op through the numpy backend; run ``attngraph train``
with a task's ``run`` replaced."""

from __future__ import annotations

import numpy as np

import attngraph as ag
from attngraph.dsl import apply


def run_op(op_name: str, inputs, attrs: dict, backend: str = "numpy"):
    """Build a one-op graph whose inputs are fed ``inputs`` and return its output(s) as arrays."""
    g = ag.Graph(f"one_{op_name}")
    handles = [g.input(f"in{i}", a.shape, a.dtype) for i, a in enumerate(inputs)]
    out = apply(op_name, handles, graph=g, **attrs)
    outs = out if isinstance(out, tuple) else (out,)
    for i, t in enumerate(outs):
        g.output(f"out{i}", t)
    result = ag.compile(g, backend=backend).run({f"in{i}": a for i, a in enumerate(inputs)})
    values = [result[f"out{i}"] for i in range(len(outs))]
    return values if isinstance(out, tuple) else values[0]


def train_command(monkeypatch, capsys, task_module, argv, *, log_line: str | None = None):
    """``attngraph train ...`` (``argv`` after ``train``) with ``task_module.run`` replaced by a fake
    that records its Config, logs ``log_line`` if given, and returns a result whose summary is
    "fake summary". Returns (the exit status, the Config, the lines printed)."""
    from attngraph.cli import main

    seen = []

    class FakeResult:
        def summary(self):
            return "fake summary"

    def fake_run(cfg, log=print):
        seen.append(cfg)
        if log_line is not None and log is not None:
            log(log_line)
        return FakeResult()

    monkeypatch.setattr(task_module, "run", fake_run)
    status = main(["train", *argv])
    return status, (seen[0] if seen else None), capsys.readouterr().out.splitlines()
