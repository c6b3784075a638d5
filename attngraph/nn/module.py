"""Module: hyperparameters, child modules, and weights named by torch's state_dict keys.

A module declares its weights in ``__init__`` (``self.register_parameter("weight", shape,
init)``) and its children as attributes (``self.out_proj = Linear(...)``). A child's
attribute name becomes part of every key below it, so the dotted keys are torch's:
``layers.0.self_attn.in_proj_weight``.

Calling ``module(x, ...)`` adds the module's nodes to ``x``'s graph inside
``graph.scope(...)``. Each weight becomes a graph param named by its full key (a buffer
such as BatchNorm's running mean becomes a const), created on first use in a graph and
reused by later calls in the same graph (weight sharing). Its value is the one loaded with
``load_state_dict``, or else a draw from the module's initializer (torch's default
distribution) seeded by the graph, which the module then keeps: like a torch module, a
module owns its weights, and every later graph uses the same ones.
"""

from __future__ import annotations

import copy
import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import numpy as np

from ..dsl import Graph, Tensor
from ..errors import AttngraphError, SerializationError, VerifyError

__all__ = ["Module", "StateDictError", "IncompatibleKeys", "load_into", "uniform_init", "normal_init",
           "constant_init", "xavier_uniform_init", "xavier_normal_init"]

Init = Callable[[np.random.Generator, tuple], np.ndarray]


