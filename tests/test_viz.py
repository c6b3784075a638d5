"""ag.viz: heatmaps and image overlays are written as PNGs; rollout matches a direct computation."""

import numpy as np
import pytest

import attngraph as ag
from attngraph.errors import ShapeError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _softmax_rows(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_heatmap_writes_png_with_labels(tmp_path, rng):
    w = _softmax_rows(rng.normal(size=(3, 5)))
    path = tmp_path / "sub" / "heat.png"
    fig = ag.viz.attention_heatmap(w, list("12345"), ["a", "b", "c"], path=path, title="cross", annotate=True)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list("12345")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert all(t.get_rotation() != 0 for t in ax.get_xticklabels())
    assert ax.get_title() == "cross"
    texts = {t.get_text() for t in ax.texts}                 # annotate=True writes the values
    assert f"{w[0, 0]:.2f}" in texts and len(ax.texts) == 15


def test_heatmap_one_panel_per_head(tmp_path, rng):
    w = _softmax_rows(rng.normal(size=(4, 3, 6)))
    fig = ag.viz.attention_heatmap(w, path=tmp_path / "heads.png")
    panels = [a for a in fig.axes if a.get_title().startswith("head")]
    assert [a.get_title() for a in panels] == [f"head {h}" for h in range(4)]
    np.testing.assert_allclose(panels[2].images[0].get_array(), w[2])


def test_heatmap_into_given_axes(rng):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2)
    out = ag.viz.attention_heatmap(rng.random((2, 2)), ["x", "y"], ax=axes[1])
    assert out is fig and len(axes[1].images) == 1 and not axes[0].images
    plt.close(fig)


@pytest.mark.parametrize("shape", [(5,), (1, 2, 3, 4)])
def test_heatmap_bad_rank(shape):
    with pytest.raises(ShapeError, match="2-D"):
        ag.viz.attention_heatmap(np.ones(shape))


def test_heatmap_bad_label_lengths():
    with pytest.raises(ShapeError, match="x_labels has 2 labels"):
        ag.viz.attention_heatmap(np.ones((3, 4)), x_labels=["a", "b"])
    with pytest.raises(ShapeError, match="y_labels has 4 labels"):
        ag.viz.attention_heatmap(np.ones((3, 4)), y_labels=list("abcd"))


@pytest.mark.parametrize("image_shape", [(16, 16), (16, 16, 3), (3, 16, 16), (1, 16, 16)])
def test_overlay_writes_png(tmp_path, rng, image_shape):
    weights = rng.random(16)                                 # a 4×4 grid, flattened row-major
    path = tmp_path / "overlay.png"
    fig = ag.viz.image_attention_overlay(rng.random(image_shape), weights, path=path, title="cls")
    assert path.read_bytes()[:8] == PNG_MAGIC
    ax = fig.axes[0]
    assert ax.get_title() == "cls"
    np.testing.assert_allclose(ax.images[1].get_array(), weights.reshape(4, 4))


def test_overlay_bad_shapes(rng):
    with pytest.raises(ShapeError, match="square grid"):
        ag.viz.image_attention_overlay(rng.random((8, 8)), rng.random(12))
    with pytest.raises(ShapeError, match="image must be"):
        ag.viz.image_attention_overlay(rng.random((2, 8, 8, 3)), rng.random(4))
    with pytest.raises(ShapeError, match=r"\(gh, gw\)"):
        ag.viz.image_attention_overlay(rng.random((8, 8)), rng.random((2, 2, 2)))


def test_rollout_matches_direct_numpy(rng):
    layers = [_softmax_rows(rng.normal(size=(2, 3, 5, 5))) for _ in range(3)]   # (B, heads, T, T)
    expected = []
    for b in range(2):
        r = np.eye(5)
        for w in layers:
            a = w[b].mean(0) + np.eye(5)
            a = a / a.sum(1, keepdims=True)
            r = a @ r
        expected.append(r)
    got = ag.viz.attention_rollout(layers)
    np.testing.assert_allclose(got, np.stack(expected), rtol=1e-12)
    np.testing.assert_allclose(got.sum(-1), 1.0)             # rows stay distributions
    single = ag.viz.attention_rollout([w[0] for w in layers])
    np.testing.assert_allclose(single, expected[0], rtol=1e-12)


def test_rollout_bad_shapes(rng):
    with pytest.raises(ShapeError, match="no layers"):
        ag.viz.attention_rollout([])
    with pytest.raises(ShapeError, match="heads"):
        ag.viz.attention_rollout([rng.random((4, 4))])
    with pytest.raises(ShapeError, match="layer 1"):
        ag.viz.attention_rollout([rng.random((2, 4, 4)), rng.random((2, 5, 5))])
