"""Ready-to-run training tasks, one per model family of the seed notes.

- :mod:`attngraph.tasks.decimal_to_binary`: a Transformer translating decimal numbers to
  binary, greedy-decoded and scored by exact match on numbers never seen in training.
- :mod:`attngraph.tasks.vit_digits`: a tiny ViT on scikit-learn's 8×8 digits images.
- :mod:`attngraph.tasks.bahdanau_decimal`: the same translation with a GRU seq2seq and
  additive (Bahdanau) attention.
- :mod:`attngraph.tasks.captioning_shapes`: captions of generated scenes, a GRU attending
  over a CNN grid.
- :mod:`attngraph.tasks.detr_shapes`: DETR finding generated coloured shapes (mAP@0.5).
- :mod:`attngraph.tasks.segmentation_shapes`: an FPN segmenter with CNN self-attention (mIoU).

Each module has a ``Config`` dataclass and ``run(cfg) -> Result``; ``attngraph train NAME``
runs them from the command line (:data:`TASKS` maps NAME to the module's name). A task whose
module sets ``DATA_PARALLEL = False`` refuses to run on several MPI ranks.
"""

from __future__ import annotations

import importlib

__all__ = ["TASKS", "load_task"]

TASKS = {
    "decimal-to-binary": "attngraph.tasks.decimal_to_binary",
    "vit-digits": "attngraph.tasks.vit_digits",
    "bahdanau-decimal": "attngraph.tasks.bahdanau_decimal",
    "captioning-shapes": "attngraph.tasks.captioning_shapes",
    "detr-shapes": "attngraph.tasks.detr_shapes",
    "segmentation-shapes": "attngraph.tasks.segmentation_shapes",
}


def load_task(name: str):
    """The module of task ``name`` (imported on demand: vit-digits needs scikit-learn only when run)."""
    return importlib.import_module(TASKS[name])
