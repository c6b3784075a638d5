"""The example in attngraph.nn's docstring runs as written, against a torch checkpoint."""

from __future__ import annotations

import re
import textwrap

import numpy as np
import pytest

import attngraph as ag
import attngraph.nn as nn

torch = pytest.importorskip("torch")


def test_docstring_example_runs_and_matches_torch(tmp_path, monkeypatch):
    torch.manual_seed(7)
    theirs = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 2,
                                         enable_nested_tensor=False).eval()
    monkeypatch.chdir(tmp_path)
    ag.io.save_safetensors(theirs.state_dict(), "encoder.safetensors")
    code = textwrap.dedent(re.search(r"::\n\n(.*?)\n\n[A-Z]", nn.__doc__, re.S).group(1))
    namespace: dict = {}
    exec(compile(code, "attngraph/nn/__init__.py", "exec"), namespace)
    exe = namespace["exe"]
    assert exe.graph.op_counts()["attention"] == 2

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 64)).astype(np.float32)
    pad = np.zeros((2, 6), bool)
    pad[1, 4:] = True
    with torch.no_grad():
        want = theirs(torch.from_numpy(x), src_key_padding_mask=torch.from_numpy(pad)).numpy()
    np.testing.assert_allclose(exe.run({"x": x, "pad": pad})["y"], want, rtol=1e-5, atol=1e-5)
