"""Embedding: rows of a (num_embeddings, embedding_dim) table (torch.nn.Embedding)."""

from __future__ import annotations

from .. import ops
from ..dsl import as_tensor
from .module import Module

__all__ = ["Embedding"]


class Embedding(Module):
    """Key ``weight`` (num_embeddings, embedding_dim), drawn from N(0, 1); the ``padding_idx`` row starts at 0."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        if padding_idx is not None and padding_idx < 0:
            padding_idx += num_embeddings
        self.padding_idx = padding_idx

        def init(rng, shape):
            w = rng.standard_normal(shape)
            if padding_idx is not None:
                w[padding_idx] = 0.0
            return w

        self.register_parameter("weight", (num_embeddings, embedding_dim), init)

    def forward(self, ids):
        """``ids``: an int Tensor (or array) of any shape → (*ids.shape, embedding_dim).
        As torch's, the ``padding_idx`` row gets no gradient (it is read through stop_gradient)."""
        weight = self.param("weight")
        ids = as_tensor(ids, weight.graph)                                 # an array becomes one const
        out = ops.embedding(ids, weight)                                   # (*ids.shape, E)
        if self.padding_idx is None:
            return out
        is_pad = ops.unsqueeze(ids == self.padding_idx, -1)                # (*ids.shape, 1)
        return ops.where(is_pad, ops.stop_gradient(out), out)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"

