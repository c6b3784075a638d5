"""Shapes whose dimensions are ints or symbolic expressions.

A dimension is an ``int`` or a ``str`` holding a polynomial over named symbols:
``"B"``, ``"T+1"``, ``"B*T"``. Strings are kept in one canonical spelling, so two
dims are equal exactly when their strings are. Symbols are bound to ints when a
compiled graph runs (from the shapes of the feeds), and every dim can then be
evaluated.
"""

from __future__ import annotations

import ast
from collections import Counter
from typing import Iterable, Mapping, Union

from ..errors import ShapeError

__all__ = [
    "Dim", "Shape", "normalize_dim", "normalize_shape", "format_shape", "is_static",
    "dim_add", "dim_sub", "dim_mul", "dim_div", "dim_product", "eval_dim", "eval_shape",
    "shape_symbols", "broadcast_shapes", "normalize_axis", "normalize_axes",
]

Dim = Union[int, str]
Shape = tuple  # tuple[Dim, ...]

# A polynomial: {monomial (sorted tuple of symbol names): integer coefficient}.
_Poly = dict


def _poly_const(c: int) -> _Poly:
    return {(): c} if c else {}


def _poly_add(a: _Poly, b: _Poly, sign: int = 1) -> _Poly:
    out = dict(a)
    for mono, c in b.items():
        out[mono] = out.get(mono, 0) + sign * c
        if out[mono] == 0:
            del out[mono]
    return out


def _poly_mul(a: _Poly, b: _Poly) -> _Poly:
    out: _Poly = {}
    for ma, ca in a.items():
        for mb, cb in b.items():
            mono = tuple(sorted(ma + mb))
            out[mono] = out.get(mono, 0) + ca * cb
            if out[mono] == 0:
                del out[mono]
    return out


def _parse(text: str) -> _Poly:
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise ShapeError(f"bad symbolic dimension {text!r}: use a name like 'B' or an expression like 'T+1'") from None

    def walk(node) -> _Poly:
        if isinstance(node, ast.Name):
            return {(node.id,): 1}
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return _poly_const(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return _poly_mul(_poly_const(-1), walk(node.operand))
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Add):
                return _poly_add(left, right)
            if isinstance(node.op, ast.Sub):
                return _poly_add(left, right, -1)
            return _poly_mul(left, right)
        raise ShapeError(f"bad symbolic dimension {text!r}: only names, ints, +, - and * are allowed")

    return walk(tree)


def _to_poly(d: Dim) -> _Poly:
    if isinstance(d, str):
        return _parse(d)
    return _poly_const(int(d))


def _from_poly(p: _Poly) -> Dim:
    if not p:
        return 0
    if set(p) == {()}:
        return p[()]
    terms = []
    # Higher-degree monomials first, then alphabetical; the constant last.
    for mono in sorted(p, key=lambda m: (-len(m), m)):
        c = p[mono]
        if mono == ():
            body = str(abs(c))
        else:
            body = "*".join(mono)
            if abs(c) != 1:
                body = f"{abs(c)}*{body}"
        sign = "-" if c < 0 else "+"
        terms.append((sign, body))
    text = ("-" if terms[0][0] == "-" else "") + terms[0][1]
    for sign, body in terms[1:]:
        text += f"{sign}{body}"
    return text


def normalize_dim(d) -> Dim:
    """Canonical form of a dimension: an int, or the canonical string of a polynomial."""
    if isinstance(d, bool):
        raise ShapeError(f"bad dimension {d!r}")
    if isinstance(d, str):
        return _from_poly(_parse(d))
    try:
        import operator

        return operator.index(d)
    except TypeError:
        raise ShapeError(f"bad dimension {d!r}: a dimension is an int or a symbol name like 'B'") from None


def normalize_shape(shape) -> Shape:
    if isinstance(shape, (int, str)):
        shape = (shape,)
    dims = tuple(normalize_dim(d) for d in shape)
    for d in dims:
        if isinstance(d, int) and d < 0:
            raise ShapeError(f"negative dimension {d} in shape {format_shape(dims)}")
    return dims


