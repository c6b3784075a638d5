"""TensorType: the (dtype, shape) of a value in the graph."""

from __future__ import annotations

from dataclasses import dataclass

from .dtypes import DType, as_dtype
from .shapes import Dim, Shape, dim_product, format_shape, normalize_shape

__all__ = ["TensorType"]


@dataclass(frozen=True)
class TensorType:
    dtype: DType
    shape: Shape

    def __post_init__(self):
        object.__setattr__(self, "dtype", as_dtype(self.dtype))
        object.__setattr__(self, "shape", normalize_shape(self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> Dim:
        return dim_product(self.shape)

    def with_shape(self, shape) -> "TensorType":
        return TensorType(self.dtype, shape)

    def with_dtype(self, dtype) -> "TensorType":
        return TensorType(dtype, self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}{format_shape(self.shape)}"
