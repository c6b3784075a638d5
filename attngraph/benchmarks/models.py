"""The benchmark models, twice: as torch modules (the baseline, exported to ONNX for ONNX
Runtime) and as attngraph graphs written from primitives, with parameters named as in
torch's state_dict so the same weights load into both.

- encoder: nn.TransformerEncoder, 4 layers, d=256, 4 heads, FFN 1024, post-norm, ReLU
- vit_tiny: 32×32 images, patch 4, dim 192, depth 12, 3 heads, MLP 768, pre-norm, GELU
"""

from __future__ import annotations

import math

import numpy as np

import attngraph as ag

ENCODER = dict(layers=4, d=256, heads=4, ffn=1024, seq=128)
VIT_TINY = dict(image=32, patch=4, channels=3, d=192, depth=12, heads=3, mlp=768, classes=10)


# -- torch ------------------------------------------------------------------------------
def torch_encoder(cfg=ENCODER, seed=0):
    import torch

    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(cfg["d"], cfg["heads"], cfg["ffn"], dropout=0.0, batch_first=True)
    return torch.nn.TransformerEncoder(layer, cfg["layers"], enable_nested_tensor=False).eval()


def torch_vit(cfg=VIT_TINY, seed=0):
    import torch
    from torch import nn

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            n = (cfg["image"] // cfg["patch"]) ** 2
            self.patch_embed = nn.Conv2d(cfg["channels"], cfg["d"], cfg["patch"], stride=cfg["patch"])
            self.cls_token = nn.Parameter(torch.randn(1, 1, cfg["d"]) * 0.02)
            self.pos_embed = nn.Parameter(torch.randn(1, n + 1, cfg["d"]) * 0.02)
            layer = nn.TransformerEncoderLayer(cfg["d"], cfg["heads"], cfg["mlp"], dropout=0.0, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, cfg["depth"], enable_nested_tensor=False)
            self.norm = nn.LayerNorm(cfg["d"])
            self.head = nn.Linear(cfg["d"], cfg["classes"])

        def forward(self, images):
            x = self.patch_embed(images).flatten(2).transpose(1, 2)          # (B, N, d)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)  # (B, N+1, d)
            x = self.encoder(x + self.pos_embed)
            return self.head(self.norm(x[:, 0]))

    torch.manual_seed(seed)
    return ViT().eval()


def state_dict_numpy(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


# -- attngraph ---------------------------------------------------------------------------
def _linear(g, x, weights, name):
    """x @ W.T + b with torch's (out, in) weight layout."""
    w = g.param(f"{name}.weight", weights[f"{name}.weight"].shape, init=weights[f"{name}.weight"])
    y = x @ w.T
    if f"{name}.bias" in weights:
        y = y + g.param(f"{name}.bias", weights[f"{name}.bias"].shape, init=weights[f"{name}.bias"])
    return y


def _layernorm(g, x, weights, name):
    gamma = g.param(f"{name}.weight", weights[f"{name}.weight"].shape, init=weights[f"{name}.weight"])
    beta = g.param(f"{name}.bias", weights[f"{name}.bias"].shape, init=weights[f"{name}.bias"])
    return ag.layernorm(x, gamma, beta, eps=1e-5)


def _self_attention(g, x, weights, name, d, heads):
    B, T = x.shape[0], x.shape[1]
    dh = d // heads
    w = g.param(f"{name}.in_proj_weight", (3 * d, d), init=weights[f"{name}.in_proj_weight"])
    b = g.param(f"{name}.in_proj_bias", (3 * d,), init=weights[f"{name}.in_proj_bias"])
    qkv = x @ w.T + b                                                     # (B, T, 3d)
    q, k, v = (t.reshape(B, T, heads, dh).transpose(0, 2, 1, 3) for t in ag.split(qkv, 3, axis=-1))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh)                  # (B, H, T, T)
    ctx = (ag.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(B, T, d)
    return _linear(g, ctx, weights, f"{name}.out_proj")


def encoder_layer(g, x, weights, name, d, heads, *, norm_first=False, activation="relu"):
    act = ag.relu if activation == "relu" else ag.gelu
    with g.scope(name):
        if norm_first:
            x = x + _self_attention(g, _layernorm(g, x, weights, f"{name}.norm1"), weights, f"{name}.self_attn",
                                    d, heads)
            h = _layernorm(g, x, weights, f"{name}.norm2")
            return x + _linear(g, act(_linear(g, h, weights, f"{name}.linear1")), weights, f"{name}.linear2")
        x = _layernorm(g, x + _self_attention(g, x, weights, f"{name}.self_attn", d, heads), weights,
                       f"{name}.norm1")
        h = _linear(g, act(_linear(g, x, weights, f"{name}.linear1")), weights, f"{name}.linear2")
        return _layernorm(g, x + h, weights, f"{name}.norm2")


def attngraph_encoder(weights: dict, cfg=ENCODER) -> ag.Graph:
    g = ag.Graph("encoder")
    x = g.input("x", ("B", "T", cfg["d"]))
    for i in range(cfg["layers"]):
        x = encoder_layer(g, x, weights, f"layers.{i}", cfg["d"], cfg["heads"])
    g.output("y", x)
    return g


def attngraph_vit(weights: dict, cfg=VIT_TINY) -> ag.Graph:
    g = ag.Graph("vit_tiny")
    d, p = cfg["d"], cfg["patch"]
    images = g.input("images", ("B", cfg["channels"], cfg["image"], cfg["image"]))
    B = images.shape[0]
    conv_w = g.param("patch_embed.weight", weights["patch_embed.weight"].shape, init=weights["patch_embed.weight"])
    conv_b = g.param("patch_embed.bias", (d,), init=weights["patch_embed.bias"])
    x = ag.patchify(images, p) @ conv_w.reshape(d, -1).T + conv_b         # (B, N, d)
    cls = g.param("cls_token", (1, 1, d), init=weights["cls_token"])
    x = ag.concat([ag.broadcast_to(cls, (B, 1, d)), x], axis=1)           # (B, N+1, d)
    x = x + g.param("pos_embed", weights["pos_embed"].shape, init=weights["pos_embed"])
    for i in range(cfg["depth"]):
        x = encoder_layer(g, x, weights, f"encoder.layers.{i}", d, cfg["heads"], norm_first=True,
                          activation="gelu")
    x = _layernorm(g, x[:, 0], weights, "norm")                           # (B, d): the class token
    g.output("logits", _linear(g, x, weights, "head"))
    return g
