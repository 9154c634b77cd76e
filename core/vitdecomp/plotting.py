"""Pictures for the applications (METHOD.md §6): contact sheets of retrieved images, heat-map overlays, and
accuracy curves. matplotlib with the non-interactive Agg backend; nothing is shown, everything is written to files.

Overlays are composed pixel for pixel (PIL), so pixel (r, c) of the PNG is pixel (r, c) of the image: a heat map
lands exactly where it was computed. Contact sheets and curves are matplotlib figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import InputError

__all__ = ["to_rgb", "colorize", "overlay", "contact_sheet", "plot_curves", "plot_group_accuracies"]


def _figure(figsize):
    """A stand-alone Agg figure (no pyplot, so no global state and no GUI backend is touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out) -> Path:
    """Write ``fig`` to ``out`` (PNG at 100 dpi), creating the folder; returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def to_rgb(image, *, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
           size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """An RGB uint8 array ``[H, W, 3]`` from a path, a PIL image, a numpy array (HWC, uint8 or float in [0, 1])
    or a tensor ``[3, H, W]`` (un-normalised with ``mean``/``std`` when given, else min-max scaled)."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            image = im.convert("RGB")
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"))
    elif isinstance(image, torch.Tensor):
        x = image.detach().cpu().to(torch.float64)
        if x.ndim != 3 or x.shape[0] not in (1, 3):
            raise InputError(f"an image tensor must be [3, H, W], got {tuple(image.shape)}")
        if mean is not None and std is not None:
            x = x * torch.tensor(std, dtype=x.dtype).view(-1, 1, 1) + torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
        else:
            x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
        arr = (x.clamp(0, 1).expand(3, -1, -1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    else:
        raise InputError(f"cannot draw an image of type {type(image).__name__}")
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise InputError(f"an image array must be [H, W, 3], got {arr.shape}")
    arr = np.ascontiguousarray(arr[..., :3])
    if size is not None and arr.shape[:2] != tuple(size):
        arr = np.asarray(Image.fromarray(arr).resize((size[1], size[0]), Image.BILINEAR))
    return arr


def colorize(heat, *, cmap: str = "jet", vmin: Optional[float] = None, vmax: Optional[float] = None) -> np.ndarray:
    """A heat map ``[H, W]`` as RGB uint8 ``[H, W, 3]`` through a matplotlib colormap (min-max scaled by default)."""
    import matplotlib

    h = heat.detach().cpu().to(torch.float64).numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat, float)
    if h.ndim != 2:
        raise InputError(f"a heat map must be [H, W], got shape {h.shape}")
    lo = np.nanmin(h) if vmin is None else vmin
    hi = np.nanmax(h) if vmax is None else vmax
    n = (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
    rgba = matplotlib.colormaps[cmap](np.clip(n, 0, 1))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def overlay(image, heat, out=None, *, alpha: float = 0.5, cmap: str = "jet", mean=None, std=None,
            vmin=None, vmax=None) -> np.ndarray:
    """Blend a colorised heat map over an image, pixel for pixel; returns RGB uint8 ``[H, W, 3]`` and writes a PNG
    to ``out`` when given. The image is resized to the heat map's size if they differ."""
    from PIL import Image

    h = heat if isinstance(heat, torch.Tensor) else torch.as_tensor(np.asarray(heat, dtype=np.float64))
    rgb = to_rgb(image, mean=mean, std=std, size=tuple(h.shape[-2:]))
    col = colorize(h, cmap=cmap, vmin=vmin, vmax=vmax)
    if not 0 <= alpha <= 1:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")
    arr = ((1 - alpha) * rgb.astype(np.float64) + alpha * col.astype(np.float64)).round().astype(np.uint8)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(out)
    return arr


def contact_sheet(images: Sequence, out, *, titles: Optional[Sequence[str]] = None, ncols: int = 5,
                  title: Optional[str] = None, thumb: float = 2.0, rows: Optional[Mapping[str, Sequence]] = None,
                  mean=None, std=None) -> Path:
    """A grid of thumbnails with captions written to ``out`` (PNG). ``rows={label: [images...]}`` draws one
    labelled row per entry instead (e.g. property-restricted versus whole-representation retrieval)."""
    if rows is None:
        if not len(images):
            raise InputError("contact_sheet needs at least one image")
        n = len(images)
        nc = min(ncols, n)
        nr = (n + nc - 1) // nc
        grid = [list(images[r * nc:(r + 1) * nc]) for r in range(nr)]
        caps = [list(titles[r * nc:(r + 1) * nc]) if titles is not None else [None] * nc for r in range(nr)]
        row_labels = [None] * nr
    else:
        row_labels = list(rows)
        grid = [list(v) for v in rows.values()]
        nc = max(len(g) for g in grid)
        nr = len(grid)
        caps = [list(titles[r]) if titles is not None else [None] * nc for r in range(nr)]
    fig = _figure((thumb * nc, thumb * nr + (0.4 if title else 0)))
    axes = fig.subplots(nr, nc, squeeze=False)
    for r in range(nr):
        for c in range(nc):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(grid[r]):
                ax.imshow(to_rgb(grid[r][c], mean=mean, std=std))
                cap = caps[r][c] if c < len(caps[r]) else None
                if cap:
                    ax.set_title(str(cap), fontsize=7)
            else:
                ax.axis("off")
            if c == 0 and row_labels[r]:
                ax.set_ylabel(row_labels[r], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def plot_curves(curves: Mapping[str, Tuple[Sequence[float], Sequence[float]]], out, *,
                xlabel: str = "components mean-ablated", ylabel: str = "accuracy", title: Optional[str] = None,
                baseline: Optional[float] = None) -> Path:
    """Line plot of ``{label: (x, y)}`` written to ``out`` (PNG), with an optional horizontal ``baseline``."""
    if not curves:
        raise InputError("plot_curves needs at least one curve")
    fig = _figure((6, 4))
    ax = fig.subplots()
    for label, (x, y) in curves.items():
        ax.plot(list(x), list(y), label=label, lw=1.5)
    if baseline is not None:
        ax.axhline(baseline, color="gray", ls="--", lw=1, label="no ablation")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


def plot_group_accuracies(before: Mapping, after: Mapping, out, *, title: Optional[str] = None) -> Path:
    """Grouped bars of per-group accuracy before and after a repair (``{group label: accuracy}``)."""
    labels = [str(k) for k in before]
    x = np.arange(len(labels))
    fig = _figure((1.2 * len(labels) + 2, 3.5))
    ax = fig.subplots()
    ax.bar(x - 0.2, [before[k] for k in before], 0.4, label="before")
    ax.bar(x + 0.2, [after[k] for k in before], 0.4, label="after")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)
