"""The Vision Transformer (Dosovitskiy et al., arXiv 2010.11929; seed notes, item 9).

An image is cut into fixed-size patches, each flattened and linearly projected to ``dim``;
a learnable class token is prepended; learned position embeddings are added; a pre-norm
Transformer encoder (GELU MLPs) runs; a final LayerNorm and an MLP head read the class
token. Weights are named like a torch ViT written from ``nn`` modules:

``patch_embed.weight`` (dim, C·p·p) and ``.bias``, ``cls_token`` (1, 1, dim), ``pos_embed``
(1, 1 + N, dim), ``encoder.layers.i.*`` (torch's ``TransformerEncoderLayer``), ``norm.*``,
``head.*`` (``head.0`` / ``head.2`` with a ``representation_size`` hidden layer).

A Conv2d patch embedding's weight (dim, C, p, p) loads as well: :meth:`ViT.load_state_dict`
flattens it, since ``ag.patchify(x, p) @ W.reshape(dim, -1).T`` is that convolution.

>>> import attngraph as ag
>>> from attngraph.models.vit import ViT, ViTConfig
>>> cfg = ViTConfig(image_size=8, patch_size=2, in_channels=1, num_classes=10, dim=16, depth=2,
...                 heads=2, mlp_dim=32)
>>> model = ViT(cfg)
>>> g = ag.Graph("vit")
>>> logits, weights = model(g.input("images", ("B", 1, 8, 8)), return_weights=True)
>>> tuple(logits.shape), len(weights), tuple(weights[0].shape)
(('B', 10), 2, ('B', 2, 17, 17))

With ``return_weights=True`` each layer's attention weights (B, heads, 1 + N, 1 + N) come
back too; made graph outputs, the attention still fuses (``attention(return_weights=True)``),
and :func:`attngraph.viz.attention_rollout` combines them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .. import nn, ops
from ..errors import ShapeError
from ..nn.module import Module, normal_init

__all__ = ["ViTConfig", "ViT", "PRESETS"]


@dataclass(frozen=True)
class ViTConfig:
    """Sizes of a ViT. The defaults are ViT-Base/16 at 224×224 (86.6 M parameters)."""

    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 1000
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    dropout: float = 0.0
    layer_norm_eps: float = 1e-6           # the ViT reference code's (torch's layer default is 1e-5)
    representation_size: int | None = None  # a tanh hidden layer in the head (the paper's pre-training head)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ShapeError(f"ViTConfig: the patch size {self.patch_size} does not divide the image size "
                             f"{self.image_size}", hint="pick a patch size that divides it, or resize the images")
        if self.dim % self.heads:
            raise ShapeError(f"ViTConfig: dim {self.dim} is not divisible by heads {self.heads}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and per row."""
        side = self.image_size // self.patch_size
        return side, side

    @classmethod
    def preset(cls, name: str, **overrides) -> "ViTConfig":
        """``"tiny"``, ``"small"`` or ``"base"`` (patch 16, 224×224, 1000 classes), with overrides."""
        try:
            base = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown ViT preset {name!r}; presets are {', '.join(PRESETS)}") from None
        return replace(base, **overrides)

    @classmethod
    def tiny(cls, **overrides) -> "ViTConfig":
        return cls.preset("tiny", **overrides)

    @classmethod
    def small(cls, **overrides) -> "ViTConfig":
        return cls.preset("small", **overrides)

    @classmethod
    def base(cls, **overrides) -> "ViTConfig":
        return cls.preset("base", **overrides)


PRESETS = {
    "tiny": ViTConfig(dim=192, depth=12, heads=3, mlp_dim=768),       # DeiT-Ti
    "small": ViTConfig(dim=384, depth=12, heads=6, mlp_dim=1536),     # DeiT-S
    "base": ViTConfig(dim=768, depth=12, heads=12, mlp_dim=3072),     # ViT-B/16
}


