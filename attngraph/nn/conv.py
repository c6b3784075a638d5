"""Conv2d and ConvTranspose2d with torch's keys (``weight``, ``bias``) and arguments (NCHW)."""

from __future__ import annotations

import math

from .. import ops
from ..errors import AttngraphError, ShapeError
from .module import Module, uniform_init

__all__ = ["Conv2d", "ConvTranspose2d"]


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _unbatched(module, x):
    """(C, H, W) inputs are run as a batch of one, as torch does."""
    if x.ndim == 3:
        return x.reshape((1,) + tuple(x.shape)), True
    if x.ndim != 4:
        raise ShapeError(f"{type(module).__name__} expects (N, C, H, W) or (C, H, W), got {x.shape}")
    return x, False


class Conv2d(Module):
    """torch.nn.Conv2d: ``weight`` (out, in/groups, kh, kw), ``bias`` (out,); ``padding`` may be
    an int, a pair, ``"valid"`` or ``"same"``; only ``padding_mode="zeros"``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros"):
        super().__init__()
        if padding_mode != "zeros":
            raise AttngraphError(f"Conv2d supports padding_mode='zeros' only, not {padding_mode!r}")
        if in_channels % groups or out_channels % groups:
            raise ShapeError(f"in_channels {in_channels} and out_channels {out_channels} must be divisible by "
                             f"groups {groups}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise AttngraphError(f"padding must be an int, a pair, 'same' or 'valid', not {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise AttngraphError("padding='same' needs stride 1 (as in torch)")
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        kh, kw = self.kernel_size
        bound = 1.0 / math.sqrt(in_channels // groups * kh * kw)
        self.register_parameter("weight", (out_channels, in_channels // groups, kh, kw), uniform_init(bound))
        if bias:
            self.register_parameter("bias", (out_channels,), uniform_init(bound))

    def forward(self, x):
        x, unbatched = _unbatched(self, x)
        padding = self.padding
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":                       # torch puts an odd extra pad after (bottom, right)
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            before = [t // 2 for t in total]
            if any(t % 2 for t in total):
                x = ops.pad(x, ((0, 0), (0, 0), (before[0], total[0] - before[0]),
                                (before[1], total[1] - before[1])))
                padding = (0, 0)
            else:
                padding = tuple(before)
        bias = self.param("bias") if self.has_param("bias") else None
        y = ops.conv2d(x, self.param("weight"), bias, stride=self.stride, padding=padding, dilation=self.dilation,
                       groups=self.groups)
        return y.reshape(tuple(y.shape[1:])) if unbatched else y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")


class ConvTranspose2d(Module):
    """torch.nn.ConvTranspose2d: ``weight`` (in, out/groups, kh, kw), ``bias`` (out,).

    ``forward(x, output_size=None)``: an ``output_size`` (h, w) picks the output padding, as torch.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                 groups: int = 1, bias: bool = True, dilation=1, padding_mode: str = "zeros"):
        super().__init__()
        if padding_mode != "zeros":
            raise AttngraphError(f"ConvTranspose2d supports padding_mode='zeros' only, not {padding_mode!r}")
        if in_channels % groups or out_channels % groups:
            raise ShapeError(f"in_channels {in_channels} and out_channels {out_channels} must be divisible by "
                             f"groups {groups}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), _pair(padding)
        self.output_padding, self.dilation = _pair(output_padding), _pair(dilation)
        kh, kw = self.kernel_size
        bound = 1.0 / math.sqrt(out_channels // groups * kh * kw)   # torch's fan-in of this weight layout
        self.register_parameter("weight", (in_channels, out_channels // groups, kh, kw), uniform_init(bound))
        if bias:
            self.register_parameter("bias", (out_channels,), uniform_init(bound))

    def _output_padding(self, x, output_size):
        if output_size is None:
            return self.output_padding
        size = tuple(output_size)[-2:]
        pads = []
        for i, want in enumerate(size):
            smallest = ((x.shape[2 + i] - 1) * self.stride[i] - 2 * self.padding[i]
                        + self.dilation[i] * (self.kernel_size[i] - 1) + 1)
            if not 0 <= want - smallest < max(self.stride[i], self.dilation[i]):
                raise ShapeError(f"requested output size {tuple(size)} is not reachable from input {x.shape}")
            pads.append(want - smallest)
        return tuple(pads)

    def forward(self, x, output_size=None):
        x, unbatched = _unbatched(self, x)
        bias = self.param("bias") if self.has_param("bias") else None
        y = ops.conv_transpose2d(x, self.param("weight"), bias, stride=self.stride, padding=self.padding,
                                 output_padding=self._output_padding(x, output_size), groups=self.groups,
                                 dilation=self.dilation)
        return y.reshape(tuple(y.shape[1:])) if unbatched else y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")
