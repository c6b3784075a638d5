"""conv2d, conv_transpose2d, max/avg pooling, upsample, patchify and pad against torch.

Every op is built with the DSL and run through the numpy backend; torch (CPU) is the
oracle. Then shape and dtype errors: what they say and where they point.
"""

import inspect

import numpy as np
import pytest

import attngraph as ag
from attngraph.errors import DTypeError, ShapeError
from attngraph.ir import Fusion, TensorType, get_op

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = {np.float32: dict(rtol=1e-5, atol=2e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}


def _run(g, feeds):
    return ag.compile(g, backend="numpy").run(feeds)


def _close(ours, theirs, dtype):
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    assert ours.dtype == np.dtype(dtype)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, **TOL[dtype])


def _rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


# ---------------------------------------------------------------------------------------------
# conv2d
# ---------------------------------------------------------------------------------------------
# (x shape, weight shape, bias, stride, padding, dilation, groups)
CONV2D_CASES = [
    ((2, 3, 8, 8), (4, 3, 3, 3), True, 1, 0, 1, 1),
    ((2, 3, 9, 7), (5, 3, 3, 3), False, 2, 1, 1, 1),
    ((1, 4, 11, 10), (6, 2, 3, 2), True, (2, 1), (1, 0), 1, 2),
    ((2, 3, 12, 13), (4, 3, 3, 3), True, 1, 2, 2, 1),
    ((1, 4, 10, 9), (4, 1, 3, 3), True, 2, 1, (2, 1), 4),          # depthwise
    ((2, 6, 7, 7), (6, 2, 1, 1), False, 1, 0, 1, 3),                # grouped 1x1
    ((1, 3, 16, 16), (8, 3, 4, 4), True, 4, 0, 1, 1),               # patch embedding
    ((1, 2, 5, 5), (3, 2, 5, 5), True, 1, 0, 1, 1),                 # kernel == input
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("xs, ws, bias, stride, padding, dilation, groups", CONV2D_CASES)
def test_conv2d_matches_torch(xs, ws, bias, stride, padding, dilation, groups, dtype):
    rng = np.random.default_rng(0)
    x, w = _rand(rng, xs, dtype), _rand(rng, ws, dtype)
    b = _rand(rng, (ws[0],), dtype) if bias else None
    g = ag.Graph("conv")
    tx = g.input("x", xs, np.dtype(dtype).name)
    tb = g.const("b", b) if bias else None
    g.output("y", ag.conv2d(tx, g.const("w", w), tb, stride=stride, padding=padding, dilation=dilation,
                            groups=groups))
    want = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), None if b is None else torch.from_numpy(b),
                    stride=stride, padding=padding, dilation=dilation, groups=groups)
    _close(_run(g, {"x": x})["y"], want, dtype)


def test_conv2d_symbolic_batch_and_stride_one_spatial_dims():
    rng = np.random.default_rng(1)
    w = _rand(rng, (4, 3, 3, 3), np.float32)
    g = ag.Graph("conv")
    x = g.input("x", ("B", 3, "H", "W"))
    y = ag.conv2d(x, g.const("w", w), padding=(1, 0))
    assert y.shape == ("B", 4, "H", "W-2")
    g.output("y", y)
    for shape in [(1, 3, 6, 5), (3, 3, 9, 4)]:
        xv = _rand(rng, shape, np.float32)
        _close(_run(g, {"x": xv})["y"], F.conv2d(torch.from_numpy(xv), torch.from_numpy(w), padding=(1, 0)),
               np.float32)


def test_conv2d_accepts_numpy_weights_and_normalizes_attrs():
    g = ag.Graph("conv")
    x = g.input("x", (1, 2, 6, 6))
    y = ag.conv2d(x, np.ones((3, 2, 3, 3), np.float32), np.zeros(3, np.float32), stride=2, padding=1)
    assert y.node.op == "conv2d" and len(y.node.inputs) == 3
    assert dict(y.node.attrs) == {"stride": (2, 2), "padding": (1, 1), "dilation": (1, 1), "groups": 1}
    assert y.shape == (1, 3, 3, 3)