def format_shape(shape: Iterable[Dim]) -> str:
    dims = [str(d) for d in shape]
    if len(dims) == 1:
        return f"({dims[0]},)"
    return "(" + ", ".join(dims) + ")"


def is_static(shape_or_dim) -> bool:
    if isinstance(shape_or_dim, tuple):
        return all(isinstance(d, int) for d in shape_or_dim)
    return isinstance(shape_or_dim, int)


def dim_add(a: Dim, b: Dim) -> Dim:
    return _from_poly(_poly_add(_to_poly(a), _to_poly(b)))


def dim_sub(a: Dim, b: Dim) -> Dim:
    return _from_poly(_poly_add(_to_poly(a), _to_poly(b), -1))


def dim_mul(a: Dim, b: Dim) -> Dim:
    return _from_poly(_poly_mul(_to_poly(a), _to_poly(b)))


def dim_product(dims: Iterable[Dim]) -> Dim:
    out: Dim = 1
    for d in dims:
        out = dim_mul(out, d)
    return out


def dim_div(a: Dim, b: Dim) -> Dim | None:
    """a / b when it divides exactly as polynomials (b a single monomial), else None."""
    pa, pb = _to_poly(a), _to_poly(b)
    if len(pb) != 1:
        return a if pa == pb and pa else None
    (mono_b, cb), = pb.items()
    out: _Poly = {}
    for mono, c in pa.items():
        rest = Counter(mono)
        rest.subtract(Counter(mono_b))
        if any(v < 0 for v in rest.values()) or c % cb:
            return None
        out[tuple(sorted(rest.elements()))] = c // cb
    return _from_poly(out)


def shape_symbols(shape: Iterable[Dim]) -> set[str]:
    names: set[str] = set()
    for d in shape:
        if isinstance(d, str):
            for mono in _parse(d):
                names.update(mono)
    return names


def eval_dim(d: Dim, bindings: Mapping[str, int]) -> int:
    if isinstance(d, int):
        return d
    total = 0
    for mono, c in _parse(d).items():
        term = c
        for name in mono:
            if name not in bindings:
                raise ShapeError(f"symbolic dimension {name!r} is not bound")
            term *= bindings[name]
        total += term
    return total


def eval_shape(shape: Iterable[Dim], bindings: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(eval_dim(d, bindings) for d in shape)


def broadcast_shapes(*shapes: Shape) -> Shape:
    """numpy's broadcasting rule, extended to symbolic dims (a symbol only meets itself or 1)."""
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        result: Dim = 1
        for d in dims:
            if d == 1 or d == result:
                continue
            if result == 1:
                result = d
                continue
            raise ShapeError(
                f"cannot broadcast: dimension {i - rank} is {result} in one and {d} in another"
            )
        out.append(result)
    return tuple(out)


def normalize_axis(axis: int, rank: int, what: str = "axis") -> int:
    import operator

    try:
        axis = operator.index(axis)
    except TypeError:
        raise ShapeError(f"{what} must be an int, got {axis!r}") from None
    if not -rank <= axis < max(rank, 1) or (rank == 0 and axis not in (0, -1)):
        raise ShapeError(f"{what} {axis} is out of range for a tensor of rank {rank}")
    return axis % rank if rank else 0


def normalize_axes(axis, rank: int) -> tuple[int, ...]:
    """None → every axis; an int or a tuple → sorted positive axes without repeats."""
    if axis is None:
        return tuple(range(rank))
    if isinstance(axis, (list, tuple)):
        axes = tuple(normalize_axis(a, rank) for a in axis)
    else:
        axes = (normalize_axis(axis, rank),)
    if len(set(axes)) != len(axes):
        raise ShapeError(f"repeated axis in {axis!r}")
    return tuple(sorted(axes))