class ViT(Module):
    """patchify → Linear → [class token; patches] + positions → pre-norm encoder → LayerNorm → head.

    ``forward(images, return_weights=False)``: images (B, C, H, W) with H = W = ``image_size``
    → logits (B, num_classes); with ``return_weights`` → (logits, list of per-layer attention
    weights (B, heads, 1 + N, 1 + N)). Token 0 is the class token, tokens 1.. the patches in
    row-major order.
    """

    def __init__(self, config: ViTConfig | None = None, **overrides):
        super().__init__()
        cfg = replace(config or ViTConfig(), **overrides) if overrides else (config or ViTConfig())
        self.config = cfg
        d = cfg.dim
        self.patch_embed = nn.Linear(cfg.in_channels * cfg.patch_size ** 2, d)
        self.register_parameter("cls_token", (1, 1, d), normal_init(0.02))
        self.register_parameter("pos_embed", (1, 1 + cfg.num_patches, d), normal_init(0.02))
        layer = nn.TransformerEncoderLayer(d, cfg.heads, cfg.mlp_dim, dropout=cfg.dropout, activation="gelu",
                                           layer_norm_eps=cfg.layer_norm_eps, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.depth)
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        if cfg.representation_size:
            self.head = nn.Sequential(nn.Linear(d, cfg.representation_size), nn.Tanh(),
                                      nn.Linear(cfg.representation_size, cfg.num_classes))
        else:
            self.head = nn.Linear(d, cfg.num_classes)

    def extra_repr(self) -> str:
        c = self.config
        return (f"image_size={c.image_size}, patch_size={c.patch_size}, dim={c.dim}, depth={c.depth}, "
                f"heads={c.heads}")

    def num_parameters(self) -> int:
        """The number of trainable weights (as ``sum(p.numel() for p in torch_model.parameters())``)."""
        return int(sum(np.prod(slot.shape, dtype=np.int64) for _, _, _, slot in self._named_slots()
                       if not slot.buffer))

    # -- weights ---------------------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True):
        """torch-style loading; a Conv2d patch embedding weight (dim, C, p, p) is flattened to the
        Linear's (dim, C·p·p) (the same numbers: patches are flattened in (C, p, p) order)."""
        key = "patch_embed.weight"
        if key in state_dict and np.ndim(_array(state_dict[key])) == 4:
            state_dict = dict(state_dict)
            w = _array(state_dict[key])
            state_dict[key] = w.reshape(w.shape[0], -1)                       # (dim, C, p, p) → (dim, C·p·p)
        return super().load_state_dict(state_dict, strict=strict)

    # -- graph -----------------------------------------------------------------------------------
    def forward(self, images, return_weights: bool = False):
        cfg = self.config
        if images.ndim != 4:
            raise ShapeError(f"ViT takes images (B, C, H, W), got shape {images.shape}")
        _, c, h, w = images.shape
        if c != cfg.in_channels or h != cfg.image_size or w != cfg.image_size:
            raise ShapeError(f"ViT(image_size={cfg.image_size}, in_channels={cfg.in_channels}) got images "
                             f"{images.shape}", hint="the position embeddings fix the number of patches; "
                             "resize the images or build a ViTConfig for this size")
        b = images.shape[0]
        x = self.patch_embed(ops.patchify(images, cfg.patch_size))               # (B, N, d)
        cls = ops.broadcast_to(self.param("cls_token"), (b, 1, cfg.dim))         # (B, 1, d)
        x = ops.concat([cls, x], axis=1) + self.param("pos_embed")               # (B, 1 + N, d)
        weights = []
        if return_weights:
            for layer in self.encoder.layers:
                x, wts = _layer_with_weights(layer, x)
                weights.append(wts)                                              # (B, heads, 1 + N, 1 + N)
        else:
            x = self.encoder(x)
        logits = self.head(self.norm(x)[:, 0])                                   # (B, classes)
        return (logits, weights) if return_weights else logits


def _layer_with_weights(layer: nn.TransformerEncoderLayer, x):
    """One pre-norm encoder layer as torch's, returning its per-head attention weights as well."""
    h = layer.norm1(x)
    attn, weights = layer.self_attn(h, h, h, need_weights=True, average_attn_weights=False)
    x = x + layer.dropout1(attn)
    return x + layer.dropout2(layer._ff_block(layer.norm2(x))), weights


def _array(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
