"""DETR (Carion et al., arXiv 2005.12872) at toy size, with DETR's reference layer semantics.

    import attngraph as ag
    from attngraph.models.detr import DETR, DETRConfig, build_eval_graph

    model = DETR(DETRConfig(image_size=32, num_classes=3))
    exe = ag.compile(build_eval_graph(model), backend="cpu")
    out = exe.run({"images": images})          # images (B, 3, 32, 32) float32
    out["logits"]                              # (B, N, num_classes + 1): the last is "no object"
    out["boxes"]                               # (B, N, 4): (cx, cy, w, h) in [0, 1]

The model (the seed notes): a small CNN backbone (3×3 convs with stride 2 and ReLU) →
``input_proj`` (1×1 conv to d_model) → flatten the (h, w) map to h·w tokens, with DETR's
2-D sine positions (:class:`attngraph.nn.PositionEmbeddingSine`, normalized) → a post-norm
Transformer encoder → a decoder over ``num_queries`` learned object queries → per query a
class head (``num_classes`` + 1 scores, the last for "no object") and a 3-layer box MLP with
a sigmoid giving (cx, cy, w, h) in [0, 1].

As DETR's ``transformer.py`` (not torch's layers):

- encoder self-attention: the positions are added to the queries and keys only, never to
  the values, in every layer (``q = k = src + pos``);
- decoder: the target starts at zeros; self-attention adds the query positions (the
  learned ``query_embed``) to Q and K; cross-attention adds them to the query and adds the
  memory's positions to the keys (values: the memory itself); post-norm layers and a final
  decoder LayerNorm (``transformer.decoder.norm``); no final encoder norm.

Parameter names follow DETR's reference code: ``input_proj``, ``query_embed.weight``,
``transformer.encoder.layers.N.self_attn.*``, ``transformer.decoder.layers.N.multihead_attn.*``,
``transformer.decoder.norm``, ``class_embed``, ``bbox_embed.layers.N``; the backbone (a toy,
not a ResNet) is ``backbone.0`` (conv), ``backbone.1`` (ReLU), ``backbone.2`` ... .

Training (:func:`build_train_graph`): the set loss of DETR for a given matching. The
matching itself (:class:`~attngraph.models.matching.HungarianMatcher`) runs in numpy on the
predictions of the current weights and is fed in as per-query targets; the graph computes
the class cross-entropy with the no-object class weighted by ``eos_coef``, and, over the
matched queries, the L1 and GIoU box losses normalized by the number of target boxes.
With ``aux_loss`` each earlier decoder layer's output goes through the same heads and adds
its own set loss (DETR's auxiliary decoding losses). Dropout (0.1 in DETR) is left out, to keep
the toy model simple (it was not tried).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import nn, ops, train
from ..dsl import Graph
from ..errors import ShapeError
from ..nn.module import Module
from .matching import HungarianMatcher

__all__ = ["DETRConfig", "DETR", "MLP", "DETREncoderLayer", "DETRDecoderLayer", "DETRTransformer",
           "LossWeights", "build_eval_graph", "build_train_graph", "set_loss", "target_names", "HungarianMatcher"]


@dataclass
class DETRConfig:
    """The model's sizes. The backbone is ``len(backbone_channels)`` 3×3 convs of stride
    ``backbone_stride`` (padding 1), so the feature map is image_size / stride^len on a side."""

    image_size: int = 32
    in_channels: int = 3
    backbone_channels: tuple = (16, 32)
    backbone_stride: int = 2
    d_model: int = 64
    nhead: int = 4
    num_encoder_layers: int = 1
    num_decoder_layers: int = 2
    dim_feedforward: int = 128
    num_queries: int = 6
    num_classes: int = 3

    @property
    def feature_size(self) -> int:
        """The side of the backbone's feature map (each conv: (s + 2 - 3) // stride + 1)."""
        s = self.image_size
        for _ in self.backbone_channels:
            s = (s - 1) // self.backbone_stride + 1
        return s


