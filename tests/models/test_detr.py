"""DETR against an independent torch implementation of DETR's reference logic, the Hungarian
matcher against brute force, and the box utilities and set loss against torch formulas."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn as tnn  # noqa: E402

from attngraph.compiler import compile as compile_graph  # noqa: E402
from attngraph.errors import AttngraphError, ShapeError  # noqa: E402
from attngraph.models import detr, matching  # noqa: E402
from attngraph.models.detr import DETR, DETRConfig, LossWeights  # noqa: E402
from tests.torch_references import DetrPositionEmbeddingSine  # noqa: E402

CFG = DETRConfig(image_size=16, in_channels=3, backbone_channels=(8, 12), d_model=16, nhead=2, num_encoder_layers=2,
                 num_decoder_layers=2, dim_feedforward=24, num_queries=5, num_classes=3)


# -- DETR's reference code, written again in torch (models/transformer.py, position_encoding.py, detr.py) --

class TorchEncoderLayer(tnn.Module):
    def __init__(self, d, h, f):
        super().__init__()
        self.self_attn = tnn.MultiheadAttention(d, h)
        self.linear1, self.linear2 = tnn.Linear(d, f), tnn.Linear(f, d)
        self.norm1, self.norm2 = tnn.LayerNorm(d), tnn.LayerNorm(d)

    def forward(self, src, pos):                                       # (S, B, d): sequence first, as DETR
        q = k = src + pos
        src = self.norm1(src + self.self_attn(q, k, value=src)[0])
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class TorchDecoderLayer(tnn.Module):
    def __init__(self, d, h, f):
        super().__init__()
        self.self_attn = tnn.MultiheadAttention(d, h)
        self.multihead_attn = tnn.MultiheadAttention(d, h)
        self.linear1, self.linear2 = tnn.Linear(d, f), tnn.Linear(f, d)
        self.norm1, self.norm2, self.norm3 = tnn.LayerNorm(d), tnn.LayerNorm(d), tnn.LayerNorm(d)

    def forward(self, tgt, memory, pos, query_pos):
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, k, value=tgt)[0])
        tgt2, weights = self.multihead_attn(query=tgt + query_pos, key=memory + pos, value=memory)
        tgt = self.norm2(tgt + tgt2)
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt)))), weights


class TorchEncoder(tnn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = tnn.ModuleList(layers)


class TorchDecoder(tnn.Module):
    def __init__(self, layers, d):
        super().__init__()
        self.layers = tnn.ModuleList(layers)
        self.norm = tnn.LayerNorm(d)


class TorchTransformer(tnn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, h, f = cfg.d_model, cfg.nhead, cfg.dim_feedforward
        self.encoder = TorchEncoder([TorchEncoderLayer(d, h, f) for _ in range(cfg.num_encoder_layers)])
        self.decoder = TorchDecoder([TorchDecoderLayer(d, h, f) for _ in range(cfg.num_decoder_layers)], d)

    def forward(self, src, pos_embed, query_embed):
        bs, c, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        query_embed = query_embed.unsqueeze(1).repeat(1, bs, 1)
        tgt = torch.zeros_like(query_embed)
        memory = src
        for layer in self.encoder.layers:
            memory = layer(memory, pos_embed)
        intermediate, output = [], tgt
        for layer in self.decoder.layers:
            output, weights = layer(output, memory, pos_embed, query_embed)
            intermediate.append(self.decoder.norm(output))
        return torch.stack(intermediate).transpose(1, 2), weights     # (L, B, N, d), (B, N, S)


class TorchMLP(tnn.Module):
    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        h = [hidden_dim] * (num_layers - 1)
        self.num_layers = num_layers
        self.layers = tnn.ModuleList(tnn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


class TorchDETR(tnn.Module):
    def __init__(self, cfg):
        super().__init__()
        layers, c = [], cfg.in_channels
        for out in cfg.backbone_channels:
            layers += [tnn.Conv2d(c, out, 3, stride=cfg.backbone_stride, padding=1), tnn.ReLU()]
            c = out
        self.backbone = tnn.Sequential(*layers)
        self.input_proj = tnn.Conv2d(c, cfg.d_model, 1)
        self.position = DetrPositionEmbeddingSine(cfg.d_model // 2, normalize=True)
        self.transformer = TorchTransformer(cfg)
        self.query_embed = tnn.Embedding(cfg.num_queries, cfg.d_model)
        self.class_embed = tnn.Linear(cfg.d_model, cfg.num_classes + 1)
        self.bbox_embed = TorchMLP(cfg.d_model, cfg.d_model, 4, 3)

    def forward(self, images):
        src = self.input_proj(self.backbone(images))
        mask = torch.zeros((src.shape[0],) + src.shape[2:], dtype=torch.bool)
        hs, weights = self.transformer(src, self.position(mask), self.query_embed.weight)
        return self.class_embed(hs), self.bbox_embed(hs).sigmoid(), weights   # (L, B, N, ·)


def _random_state(model, seed=0):
    """Every weight drawn at random (LayerNorm gains and all biases too), at a scale that keeps
    the activations moderate."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, value in model.state_dict().items():
        fan_in = int(np.prod(value.shape[1:])) if value.ndim > 1 else 4
        scale = 1.0 / math.sqrt(fan_in)
        v = rng.normal(0, scale, value.shape)
        if key.endswith("norm1.weight") or key.endswith("norm2.weight") or key.endswith("norm3.weight") \
                or key.endswith("norm.weight"):
            v = 1.0 + 0.2 * rng.standard_normal(value.shape)
        out[key] = v.astype(np.float32)
    return out


