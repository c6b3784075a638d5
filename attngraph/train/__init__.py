"""Training: losses, optimizers, learning-rate schedules, gradient clipping, train-mode dropout,
the compiled training step, the fit loop and checkpoints.

>>> import attngraph as ag
>>> from attngraph import train
>>> g.output("loss", train.cross_entropy(logits, targets, label_smoothing=0.1))
>>> step = train.compile_train_step(g, "loss", optimizer=train.AdamW(lr=train.noam(512, 4000)))
>>> history = train.fit(step, train.Batches({"x": X, "targets": Y}, 64), epochs=10,
...                     checkpoint="run.safetensors", resume=True)
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .clip import clip_grad_norm, global_norm
from .dropout import DropoutSite, dropout_mask_feeds, with_dropout
from .losses import (binary_cross_entropy, binary_cross_entropy_with_logits, box_cxcywh_to_xyxy, cross_entropy,
                     giou_loss, l1_loss, mse_loss, nll_from_log_probs)
from .optimizers import SGD, Adam, AdamW, Optimizer, OptimizerError
from .schedules import Schedule, constant, cosine, noam, warmup_cosine
from .trainer import Batches, Callback, FitState, History, TrainStep, compile_train_step, fit

__all__ = [
    "cross_entropy", "nll_from_log_probs", "mse_loss", "l1_loss", "binary_cross_entropy_with_logits",
    "binary_cross_entropy", "giou_loss", "box_cxcywh_to_xyxy",
    "Optimizer", "OptimizerError", "SGD", "Adam", "AdamW",
    "Schedule", "constant", "noam", "cosine", "warmup_cosine",
    "clip_grad_norm", "global_norm",
    "DropoutSite", "with_dropout", "dropout_mask_feeds",
    "TrainStep", "compile_train_step", "fit", "Batches", "Callback", "FitState", "History",
    "save_checkpoint", "load_checkpoint",
]
