"""Self-attention over a CNN feature map (SAGAN), and an FPN encoder-decoder for segmentation.

    import attngraph as ag
    from attngraph.models.cnn_attention import SelfAttention2d, FPNSegmenter

    g = ag.Graph("seg")
    x = g.input("images", ("B", 3, 32, 32))
    model = FPNSegmenter(in_channels=3, num_classes=4)
    g.output("logits", model(x))                       # (B, 4, 32, 32) per-pixel class scores
    exe = ag.compile(g, backend="cpu")                 # the self-attention is one `attention` node

The seed notes' "CNN with self-attention": 1×1 convolutions give Q, K and V from a feature
map, every position attends to every other, and the result is added back to the input.
:class:`SelfAttention2d` is SAGAN's block (Zhang et al. 2019): q and k have C/8 channels,
v has C; the H·W positions are the tokens; ``out = gamma · attention + x`` with a learned
scalar ``gamma`` that starts at 0, so the block starts as the identity and the network
learns how much non-local context to mix in.

The notes' "backbone → neck (FPN) → head; segmentation as encoder-decoder with upsampling /
transposed convolution" is :class:`FPNSegmenter`: a strided conv encoder (the backbone),
the self-attention block on its coarsest map (where each position sees the whole image),
an FPN neck (lateral 1×1 convs, top-down nearest upsampling and addition), and a decoder
whose transposed convolution goes back to full resolution, then per-pixel class logits.
"""

from __future__ import annotations

import math

from .. import nn, ops
from ..errors import ShapeError
from ..nn.module import Module, constant_init

__all__ = ["SelfAttention2d", "FPNSegmenter"]


class SelfAttention2d(Module):
    """SAGAN's self-attention over the H·W positions of an (N, C, H, W) feature map.

    Keys: ``query_conv``, ``key_conv`` (1×1, C → C/reduction), ``value_conv`` (1×1, C → C),
    ``gamma`` (1,), initialised to ``gamma_init`` (0 as in SAGAN: the block starts as the identity).

    ``forward(x, need_weights=False)`` → ``gamma · o + x`` (N, C, H, W), where o at each
    position is the softmax(qᵀk)-weighted sum of v over all positions; with ``need_weights``
    also the attention (N, H·W, H·W), row i = where position i (row-major) looks.
    ``scaled=True`` divides the scores by √(C/reduction) (SAGAN does not).
    """

    def __init__(self, channels: int, reduction: int = 8, gamma_init: float = 0.0, scaled: bool = False):
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ShapeError(f"SelfAttention2d needs channels >= 1 and reduction >= 1, got {channels}, {reduction}")
        self.channels = int(channels)
        self.inner = max(1, channels // reduction)
        self.scale = 1.0 / math.sqrt(self.inner) if scaled else 1.0
        self.query_conv = nn.Conv2d(channels, self.inner, 1)
        self.key_conv = nn.Conv2d(channels, self.inner, 1)
        self.value_conv = nn.Conv2d(channels, channels, 1)
        self.register_parameter("gamma", (1,), constant_init(gamma_init))

    def forward(self, x, need_weights: bool = False):
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ShapeError(f"SelfAttention2d({self.channels}) expects (N, {self.channels}, H, W), got {x.shape}")
        n, c, h, w = x.shape
        hw = h * w if isinstance(h, int) and isinstance(w, int) else None
        if hw is None:
            raise ShapeError(f"SelfAttention2d needs a fixed height and width, got {x.shape}")
        q = self.query_conv(x).reshape(n, self.inner, hw).transpose(0, 2, 1)    # (N, HW, C')
        k = self.key_conv(x).reshape(n, self.inner, hw)                          # (N, C', HW): Kᵀ
        v = self.value_conv(x).reshape(n, c, hw).transpose(0, 2, 1)              # (N, HW, C)
        scores = q @ k                                                            # (N, HW, HW)
        if self.scale != 1.0:
            scores = scores * self.scale
        p = ops.softmax(scores, axis=-1)                                          # over the keys
        o = (p @ v).transpose(0, 2, 1).reshape(n, c, h, w)                       # (N, C, H, W)
        out = self.param("gamma") * o + x
        return (out, p) if need_weights else out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, inner={self.inner}, scale={self.scale:g}"


def _conv_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU())