@pytest.fixture(scope="module")
def pair():
    model = DETR(CFG)
    state = _random_state(model)
    model.load_state_dict(state)
    ref = TorchDETR(CFG)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return model, ref.eval()


def test_parameter_names_are_detrs(pair):
    model, ref = pair
    keys = set(model.state_dict())
    assert keys == set(ref.state_dict())
    for key in ("input_proj.weight", "query_embed.weight", "class_embed.weight", "bbox_embed.layers.2.bias",
                "transformer.encoder.layers.1.self_attn.in_proj_weight",
                "transformer.decoder.layers.0.multihead_attn.out_proj.weight", "transformer.decoder.norm.weight",
                "transformer.decoder.layers.1.norm3.bias"):
        assert key in keys


def test_detr_matches_torch_reference_fused_on_cpu(pair):
    model, ref = pair
    images = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        logits, boxes, weights = ref(torch.from_numpy(images))
    exe = compile_graph(detr.build_eval_graph(model, aux=True), backend="cpu")
    ops = [n.op for n in exe.graph.nodes]
    assert ops.count("attention") == CFG.num_encoder_layers + 2 * CFG.num_decoder_layers
    assert "softmax" not in ops                                         # every attention fused
    out = exe.run({"images": images})
    np.testing.assert_allclose(out["logits"], logits[-1].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["boxes"], boxes[-1].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["aux0_logits"], logits[0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["aux0_boxes"], boxes[0].numpy(), rtol=1e-5, atol=1e-5)
    assert np.abs(out["logits"]).max() > 0.1 and out["boxes"].std() > 1e-3   # not a degenerate case

    attn_exe = compile_graph(detr.build_eval_graph(model, attention=True), backend="cpu")
    fused = [n.attrs.get("return_weights") for n in attn_exe.graph.nodes if n.op == "attention"]
    assert len(fused) == CFG.num_encoder_layers + 2 * CFG.num_decoder_layers and fused.count(True) == 1
    attn = attn_exe.run({"images": images})
    np.testing.assert_allclose(attn["attention"], weights.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(attn["logits"], out["logits"], rtol=1e-5, atol=1e-6)


def test_detr_rejects_wrong_image_size():
    import attngraph as ag

    g = ag.Graph("bad")
    with pytest.raises(ShapeError, match="DETR expects images"):
        DETR(CFG)(g.input("images", ("B", 3, 20, 20)))
    with pytest.raises(ShapeError, match="even"):
        DETR(DETRConfig(d_model=15, nhead=3))
    assert CFG.feature_size == 4 and DETRConfig(image_size=32).feature_size == 8


# -- box utilities ---------------------------------------------------------------------------------

def _torch_box_iou(a, b):                     # torchvision.ops.box_iou's formula
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[:, :2])
    rb = torch.min(a[:, None, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b - inter
    return inter / union, union


def _torch_giou(a, b):                        # torchvision.ops.generalized_box_iou's formula
    iou, union = _torch_box_iou(a, b)
    lt = torch.min(a[:, None, :2], b[:, :2])
    rb = torch.max(a[:, None, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / area


def _random_cxcywh(rng, n):
    return np.concatenate([rng.uniform(0.2, 0.8, (n, 2)), rng.uniform(0.05, 0.5, (n, 2))], axis=1)


def test_box_conversions_roundtrip_and_match_torch():
    rng = np.random.default_rng(0)
    b = _random_cxcywh(rng, 7)
    xyxy = matching.box_cxcywh_to_xyxy(b)
    t = torch.from_numpy(b)
    cx, cy, w, h = t.unbind(-1)
    expected = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1).numpy()
    np.testing.assert_allclose(xyxy, expected, rtol=1e-12)
    np.testing.assert_allclose(matching.box_xyxy_to_cxcywh(xyxy), b, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(matching.box_area(xyxy), b[:, 2] * b[:, 3], rtol=1e-12)
    with pytest.raises(ShapeError):
        matching.box_cxcywh_to_xyxy(np.zeros((3, 3)))


def test_iou_and_giou_match_torch_formulas():
    rng = np.random.default_rng(1)
    a = matching.box_cxcywh_to_xyxy(_random_cxcywh(rng, 6))
    b = matching.box_cxcywh_to_xyxy(_random_cxcywh(rng, 4))
    b[0] = a[2]                                                       # one identical pair: IoU = GIoU = 1
    iou, union = matching.box_iou(a, b)
    t_iou, t_union = _torch_box_iou(torch.from_numpy(a), torch.from_numpy(b))
    np.testing.assert_allclose(iou, t_iou.numpy(), rtol=1e-12)
    np.testing.assert_allclose(union, t_union.numpy(), rtol=1e-12)
    giou = matching.generalized_box_iou(a, b)
    np.testing.assert_allclose(giou, _torch_giou(torch.from_numpy(a), torch.from_numpy(b)).numpy(), rtol=1e-12)
    assert giou[2, 0] == pytest.approx(1.0) and (giou >= -1).all() and (giou <= 1).all()
    assert (iou < 1e-12).any()                                        # disjoint pairs: GIoU < 0 there
    assert (giou[iou < 1e-12] < 0).all()
    with pytest.raises(AttngraphError):
        matching.generalized_box_iou([[0.5, 0.5, 0.4, 0.6]], [[0, 0, 1, 1]])


def test_hand_made_iou():
    iou, _ = matching.box_iou([[0, 0, 2, 2]], [[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]])
    np.testing.assert_allclose(iou[0], [1 / 7, 1.0, 0.0])
    giou = matching.generalized_box_iou([[0, 0, 1, 1]], [[2, 0, 3, 1]])   # hull 3, union 2
    assert giou[0, 0] == pytest.approx(0 - 1 / 3)


# -- the matcher -----------------------------------------------------------------------------------

def _torch_cost(logits, boxes, labels, tboxes, wc, wb, wg):        # DETR's HungarianMatcher.forward
    prob = torch.from_numpy(logits).softmax(-1)
    out_bbox, tgt_bbox = torch.from_numpy(boxes), torch.from_numpy(tboxes)
    cost_class = -prob[:, torch.from_numpy(labels)]
    cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)

    def xyxy(x):
        cx, cy, w, h = x.unbind(-1)
        return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)

    cost_giou = -_torch_giou(xyxy(out_bbox), xyxy(tgt_bbox))
    return (wb * cost_bbox + wc * cost_class + wg * cost_giou).numpy()


@pytest.mark.parametrize("seed", range(6))
def test_matcher_costs_and_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, m, c = int(rng.integers(3, 7)), None, 4
    m = int(rng.integers(1, n + 1))
    logits = rng.standard_normal((2, n, c + 1))
    boxes = np.stack([_random_cxcywh(rng, n) for _ in range(2)])
    targets = [{"labels": rng.integers(0, c, m), "boxes": _random_cxcywh(rng, m)} for _ in range(2)]
    matcher = matching.HungarianMatcher(cost_class=1.5, cost_bbox=5.0, cost_giou=2.0)
    for i, (q, j) in enumerate(matcher(logits, boxes, targets)):
        cost = matcher.cost_matrix(logits[i], boxes[i], targets[i]["labels"], targets[i]["boxes"])
        expected = _torch_cost(logits[i], boxes[i], targets[i]["labels"], targets[i]["boxes"], 1.5, 5.0, 2.0)
        np.testing.assert_allclose(cost, expected, rtol=1e-10, atol=1e-12)
        assert sorted(j.tolist()) == list(range(m)) and len(set(q.tolist())) == m
        best = min(sum(cost[perm[t], t] for t in range(m)) for perm in itertools.permutations(range(n), m))
        assert cost[q, j].sum() == pytest.approx(best, rel=1e-12)


def test_matcher_targets_layout():
    logits = np.zeros((2, 4, 3))
    boxes = np.tile([0.5, 0.5, 0.2, 0.2], (2, 4, 1))
    boxes[0, 2] = [0.2, 0.3, 0.1, 0.1]                                  # query 2 sits on target 0 of image 0
    targets = [{"labels": np.array([1]), "boxes": np.array([[0.2, 0.3, 0.1, 0.1]])},
               {"labels": np.array([], np.int64), "boxes": np.zeros((0, 4))}]
    t = matching.HungarianMatcher().targets(logits, boxes, targets, num_classes=2)
    assert t["target_classes"].tolist() == [[2, 2, 1, 2], [2, 2, 2, 2]]
    assert t["box_weights"].tolist() == [[0, 0, 1, 0], [0, 0, 0, 0]]
    np.testing.assert_allclose(t["target_boxes"][0, 2], [0.2, 0.3, 0.1, 0.1], rtol=1e-6)
    assert t["target_boxes"].dtype == np.float32 and t["target_classes"].dtype == np.int64
    with pytest.raises(ShapeError):
        matching.HungarianMatcher()(logits, boxes, targets[:1])
    with pytest.raises(AttngraphError):
        matching.HungarianMatcher(0, 0, 0)


# -- the set loss --------------------------------------------------------------------------------

def _torch_set_loss(logits, boxes, classes, tboxes, weights, num_classes, w):   # DETR's SetCriterion
    logits, boxes = torch.from_numpy(logits), torch.from_numpy(boxes)
    empty_weight = torch.ones(num_classes + 1)
    empty_weight[-1] = w.eos_coef
    loss_ce = F.cross_entropy(logits.transpose(1, 2), torch.from_numpy(classes), empty_weight)
    keep = torch.from_numpy(weights) > 0
    num_boxes = max(float(keep.sum()), 1.0)
    src, tgt = boxes[keep], torch.from_numpy(tboxes)[keep]
    loss_bbox = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes

    def xyxy(x):
        cx, cy, ww, hh = x.unbind(-1)
        return torch.stack([cx - 0.5 * ww, cy - 0.5 * hh, cx + 0.5 * ww, cy + 0.5 * hh], -1)

    loss_giou = (1 - torch.diag(_torch_giou(xyxy(src), xyxy(tgt)))).sum() / num_boxes
    total = w.ce * loss_ce + w.bbox * loss_bbox + w.giou * loss_giou
    return {"loss": total, "loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}


def test_set_loss_matches_detr_criterion():
    import attngraph as ag

    rng = np.random.default_rng(0)
    b, n, c = 3, 5, 3
    logits = rng.standard_normal((b, n, c + 1)).astype(np.float32)
    boxes = np.stack([_random_cxcywh(rng, n) for _ in range(b)]).astype(np.float32)
    targets = [{"labels": rng.integers(0, c, k), "boxes": _random_cxcywh(rng, k)} for k in (2, 0, 3)]
    feeds = matching.HungarianMatcher().targets(logits, boxes, targets, c)
    w = LossWeights(ce=1.0, bbox=5.0, giou=2.0, eos_coef=0.1)
    g = ag.Graph("set_loss")
    lg, bx = g.input("logits", (b, n, c + 1)), g.input("boxes", (b, n, 4))
    tc, tb, bw = g.input("target_classes", (b, n), "int64"), g.input("target_boxes", (b, n, 4)), \
        g.input("box_weights", (b, n))
    for key, value in detr.set_loss(lg, bx, tc, tb, bw, c, w).items():
        g.output(key, value)
    out = compile_graph(g, backend="cpu").run({"logits": logits, "boxes": boxes, **feeds})
    expected = _torch_set_loss(logits, boxes, feeds["target_classes"], feeds["target_boxes"], feeds["box_weights"],
                               c, w)
    for key, value in expected.items():
        np.testing.assert_allclose(out[key], value.item(), rtol=1e-5, err_msg=key)


def test_train_graph_aux_inputs_and_gradients_flow():
    from attngraph import train

    small = DETRConfig(image_size=16, backbone_channels=(8,), d_model=16, nhead=2, num_encoder_layers=1,
                       num_decoder_layers=2, dim_feedforward=16, num_queries=4, num_classes=3)
    model = DETR(small).reset_parameters(0)
    g = detr.build_train_graph(model, aux_loss=True)
    assert {"target_classes", "aux0_target_classes", "aux0_box_weights"} <= set(g.inputs)
    assert "aux1_target_classes" not in g.inputs
    step = train.compile_train_step(g, "loss", optimizer=train.AdamW(3e-3))
    rng = np.random.default_rng(0)
    images = rng.random((4, 3, 16, 16)).astype(np.float32)
    targets = [{"labels": rng.integers(0, 3, 2), "boxes": _random_cxcywh(rng, 2)} for _ in range(4)]
    eval_exe = compile_graph(detr.build_eval_graph(model, aux=True), backend="cpu")
    losses = []
    for _ in range(12):
        for name in eval_exe.params:
            eval_exe.params[name] = step.params[name]
        out = eval_exe.run({"images": images})
        feeds = {"images": images}
        for prefix in ("", "aux0_"):
            t = matching.HungarianMatcher().targets(out[prefix + "logits"], out[prefix + "boxes"], targets, 3)
            feeds.update({prefix + k: v for k, v in t.items()})
        losses.append(step(feeds))
    assert np.isfinite(losses).all() and losses[-1] < 0.9 * losses[0]
