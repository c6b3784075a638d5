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
