"""Shape and dtype rules that several op families share."""

from __future__ import annotations

from ..errors import DTypeError, ShapeError
from .dtypes import DType
from .shapes import broadcast_shapes, format_shape
from .types import TensorType

__all__ = ["require_float", "require_dtype", "require_same_dtype", "broadcast_types", "require_rank", "num_elements"]


def require_float(t: TensorType, what: str = "input") -> None:
    if not t.dtype.is_float:
        raise DTypeError(f"{what} must be float32 or float64, got {t.dtype}",
                         hint="cast it first: x.astype('float32')")


def require_dtype(t: TensorType, dtype: DType, what: str = "input") -> None:
    if t.dtype != dtype:
        raise DTypeError(f"{what} must be {dtype}, got {t.dtype}")


def require_same_dtype(*types: TensorType) -> DType:
    dtypes = {t.dtype for t in types}
    if len(dtypes) > 1:
        raise DTypeError(f"dtypes differ: {', '.join(str(t.dtype) for t in types)}",
                         hint="the DSL promotes operands for you; in a hand-built node cast them first")
    return types[0].dtype


def broadcast_types(*types: TensorType, dtype: DType | None = None) -> TensorType:
    shape = broadcast_shapes(*(t.shape for t in types))
    return TensorType(dtype or require_same_dtype(*types), shape)


def require_rank(t: TensorType, ranks, what: str = "input") -> None:
    ranks = (ranks,) if isinstance(ranks, int) else tuple(ranks)
    if t.rank not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ShapeError(f"{what} must have rank {want}, got shape {format_shape(t.shape)}")


def num_elements(types) -> object:
    from .shapes import dim_add

    total = 0
    for t in types:
        total = dim_add(total, t.size)
    return total
