"""Checkpoint files: one safetensors file holding the arrays and, in its metadata, a JSON record.

- arrays: ``param/<name>`` (every trained parameter), ``optimizer/<buffer>`` (the
  optimizer's flat state and its ``step``);
- metadata key ``attngraph.checkpoint``: JSON with the format version, the step, the
  dropout Generator's state (``bit_generator.state``), the parameter layout, the
  optimizer's settings, and what the fit loop needs to resume (epoch, batch, history).

Writes go through :func:`attngraph.io.save_safetensors`: a temporary file in the same
folder, renamed over the old checkpoint once complete (``os.replace``), so a crash
mid-write leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np

from ..errors import SerializationError
from ..io import load_safetensors, save_safetensors

__all__ = ["save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]

CHECKPOINT_FORMAT = "attngraph.checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], info: Mapping) -> None:
    """Write ``arrays`` and the JSON-serializable ``info`` to ``path``, atomically."""
    record = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **info}
    save_safetensors(arrays, path, metadata={CHECKPOINT_FORMAT: json.dumps(record, default=_plain)})


def _plain(value):
    """numpy scalars and arrays in the record become numbers and lists; anything else its repr."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return repr(value)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read a checkpoint: (arrays, info). Raises SerializationError for a file that is not one."""
    arrays = load_safetensors(path)   # checks the file exists and is valid safetensors
    import safetensors

    with safetensors.safe_open(os.fspath(path), framework="numpy") as f:
        metadata = f.metadata() or {}
    text = metadata.get(CHECKPOINT_FORMAT)
    if text is None:
        raise SerializationError(f"{os.fspath(path)} is a safetensors file but not an attngraph checkpoint "
                                 f"(no {CHECKPOINT_FORMAT!r} metadata)")
    try:
        info = json.loads(text)
    except ValueError as err:
        raise SerializationError(f"checkpoint {os.fspath(path)} has corrupt metadata: {err}") from None
    if info.get("version", 0) > CHECKPOINT_VERSION:
        raise SerializationError(f"checkpoint {os.fspath(path)} has version {info.get('version')}; "
                                 f"this attngraph reads up to {CHECKPOINT_VERSION}")
    return arrays, info
