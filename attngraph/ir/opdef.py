"""OpDef: everything attngraph knows about one primitive, in named slots; and the registry."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import UnknownOpError

__all__ = ["Fusion", "OpDef", "Example", "BadCase", "register", "get_op", "all_ops", "has_op"]


class Fusion(enum.Enum):
    """How the fuser may group an op with its neighbours."""

    ELEMENTWISE = "elementwise"   # out[i] = f(in[i]) after broadcasting
    REDUCTION = "reduction"       # reduces (or normalises) along axes
    INJECTIVE = "injective"       # moves data without arithmetic: reshape, transpose, slice
    OPAQUE = "opaque"             # matmul, conv, attention: a kernel of its own


@dataclass(frozen=True)
class Example:
    """Inputs and attributes on which the registry tests run an op."""

    inputs: tuple  # numpy arrays
    attrs: dict = field(default_factory=dict)
    label: str = ""


@dataclass(frozen=True)
class BadCase:
    """Input types (``(dtype, shape)`` pairs) and attributes an op must refuse with ``error``."""

    inputs: tuple
    attrs: dict = field(default_factory=dict)
    error: str = "ShapeError"
    label: str = ""


@dataclass(frozen=True)
class OpDef:
    """One primitive. Slots:

    - ``infer(*input_types, **attrs)`` → a TensorType (or a tuple for several outputs);
      raises ShapeError/DTypeError with a message that names the shapes.
    - ``reference(*arrays, **attrs)`` → numpy result: the meaning of the op.
    - ``normalize(input_types, attrs)`` → canonical attrs (positive axes, resolved -1 ...).
    - ``shape_attrs``: attrs holding dims; symbolic ones are evaluated before ``reference`` runs.
    - ``grad(ctx, *out_grads)`` → one gradient per input (a graph Tensor, or None for none),
      built from DSL ops so the passes optimize and fuse the backward like the forward.
      ``ctx.inputs`` / ``ctx.outputs`` are the forward node's Tensors, ``ctx.attrs`` its
      normalized attrs, ``ctx.needs[i]`` whether input ``i`` wants a gradient (a rule may
      skip the others). A gradient may have the output's broadcast shape: autodiff sums it
      back to the input's shape. A multi-output op gets zeros for unused outputs. E.g.
      softmax: ``y, = ctx.outputs; return [y * (g - sum(g * y, axis=axis, keepdims=True))]``.
      See :mod:`attngraph.autodiff`.
    - ``differentiable``: False for ops with no gradient (``argmax``, ``full``); ``ag.grad``
      through one raises GradError naming it. Ops whose outputs are int/bool (comparisons)
      stay differentiable with a rule returning None: no gradient flows through them.
    - ``cpu`` / ``cuda``: kernels or codegen templates for the backends.
    - ``fusion``: the op's class for the fuser.
    - ``flops(input_types, output_types, **attrs)`` → a Dim estimate for ``attngraph info``.
    - ``examples(rng)`` / ``bad_cases``: what the registry-wide tests run.
    """

    name: str
    infer: Callable[..., Any]
    reference: Callable[..., Any]
    normalize: Callable[..., dict] | None = None
    shape_attrs: tuple[str, ...] = ()
    grad: Callable[..., Any] | None = None     # grad(ctx, *out_grads) -> input grads; see attngraph.autodiff
    differentiable: bool = True
    multiple_outputs: bool = False      # infer returns a tuple; the DSL returns a tuple of Tensors
    cpu: Any = None
    cuda: Any = None
    fusion: Fusion = Fusion.OPAQUE
    flops: Callable[..., Any] | None = None
    examples: Callable[[Any], list[Example]] | None = None
    bad_cases: tuple[BadCase, ...] = ()
    doc: str = ""
    family: str = ""

    def __repr__(self) -> str:
        return f"OpDef({self.name!r}, family={self.family!r}, fusion={self.fusion.value})"


_REGISTRY: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    if op.name in _REGISTRY:
        raise ValueError(f"op {op.name!r} is registered twice")
    _REGISTRY[op.name] = op
    return op


def has_op(name: str) -> bool:
    return name in _REGISTRY


def get_op(name: str) -> OpDef:
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else None
        raise UnknownOpError(f"unknown op {name!r}", hint=hint) from None


def all_ops() -> list[OpDef]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