def test_conv_flops_are_twice_the_macs():
    op = get_op("conv2d")
    x, w = TensorType("float32", (2, 4, 8, 8)), TensorType("float32", (6, 2, 3, 3))
    attrs = op.normalize([x, w], {"padding": 1, "groups": 2})
    out = op.infer(x, w, **attrs)
    assert out.shape == (2, 6, 8, 8)
    assert op.flops([x, w], [out], **attrs) == 2 * (2 * 6 * 8 * 8) * (2 * 3 * 3)
    sym = TensorType("float32", ("B", 4, 8, 8))
    assert op.flops([sym, w], [op.infer(sym, w, **attrs)], **attrs) == "13824*B"

    opt = get_op("conv_transpose2d")
    wt = TensorType("float32", (4, 3, 2, 2))
    attrs = opt.normalize([x, wt], {"stride": 2})
    out = opt.infer(x, wt, **attrs)
    assert out.shape == (2, 3, 16, 16)
    assert opt.flops([x, wt], [out], **attrs) == 2 * (2 * 4 * 8 * 8) * (3 * 2 * 2)


# ---------------------------------------------------------------------------------------------
# conv_transpose2d
# ---------------------------------------------------------------------------------------------
# (x shape, weight shape, bias, stride, padding, output_padding, groups, dilation)
CONV_T_CASES = [
    ((2, 3, 5, 5), (3, 4, 3, 3), True, 1, 0, 0, 1, 1),
    ((2, 3, 5, 6), (3, 2, 3, 3), False, 2, 1, 1, 1, 1),
    ((1, 4, 4, 3), (4, 3, 2, 3), True, (2, 3), (0, 1), (1, 2), 2, 1),
    ((1, 2, 6, 5), (2, 3, 3, 2), True, 2, 1, 0, 1, (2, 3)),
    ((2, 8, 3, 3), (8, 4, 4, 4), True, 2, 1, 0, 1, 1),              # the usual x2 upsampling layer
    ((1, 3, 7, 7), (3, 1, 3, 3), False, 3, 2, 2, 3, 2),              # depthwise, output_padding < dilation
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("xs, ws, bias, stride, padding, output_padding, groups, dilation", CONV_T_CASES)
def test_conv_transpose2d_matches_torch(xs, ws, bias, stride, padding, output_padding, groups, dilation, dtype):
    rng = np.random.default_rng(2)
    x, w = _rand(rng, xs, dtype), _rand(rng, ws, dtype)
    b = _rand(rng, (ws[1] * groups,), dtype) if bias else None
    g = ag.Graph("convt")
    tx = g.input("x", xs, np.dtype(dtype).name)
    y = ag.conv_transpose2d(tx, g.const("w", w), g.const("b", b) if bias else None, stride=stride,
                            padding=padding, output_padding=output_padding, groups=groups, dilation=dilation)
    g.output("y", y)
    want = F.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(w), None if b is None else torch.from_numpy(b),
                              stride=stride, padding=padding, output_padding=output_padding, groups=groups,
                              dilation=dilation)
    assert y.shape == tuple(want.shape)
    _close(_run(g, {"x": x})["y"], want, dtype)


def test_conv_transpose2d_symbolic_spatial_dims():
    rng = np.random.default_rng(3)
    w = _rand(rng, (3, 2, 4, 4), np.float32)
    g = ag.Graph("convt")
    x = g.input("x", ("B", 3, "H", "W"))
    y = ag.conv_transpose2d(x, g.const("w", w), stride=2, padding=1)
    assert y.shape == ("B", 2, "2*H", "2*W")
    g.output("y", y)
    xv = _rand(rng, (2, 3, 5, 3), np.float32)
    want = F.conv_transpose2d(torch.from_numpy(xv), torch.from_numpy(w), stride=2, padding=1)
    _close(_run(g, {"x": xv})["y"], want, np.float32)


