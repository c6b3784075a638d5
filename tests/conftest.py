from contextlib import contextmanager

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# Generated kernels go to a cache inside the checkout (ignored by git), not ~/.cache:
# reruns start warm, and a fresh clone (CI) starts cold.
import os  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("ATTNGRAPH_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "kernels"))


@contextmanager
def single_threaded():
    """Tiny models run fastest on one numba thread and one BLAS thread; on a 2-core machine two
    spinning thread pools (numba's OpenMP and BLAS's, torch's too) also starve each other."""
    import numba
    from threadpoolctl import threadpool_limits

    try:
        import torch
    except ImportError:
        torch = None
    before = numba.get_num_threads(), (torch.get_num_threads() if torch is not None else None)
    numba.set_num_threads(1)
    if torch is not None:
        torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        numba.set_num_threads(before[0])
        if torch is not None:
            torch.set_num_threads(before[1])


@pytest.fixture
def one_thread():
    with single_threaded():
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    with single_threaded():
        yield