class FPNSegmenter(Module):
    """Backbone → self-attention → FPN neck → transposed-conv decoder → per-pixel logits.

    With ``channels=(c1, c2, c3, c4)`` and an (N, in_channels, H, W) input (H, W divisible by 8):

    - backbone: ``stem`` 3×3 conv (c1, H) → ``layer1`` stride 2 (c2, H/2) → ``layer2`` stride 2
      (c3, H/4) → ``layer3`` stride 2 (c4, H/8); each conv followed by ReLU;
    - ``attn``: :class:`SelfAttention2d` on the H/8 map;
    - neck: ``lateral.i`` 1×1 convs bring C2, C3, C4 to ``fpn_dim``; top-down, P4 = L4,
      P3 = L3 + up2(P4), P2 = L2 + up2(P3) (nearest ``ag.upsample``); ``smooth`` 3×3 conv on P2;
    - decoder: ``up`` ConvTranspose2d(k=4, s=2, p=1) H/2 → H, plus ``skip`` (1×1 conv of the
      stem's features), ReLU, ``head`` 1×1 conv to ``num_classes``.

    ``forward(x, need_weights=False)`` → logits (N, num_classes, H, W), and with
    ``need_weights`` the self-attention weights (N, (H/8)·(W/8), (H/8)·(W/8)).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 4, channels=(16, 24, 32, 48), fpn_dim: int = 32,
                 reduction: int = 8, gamma_init: float = 0.0):
        super().__init__()
        c1, c2, c3, c4 = (int(c) for c in channels)
        self.in_channels, self.num_classes, self.fpn_dim = int(in_channels), int(num_classes), int(fpn_dim)
        self.stem = _conv_relu(in_channels, c1)
        self.layer1 = _conv_relu(c1, c2, stride=2)
        self.layer2 = _conv_relu(c2, c3, stride=2)
        self.layer3 = _conv_relu(c3, c4, stride=2)
        self.attn = SelfAttention2d(c4, reduction=reduction, gamma_init=gamma_init)
        self.lateral = nn.ModuleList([nn.Conv2d(c, fpn_dim, 1) for c in (c2, c3, c4)])
        self.smooth = nn.Conv2d(fpn_dim, fpn_dim, 3, padding=1)
        self.up = nn.ConvTranspose2d(fpn_dim, fpn_dim, 4, stride=2, padding=1)
        self.skip = nn.Conv2d(c1, fpn_dim, 1)
        self.head = nn.Conv2d(fpn_dim, num_classes, 1)

    def forward(self, x, need_weights: bool = False):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ShapeError(f"FPNSegmenter expects (N, {self.in_channels}, H, W), got {x.shape}")
        h, w = x.shape[2:]
        if not (isinstance(h, int) and isinstance(w, int)) or h % 8 or w % 8:
            raise ShapeError(f"FPNSegmenter needs a fixed height and width divisible by 8, got {h}×{w}")
        f1 = self.stem(x)                                  # (N, c1, H, W)
        f2 = self.layer1(f1)                               # (N, c2, H/2, W/2)
        f3 = self.layer2(f2)                               # (N, c3, H/4, W/4)
        f4, weights = self.attn(self.layer3(f3), need_weights=True)   # (N, c4, H/8, W/8)
        p4 = self.lateral[2](f4)                           # (N, d, H/8, W/8)
        p3 = self.lateral[1](f3) + ops.upsample(p4, scale_factor=2)   # (N, d, H/4, W/4)
        p2 = self.lateral[0](f2) + ops.upsample(p3, scale_factor=2)   # (N, d, H/2, W/2)
        p2 = ops.relu(self.smooth(p2))
        y = ops.relu(self.up(p2) + self.skip(f1))          # (N, d, H, W)
        logits = self.head(y)                              # (N, classes, H, W)
        return (logits, weights) if need_weights else logits

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, num_classes={self.num_classes}, fpn_dim={self.fpn_dim}"
