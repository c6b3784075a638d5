"""attngraph: a static computation-graph compiler and executor for attention models.

>>> import attngraph as ag
>>> g = ag.Graph("toy")
>>> x = g.input("x", ("B", 16, 64))
>>> w = g.param("w", (64, 64))
>>> y = g.output("y", ag.softmax(x @ w, axis=-1))
>>> exe = ag.compile(g, backend="numpy")
"""

import importlib.util as _ilu
import os as _os
import sys as _sys

# Numba's parallel kernels run on an OpenMP pool whose idle workers spin (busy-wait) for a
# while after each kernel; the BLAS matmuls in between then fight them for the cores. On a
# 2-core machine that made ViT-Tiny at batch 1 run 558 ms instead of 16 ms, and the encoder
# 214 ms instead of 12 ms. Passive waiting (sleep at once) is read by libgomp when it first
# loads, which is at numba's first parallel kernel, after this import. A value the user set
# is kept.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import errors, ir


def _find_ops_in_checkout() -> None:
    """Installed, ``attngraph.ops`` is mapped to the top-level ops/ folder. Run from a source
    checkout (repo root on sys.path), the package is found before the install: point
    ``attngraph.ops`` at ../ops the same way."""
    if _ilu.find_spec(__name__ + ".ops") is not None:
        return
    ops_dir = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "ops")
    spec = _ilu.spec_from_file_location(__name__ + ".ops", _os.path.join(ops_dir, "__init__.py"),
                                        submodule_search_locations=[ops_dir])
    if spec is None:
        raise ImportError(f"attngraph.ops not found (looked in {ops_dir})")
    module = _ilu.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_find_ops_in_checkout()
from .dsl import Graph, Tensor
from .ir import DType, TensorType

from . import ops as ops  # noqa: E402  (registers every op; ops/ is shipped as attngraph.ops)
from .ops import *  # noqa: E402,F401,F403  (the op functions: ag.softmax, ag.matmul, ...)
from .compiler import compile  # noqa: E402
from .autodiff import grad  # noqa: E402
from . import io  # noqa: E402
from . import nn  # noqa: E402  (torch-compatible modules; needs the ops)
from . import train  # noqa: E402
from .onnx_import import from_onnx  # noqa: E402  (imports onnx only when called)
from . import models  # noqa: E402  (each model family is imported on first use)
from . import viz  # noqa: E402  (imports matplotlib only when a picture is drawn)
from . import distributed  # noqa: E402  (mpi4py is imported only under an MPI launcher)

float32, float64, int32, int64, bool_ = (DType.float32, DType.float64, DType.int32, DType.int64, DType.bool)

__version__ = "0.1.0"

__all__ = [
    "Graph", "Tensor", "DType", "TensorType", "compile", "distributed", "from_onnx", "grad", "errors", "ir", "io", "models", "nn", "ops", "train", "viz",
    "float32", "float64", "int32", "int64", "bool_",
] + list(ops.__all__)
