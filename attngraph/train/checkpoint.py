"""Checkpoint files: one safetensors file holding the arrays and, in its metadata, a JSON record.

- arrays: ``param/<name>`` (every trained parameter), ``optimizer/<buffer>`` (the
  optimizer's flat state and its ``step``);
- metadata key ``attngraph.checkpoint``: JSON with the format version, the step, the
  dropout Generator's state (``bit_generator.state``), the parameter layout, the
  optimizer's settings, and what the fit loop needs to resume (epoch, batch, history).

Writes go through :func:`attngraph.io.save_safetensors`: a temporary file in the same
folder, renamed over the old checkpoint once complete (``os.replace``), so a crash
mid-write leaves the previous checkpoint whole. A crash mid-write can leave that temporary
file (``.<name>.<random>.tmp``) behind; it is never mistaken for the checkpoint, and
:func:`remove_stale_temporaries` (run by ``fit`` before it starts) deletes it.

The record also holds a CRC-32 of every array (names, dtypes, shapes and bytes, in name
order), checked on load: a file damaged after it was written is an error, not silently
different weights.
"""

from __future__ import annotations

import glob
import json
import os
import zlib
from typing import Mapping

import numpy as np

from ..errors import SerializationError
from ..io import load_safetensors, save_safetensors

__all__ = ["save_checkpoint", "load_checkpoint", "checksum", "remove_stale_temporaries", "CHECKPOINT_FORMAT",
           "CHECKPOINT_VERSION"]

CHECKPOINT_FORMAT = "attngraph.checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], info: Mapping) -> None:
    """Write ``arrays`` and the JSON-serializable ``info`` to ``path``, atomically."""
    record = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **info, "checksum": checksum(arrays)}
    save_safetensors(arrays, path, metadata={CHECKPOINT_FORMAT: json.dumps(record, default=_plain)})


def checksum(arrays: Mapping[str, np.ndarray]) -> str:
    """CRC-32 (hex) of the arrays: each one's name, dtype, shape and bytes, in name order."""
    crc = 0
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name]) if np.ndim(arrays[name]) else np.asarray(arrays[name])
        crc = zlib.crc32(f"{name}|{arr.dtype.str}|{arr.shape}".encode(), crc)
        crc = zlib.crc32(memoryview(arr.tobytes() if arr.ndim == 0 else arr.reshape(-1)).cast("B"), crc)
    return f"{crc:08x}"


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Delete temporary files an interrupted write of checkpoint ``path`` left in its folder
    (``.<name>.*.tmp``); returns their names. Only the one process that writes ``path`` may call it."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(folder or "."), glob.escape(f".{name}.") + "*.tmp")):
        try:
            os.unlink(tmp)
            removed.append(tmp)
        except OSError:
            pass
    return removed


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
    expected = info.get("checksum")
    if expected is not None and checksum(arrays) != expected:
        raise SerializationError(f"checkpoint {os.fspath(path)} is damaged: its arrays' checksum is "
                                 f"{checksum(arrays)}, the record says {expected}")
    return arrays, info