class StateDictError(SerializationError, KeyError):
    """A state_dict does not fit a module: every missing, unexpected or wrongly shaped key is listed."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class IncompatibleKeys(NamedTuple):
    """What ``load_state_dict(..., strict=False)`` skipped (torch's return value)."""

    missing_keys: list
    unexpected_keys: list


# -- initializers: torch.nn.init's default distributions, as f(rng, shape) ----------------------
def uniform_init(bound: float) -> Init:
    return lambda rng, shape: rng.uniform(-bound, bound, shape)


def normal_init(std: float = 1.0, mean: float = 0.0) -> Init:
    return lambda rng, shape: rng.normal(mean, std, shape)


def constant_init(value: float) -> Init:
    return lambda rng, shape: np.full(shape, value)


def _fans(shape: tuple) -> tuple[int, int]:
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def xavier_uniform_init(rng, shape):
    fan_in, fan_out = _fans(shape)
    return uniform_init(math.sqrt(6.0 / (fan_in + fan_out)))(rng, shape)


def xavier_normal_init(rng, shape):
    fan_in, fan_out = _fans(shape)
    return normal_init(math.sqrt(2.0 / (fan_in + fan_out)))(rng, shape)


@dataclass(frozen=True)
class _Slot:
    """One declared weight: its shape, its initializer, and whether it is a buffer (a const)."""

    shape: tuple
    init: Init
    buffer: bool = False


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _to_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


# Per graph: full key → (owning module, its Tensor); weak, so graphs are freed as usual.
_CREATED: "weakref.WeakKeyDictionary[Graph, dict[str, tuple[Module, Tensor]]]" = weakref.WeakKeyDictionary()
# The modules being called, innermost last, with the graph they build.
_CALLS: list[tuple[Graph, "Module"]] = []


class Module:
    """The base class: hyperparameters as attributes, child modules, torch-named weights.

    Subclasses write ``__init__`` (call ``super().__init__()`` first) and ``forward``, and
    read their weights inside ``forward`` with ``self.param("weight")``.
    """

    # Keys a state_dict may hold that this module accepts and ignores (BatchNorm's num_batches_tracked).
    _ignored_keys: tuple = ()

    def __init__(self):
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "_slots", {})
        object.__setattr__(self, "_values", {})
        object.__setattr__(self, "_prefix", "")

    # -- structure ---------------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if "_modules" not in self.__dict__:
            raise AttngraphError(f"{type(self).__name__}.__init__ must call super().__init__() before setting "
                                 f"attributes (setting {name!r})")
        if isinstance(value, Module):
            self._modules[name] = value
            value._set_prefix(_join(self._prefix, name))
        elif name in self._modules:
            del self._modules[name]
        object.__setattr__(self, name, value)

    def _set_prefix(self, prefix: str) -> None:
        object.__setattr__(self, "_prefix", prefix)
        for name, child in self._modules.items():
            child._set_prefix(_join(prefix, name))

    @property
    def prefix(self) -> str:
        """This module's dotted name from its root module ("" for a root): the prefix of its graph params."""
        return self._prefix

    def named(self, prefix: str) -> "Module":
        """Give a root module a name: its graph params become ``prefix.<key>`` (returns self).

        Two separate root modules in one graph need this, or their keys (``weight``...) clash.
        """
        self._set_prefix(prefix)
        return self

    def children(self) -> Iterator["Module"]:
        yield from self._modules.values()

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        """(relative dotted name, module) for this module and every module below it."""
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(_join(prefix, name))

    def register_parameter(self, name: str, shape, init: Init) -> None:
        """Declare a trainable weight (a graph param); ``init(rng, shape)`` draws its first value."""
        self._slots[name] = _Slot(tuple(int(d) for d in shape), init)

    def register_buffer(self, name: str, shape, init: Init) -> None:
        """Declare a state_dict entry that is not trained (a graph const), e.g. BatchNorm's running mean."""
        self._slots[name] = _Slot(tuple(int(d) for d in shape), init, buffer=True)

    def _named_slots(self, prefix: str = "") -> Iterator[tuple[str, "Module", str, _Slot]]:
        for name, slot in self._slots.items():
            yield _join(prefix, name), self, name, slot
        for cname, child in self._modules.items():
            yield from child._named_slots(_join(prefix, cname))

    def parameter_names(self) -> list[str]:
        """The graph names (full dotted keys) of this module's trainable weights."""
        return [_join(self._prefix, key) for key, _, _, slot in self._named_slots() if not slot.buffer]

    # -- weights -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Relative key → a copy of the array, as torch's ``state_dict()`` (weights never used nor
        loaded are drawn now, from a generator seeded 0)."""
        out: dict[str, np.ndarray] = {}
        rng = None
        for key, module, name, slot in self._named_slots():
            if name not in module._values:
                rng = rng or np.random.default_rng(0)
                module._values[name] = np.asarray(slot.init(rng, slot.shape), dtype=np.float32)
            out[key] = module._values[name].copy()
        for prefix, module in self.named_modules():
            for name, value in module._extra_state().items():
                out[_join(prefix, name)] = value
        return out

    def _extra_state(self) -> dict[str, np.ndarray]:
        """Entries torch saves that the graph does not use (returned by state_dict, ignored by load)."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> IncompatibleKeys:
        """Take the weights of a torch state_dict (name → numpy array or torch tensor).

        Every key is checked first; a missing or unexpected key (with ``strict``), a wrong
        shape or a non-numeric array raises one :class:`StateDictError` listing them all, and
        nothing is loaded. Graphs already built keep their old values (rebuild, or use
        :func:`load_into` on an executable).
        """
        expected = {key: (module, name, slot) for key, module, name, slot in self._named_slots()}
        ignored = {_join(prefix, k) for prefix, m in self.named_modules() for k in m._ignored_keys}
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected and k not in ignored]
        problems = []
        arrays = {}
        for key, (module, name, slot) in expected.items():
            if key not in state_dict:
                continue
            arr = _to_array(state_dict[key])
            if arr.dtype.kind not in "fiu":
                problems.append(f"{key}: dtype {arr.dtype} is not numeric")
            elif arr.shape != slot.shape:
                problems.append(f"{key}: got shape {arr.shape}, expected {slot.shape}")
            else:
                arrays[key] = np.array(arr, dtype=np.float32, order="C")
        if problems or (strict and (missing or unexpected)):
            raise StateDictError(_report(type(self).__name__, missing, unexpected, problems))
        for key, arr in arrays.items():
            module, name, _ = expected[key]
            module._values[name] = arr
        return IncompatibleKeys(missing, unexpected)

    def load_from(self, exe) -> "Module":
        """Copy this module's trained weights back from a compiled executable (``exe.params``)."""
        names = set(exe.params)  # (ParamStore's lookup raises FeedError, not KeyError, for unknown names)
        for key, module, name, slot in self._named_slots():
            full = _join(self._prefix, key)
            if not slot.buffer and full in names:
                module._values[name] = np.array(exe.params[full], dtype=np.float32)
        return self

    def reset_parameters(self, seed: int = 0) -> "Module":
        """Draw every weight again from its initializer (``np.random.default_rng(seed)``)."""
        rng = np.random.default_rng(seed)
        for _, module, name, slot in self._named_slots():
            module._values[name] = np.asarray(slot.init(rng, slot.shape), dtype=np.float32)
        return self

    def copy(self) -> "Module":
        """A deep copy (weights included), as torch's layer stacks make of their layer."""
        return copy.deepcopy(self)

    # -- building graphs -------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        graph = _graph_of(args, kwargs)
        if graph is None:
            raise AttngraphError(f"{type(self).__name__} must be called on graph Tensors",
                                 hint="make them with g.input(...) first")
        with graph.scope(self._scope_label(graph)):
            _CALLS.append((graph, self))
            try:
                return self.forward(*args, **kwargs)
            finally:
                _CALLS.pop()

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no forward")

    def _scope_label(self, graph: Graph) -> str:
        outer = next((m for g, m in reversed(_CALLS) if g is graph), None)
        if outer is not None and outer._prefix and self._prefix.startswith(outer._prefix + "."):
            return self._prefix[len(outer._prefix) + 1:]
        return self._prefix or type(self).__name__

    @property
    def graph(self) -> Graph:
        """The graph this module is adding nodes to (only inside ``forward``)."""
        for g, m in reversed(_CALLS):
            if m is self:
                return g
        raise AttngraphError(f"{type(self).__name__}.graph is only known while the module is being called")

    def param(self, name: str) -> Tensor:
        """The Tensor of weight ``name`` in the graph being built (created on first use)."""
        graph = self.graph
        slot = self._slots.get(name)
        if slot is None:
            raise AttngraphError(f"{type(self).__name__} has no weight {name!r}")
        full = _join(self._prefix, name)
        created = _CREATED.setdefault(graph, {})
        if full in created:
            owner, tensor = created[full]
            if owner is not self:
                raise VerifyError(
                    f"two different modules both name a weight {full!r} in graph {graph.name!r}",
                    hint="make them children of one Module, or name the roots apart with module.named('enc')")
            return tensor
        if full in graph.params or full in graph.consts or full in graph.inputs:
            raise VerifyError(f"graph {graph.name!r} already has a value named {full!r}, which "
                              f"{type(self).__name__} needs for its weight", hint="rename one, e.g. module.named(...)")
        if name not in self._values:
            graph._ensure_builder()
            self._values[name] = np.asarray(slot.init(graph._rng, slot.shape), dtype=np.float32)
        value = self._values[name]
        tensor = graph.const(full, value) if slot.buffer else graph.param(full, slot.shape, init=value)
        created[full] = (self, tensor)
        return tensor

    def const(self, name: str, array) -> Tensor:
        """A const named ``<prefix>.<name>`` in the graph being built, made once per graph; not in
        the state_dict (e.g. a sinusoidal position table)."""
        graph = self.graph
        full = _join(self._prefix, name)
        created = _CREATED.setdefault(graph, {})
        if full in created:
            return created[full][1]
        if full in graph.params or full in graph.consts or full in graph.inputs:
            raise VerifyError(f"graph {graph.name!r} already has a value named {full!r}, which "
                              f"{type(self).__name__} needs", hint="rename one, e.g. module.named(...)")
        tensor = graph.const(full, array)
        created[full] = (self, tensor)
        return tensor

    def parameters(self, graph: Graph) -> dict[str, Tensor]:
        """Full key → Tensor of this module's trainable weights already created in ``graph``
        (what ``ag.grad`` and the optimizers take)."""
        created = _CREATED.get(graph, {})
        return {full: created[full][1] for full in self.parameter_names() if full in created}

    def has_param(self, name: str) -> bool:
        return name in self._slots

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        extra = self.extra_repr()
        if not self._modules:
            return f"{type(self).__name__}({extra})"
        lines = [f"{type(self).__name__}("] + ([f"  {extra}"] if extra else [])
        for name, child in self._modules.items():
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return "\n".join(lines) + "\n)"