# ---------------------------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------------------------
# (x shape, kernel_size, stride, padding)
POOL_CASES = [
    ((2, 3, 8, 8), 2, None, 0),
    ((2, 3, 9, 7), 3, 2, 1),
    ((1, 2, 11, 10), (3, 2), (2, 1), (1, 1)),
    ((1, 4, 7, 7), 3, 1, 1),
    ((3, 5, 6), (2, 3), None, (1, 0)),                               # unbatched (C, H, W)
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("xs, kernel, stride, padding", POOL_CASES)
def test_max_pool2d_matches_torch(xs, kernel, stride, padding, dtype):
    x = _rand(np.random.default_rng(4), xs, dtype)
    g = ag.Graph("pool")
    g.output("y", ag.max_pool2d(g.input("x", xs, np.dtype(dtype).name), kernel, stride, padding))
    want = F.max_pool2d(torch.from_numpy(x), kernel, stride, padding)
    _close(_run(g, {"x": x})["y"], want, dtype)


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("xs, kernel, stride, padding", POOL_CASES)
def test_avg_pool2d_matches_torch(xs, kernel, stride, padding, dtype, count_include_pad):
    x = _rand(np.random.default_rng(5), xs, dtype)
    g = ag.Graph("pool")
    g.output("y", ag.avg_pool2d(g.input("x", xs, np.dtype(dtype).name), kernel, stride, padding,
                                count_include_pad=count_include_pad))
    want = F.avg_pool2d(torch.from_numpy(x), kernel, stride, padding, count_include_pad=count_include_pad)
    _close(_run(g, {"x": x})["y"], want, dtype)


def test_max_pool2d_pads_with_minus_infinity():
    x = -np.ones((1, 1, 3, 3), np.float32) * 5
    g = ag.Graph("pool")
    g.output("y", ag.max_pool2d(g.input("x", (1, 1, 3, 3)), 2, stride=2, padding=1))
    np.testing.assert_array_equal(_run(g, {"x": x})["y"], np.full((1, 1, 2, 2), -5, np.float32))


def test_pooling_symbolic_batch():
    g = ag.Graph("pool")
    x = g.input("x", ("B", 2, 6, 6))
    y = ag.avg_pool2d(x, 2)
    assert y.shape == ("B", 2, 3, 3)
    assert ag.max_pool2d(x, 3, stride=1, padding=1).shape == ("B", 2, 6, 6)
    g.output("y", y)
    xv = _rand(np.random.default_rng(6), (3, 2, 6, 6), np.float32)
    _close(_run(g, {"x": xv})["y"], F.avg_pool2d(torch.from_numpy(xv), 2), np.float32)


# ---------------------------------------------------------------------------------------------
# upsample
# ---------------------------------------------------------------------------------------------
# (x shape, scale_factor, size, mode, align_corners)
UPSAMPLE_CASES = [
    ((2, 3, 4, 5), 2, None, "nearest", None),
    ((1, 2, 5, 3), 3, None, "nearest", None),
    ((1, 2, 5, 7), (1.5, 2.5), None, "nearest", None),
    ((1, 2, 7, 6), 0.5, None, "nearest", None),
    ((1, 2, 5, 4), 1.1, None, "nearest", None),                     # out == in: torch copies
    ((1, 2, 5, 3), None, (7, 8), "nearest", None),
    ((1, 2, 9, 8), None, (4, 3), "nearest", None),
    ((1, 2, 5, 3), None, (7, 8), "nearest-exact", None),
    ((1, 2, 5, 7), (1.5, 2.5), None, "nearest-exact", None),
    ((2, 3, 4, 5), 2, None, "bilinear", False),
    ((2, 3, 4, 5), 2, None, "bilinear", True),
    ((1, 2, 5, 7), (1.5, 2.5), None, "bilinear", False),
    ((1, 2, 5, 7), (1.5, 2.5), None, "bilinear", True),
    ((1, 2, 5, 3), None, (9, 4), "bilinear", False),
    ((1, 2, 5, 3), None, (9, 4), "bilinear", True),
    ((1, 2, 9, 8), None, (4, 1), "bilinear", False),
    ((1, 2, 9, 8), None, (4, 1), "bilinear", True),
    ((1, 2, 7, 6), 0.5, None, "bilinear", False),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("xs, scale, size, mode, align", UPSAMPLE_CASES)
def test_upsample_matches_torch_interpolate(xs, scale, size, mode, align, dtype):
    x = _rand(np.random.default_rng(7), xs, dtype)
    g = ag.Graph("up")
    y = ag.upsample(g.input("x", xs, np.dtype(dtype).name), scale_factor=scale, size=size, mode=mode,
                    align_corners=align)
    g.output("y", y)
    want = F.interpolate(torch.from_numpy(x), scale_factor=scale, size=size, mode=mode, align_corners=align)
    assert y.shape == tuple(want.shape)
    ours = _run(g, {"x": x})["y"]
    if mode.startswith("nearest"):
        np.testing.assert_array_equal(ours, want.numpy())
    _close(ours, want, dtype)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_upsample_integer_scale_keeps_symbolic_dims(mode):
    g = ag.Graph("up")
    x = g.input("x", ("B", 3, "H", "W"))
    y = ag.upsample(x, scale_factor=2, mode=mode)
    assert y.shape == ("B", 3, "2*H", "2*W")
    assert y.node.attrs["size"] == ("2*H", "2*W") and y.node.attrs["scales"] == (2.0, 2.0)
    g.output("y", y)
    xv = _rand(np.random.default_rng(8), (2, 3, 3, 5), np.float32)
    want = F.interpolate(torch.from_numpy(xv), scale_factor=2, mode=mode)
    _close(_run(g, {"x": xv})["y"], want, np.float32)


def test_upsample_fusion_class_and_normalized_attrs():
    assert get_op("upsample").fusion is Fusion.OPAQUE
    g = ag.Graph("up")
    y = ag.upsample(g.input("x", (1, 1, 4, 6)), size=5, mode="bilinear")
    assert dict(y.node.attrs) == {"mode": "bilinear", "align_corners": False, "size": (5, 5), "scales": None}


# ---------------------------------------------------------------------------------------------
# patchify: the pinned contract with a stride-p Conv2d patch embedding
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels, height, width, patch, dim", [(3, 8, 12, 4, 5), (1, 6, 6, 3, 4),
                                                                 (3, 32, 32, 16, 8), (2, 4, 4, 1, 3)])
