"""Pictures of attention: heatmaps, overlays on images, and attention rollout.

The seed notes (item 14) draw attention weights as heatmaps: source words × target
words for translation, attention over image regions for captioning and ViT. These
helpers take plain numpy arrays (e.g. the weights a compiled model returns when an
``nn.MultiheadAttention(..., need_weights=True)`` output is a graph output) and draw
them with matplotlib.

>>> fig = attention_heatmap(w, x_labels=list("1234"), y_labels=list("abc"), path="a.png")  # doctest: +SKIP
>>> fig = image_attention_overlay(image, cls_to_patches, path="b.png")                      # doctest: +SKIP

matplotlib is imported inside the functions, so ``import attngraph`` stays fast and
works without it. When a ``path`` is given (and no ``ax``), the figure is drawn with
the Agg backend (no display needed), written as a PNG and closed.
"""

from __future__ import annotations

import math
import pathlib
from typing import Sequence

import numpy as np

from .errors import ShapeError

__all__ = ["attention_heatmap", "image_attention_overlay", "attention_rollout"]


def _pyplot(headless: bool):
    """matplotlib.pyplot, switched to the Agg backend when we only write files."""
    import matplotlib

    if headless:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _as_array(weights, what: str) -> np.ndarray:
    try:
        arr = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ShapeError(f"{what}: weights must be a numeric array ({exc})") from None
    return arr


def _check_labels(labels, n: int, name: str, shape) -> list[str] | None:
    if labels is None:
        return None
    labels = [str(s) for s in labels]
    if len(labels) != n:
        raise ShapeError(f"attention_heatmap: {name} has {len(labels)} labels but the weights "
                         f"{tuple(shape)} have {n} along that axis",
                         hint="x_labels name the columns (keys / source), y_labels the rows (queries / target)")
    return labels


