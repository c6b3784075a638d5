"""The graph IR: dtypes, symbolic shapes, nodes, graphs, the op registry and verify."""

from .dtypes import DType, as_dtype, promote
from .graph import Graph
from .node import SOURCE_OPS, Attrs, Node, Value
from .opdef import BadCase, Example, Fusion, OpDef, all_ops, get_op, has_op, register
from .shapes import (Dim, Shape, broadcast_shapes, dim_add, dim_div, dim_mul, dim_product, dim_sub,
                     eval_dim, eval_shape, format_shape, is_static, normalize_axes, normalize_axis,
                     normalize_dim, normalize_shape, shape_symbols)
from .source import Source, capture_source
from .types import TensorType
from .verify import infer_types, structural_diff, verify

__all__ = [
    "DType", "as_dtype", "promote", "Graph", "SOURCE_OPS", "Attrs", "Node", "Value",
    "BadCase", "Example", "Fusion", "OpDef", "all_ops", "get_op", "has_op", "register",
    "Dim", "Shape", "broadcast_shapes", "dim_add", "dim_div", "dim_mul", "dim_product", "dim_sub",
    "eval_dim", "eval_shape", "format_shape", "is_static", "normalize_axes", "normalize_axis",
    "normalize_dim", "normalize_shape", "shape_symbols", "Source", "capture_source", "TensorType",
    "infer_types", "structural_diff", "verify",
]