def test_patchify_equals_conv2d_patch_embedding(channels, height, width, patch, dim, dtype):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, dim, patch, stride=patch).to(torch.float64 if dtype == np.float64 else
                                                                torch.float32)
    x = _rand(np.random.default_rng(9), (2, channels, height, width), dtype)
    g = ag.Graph("vit")
    tokens = ag.patchify(g.input("x", ("B", channels, height, width), np.dtype(dtype).name), patch)
    n = (height // patch) * (width // patch)
    assert tokens.shape == ("B", n, channels * patch * patch)
    g.output("tokens", tokens)
    ours = _run(g, {"x": x})["tokens"]
    weight = conv.weight.detach().numpy()
    embedded = ours @ weight.reshape(dim, -1).T + conv.bias.detach().numpy()
    with torch.no_grad():
        want = conv(torch.from_numpy(x)).flatten(2).transpose(1, 2)  # (B, N, dim)
    _close(embedded, want, dtype)


def test_patchify_row_major_patches_flattened_channel_first():
    x = np.arange(2 * 4 * 6, dtype=np.float32).reshape(1, 2, 4, 6)
    g = ag.Graph("p")
    g.output("y", ag.patchify(g.input("x", (1, 2, 4, 6)), 2))
    y = _run(g, {"x": x})["y"]
    assert y.shape == (1, 6, 8)
    np.testing.assert_array_equal(y[0, 1], x[0, :, 0:2, 2:4].reshape(-1))   # second patch: top row, middle
    np.testing.assert_array_equal(y[0, 3], x[0, :, 2:4, 0:2].reshape(-1))   # fourth: second row, left
    assert get_op("patchify").fusion is Fusion.INJECTIVE


def test_patchify_symbolic_multiple_of_patch():
    g = ag.Graph("p")
    assert ag.patchify(g.input("x", ("B", 3, "16*h", "16*w")), 16).shape == ("B", "h*w", 768)


# ---------------------------------------------------------------------------------------------
# pad
# ---------------------------------------------------------------------------------------------
def _torch_pad_arg(pairs):
    """numpy's per-axis (before, after) pairs → F.pad's flat tuple, last axis first."""
    flat = []
    for before, after in reversed(pairs):
        flat += [before, after]
    return tuple(flat)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, pairs, value", [
    ((2, 3, 4), ((0, 0), (1, 2), (3, 0)), 0.0),
    ((2, 3, 5, 5), ((0, 0), (0, 0), (1, 1), (2, 3)), -1.5),
    ((3, 4), ((2, 1), (0, 4)), float("-inf")),
])
def test_pad_matches_torch(shape, pairs, value, dtype):
    x = _rand(np.random.default_rng(10), shape, dtype)
    g = ag.Graph("pad")
    g.output("y", ag.pad(g.input("x", shape, np.dtype(dtype).name), pairs, value=value))
    want = F.pad(torch.from_numpy(x), _torch_pad_arg(pairs), value=value)
    _close(_run(g, {"x": x})["y"], want, dtype)