def _save(fig, path) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _draw_panel(ax, w: np.ndarray, x_labels, y_labels, *, title, xlabel, ylabel, annotate: bool,
                vmin, vmax, cmap: str):
    """One heatmap: rows are queries, columns keys; returns the image artist."""
    im = ax.imshow(w, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    tq, tk = w.shape
    if x_labels is not None:
        ax.set_xticks(range(tk))
        ax.set_xticklabels(x_labels, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
    if y_labels is not None:
        ax.set_yticks(range(tq))
        ax.set_yticklabels(y_labels, fontsize=8)
    if annotate:
        mid = (np.nanmin(w) + np.nanmax(w)) / 2 if w.size else 0.0
        for i in range(tq):
            for j in range(tk):
                ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if w[i, j] > mid else "white")
    if title:
        ax.set_title(title, fontsize=9)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    return im


def attention_heatmap(weights, x_labels: Sequence | None = None, y_labels: Sequence | None = None, *,
                      path=None, title: str | None = None, xlabel: str | None = "key / source",
                      ylabel: str | None = "query / target", ax=None, annotate: bool = False,
                      vmin: float | None = 0.0, vmax: float | None = None, cmap: str = "viridis"):
    """Draw attention weights as a heatmap; return the matplotlib Figure.

    ``weights`` is 2-D ``(Tq, Tk)``: rows are queries (target tokens), columns keys
    (source tokens); or 3-D ``(heads, Tq, Tk)``: one panel per head, side by side.
    ``x_labels`` name the columns and ``y_labels`` the rows (their lengths must match).
    ``annotate=True`` writes each value in its cell (for small matrices). ``path``
    writes a PNG. ``ax`` draws into an existing axes (2-D weights only).
    """
    w = _as_array(weights, "attention_heatmap")
    if w.ndim not in (2, 3):
        raise ShapeError(f"attention_heatmap: weights must be 2-D (Tq, Tk) or 3-D (heads, Tq, Tk), "
                         f"got shape {w.shape}",
                         hint="pick one batch item first, e.g. weights[0]")
    if w.ndim == 3 and ax is not None:
        raise ShapeError(f"attention_heatmap: ax= draws one panel, but weights {w.shape} have "
                         f"{w.shape[0]} heads", hint="pass weights[h] or weights.mean(0)")
    tq, tk = w.shape[-2:]
    xl = _check_labels(x_labels, tk, "x_labels", w.shape)
    yl = _check_labels(y_labels, tq, "y_labels", w.shape)
    vmax = float(np.nanmax(w)) if vmax is None and w.size else vmax
    plt = _pyplot(headless=path is not None and ax is None)

    if ax is not None:
        fig = ax.figure
        _draw_panel(ax, w, xl, yl, title=title, xlabel=xlabel, ylabel=ylabel, annotate=annotate,
                    vmin=vmin, vmax=vmax, cmap=cmap)
    else:
        panels = w[None] if w.ndim == 2 else w
        n = panels.shape[0]
        cell = 0.35 if annotate else 0.25
        width = min(4.0, max(2.2, cell * tk + 1.2))
        height = min(6.0, max(2.0, cell * tq + 1.2))
        fig, axes = plt.subplots(1, n, figsize=(width * n + 0.8, height), squeeze=False)
        for h, (a, p) in enumerate(zip(axes[0], panels)):
            panel_title = (f"head {h}" if w.ndim == 3 else title)
            im = _draw_panel(a, p, xl, yl if h == 0 else None, title=panel_title, xlabel=xlabel,
                             ylabel=ylabel if h == 0 else None, annotate=annotate,
                             vmin=vmin, vmax=vmax, cmap=cmap)
            if h > 0 and yl is not None:
                a.set_yticks(range(tq))
                a.set_yticklabels([])
        fig.colorbar(im, ax=list(axes[0]), fraction=0.046 / max(1, n) ** 0.5, pad=0.04)
        if w.ndim == 3 and title:
            fig.suptitle(title, fontsize=10, y=1.04)               # above the per-head titles
    if path is not None:
        _save(fig, path)
        if ax is None:
            plt.close(fig)
    return fig


def _image_hw(image) -> tuple[np.ndarray, int, int]:
    """The image as (H, W) or (H, W, 3|4) for imshow, accepting (C, H, W) too."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3 and img.shape[0] in (1, 3, 4) and img.shape[-1] not in (1, 3, 4):
        img = img.transpose(1, 2, 0)                           # (C, H, W) → (H, W, C)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] not in (3, 4)):
        raise ShapeError(f"image_attention_overlay: image must be (H, W), (H, W, 3) or (C, H, W), "
                         f"got shape {np.shape(image)}")
    if img.ndim == 3:                                          # rescale colours into [0, 1]
        lo, hi = img.min(), img.max()
        if lo < 0 or hi > 1:
            img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return img, img.shape[0], img.shape[1]


def _grid(weights) -> np.ndarray:
    w = _as_array(weights, "image_attention_overlay")
    if w.ndim == 1:
        side = math.isqrt(w.size)
        if side * side != w.size:
            raise ShapeError(f"image_attention_overlay: {w.size} weights do not form a square grid",
                             hint="pass them as (gh, gw), e.g. weights.reshape(gh, gw)")
        w = w.reshape(side, side)                              # (N,) → (gh, gw), row-major patches
    if w.ndim != 2:
        raise ShapeError(f"image_attention_overlay: weights must be (gh, gw) or (gh*gw,), got shape {w.shape}")
    return w


def image_attention_overlay(image, weights, *, path=None, title: str | None = None, ax=None,
                            alpha: float = 0.55, cmap: str = "jet"):
    """Draw attention over a grid of image cells on top of the image; return the Figure.

    ``image`` is (H, W), (H, W, 3) or (C, H, W). ``weights`` are over the grid of cells
    (e.g. ViT patches, row-major): shape (gh, gw), or (gh*gw,) for a square grid. Each
    cell's weight is spread over its block of pixels (nearest upsampling, so patch
    boundaries stay visible) and drawn semi-transparent over the image.
    """
    img, h, wdt = _image_hw(image)
    grid = _grid(weights)
    plt = _pyplot(headless=path is not None and ax is None)
    if ax is None:
        fig, ax = plt.subplots(figsize=(3.2, 3.2))
        own = True
    else:
        fig, own = ax.figure, False
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, extent=(0, wdt, h, 0), interpolation="nearest")
    ax.imshow(grid, cmap=cmap, alpha=alpha, extent=(0, wdt, h, 0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlim(0, wdt)
    ax.set_ylim(h, 0)
    if title:
        ax.set_title(title, fontsize=9)
    if path is not None:
        _save(fig, path)
        if own:
            plt.close(fig)
    return fig


def attention_rollout(weights_per_layer, *, head_fusion: str = "mean", residual: bool = True) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020): how much each token draws on each input token.

    ``weights_per_layer`` is a list, first layer first, of arrays ``(heads, T, T)`` or
    ``(B, heads, T, T)`` (already averaged over heads: ``(T, T)`` / ``(B, T, T)`` with
    ``head_fusion="none"``). Per layer: average the heads, add the identity for the
    residual connection, renormalise the rows; then multiply through the layers
    ``R = A_L · … · A_1``. Returns ``(T, T)`` or ``(B, T, T)``; for ViT,
    ``R[..., 0, 1:]`` is the class token's attention over the patches.
    """
    layers = [np.asarray(w, dtype=np.float64) for w in weights_per_layer]
    if not layers:
        raise ShapeError("attention_rollout: no layers given")
    fused = []
    for i, a in enumerate(layers):
        if head_fusion == "mean":
            if a.ndim not in (3, 4):
                raise ShapeError(f"attention_rollout: layer {i} weights must be (heads, T, T) or "
                                 f"(B, heads, T, T), got shape {a.shape}",
                                 hint='pass head_fusion="none" for weights already averaged over heads')
            a = a.mean(axis=-3)
        elif head_fusion == "max":
            if a.ndim not in (3, 4):
                raise ShapeError(f"attention_rollout: layer {i} weights must be (heads, T, T) or "
                                 f"(B, heads, T, T), got shape {a.shape}")
            a = a.max(axis=-3)
        elif head_fusion != "none":
            raise ValueError(f"attention_rollout: head_fusion must be 'mean', 'max' or 'none', got {head_fusion!r}")
        if a.ndim not in (2, 3) or a.shape[-1] != a.shape[-2]:
            raise ShapeError(f"attention_rollout: layer {i} weights are not square (…, T, T): {a.shape}")
        if fused and a.shape != fused[0].shape:
            raise ShapeError(f"attention_rollout: layer {i} has shape {a.shape}, layer 0 {fused[0].shape}")
        if residual:
            a = a + np.eye(a.shape[-1])
        a = a / a.sum(axis=-1, keepdims=True)
        fused.append(a)
    rollout = fused[0]
    for a in fused[1:]:
        rollout = a @ rollout                                  # later layers act on the left
    return rollout
