"""Element types: float32, float64, int32, int64, bool, and promotion between them."""

from __future__ import annotations

import enum

import numpy as np

from ..errors import DTypeError

__all__ = ["DType", "as_dtype", "promote", "float32", "float64", "int32", "int64", "bool_"]


class DType(str, enum.Enum):
    float32 = "float32"
    float64 = "float64"
    int32 = "int32"
    int64 = "int64"
    bool = "bool"

    @property
    def numpy(self) -> np.dtype:
        return np.dtype(self.value)

    @property
    def is_float(self) -> bool:
        return self in (DType.float32, DType.float64)

    @property
    def is_int(self) -> bool:
        return self in (DType.int32, DType.int64)

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return self.value


float32, float64, int32, int64, bool_ = DType.float32, DType.float64, DType.int32, DType.int64, DType.bool

_RANK = {DType.bool: 0, DType.int32: 1, DType.int64: 2, DType.float32: 3, DType.float64: 4}


def as_dtype(value) -> DType:
    """Accept a DType, a name ("float32"), a numpy dtype or a numpy scalar type."""
    if isinstance(value, DType):
        return value
    try:
        name = np.dtype(value).name
    except TypeError:
        name = str(value)
    try:
        return DType(name)
    except ValueError:
        supported = ", ".join(d.value for d in DType)
        raise DTypeError(f"unsupported dtype {value!r}; attngraph supports {supported}") from None


def promote(a: DType, b: DType) -> DType:
    """Result type of a binary op between two tensors (torch's rule: int with float gives the float)."""
    return a if _RANK[a] >= _RANK[b] else b


def weak_scalar_dtype(tensor_dtype: DType, scalar) -> DType:
    """Dtype a Python/numpy scalar takes next to a tensor: it adopts the tensor's kind (weak typing)."""
    if isinstance(scalar, (bool, np.bool_)):
        return tensor_dtype
    if isinstance(scalar, (int, np.integer)):
        return tensor_dtype
    if isinstance(scalar, (float, np.floating)):
        return tensor_dtype if tensor_dtype.is_float else DType.float32
    raise DTypeError(f"cannot use {type(scalar).__name__} {scalar!r} as a scalar operand")