class MLP(Module):
    """DETR's box head: ``layers.0 … layers.{n-1}`` Linear, ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList([nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim])])

    def forward(self, x):
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < n - 1:
                x = ops.relu(x)
        return x


class _FeedForward(Module):
    """Shared by both layers: ``linear1`` → ReLU → ``linear2`` (DETR's keys, no dropout at toy size)."""

    def _init_ffn(self, d_model: int, dim_feedforward: int) -> None:
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)

    def _ffn(self, x):
        return self.linear2(ops.relu(self.linear1(x)))


class DETREncoderLayer(_FeedForward):
    """Post-norm: ``src = norm1(src + self_attn(src + pos, src + pos, src))``, then the FFN block."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, batch_first=True)
        self._init_ffn(d_model, dim_feedforward)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos):                                   # (B, S, d), (B|1, S, d)
        q = src + pos
        src = self.norm1(src + self.self_attn(q, q, src, need_weights=False)[0])
        return self.norm2(src + self._ffn(src))


class DETRDecoderLayer(_FeedForward):
    """Post-norm: self-attention (query_pos on Q, K), cross-attention (query_pos on the query,
    pos on the memory's keys), FFN; each followed by residual + LayerNorm (norm1, norm2, norm3).

    ``forward`` returns (tgt, cross-attention weights averaged over heads, or None).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, batch_first=True)
        self._init_ffn(d_model, dim_feedforward)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, memory, pos, query_pos, need_weights: bool = False):
        q = tgt + query_pos                                          # (B, N, d)
        tgt = self.norm1(tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        out, weights = self.multihead_attn(tgt + query_pos, memory + pos, memory, need_weights=need_weights)
        tgt = self.norm2(tgt + out)
        return self.norm3(tgt + self._ffn(tgt)), weights


class _Encoder(Module):
    def __init__(self, layers: list):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, src, pos):
        for layer in self.layers:
            src = layer(src, pos)
        return src


class _Decoder(Module):
    """The layers and the final ``norm``; returns (every layer's output through ``norm``, as DETR's
    ``return_intermediate``, the last one last; the last layer's cross-attention weights or None)."""

    def __init__(self, layers: list, d_model: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt, memory, pos, query_pos, need_weights: bool = False):
        weights, outputs = None, []
        for i, layer in enumerate(self.layers):
            tgt, weights = layer(tgt, memory, pos, query_pos, need_weights and i == len(self.layers) - 1)
            outputs.append(self.norm(tgt))
        return outputs, weights


class DETRTransformer(Module):
    """``encoder`` + ``decoder`` over batch-first tokens: ``forward(src, pos, query_embed)``
    with src (B, S, d), pos (B|1, S, d), query_embed (N, d) → (hs: one (B, N, d) per decoder layer,
    memory (B, S, d), the last layer's cross-attention weights or None)."""

    def __init__(self, d_model: int, nhead: int, num_encoder_layers: int, num_decoder_layers: int,
                 dim_feedforward: int):
        super().__init__()
        self.d_model = d_model
        self.encoder = _Encoder([DETREncoderLayer(d_model, nhead, dim_feedforward)
                                 for _ in range(num_encoder_layers)])
        self.decoder = _Decoder([DETRDecoderLayer(d_model, nhead, dim_feedforward)
                                 for _ in range(num_decoder_layers)], d_model)

    def forward(self, src, pos, query_embed, need_weights: bool = False):
        b = src.shape[0]
        n = query_embed.shape[0]
        memory = self.encoder(src, pos)
        query_pos = query_embed.reshape(1, n, self.d_model)                        # (1, N, d)
        tgt = src.graph.full((1, n, self.d_model), 0.0, src.dtype)                 # DETR: zeros_like(query_embed)
        tgt = ops.broadcast_to(tgt, (b, n, self.d_model))                          # (B, N, d)
        hs, weights = self.decoder(tgt, memory, pos, query_pos, need_weights)
        return hs, memory, weights