def _graph_of(args, kwargs) -> Graph | None:
    stack = list(args) + list(kwargs.values())
    while stack:
        item = stack.pop(0)
        if isinstance(item, Tensor):
            return item.graph
        if isinstance(item, (tuple, list)):
            stack.extend(item)
    return None


def _report(what: str, missing, unexpected, problems) -> str:
    lines = [f"Error(s) in loading state_dict for {what}:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
    if problems:
        lines.append(f"  wrong shapes or dtypes ({len(problems)}): " + "; ".join(problems))
    return "\n".join(lines)


def load_into(exe, state_dict: Mapping[str, Any], strict: bool = True) -> None:
    """Set a compiled executable's params from a state_dict whose keys are the graph's param names.

    Checks everything before changing anything: a key that is no param of ``exe``, a param
    the state_dict lacks (with ``strict``), or a wrong shape raises one :class:`StateDictError`
    listing them all. Buffers (BatchNorm's running statistics) are consts baked into the
    graph: they are accepted when unchanged, and refused otherwise (rebuild the graph).
    """
    params = exe.params
    names = set(params)  # (ParamStore's lookup raises FeedError, not KeyError, for unknown names)
    source = getattr(exe, "source_graph", None) or exe.graph
    unexpected, problems, arrays = [], [], {}
    for key, value in state_dict.items():
        arr = _to_array(value)
        if key in names:
            want = tuple(params[key].shape)
            if arr.shape != want:
                problems.append(f"{key}: got shape {arr.shape}, expected {want}")
            elif arr.dtype.kind not in "fiu":
                problems.append(f"{key}: dtype {arr.dtype} is not numeric")
            else:
                arrays[key] = arr
        elif key.endswith("num_batches_tracked"):
            continue
        elif key in source.consts:
            baked = source.values[key]
            if baked.shape != arr.shape or not np.array_equal(baked, arr.astype(baked.dtype)):
                problems.append(f"{key}: a buffer baked into the graph as a constant; rebuild the graph to change it")
        else:
            unexpected.append(key)
    missing = [k for k in params if k not in state_dict] if strict else []
    if missing or unexpected or problems:
        raise StateDictError(_report(f"executable {exe.graph.name!r}", missing, unexpected, problems))
    for key, arr in arrays.items():
        params[key] = arr
