"""ViT against an independent torch ViT (Conv2d patch embedding, class token, positions,
torch's pre-norm encoder, head) with the same weights: cpu backend, optimizer on (fused)."""

from __future__ import annotations

import numpy as np
import pytest

import attngraph as ag
from attngraph.errors import ShapeError
from attngraph.models.vit import PRESETS, ViT, ViTConfig

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.filterwarnings("ignore:.*enable_nested_tensor.*:UserWarning")


class TorchViT(torch.nn.Module):
    """The reference, written the usual torch way."""

    def __init__(self, c: ViTConfig):
        super().__init__()
        d = c.dim
        self.patch_embed = torch.nn.Conv2d(c.in_channels, d, c.patch_size, stride=c.patch_size)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos_embed = torch.nn.Parameter(torch.randn(1, 1 + c.num_patches, d) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(d, c.heads, c.mlp_dim, dropout=0.0, activation="gelu",
                                                 layer_norm_eps=c.layer_norm_eps, batch_first=True, norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, c.depth, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(d, eps=c.layer_norm_eps)
        if c.representation_size:
            self.head = torch.nn.Sequential(torch.nn.Linear(d, c.representation_size), torch.nn.Tanh(),
                                            torch.nn.Linear(c.representation_size, c.num_classes))
        else:
            self.head = torch.nn.Linear(d, c.num_classes)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)                 # (B, N, d)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        x0, weights = x, []
        for layer in self.encoder.layers:                                        # torch's layer, step by step
            h = layer.norm1(x)
            a, w = layer.self_attn(h, h, h, need_weights=True, average_attn_weights=False)
            weights.append(w)
            x = x + a
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))
        assert torch.allclose(self.encoder(x0), x, atol=1e-5)                  # the loop is torch's encoder
        return self.head(self.norm(x)[:, 0]), weights


SMALL = ViTConfig(image_size=12, patch_size=4, in_channels=3, num_classes=5, dim=16, depth=2, heads=2, mlp_dim=32)


def torch_and_mine(cfg: ViTConfig, seed: int = 0):
    torch.manual_seed(seed)
    ref = TorchViT(cfg).eval()
    with torch.no_grad():                                                        # nonzero biases everywhere
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    mine = ViT(cfg)
    mine.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})   # Conv2d weight too
    return ref, mine


@pytest.mark.parametrize("with_weights", [False, True])
def test_vit_matches_torch_fused_on_cpu(with_weights, rng):
    cfg = SMALL if not with_weights else ViTConfig(**{**SMALL.__dict__, "representation_size": 8})
    ref, mine = torch_and_mine(cfg)
    g = ag.Graph("vit")
    images = g.input("images", ("B", 3, 12, 12))
    if with_weights:
        logits, weights = mine(images, return_weights=True)
        for i, w in enumerate(weights):
            g.output(f"attn{i}", w)
    else:
        logits = mine(images)
    g.output("logits", logits)
    exe = ag.compile(g, backend="cpu")
    att = [n for n in exe.graph.nodes if n.op == "attention"]
    assert len(att) == cfg.depth and "softmax" not in exe.graph.op_counts()
    assert all(bool(n.attrs.get("return_weights")) == with_weights for n in att)
    x = rng.standard_normal((2, 3, 12, 12)).astype(np.float32)
    got = exe.run({"images": x})
    with torch.no_grad():
        want_logits, want_weights = ref(torch.from_numpy(x))
    np.testing.assert_allclose(got["logits"], want_logits.numpy(), rtol=1e-5, atol=1e-5)
    if with_weights:
        for i, w in enumerate(want_weights):
            assert got[f"attn{i}"].shape == (2, cfg.heads, 1 + cfg.num_patches, 1 + cfg.num_patches)
            np.testing.assert_allclose(got[f"attn{i}"], w.numpy(), rtol=1e-5, atol=1e-6)


def test_state_dict_keys_are_torchs():
    ref, mine = torch_and_mine(SMALL)
    theirs = ref.state_dict()
    ours = mine.state_dict()
    assert set(ours) == set(theirs)
    assert ours["patch_embed.weight"].shape == (16, 3 * 4 * 4)                 # the Linear form of the Conv2d
    np.testing.assert_array_equal(ours["patch_embed.weight"], theirs["patch_embed.weight"].reshape(16, -1).numpy())