@pytest.mark.parametrize("pads", [2, (1, 3), ((1, 3),), ((0, 1), (2, 0))])
def test_pad_follows_numpy_pad_width_rules(pads):
    x = np.arange(6, dtype=np.int64).reshape(2, 3)
    g = ag.Graph("pad")
    y = ag.pad(g.input("x", (2, 3), "int64"), pads, value=7)
    want = np.pad(x, pads, constant_values=7)
    assert y.shape == want.shape
    g.output("y", y)
    out = _run(g, {"x": x})["y"]
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, want)


def test_pad_symbolic_dims():
    g = ag.Graph("pad")
    y = ag.pad(g.input("x", ("B", "T", 4)), ((0, 0), (1, 1), (0, 2)))
    assert y.shape == ("B", "T+2", 6)
    assert y.node.attrs["pads"] == ((0, 0), (1, 1), (0, 2))
    assert get_op("pad").fusion is Fusion.INJECTIVE
    g.output("y", y)
    x = _rand(np.random.default_rng(11), (2, 5, 4), np.float32)
    _close(_run(g, {"x": x})["y"], F.pad(torch.from_numpy(x), (0, 2, 1, 1)), np.float32)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def _graph_input(shape, dtype="float32"):
    g = ag.Graph("bad")
    return g, g.input("x", shape, dtype)


def test_conv2d_wrong_channel_count_names_the_shapes():
    g, x = _graph_input((1, 3, 8, 8))
    with pytest.raises(ShapeError) as err:
        ag.conv2d(x, g.const("w", np.zeros((4, 2, 3, 3), np.float32)))
    text = str(err.value)
    assert "conv2d of (1, 3, 8, 8) and (4, 2, 3, 3)" in text and "input channels" in text
    assert "hint:" in text


def test_conv_groups_must_divide_channels():
    g, x = _graph_input((1, 6, 8, 8))
    with pytest.raises(ShapeError, match="groups=4 does not divide the 6 input channels"):
        ag.conv2d(x, g.const("w", np.zeros((4, 1, 3, 3), np.float32)), groups=4)
    with pytest.raises(ShapeError, match="groups=4 does not divide"):
        ag.conv_transpose2d(x, g.const("wt", np.zeros((6, 1, 3, 3), np.float32)), groups=4)
    with pytest.raises(ShapeError, match="groups=3 does not divide the 4 output channels"):
        ag.conv2d(x, g.const("w3", np.zeros((4, 2, 3, 3), np.float32)), groups=3)


def test_kernel_larger_than_input():
    g, x = _graph_input((1, 3, 4, 4))
    with pytest.raises(ShapeError, match="kernel height 5 is larger than the input height 4"):
        ag.conv2d(x, g.const("w", np.zeros((2, 3, 5, 5), np.float32)))
    with pytest.raises(ShapeError, match=r"kernel width 9 \(dilation included\)"):
        ag.conv2d(x, g.const("w2", np.zeros((2, 3, 1, 3), np.float32)), dilation=4)
    with pytest.raises(ShapeError, match="larger than the input"):
        ag.max_pool2d(x, 5)
    with pytest.raises(ShapeError, match="more than half the kernel"):
        ag.avg_pool2d(x, 2, padding=2)


def test_patchify_not_divisible_gives_a_hint():
    _, x = _graph_input((2, 3, 30, 32))
    with pytest.raises(ShapeError) as err:
        ag.patchify(x, 16)
    text = str(err.value)
    assert "height 30" in text and "patch size 16" in text and "hint:" in text


