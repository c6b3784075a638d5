"""Image captioning with attention (Show, Attend and Tell): a small CNN and a GRU decoder
that attends over the CNN's feature grid at every word.

The seed notes' second model. The CNN turns the image into a grid of feature vectors
h_ij, one per cell; the decoder is the one of Bahdanau's seq2seq
(:class:`~attngraph.models.seq2seq_rnn.AttentionGRUDecoder`): before each word it scores
every cell with e = vᵀ tanh(W s_{t-1} + U h_ij), takes the softmax over the cells, reads
the weighted sum of the features and then writes the word. The weights, drawn over the
image, show where the model looked for each word.

    import attngraph as ag
    from attngraph.models.captioning import CaptioningModel

    model = CaptioningModel(vocab=14, image_size=32)           # 32×32 RGB → a 4×4 grid
    g = ag.Graph("caption")
    images = g.input("images", ("B", 3, 32, 32))
    tgt_in = g.input("tgt_in", ("B", 10), "int64")
    logits, weights = model(images, tgt_in)                    # (B, 10, V), (B, 10, 16)

    decoder = model.compile_decoder(backend="cpu")             # encoder + one-step graphs
    tokens, attention = decoder.greedy({"images": x}, np.zeros((len(x), 16), bool),
                                       max_len=10, sos=1, eos=2)

The CNN is a stack of stride-2 ``Conv2d(k=3, padding=1)`` + ReLU (torch's keys
``encoder.0.weight``, ``encoder.2.weight``, ...); a learned position embedding
``pos_embed`` (cells, C) is added to the grid so that a context vector says where it
came from, not only what is there.
"""

from __future__ import annotations

import numpy as np

from .. import nn
from ..dsl import Graph, Tensor
from ..errors import ShapeError
from ..nn.module import Module, normal_init
from .seq2seq_rnn import AttentionGRUDecoder, StepDecoder

__all__ = ["CaptioningModel"]


class CaptioningModel(Module):
    """CNN encoder → feature grid (B, gh·gw, C) → :class:`AttentionGRUDecoder`.

    ``forward(images (B, in_channels, H, W), tgt_in (B, T))`` → (logits (B, T, V),
    attention (B, T, gh·gw)); the cells are in row-major order. ``forward(images)`` alone
    gives the feature grid.
    """

    def __init__(self, vocab: int, image_size: int = 32, in_channels: int = 3, channels=(16, 32, 32),
                 emb_dim: int = 16, hidden_size: int = 64, attn_dim: int = 32, padding_idx: int | None = 0):
        super().__init__()
        self.vocab, self.image_size, self.in_channels = int(vocab), int(image_size), int(in_channels)
        self.channels = tuple(int(c) for c in channels)
        if not self.channels or image_size % (2 ** len(self.channels)):
            raise ShapeError(f"image_size {image_size} must be divisible by 2**{len(self.channels)} "
                             f"(one stride-2 conv per entry of channels={self.channels})")
        self.grid = image_size // 2 ** len(self.channels)                # gh = gw
        layers, c_in = [], in_channels
        for c in self.channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.ReLU()]
            c_in = c
        self.encoder = nn.Sequential(*layers)
        self.feature_dim = c_in
        self.register_parameter("pos_embed", (self.grid * self.grid, c_in), normal_init(0.02))
        self.decoder = AttentionGRUDecoder(vocab, emb_dim, c_in, hidden_size, attn_dim, padding_idx)

    def features(self, images: Tensor) -> Tensor:
        """images (B, C_in, H, W) → the feature grid h_ij, flattened row-major: (B, gh·gw, C)."""
        return self(images)

    def forward(self, images: Tensor, tgt_in: Tensor | None = None):
        """With ``tgt_in``: (logits, attention); without: the feature grid (:meth:`features`)."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (self.in_channels, self.image_size, self.image_size):
            raise ShapeError(f"CaptioningModel expects images (B, {self.in_channels}, {self.image_size}, "
                             f"{self.image_size}), got {images.shape}")
        f = self.encoder(images)                                            # (B, C, gh, gw)
        b, c = f.shape[0], self.feature_dim
        f = f.reshape(b, c, self.grid * self.grid).transpose(0, 2, 1)     # (B, gh·gw, C)
        f = f + self.param("pos_embed")
        return f if tgt_in is None else self.decoder(tgt_in, f)

    def compile_decoder(self, backend: str = "cpu", **options) -> StepDecoder:
        """The encoder graph (input ``images``) and the one-step graph, compiled, for greedy captions."""
        g = Graph("captioning_encoder")
        images = g.input("images", ("B", self.in_channels, self.image_size, self.image_size))
        self.decoder.encoder_outputs(g, self.features(images))
        return StepDecoder.compile(g, self.decoder, self.grid * self.grid, "captioning_step", backend, **options)

    def no_padding(self, n: int) -> np.ndarray:
        """An all-False memory padding mask (N, cells) for :meth:`StepDecoder.greedy`: every cell is real."""
        return np.zeros((n, self.grid * self.grid), bool)

    def extra_repr(self) -> str:
        return f"grid={self.grid}x{self.grid}, feature_dim={self.feature_dim}"