class DETR(Module):
    """``forward(images, need_weights=False)`` → a dict, as DETR's ``pred_logits``/``pred_boxes``/``aux_outputs``:

    - ``logits`` (B, N, C+1) (the last class is "no object"), ``boxes`` (B, N, 4) cxcywh in [0, 1];
    - ``aux``: the same two for every decoder layer but the last (the shared heads on each
      layer's normed output; DETR's auxiliary losses use them);
    - ``attention`` (B, N, h·w): the last layer's cross-attention averaged over heads, with ``need_weights``.
    """

    def __init__(self, config: DETRConfig | None = None):
        super().__init__()
        cfg = self.config = config or DETRConfig()
        if cfg.d_model % 2:
            raise ShapeError(f"DETR: d_model must be even for the 2-D sine positions, got {cfg.d_model}")
        layers, c = [], cfg.in_channels
        for out in cfg.backbone_channels:
            layers += [nn.Conv2d(c, out, 3, stride=cfg.backbone_stride, padding=1), nn.ReLU()]
            c = out
        self.backbone = nn.Sequential(*layers)
        self.input_proj = nn.Conv2d(c, cfg.d_model, 1)
        self.position_embedding = nn.PositionEmbeddingSine(cfg.d_model // 2, normalize=True)
        self.transformer = DETRTransformer(cfg.d_model, cfg.nhead, cfg.num_encoder_layers, cfg.num_decoder_layers,
                                           cfg.dim_feedforward)
        self.query_embed = nn.Embedding(cfg.num_queries, cfg.d_model)
        self.class_embed = nn.Linear(cfg.d_model, cfg.num_classes + 1)
        self.bbox_embed = MLP(cfg.d_model, cfg.d_model, 4, 3)

    def forward(self, images, need_weights: bool = False) -> dict:
        cfg = self.config
        size = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != size:
            raise ShapeError(f"DETR expects images (B, {', '.join(map(str, size))}), got {images.shape}")
        b, d = images.shape[0], cfg.d_model
        feat = self.input_proj(self.backbone(images))                             # (B, d, h, w)
        h, w = feat.shape[2:]
        src = feat.reshape(b, d, h * w).transpose(0, 2, 1)                          # (B, h·w, d)
        pos = self.position_embedding(feat[:1])                                    # (1, d, h, w): no mask
        pos = pos.reshape(1, d, h * w).transpose(0, 2, 1)                           # (1, h·w, d)
        query_embed = self.query_embed(images.graph.arange(cfg.num_queries))       # (N, d): the whole table
        hs, _, weights = self.transformer(src, pos, query_embed, need_weights)
        heads = [{"logits": self.class_embed(x),                                   # (B, N, C+1)
                  "boxes": ops.sigmoid(self.bbox_embed(x))} for x in hs]           # (B, N, 4)
        out = {**heads[-1], "aux": heads[:-1]}
        if need_weights:
            out["attention"] = weights
        return out


def build_eval_graph(model: DETR, attention: bool = False, aux: bool = False, name: str = "detr") -> Graph:
    """Input ``images`` (B, C, S, S); outputs ``logits`` (B, N, C+1), ``boxes`` (B, N, 4); with
    ``attention``, ``attention`` (B, N, h·w), the last decoder layer's cross-attention averaged over
    heads; with ``aux``, ``aux{l}_logits`` and ``aux{l}_boxes`` of decoder layers l = 0 … L-2."""
    cfg = model.config
    g = Graph(name)
    images = g.input("images", ("B", cfg.in_channels, cfg.image_size, cfg.image_size))
    out = model(images, need_weights=attention)
    g.output("logits", out["logits"])
    g.output("boxes", out["boxes"])
    if attention:
        g.output("attention", out["attention"])
    if aux:
        for i, head in enumerate(out["aux"]):
            g.output(f"aux{i}_logits", head["logits"])
            g.output(f"aux{i}_boxes", head["boxes"])
    return g


@dataclass
class LossWeights:
    """DETR's defaults: class 1, L1 5, GIoU 2; the no-object class weighs ``eos_coef`` in the
    cross-entropy (there are many more unmatched queries than objects)."""

    ce: float = 1.0
    bbox: float = 5.0
    giou: float = 2.0
    eos_coef: float = 0.1


def set_loss(logits, boxes, target_classes, target_boxes, box_weights, num_classes: int,
             weights: LossWeights | None = None) -> dict:
    """DETR's ``SetCriterion`` for a given matching, as graph Tensors.

    - ``target_classes`` (B, N) int: the class of the target matched to each query, or
      ``num_classes`` (no object); ``target_boxes`` (B, N, 4) cxcywh and ``box_weights`` (B, N)
      (1 where matched, 0 elsewhere; the unmatched boxes must still be valid boxes).
    - class loss: cross-entropy averaged with per-query weights (``eos_coef`` for no object),
      as torch's ``cross_entropy(..., weight=empty_weight)``;
    - box losses: L1 of the 4 coordinates and 1 - GIoU, summed over the matched queries and
      divided by the number of target boxes (at least 1).

    Returns a dict of Tensors: ``loss`` (the weighted sum), ``loss_ce``, ``loss_bbox``, ``loss_giou``.
    """
    w = weights or LossWeights()
    ce = train.cross_entropy(logits, target_classes, reduction="none")            # (B, N)
    no_object = target_classes == num_classes
    class_w = ops.where(no_object, float(w.eos_coef), 1.0)                           # (B, N)
    loss_ce = ops.sum(ce * class_w) / ops.sum(class_w)
    num_boxes = ops.maximum(ops.sum(box_weights), 1.0)
    l1 = ops.sum(ops.abs(boxes - target_boxes), axis=-1)                           # (B, N)
    loss_bbox = ops.sum(l1 * box_weights) / num_boxes
    giou = train.giou_loss(boxes, target_boxes, fmt="cxcywh", reduction="none")     # (B, N)
    loss_giou = ops.sum(giou * box_weights) / num_boxes
    loss = loss_ce * w.ce + loss_bbox * w.bbox + loss_giou * w.giou
    return {"loss": loss, "loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}


def target_names(prefix: str = "") -> tuple[str, str, str]:
    """The names of the per-query target inputs of one set of predictions (``prefix``: "" for the
    last layer, ``aux{l}_`` for the auxiliary ones)."""
    return f"{prefix}target_classes", f"{prefix}target_boxes", f"{prefix}box_weights"


def build_train_graph(model: DETR, weights: LossWeights | None = None, aux_loss: bool = False,
                      name: str = "detr_train") -> Graph:
    """DETR's training graph for a given matching.

    Inputs: ``images``, and the matcher's per-query targets
    (:meth:`~attngraph.models.matching.HungarianMatcher.targets`): ``target_classes`` (B, N) int64,
    ``target_boxes`` (B, N, 4), ``box_weights`` (B, N); with ``aux_loss`` also ``aux{l}_target_classes``,
    ``aux{l}_target_boxes``, ``aux{l}_box_weights`` for the decoder layers l = 0 … L-2, matched to
    those layers' own predictions (DETR's auxiliary decoding losses).

    Outputs: ``loss`` (the sum of :func:`set_loss` over the final and, with ``aux_loss``, the
    auxiliary predictions), the final predictions' ``loss_ce``, ``loss_bbox``, ``loss_giou``, and
    ``logits``, ``boxes``.
    """
    cfg = model.config
    g = Graph(name)
    images = g.input("images", ("B", cfg.in_channels, cfg.image_size, cfg.image_size))
    out = model(images)

    def targets(prefix):
        c, b, w = target_names(prefix)
        return (g.input(c, ("B", cfg.num_queries), "int64"), g.input(b, ("B", cfg.num_queries, 4)),
                g.input(w, ("B", cfg.num_queries)))

    losses = set_loss(out["logits"], out["boxes"], *targets(""), cfg.num_classes, weights)
    total = losses["loss"]
    if aux_loss:
        for i, head in enumerate(out["aux"]):
            total = total + set_loss(head["logits"], head["boxes"], *targets(f"aux{i}_"), cfg.num_classes,
                                     weights)["loss"]
    g.output("loss", total)
    for key in ("loss_ce", "loss_bbox", "loss_giou"):
        g.output(key, losses[key])
    g.output("logits", out["logits"])
    g.output("boxes", out["boxes"])
    return g
