"""nn.Embedding's padding_idx: the same output as torch, and no gradient into the padding row."""

import numpy as np
import pytest
import torch

import attngraph as ag
from attngraph import nn


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_padding_row_gets_no_gradient_like_torch(backend):
    rng = np.random.default_rng(0)
    ids = np.array([[1, 0, 3, 0], [2, 2, 0, 4]])
    emb = nn.Embedding(5, 3, padding_idx=0)
    weight = rng.standard_normal((5, 3)).astype(np.float32)       # a non-zero padding row, as loaded weights may have
    emb.load_state_dict({"weight": weight})
    g = ag.Graph("emb")
    x = g.input("ids", (2, 4), "int64")
    y = emb(x)
    coef = g.input("coef", (2, 4, 3))
    loss = ag.sum(y * coef)
    (dw,) = ag.grad(loss, [emb.parameters(g)["weight"]])
    g.output("y", y), g.output("dw", dw)
    c = rng.standard_normal((2, 4, 3)).astype(np.float32)
    out = ag.compile(g, backend=backend).run({"ids": ids, "coef": c})

    te = torch.nn.Embedding(5, 3, padding_idx=0)
    te.weight.data = torch.tensor(weight)
    ty = te(torch.tensor(ids))
    (ty * torch.tensor(c)).sum().backward()
    np.testing.assert_allclose(out["y"], ty.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(out["dw"], te.weight.grad.numpy(), rtol=1e-5, atol=1e-6)
    assert np.all(out["dw"][0] == 0)


def test_stop_gradient_passes_values_and_no_gradient():
    g = ag.Graph("sg")
    w = g.param("w", (3,), init=lambda rng, shape: np.array([1.0, 2.0, 3.0]))
    loss = ag.sum(w * w + ag.stop_gradient(w) * w)
    (dw,) = ag.grad(loss, [w])
    g.output("loss", loss), g.output("dw", dw)
    out = ag.compile(g, backend="numpy").run({})
    np.testing.assert_allclose(out["loss"], 28.0)
    np.testing.assert_allclose(out["dw"], [3.0, 6.0, 9.0])        # 2w + stop_gradient(w)
