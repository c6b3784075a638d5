"""Elementwise math: unary and binary ops with numpy broadcasting, comparisons, where.

Each op's ``cpu`` slot is a scalar expression template (``{0}``, ``{1}`` are the
operands) from which the CPU backend generates fused loops.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

from attngraph.dsl import apply, as_tensor, binary, promote_pair
from attngraph.errors import DTypeError
from attngraph.ir import BadCase, DType, Example, Fusion, OpDef, TensorType, register
from attngraph.ir.rules import broadcast_types, require_dtype, require_float

__all__ = [
    "add", "sub", "mul", "div", "pow", "maximum", "minimum", "neg", "abs", "exp", "log", "sqrt", "rsqrt",
    "tanh", "erf", "relu", "gelu", "sigmoid", "sin", "cos", "equal", "not_equal", "less", "less_equal",
    "greater", "greater_equal", "logical_and", "logical_or", "logical_not", "where",
]

_F32, _F64 = np.float32, np.float64


def _unary_examples(positive=False, dtypes=(_F32, _F64)):
    def examples(rng):
        out = []
        for dt in dtypes:
            x = rng.standard_normal((3, 5)).astype(dt)
            if positive:
                x = np.abs(x) + 0.1
            out.append(Example((x,), label=np.dtype(dt).name))
        return out
    return examples


def _elementwise_flops(in_types, out_types, **attrs):
    return out_types[0].size


def per_input(*rules):
    """A grad rule from one function per input, ``rule(g, *inputs, y)`` → that input's gradient,
    called only for the inputs that want one (a None rule: no gradient for that input)."""
    def grad(ctx, g):
        args = (*ctx.inputs, ctx.outputs[0])
        return [rule(g, *args) if rule is not None and need else None for rule, need in zip(rules, ctx.needs)]
    return grad


def _no_grad(ctx, *out_grads):
    """Bool results (comparisons, logic): no gradient flows back to the inputs."""
    return [None] * len(ctx.inputs)


def _unary(name, reference, cpu, *, grad, float_only=True, positive=False, doc=""):
    def infer(x):
        if float_only:
            require_float(x)
        elif x.dtype == DType.bool:
            raise DTypeError(f"{name} does not take bool tensors")
        return x

    bad = (BadCase(((DType.int32, (3,)),), error="DTypeError", label="int input"),) if float_only else ()
    op = register(OpDef(name, infer=infer, reference=reference, cpu=cpu, fusion=Fusion.ELEMENTWISE,
                        grad=per_input(grad), flops=_elementwise_flops, examples=_unary_examples(positive),
                        bad_cases=bad,
                        doc=doc, family="elementwise"))
    return op


def _binary_examples(positive_rhs=False, positive_lhs=False):
    def examples(rng):
        out = []
        for dt in (_F32, _F64):
            a = rng.standard_normal((3, 1, 4)).astype(dt)
            b = rng.standard_normal((2, 4)).astype(dt)
            if positive_lhs:
                a = np.abs(a) + 0.5
            if positive_rhs:
                b = np.sign(b) * (np.abs(b) + 0.5)
            out.append(Example((a, b), label=f"broadcast {np.dtype(dt).name}"))
        return out
    return examples


_BROADCAST_BAD = BadCase(((DType.float32, (3, 4)), (DType.float32, (5,))), label="shapes do not broadcast")


def _binary_op(name, reference, cpu, *, grad, float_only=False, result_dtype=None, examples=None, doc=""):
    def infer(a, b):
        out = broadcast_types(a, b)
        if float_only:
            require_float(out, "operands")
        elif out.dtype == DType.bool and result_dtype is None:
            raise DTypeError(f"{name} does not take bool tensors", hint="cast them first: x.astype('float32')")
        return out.with_dtype(result_dtype) if result_dtype else out

    return register(OpDef(name, infer=infer, reference=reference, cpu=cpu, fusion=Fusion.ELEMENTWISE,
                          grad=grad, flops=_elementwise_flops, examples=examples or _binary_examples(),
                          bad_cases=(_BROADCAST_BAD,), doc=doc, family="elementwise"))


def _compare_op(name, reference, cpu, doc):
    def examples(rng):
        a = rng.integers(0, 3, (3, 1, 4)).astype(np.float32)
        b = rng.integers(0, 3, (2, 4)).astype(np.float32)
        return [Example((a, b), label="float"), Example((a.astype(np.int64), b.astype(np.int64)), label="int")]

    def infer(a, b):
        return broadcast_types(a, b, dtype=None).with_dtype(DType.bool)

    return register(OpDef(name, infer=infer, reference=reference, cpu=cpu, fusion=Fusion.ELEMENTWISE,
                          grad=_no_grad, flops=_elementwise_flops, examples=examples, bad_cases=(_BROADCAST_BAD,),
                          doc=doc,
                          family="elementwise"))


def _logical_op(name, reference, cpu, doc):
    def infer(a, b):
        require_dtype(a, DType.bool, "lhs")
        require_dtype(b, DType.bool, "rhs")
        return broadcast_types(a, b)

    def examples(rng):
        return [Example((rng.random((3, 1, 4)) > 0.5, rng.random((2, 4)) > 0.5))]

    return register(OpDef(name, infer=infer, reference=reference, cpu=cpu, fusion=Fusion.ELEMENTWISE,
                          grad=_no_grad, flops=_elementwise_flops, examples=examples,
                          bad_cases=(BadCase(((DType.bool, (3, 4)), (DType.bool, (5,)))),
                                     BadCase(((DType.float32, (3,)), (DType.bool, (3,))), error="DTypeError")),
                          doc=doc, family="elementwise"))


# -- binary arithmetic --------------------------------------------------------------------
# Gradients come in the broadcast shape of the output; autodiff sums them back to each input.
def _pow_exponent_grad(g, a, b, y):
    # d(a**b)/db = a**b log(a); taken as 0 where a == 0 (torch's rule), NaN where a < 0.
    return where(equal(a, 0.0), 0.0, g * y * log(a))


def _selector_grad(wins):
    """maximum/minimum: the gradient goes to the selected operand, split in half on ties (as torch)."""
    def grad(ctx, g):
        a, b = ctx.inputs
        da = where(wins(a, b), g, where(equal(a, b), g * 0.5, 0.0))
        return [da if ctx.needs[0] else None, g - da if ctx.needs[1] else None]
    return grad


_binary_op("add", np.add, "({0} + {1})", grad=per_input(lambda g, a, b, y: g, lambda g, a, b, y: g),
           doc="a + b, broadcasting.")
_binary_op("sub", np.subtract, "({0} - {1})", grad=per_input(lambda g, a, b, y: g, lambda g, a, b, y: -g),
           doc="a - b, broadcasting.")
_binary_op("mul", np.multiply, "({0} * {1})", grad=per_input(lambda g, a, b, y: g * b, lambda g, a, b, y: g * a),
           doc="a * b, broadcasting.")
_binary_op("div", np.divide, "({0} / {1})", float_only=True, examples=_binary_examples(positive_rhs=True),
           grad=per_input(lambda g, a, b, y: g / b, lambda g, a, b, y: -(g * y) / b),
           doc="a / b (true division; float only).")
_binary_op("pow", np.power, "({0} ** {1})", float_only=True, examples=_binary_examples(positive_lhs=True),
           grad=per_input(lambda g, a, b, y: g * b * pow(a, b - 1.0), _pow_exponent_grad),
           doc="a ** b, broadcasting (float only).")
_binary_op("maximum", np.maximum, "max({0}, {1})", grad=_selector_grad(lambda a, b: greater(a, b)),
           doc="Elementwise maximum.")
_binary_op("minimum", np.minimum, "min({0}, {1})", grad=_selector_grad(lambda a, b: less(a, b)),
           doc="Elementwise minimum.")

# -- unary math ---------------------------------------------------------------------------
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)

# Unary rules: grad(g, x, y) with y the forward output. Non-smooth points (relu and abs at 0)
# get the gradient 0, as torch.
_unary("neg", np.negative, "(-{0})", grad=lambda g, x, y: -g, float_only=False, doc="-x")
_unary("abs", np.abs, "abs({0})", grad=lambda g, x, y: where(greater(x, 0), g, where(less(x, 0), -g, 0.0)),
       float_only=False, doc="|x|")
_unary("exp", np.exp, "math.exp({0})", grad=lambda g, x, y: g * y, doc="e ** x")
_unary("log", np.log, "math.log({0})", grad=lambda g, x, y: g / x, positive=True, doc="Natural logarithm.")
_unary("sqrt", np.sqrt, "math.sqrt({0})", grad=lambda g, x, y: g * 0.5 / y, positive=True, doc="Square root.")
_unary("rsqrt", lambda x: (1 / np.sqrt(x)).astype(x.dtype), "(1.0 / math.sqrt({0}))",
       grad=lambda g, x, y: g * -0.5 * y * y * y, positive=True, doc="1 / sqrt(x)")
_unary("tanh", np.tanh, "math.tanh({0})", grad=lambda g, x, y: g * (1.0 - y * y), doc="Hyperbolic tangent.")
_unary("erf", special.erf, "math.erf({0})", grad=lambda g, x, y: g * _TWO_OVER_SQRT_PI * exp(-(x * x)),
       doc="The error function.")
_unary("sigmoid", special.expit, "(1.0 / (1.0 + math.exp(-{0})))", grad=lambda g, x, y: g * y * (1.0 - y),
       doc="1 / (1 + exp(-x))")
_unary("sin", np.sin, "math.sin({0})", grad=lambda g, x, y: g * cos(x), doc="Sine.")
_unary("cos", np.cos, "math.cos({0})", grad=lambda g, x, y: -(g * sin(x)), doc="Cosine.")
_unary("relu", lambda x: np.maximum(x, x.dtype.type(0)), "max({0}, 0.0)",
       grad=lambda g, x, y: where(greater(x, 0), g, 0.0), float_only=False, doc="max(x, 0)")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_reference(x, *, approximate="none"):
    if approximate == "tanh":
        return (0.5 * x * (1 + np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)))).astype(x.dtype)
    return (0.5 * x * (1 + special.erf(x / math.sqrt(2.0)))).astype(x.dtype)


def _gelu_infer(x, *, approximate="none"):
    require_float(x)
    if approximate not in ("none", "tanh"):
        raise DTypeError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return x


def _gelu_grad(ctx, g):
    (x,) = ctx.inputs
    if ctx.attrs["approximate"] == "tanh":
        # y = x/2 (1 + t), t = tanh(u), u = sqrt(2/pi) (x + 0.044715 x^3)
        t = tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
        du = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
        return [g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)]
    # y = x Phi(x): dy/dx = Phi(x) + x phi(x)
    cdf = 0.5 * (1.0 + erf(x * (1 / math.sqrt(2.0))))
    pdf = exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
    return [g * (cdf + x * pdf)]


def _gelu_examples(rng):
    x = rng.standard_normal((3, 5)).astype(np.float32)
    return [Example((x,), {"approximate": "none"}, "exact"), Example((x,), {"approximate": "tanh"}, "tanh"),
            Example((x.astype(np.float64),), {"approximate": "none"}, "exact float64")]


register(OpDef("gelu", infer=_gelu_infer, reference=_gelu_reference, grad=_gelu_grad, fusion=Fusion.ELEMENTWISE,
               cpu={"none": "(0.5 * {0} * (1.0 + math.erf({0} * 0.7071067811865476)))",
                    "tanh": "(0.5 * {0} * (1.0 + math.tanh(0.7978845608028654 * ({0} + 0.044715 * {0} * {0} * {0}))))"},
               flops=_elementwise_flops, examples=_gelu_examples,
               bad_cases=(BadCase(((DType.int64, (3,)),), error="DTypeError"),),
               doc="Gaussian error linear unit; approximate='none' (erf) or 'tanh'.", family="elementwise"))

# -- comparisons and logic ----------------------------------------------------------------
_compare_op("equal", np.equal, "({0} == {1})", "a == b (bool result).")
_compare_op("not_equal", np.not_equal, "({0} != {1})", "a != b (bool result).")
_compare_op("less", np.less, "({0} < {1})", "a < b (bool result).")
_compare_op("less_equal", np.less_equal, "({0} <= {1})", "a <= b (bool result).")
_compare_op("greater", np.greater, "({0} > {1})", "a > b (bool result).")
_compare_op("greater_equal", np.greater_equal, "({0} >= {1})", "a >= b (bool result).")
_logical_op("logical_and", np.logical_and, "({0} and {1})", "a & b for bool tensors.")
_logical_op("logical_or", np.logical_or, "({0} or {1})", "a | b for bool tensors.")


def _not_infer(x):
    require_dtype(x, DType.bool)
    return x


register(OpDef("logical_not", infer=_not_infer, reference=np.logical_not, cpu="(not {0})", grad=_no_grad,
               fusion=Fusion.ELEMENTWISE, flops=_elementwise_flops,
               examples=lambda rng: [Example((rng.random((3, 4)) > 0.5,))],
               bad_cases=(BadCase(((DType.float32, (3,)),), error="DTypeError"),),
               doc="~x for bool tensors.", family="elementwise"))


def _where_infer(cond, a, b):
    require_dtype(cond, DType.bool, "condition")
    value = broadcast_types(a, b)
    return broadcast_types(cond.with_dtype(value.dtype), value)


def _where_grad(ctx, g):
    cond = ctx.inputs[0]
    return [None, where(cond, g, 0.0) if ctx.needs[1] else None, where(cond, 0.0, g) if ctx.needs[2] else None]


def _where_examples(rng):
    cond = rng.random((3, 1, 4)) > 0.5
    a = rng.standard_normal((2, 4)).astype(np.float32)
    b = rng.standard_normal((1, 4)).astype(np.float32)
    return [Example((cond, a, b))]


register(OpDef("where", infer=_where_infer, reference=np.where, cpu="({1} if {0} else {2})", grad=_where_grad,
               fusion=Fusion.ELEMENTWISE, flops=_elementwise_flops, examples=_where_examples,
               bad_cases=(BadCase(((DType.bool, (3, 4)), (DType.float32, (5,)), (DType.float32, (1,)))),
                          BadCase(((DType.float32, (3,)), (DType.float32, (3,)), (DType.float32, (3,))),
                                  error="DTypeError")),
               doc="cond ? a : b, broadcasting all three (numpy's where).", family="elementwise"))


# -- the DSL functions --------------------------------------------------------------------
def add(a, b): return binary("add", a, b)
def sub(a, b): return binary("sub", a, b)
def mul(a, b): return binary("mul", a, b)
def div(a, b): return binary("div", a, b)
def pow(a, b): return binary("pow", a, b)  # noqa: A001 (numpy's name)
def maximum(a, b): return binary("maximum", a, b)
def minimum(a, b): return binary("minimum", a, b)
def equal(a, b): return binary("equal", a, b)
def not_equal(a, b): return binary("not_equal", a, b)
def less(a, b): return binary("less", a, b)
def less_equal(a, b): return binary("less_equal", a, b)
def greater(a, b): return binary("greater", a, b)
def greater_equal(a, b): return binary("greater_equal", a, b)
def logical_and(a, b): return binary("logical_and", a, b)
def logical_or(a, b): return binary("logical_or", a, b)
def logical_not(x): return apply("logical_not", [x])
def neg(x): return apply("neg", [x])
def abs(x): return apply("abs", [x])  # noqa: A001
def exp(x): return apply("exp", [x])
def log(x): return apply("log", [x])
def sqrt(x): return apply("sqrt", [x])
def rsqrt(x): return apply("rsqrt", [x])
def tanh(x): return apply("tanh", [x])
def erf(x): return apply("erf", [x])
def sigmoid(x): return apply("sigmoid", [x])
def sin(x): return apply("sin", [x])
def cos(x): return apply("cos", [x])
def relu(x): return apply("relu", [x])


def gelu(x, approximate: str = "none"):
    """GELU; ``approximate="tanh"`` for the tanh form (torch's argument)."""
    return apply("gelu", [x], approximate=approximate)


def where(cond, a, b):
    """``cond ? a : b`` with numpy broadcasting; ``a``/``b`` may be scalars."""
    from attngraph.dsl import Tensor

    anchor = next((t for t in (cond, a, b) if isinstance(t, Tensor)), None)
    if anchor is None:
        raise DTypeError("where needs at least one Tensor argument")
    g = anchor.graph
    like = next((t.dtype for t in (a, b) if isinstance(t, Tensor)), DType.float32)
    ta, tb = as_tensor(a, g, like=like), as_tensor(b, g, like=like)
    ta, tb = promote_pair(ta, tb)
    return apply("where", [as_tensor(cond, g), ta, tb])
