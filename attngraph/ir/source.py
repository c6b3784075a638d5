"""Where in the user's code a node was made, so errors and diagrams can point at it."""

from __future__ import annotations

import linecache
import os
import sys
from dataclasses import dataclass

__all__ = ["Source", "capture_source", "internal_dirs"]


@dataclass(frozen=True)
class Source:
    file: str
    line: int
    code: str = ""

    @property
    def short(self) -> str:
        return f"{os.path.basename(self.file)}:{self.line}"

    def __str__(self) -> str:
        text = f"{self.file}:{self.line}"
        return f"{text}   {self.code}" if self.code else text


_INTERNAL: list[str] = []


def internal_dirs() -> list[str]:
    """Folders whose frames are attngraph's own (the package, and ops/ where it is installed)."""
    if not _INTERNAL:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # attngraph/
        _INTERNAL.append(here + os.sep)
        try:
            import attngraph.ops as ops_pkg

            for path in ops_pkg.__path__:
                path = os.path.abspath(path) + os.sep
                if not path.startswith(here):
                    _INTERNAL.append(path)
        except ImportError:  # while attngraph.ops itself is being imported
            return [here + os.sep]
    return _INTERNAL


def capture_source() -> Source | None:
    """The innermost stack frame outside attngraph: the user's line."""
    dirs = tuple(internal_dirs())
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not os.path.abspath(filename).startswith(dirs) and not filename.startswith("<frozen"):
            line = frame.f_lineno
            code = linecache.getline(filename, line).strip()
            return Source(filename, line, code)
        frame = frame.f_back
    return None
