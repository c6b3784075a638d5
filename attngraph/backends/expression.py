"""Turning fused-region expressions into source code: shared by the CPU and CUDA code generators."""

from __future__ import annotations

import math

from ..ir import get_op

__all__ = ["literal", "scalar_template"]


def literal(value) -> str:
    """A Python literal for ``value`` that generated code can hold (inf and nan through ``math``)."""
    if isinstance(value, float):
        if math.isnan(value):
            return "math.nan"
        if math.isinf(value):
            return "math.inf" if value > 0 else "-math.inf"
    return repr(value)


def scalar_template(op_name: str, attrs: dict) -> str:
    """The op's scalar expression template from its ``cpu`` slot (``"math.exp({0})"``); a dict slot
    is keyed by one of the node's attr values (gelu's ``approximate``)."""
    tpl = get_op(op_name).cpu
    if isinstance(tpl, str):
        return tpl
    if isinstance(tpl, dict):
        for value in attrs.values():
            if isinstance(value, (str, int, float, bool)) and value in tpl:
                return tpl[value]
        raise NotImplementedError(f"{op_name}: no scalar template for attrs {attrs}")
    raise NotImplementedError(f"{op_name} has no scalar template; it cannot be part of a generated kernel")
