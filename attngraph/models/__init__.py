"""attngraph.models: the ready models of the seed notes, built from :mod:`attngraph.nn`.

Each submodule holds one model family, with a small documented example at its top and a
tutorial in ``docs/tutorials/``:

- :mod:`~attngraph.models.transformer`: the Transformer encoder-decoder (the paper's base
  config available), greedy and beam-search decoding with a key/value cache.
- :mod:`~attngraph.models.vit`: the Vision Transformer.
- :mod:`~attngraph.models.detr`: DETR, with Hungarian matching and its set loss.
- :mod:`~attngraph.models.seq2seq_rnn`: Bahdanau's GRU encoder-decoder with additive attention.
- :mod:`~attngraph.models.captioning`: a CNN encoder and a GRU decoder attending over the grid.
- :mod:`~attngraph.models.cnn_attention`: self-attention over a feature map, and an FPN
  segmentation encoder-decoder.
- :mod:`~attngraph.models.bert`: BERT encoders; all-MiniLM-L6-v2 sentence embeddings.

Submodules are imported on first use (``ag.models.vit``), so importing attngraph stays fast.
"""

from __future__ import annotations

import importlib

__all__ = ["transformer", "vit", "detr", "seq2seq_rnn", "captioning", "cnn_attention", "bert"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
