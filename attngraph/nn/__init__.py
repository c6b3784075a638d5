"""attngraph.nn: modules whose weights and arithmetic are torch.nn's.

A torch state_dict, saved as safetensors, loads into the matching module and the graph it
builds gives torch's outputs::

    import attngraph as ag
    from attngraph import nn

    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 2)
    model.load_state_dict(ag.io.load_safetensors("encoder.safetensors"))   # torch's keys

    g = ag.Graph("encoder")
    x = g.input("x", ("B", "T", 64))
    pad = g.input("pad", ("B", "T"), "bool")                    # True = padding, as torch
    g.output("y", model(x, src_key_padding_mask=pad))
    exe = ag.compile(g, backend="cpu")                          # each self-attention: one `attention` node

How a module works
------------------
- A module holds hyperparameters and child modules. The attribute names are torch's, so
  the dotted keys are too: ``layers.0.self_attn.in_proj_weight``.
- ``module(x, ...)`` adds the module's nodes to ``x``'s graph (the graph comes from the
  tensors; every module is called on at least one), inside ``graph.scope(name)``, so
  diagrams draw each module as a cluster. It returns what torch's ``forward`` returns.
- Each weight becomes a graph param named by its full key (buffers, such as BatchNorm's
  running statistics, become consts). It is created on the first call in a graph and
  reused by later calls in the same graph (weight sharing). Its value is the loaded one,
  or a draw from torch's default initializer seeded by the graph, which the module keeps.
- ``load_state_dict(d)`` checks every key first: missing, unexpected or wrongly shaped keys
  raise one :class:`StateDictError` (an ``ag.errors.SerializationError``) listing them all.
  ``state_dict()`` returns the arrays under torch's keys.
- After compiling, ``load_into(exe, state_dict)`` swaps weights into the executable without
  rebuilding, and ``module.load_from(exe)`` copies trained weights back into the module.
- Two separate root modules in one graph would both own a key like ``weight``: make them
  children of one Module, or name the roots apart with ``module.named("proj")``.

What is here
------------
Linear, Identity, Embedding, LayerNorm, BatchNorm2d (inference), Dropout (identity at
inference), ReLU, GELU, Tanh, Sigmoid, Sequential, ModuleList, ModuleDict,
MultiheadAttention, TransformerEncoderLayer, TransformerDecoderLayer, TransformerEncoder,
TransformerDecoder, Transformer (and ``generate_square_subsequent_mask``), Conv2d,
ConvTranspose2d, GRU, LSTM (unrolled over a static length), SinusoidalPositionalEncoding,
LearnedPositionalEncoding, PositionEmbeddingSine (DETR).

Where the numbers differ from torch on purpose: a query whose keys are all masked gives
zeros (torch gives NaN); dropout on attention weights is not in the graph; torch's
nested-tensor encoder zeroes padded positions, these modules compute them.
"""

from .activation import GELU, ReLU, Sigmoid, Tanh
from .attention import MultiheadAttention
from .container import ModuleDict, ModuleList, Sequential
from .conv import Conv2d, ConvTranspose2d
from .dropout import Dropout
from .embedding import Embedding
from .linear import Identity, Linear
from .module import IncompatibleKeys, Module, StateDictError, load_into
from .normalization import BatchNorm2d, LayerNorm
from .positional import LearnedPositionalEncoding, PositionEmbeddingSine, SinusoidalPositionalEncoding
from .recurrent import GRU, LSTM
from .transformer import (Transformer, TransformerDecoder, TransformerDecoderLayer, TransformerEncoder,
                          TransformerEncoderLayer, generate_square_subsequent_mask)

__all__ = [
    "Module", "StateDictError", "IncompatibleKeys", "load_into",
    "Linear", "Identity", "Embedding", "LayerNorm", "BatchNorm2d", "Dropout",
    "ReLU", "GELU", "Tanh", "Sigmoid", "Sequential", "ModuleList", "ModuleDict",
    "MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder",
    "TransformerDecoder", "Transformer", "generate_square_subsequent_mask",
    "Conv2d", "ConvTranspose2d", "GRU", "LSTM",
    "SinusoidalPositionalEncoding", "LearnedPositionalEncoding", "PositionEmbeddingSine",
]
