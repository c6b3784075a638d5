"""The on-disk home of generated kernels: one ``.py`` file per kernel, named by the hash of its code.

``load_kernel(source, name)`` writes ``source`` to ``<cache dir>/<sha256(source)[:16]>.py``
(unless that file is already there), imports it under a module name made from the same
hash, and returns the function ``name`` from it. Generated kernels are decorated with
``numba.njit(cache=True)``, so numba keeps their machine code next to the file
(``__pycache__``): a second process that generates the same source finds the file, imports
it, and numba loads the compiled code instead of compiling it again.

The file is never rewritten once it exists: numba's cache is keyed by the file's
modification time, so rewriting an identical file would throw the compiled code away.

The cache directory is ``$ATTNGRAPH_CACHE_DIR`` when set, else the user's cache folder
(``$XDG_CACHE_HOME/attngraph`` or ``~/.cache/attngraph``; ``~/Library/Caches/attngraph`` on
macOS; ``%LOCALAPPDATA%\\attngraph\\cache`` on Windows).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

__all__ = ["cache_dir", "kernel_path", "source_digest", "load_kernel", "MODULE_PREFIX"]

MODULE_PREFIX = "attngraph_kernel_"

_lock = threading.Lock()
_modules: dict[str, ModuleType] = {}   # "<cache dir>/<digest>" → the imported module


def cache_dir() -> Path:
    """Where generated kernels live (created on first use)."""
    env = os.environ.get("ATTNGRAPH_CACHE_DIR")
    if env:
        path = Path(env).expanduser()
    elif sys.platform == "darwin":
        path = Path.home() / "Library" / "Caches" / "attngraph"
    elif os.name == "nt":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        path = Path(base) / "attngraph" / "cache"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base) / "attngraph"
    path.mkdir(parents=True, exist_ok=True)
    return path


def source_digest(source: str) -> str:
    """The first 16 hex digits of the SHA-256 of ``source``: the kernel's file and module name."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]


def kernel_path(source: str, directory: Path | None = None) -> Path:
    return (directory or cache_dir()) / f"{source_digest(source)}.py"


def _write_once(path: Path, text: str) -> None:
    """Create ``path`` holding ``text`` atomically; leave an existing file untouched."""
    if path.exists():
        return
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".py", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)       # mkstemp makes 0600; a kernel is an ordinary readable source file
        if path.exists():          # another process won the race; keep its file (and its numba cache)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_kernel(source: str, name: str, *, header: str = ""):
    """The function ``name`` defined by ``source``, loaded from the kernel cache.

    ``header`` (comment lines: what the kernel fuses, where the user wrote it) is written at the
    top of a new file but is not part of the hash, so regions that generate the same code (the
    same epilogue in every layer) share one file and one compilation.
    """
    digest = source_digest(source)
    module_name = MODULE_PREFIX + digest
    directory = cache_dir()
    key = f"{directory}/{digest}"
    with _lock:
        module = _modules.get(key)
        if module is None:
            path = kernel_path(source, directory)
            _write_once(path, header + source)
            spec = importlib.util.spec_from_file_location(module_name, path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot import generated kernel {path}")
            module = importlib.util.module_from_spec(spec)
            # numba's cache finds the module by name when it loads compiled code: register it first.
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[module_name]
                raise
            _modules[key] = module
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"generated kernel module {module.__file__} defines no {name!r}") from None