def test_other_shape_errors():
    g, x = _graph_input(("B", 3, "H", "W"))
    with pytest.raises(ShapeError, match="symbolic"):
        ag.conv2d(x, g.const("w", np.zeros((2, 3, 3, 3), np.float32)), stride=2)
    with pytest.raises(ShapeError, match="integer"):
        ag.upsample(x, scale_factor=1.5)
    with pytest.raises(ShapeError, match="bias has shape"):
        ag.conv2d(x, g.const("w2", np.zeros((2, 3, 3, 3), np.float32)), g.const("b", np.zeros(3, np.float32)))
    with pytest.raises(ShapeError, match="output_padding"):
        ag.conv_transpose2d(x, g.const("wt", np.zeros((3, 2, 3, 3), np.float32)), stride=2, output_padding=2)
    with pytest.raises(ShapeError, match="only one of size and scale_factor"):
        ag.upsample(x, scale_factor=2, size=(4, 4))
    with pytest.raises(ShapeError, match="align_corners"):
        ag.upsample(x, scale_factor=2, align_corners=True)
    with pytest.raises(ShapeError, match="do not fit a tensor of rank 4"):
        ag.pad(x, ((1, 1),) * 3)


def test_dtype_errors():
    g, x = _graph_input((1, 3, 8, 8))
    with pytest.raises(DTypeError, match="weight is float64"):
        ag.conv2d(x, g.const("w", np.zeros((2, 3, 3, 3), np.float64)))
    with pytest.raises(DTypeError, match="bias is float64"):
        ag.conv_transpose2d(x, g.const("wt", np.zeros((3, 2, 3, 3), np.float32)),
                            g.const("b", np.zeros(2, np.float64)))
    _, xi = _graph_input((1, 3, 8, 8), "int64")
    with pytest.raises(DTypeError):
        ag.max_pool2d(xi, 2)
    with pytest.raises(DTypeError):
        ag.upsample(xi, scale_factor=2, mode="bilinear")
    with pytest.raises(DTypeError, match="cannot pad a int64 tensor"):
        ag.pad(xi, 1, value=0.5)
    assert ag.upsample(xi, scale_factor=2).dtype == ag.int64        # nearest moves ints fine


def test_shape_error_points_at_this_line():
    g, x = _graph_input((1, 3, 8, 8))
    w = g.const("w", np.zeros((4, 5, 3, 3), np.float32))
    line = inspect.currentframe().f_lineno + 2
    with pytest.raises(ShapeError) as err:
        ag.conv2d(x, w)
    assert f"test_conv_family.py:{line}" in str(err.value)
    assert "ag.conv2d(x, w)" in str(err.value)


def test_fusion_classes():
    assert get_op("conv2d").fusion is Fusion.OPAQUE
    assert get_op("conv_transpose2d").fusion is Fusion.OPAQUE
    assert get_op("max_pool2d").fusion is Fusion.REDUCTION
    assert get_op("avg_pool2d").fusion is Fusion.REDUCTION


# ---------------------------------------------------------------------------------------------
# each op's own examples and bad cases (what the registry-wide tests run), checked here too
# ---------------------------------------------------------------------------------------------
FAMILY = ["conv2d", "conv_transpose2d", "max_pool2d", "avg_pool2d", "upsample", "patchify", "pad"]


@pytest.mark.parametrize("name", FAMILY)
def test_examples_keep_dtype_and_inferred_shape(name):
    op = get_op(name)
    examples = op.examples(np.random.default_rng(12))
    assert examples
    for ex in examples:
        types = [TensorType(a.dtype, a.shape) for a in ex.inputs]
        attrs = op.normalize(types, dict(ex.attrs)) if op.normalize else dict(ex.attrs)
        assert (op.normalize(types, dict(attrs)) if op.normalize else attrs) == attrs, "normalize is idempotent"
        out = op.infer(*types, **attrs)
        y = op.reference(*ex.inputs, **attrs)
        assert y.dtype == out.dtype.numpy and y.shape == out.shape, ex.label


@pytest.mark.parametrize("name", FAMILY)
def test_bad_cases_raise_their_error(name):
    op = get_op(name)
    assert op.bad_cases
    for case in op.bad_cases:
        types = [TensorType(d, s) for d, s in case.inputs]
        with pytest.raises(getattr(ag.errors, case.error)):
            attrs = op.normalize(types, dict(case.attrs)) if op.normalize else dict(case.attrs)
            op.infer(*types, **attrs)