@pytest.mark.parametrize("name, expected", [("tiny", 5_717_416), ("small", 22_050_664), ("base", 86_567_656)])
def test_preset_parameter_counts_equal_torchs(name, expected):
    cfg = ViTConfig.preset(name)
    with torch.device("meta"):                                                  # shapes only, no memory
        ref = TorchViT(cfg)
    assert ViT(cfg).num_parameters() == sum(p.numel() for p in ref.parameters()) == expected
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.patch_size, cfg.image_size) == \
        {"tiny": (192, 12, 3, 16, 224), "small": (384, 12, 6, 16, 224), "base": (768, 12, 12, 16, 224)}[name]
    assert PRESETS["base"].mlp_dim == 3072


def test_bad_image_sizes_raise_shape_errors():
    with pytest.raises(ShapeError, match="does not divide the image size"):
        ViTConfig(image_size=10, patch_size=4)
    with pytest.raises(ShapeError, match="not divisible by heads"):
        ViTConfig(image_size=8, patch_size=2, dim=10, heads=3)
    model = ViT(SMALL)
    for shape in [(2, 3, 13, 12), (2, 3, 16, 16), (2, 1, 12, 12), (3, 12, 12)]:
        g = ag.Graph("bad")
        with pytest.raises(ShapeError):
            model(g.input("images", shape))
    with pytest.raises(ValueError, match="presets are"):
        ViTConfig.preset("huge")


def test_vit_gradients_match_torch(rng):
    """ag.grad of the cross-entropy w.r.t. every weight (compiled and fused on cpu) equals torch's
    autograd, so the model trains as torch's would."""
    ref, mine = torch_and_mine(SMALL, seed=1)
    g = ag.Graph("vit_grad")
    images = g.input("images", (3, 3, 12, 12))
    labels = g.input("labels", (3,), "int64")
    loss = ag.train.cross_entropy(mine(images), labels)
    g.output("loss", loss)
    params = mine.parameters(g)                                                  # key → param Tensor
    for key, d in zip(params, ag.grad(loss, list(params.values()))):
        g.output("d:" + key, d)
    exe = ag.compile(g, backend="cpu")
    assert exe.graph.op_counts().get("attention") == SMALL.depth
    x = rng.standard_normal((3, 3, 12, 12)).astype(np.float32)
    y = np.array([0, 3, 4])
    got = exe.run({"images": x, "labels": y})
    logits, _ = ref(torch.from_numpy(x))
    want_loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y))
    want_loss.backward()
    np.testing.assert_allclose(got["loss"], want_loss.item(), rtol=1e-5)
    theirs = dict(ref.named_parameters())
    for key in params:
        want = theirs[key].grad.numpy()
        np.testing.assert_allclose(got["d:" + key], want.reshape(got["d:" + key].shape), rtol=1e-4, atol=1e-5,
                                   err_msg=key)


def test_the_vit_digits_task_model_is_this_vit(rng):
    """vit_digits.TinyViT (the task examples/vit_attention.py trains) with its weights moved into
    ViT gives the same logits: only the position table's key and shape differ."""
    from attngraph.tasks import vit_digits

    tiny = vit_digits.TinyViT(8, 1, patch=2, d_model=16, nhead=2, num_layers=2, dim_feedforward=32).reset_parameters(3)
    vit = ViT(ViTConfig(image_size=8, patch_size=2, in_channels=1, num_classes=10, dim=16, depth=2, heads=2,
                        mlp_dim=32, layer_norm_eps=1e-5))
    state = tiny.state_dict()
    state["pos_embed"] = state.pop("pos_embed.weight")[None]                    # (1 + N, d) → (1, 1 + N, d)
    vit.load_state_dict(state)
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    got = ag.compile(vit_digits.build_eval_graph(tiny), backend="numpy").run({"images": x})["logits"]
    g = ag.Graph("vit")
    g.output("logits", vit(g.input("images", ("B", 1, 8, 8))))
    want = ag.compile(g, backend="numpy").run({"images": x})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
