"""The array helpers the backends share."""

import numpy as np
import pytest

from attngraph.backends.arrays import matmul_into


@pytest.mark.parametrize("a_shape, b_shape", [
    ((4, 3, 5), (5, 6)),          # rows stacked: one flattened GEMM
    ((2, 4, 3, 5), (5, 6)),
    ((4, 3, 5), (4, 5, 6)),       # batched: numpy's matmul
    ((3, 5), (5, 6)),
    ((2, 3, 0), (0, 6)),          # empty inner dim: zeros
    ((0, 3, 5), (5, 6)),
])
def test_matmul_into_equals_numpy(a_shape, b_shape):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(a_shape)
    b = rng.standard_normal(b_shape)
    expected = a @ b
    out = np.full(expected.shape, np.nan)
    matmul_into(a, b, out)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_matmul_into_non_contiguous_operands():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 5, 3)).transpose(0, 2, 1)        # (4, 3, 5), not contiguous
    b = rng.standard_normal((5, 6))
    out = np.empty((4, 3, 6))
    matmul_into(a, b, out)
    np.testing.assert_allclose(out, a @ b, rtol=1e-12)
