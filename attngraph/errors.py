"""Exceptions raised by attngraph.

Every error subclasses :class:`AttngraphError`. Errors raised while a graph is
built carry the user's source location (``file:line``) and, where one is
obvious, a hint.
"""

from __future__ import annotations

__all__ = [
    "AttngraphError",
    "ShapeError",
    "DTypeError",
    "FeedError",
    "BackendError",
    "UnknownOpError",
    "VerifyError",
    "SerializationError",
    "GradError",
    "RenderWarning",
]


class AttngraphError(Exception):
    """Base class of every error attngraph raises on purpose."""

    def __init__(self, message: str, *, hint: str | None = None, where: str | None = None):
        self.message = message
        self.hint = hint
        self.where = where
        super().__init__(self._render())

    def _render(self) -> str:
        text = self.message
        if self.where:
            text += f"\n  in {self.where}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text

    def located(self, prefix: str | None, where: str | None) -> "AttngraphError":
        """A copy of this error with an op prefix and the user's source location."""
        message = f"{prefix}: {self.message}" if prefix else self.message
        err = type(self).__new__(type(self))
        AttngraphError.__init__(err, message, hint=self.hint, where=where or self.where)
        return err


class ShapeError(AttngraphError, ValueError):
    """Shapes do not fit an op (raised while the graph is built)."""


class DTypeError(AttngraphError, TypeError):
    """Dtypes do not fit an op."""


class FeedError(AttngraphError, ValueError):
    """A feed passed to ``Executable.run`` is missing, unknown, or has the wrong shape or dtype."""


class BackendError(AttngraphError, RuntimeError):
    """A backend cannot run the graph (no GPU, op without a kernel, ...)."""


class UnknownOpError(AttngraphError, KeyError):
    """An op name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class VerifyError(AttngraphError):
    """A graph is malformed (cycle, dangling input, type mismatch)."""


class SerializationError(AttngraphError):
    """A saved graph or weights file is missing, corrupt or inconsistent."""


class GradError(AttngraphError):
    """A gradient was asked of something that has none."""


class RenderWarning(UserWarning):
    """A diagram could not be drawn as asked (e.g. graphviz's ``dot`` is not installed)."""
