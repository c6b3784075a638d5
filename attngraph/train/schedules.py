"""Learning-rate schedules: callables ``schedule(step) -> lr``.

``step`` is the 1-based number of the update about to be made (the paper's
``step_num``): an optimizer given ``lr=schedule`` uses ``schedule(1)`` for its first
update, ``schedule(2)`` for the second, and so on. In torch terms, ``lr=s`` does what
``LambdaLR(opt, lambda e: s(e + 1))`` with base lr 1 does.

>>> opt = Adam(lr=noam(d_model=512, warmup=4000), betas=(0.9, 0.98), eps=1e-9)   # the paper's setting
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Schedule", "constant", "noam", "cosine", "warmup_cosine"]


class Schedule:
    """A learning-rate schedule; subclasses define ``__call__(step) -> float``."""

    def __call__(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class constant(Schedule):
    """The same learning rate at every step."""

    lr: float

    def __call__(self, step: int) -> float:
        return float(self.lr)


@dataclass(frozen=True)
class noam(Schedule):
    """"Attention Is All You Need" §5.3: lr = factor · d_model^-0.5 · min(step^-0.5, step · warmup^-1.5).

    Rises linearly for ``warmup`` steps, peaks at step = warmup, then decays as 1/√step.
    Step 0 is read as step 1 (as the Annotated Transformer does), so the rate is never infinite.
    """

    d_model: int
    warmup: int = 4000
    factor: float = 1.0

    def __post_init__(self):
        if self.d_model <= 0 or self.warmup <= 0:
            raise ValueError(f"noam needs d_model > 0 and warmup > 0, got d_model={self.d_model}, warmup={self.warmup}")

    def __call__(self, step: int) -> float:
        step = max(int(step), 1)
        return self.factor * self.d_model ** -0.5 * min(step ** -0.5, step * self.warmup ** -1.5)


@dataclass(frozen=True)
class cosine(Schedule):
    """Linear warmup to ``peak_lr`` over ``warmup`` steps, then a half cosine down to ``min_lr``
    at step ``total_steps`` (and ``min_lr`` after it).

    - step ≤ warmup: lr = peak_lr · step / warmup
    - after:         lr = min_lr + (peak_lr - min_lr) · ½ (1 + cos(π · (step - warmup) / (total_steps - warmup)))

    With ``warmup=0``, ``cosine(peak, T)(s)`` equals torch's ``CosineAnnealingLR(T_max=T,
    eta_min=min_lr)`` learning rate after ``s`` scheduler steps.
    """

    peak_lr: float
    total_steps: int
    warmup: int = 0
    min_lr: float = 0.0

    def __post_init__(self):
        if self.warmup < 0 or self.total_steps <= self.warmup:
            raise ValueError(f"cosine needs 0 <= warmup < total_steps, got warmup={self.warmup}, "
                             f"total_steps={self.total_steps}")

    def __call__(self, step: int) -> float:
        step = int(step)
        if self.warmup and step <= self.warmup:
            return self.peak_lr * max(step, 0) / self.warmup
        progress = min((step - self.warmup) / (self.total_steps - self.warmup), 1.0)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


warmup_cosine = cosine
