"""Pictures for the applications (METHOD.md §6): contact sheets of retrieved images, heat-map overlays, and
accuracy curves. matplotlib with the non-interactive Agg backend; nothing is shown, everything is written to files.

Overlays are composed pixel for pixel (PIL), so pixel (r, c) of the PNG is pixel (r, c) of the image: a heat map
lands exactly where it was computed. :func:`heatmap_figure` is the picture that explains itself: the photo at full
resolution under the map, a title, a colour bar with the value scale, a diverging colour map centred at zero for
signed values, and a plain statement when the map is identically zero. Contact sheets, curves and segmentation
figures are matplotlib figures with wrapped captions that do not overlap, and legends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import InputError

__all__ = ["to_rgb", "colorize", "overlay", "contact_sheet", "plot_curves", "plot_group_accuracies",
           "heatmap_figure", "segmentation_figure", "wrap_caption"]


def _figure(figsize, layout=None):
    """A stand-alone Agg figure (no pyplot, so no global state and no GUI backend is touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def wrap_caption(text, width_chars: int, max_lines: int = 3) -> str:
    """``text`` wrapped to lines of at most ``width_chars`` characters, at most ``max_lines`` (the last ends with
    … when something was cut), so captions fit their panel and never run into the next one."""
    import textwrap

    lines = textwrap.wrap(str(text), max(4, int(width_chars)), break_long_words=True, break_on_hyphens=False)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(1, int(width_chars) - 1)].rstrip() + "…"
    return "\n".join(lines)


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
            vmin=None, vmax=None, preprocess=None) -> np.ndarray:
    """Blend a colorised heat map over an image, pixel for pixel; returns RGB uint8 ``[H, W, 3]`` and writes a PNG
    to ``out`` when given.

    ``preprocess``: the model's preprocessing (``LoadedModel.preprocess``) when ``image`` is the original photo
    and ``heat`` lives on the model's input: the map is carried back through its resize and centre crop
    (:func:`vitdecomp.heatmap.map_to_photo`) and drawn on the photo at full resolution; parts the crop removed
    stay uncoloured. Without it the image is taken to be what the model saw and resized to the heat map's size.
    """
    from PIL import Image

    h = (heat if isinstance(heat, torch.Tensor) else torch.as_tensor(np.asarray(heat, dtype=np.float64))).detach().cpu()
    if preprocess is not None:
        from .heatmap import map_to_photo, preprocess_geometry

        rgb = to_rgb(image)
        h = map_to_photo(h, preprocess_geometry(preprocess, rgb.shape[:2]))
    else:
        rgb = to_rgb(image, mean=mean, std=std, size=tuple(h.shape[-2:]))
    seen = ~torch.isnan(h).numpy()
    col = colorize(torch.nan_to_num(h, nan=0.0), cmap=cmap, vmin=vmin if vmin is not None else float(np.nanmin(h.numpy())),
                   vmax=vmax if vmax is not None else float(np.nanmax(h.numpy())))
    if not 0 <= alpha <= 1:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")
    a = alpha * seen[..., None]
    arr = ((1 - a) * rgb.astype(np.float64) + a * col.astype(np.float64)).round().astype(np.uint8)
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
    cap_chars = thumb * 72 / (7 * 0.6)  # characters of 7-pt text across one thumbnail
    n_lines = max([wrap_caption(c, cap_chars).count("\n") + 1 for row in caps for c in row if c] or [0])
    label_w = 0.3 if any(row_labels) else 0
    title_text = wrap_caption(title, (thumb * nc + label_w) * 72 / (10 * 0.6), 2) if title else None
    fig = _figure((thumb * nc + label_w, nr * (thumb + 0.14 * n_lines)
                   + (0.25 * (title_text.count("\n") + 1) if title else 0) + 0.1), layout="constrained")
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
                    ax.set_title(wrap_caption(cap, cap_chars), fontsize=7)
            else:
                ax.axis("off")
            if c == 0 and row_labels[r]:
                ax.set_ylabel(wrap_caption(row_labels[r], thumb * 72 / (9 * 0.6), 2), fontsize=9)
    if title:
        fig.suptitle(title_text, fontsize=10)
    return _save(fig, out)


def _heat_norm(h: np.ndarray, signed: Optional[bool], vmin, vmax):
    """(cmap name, vmin, vmax, signed) for a map: diverging and symmetric about 0 when it has both signs."""
    finite = h[np.isfinite(h)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if signed is None:
        signed = lo < 0 < hi
    if signed:
        m = max(abs(lo), abs(hi)) if vmin is None and vmax is None else max(abs(vmin or 0), abs(vmax or 0))
        return "RdBu_r", -m, m, True
    return "magma", (lo if vmin is None else vmin), (hi if vmax is None else vmax), False


def _alpha(h: np.ndarray, lo: float, hi: float, alpha: float) -> np.ndarray:
    """Per-pixel opacity: ``alpha`` where the map is strongest, fading to transparent where it is weakest (0 for
    signed maps, the minimum for unsigned ones), so the image stays visible where nothing is written."""
    if lo < 0 < hi or (lo == -hi and hi > 0):
        w = np.abs(h) / max(abs(lo), abs(hi))
    else:
        w = (h - lo) / (hi - lo) if hi > lo else np.ones_like(h)
    return (alpha * np.sqrt(np.clip(np.nan_to_num(w), 0, 1))).astype(np.float64)


def heatmap_figure(image, heat, out, *, title: Optional[str] = None, label: str = "heat", signed: Optional[bool] = None,
                   alpha: float = 0.75, cmap: Optional[str] = None, vmin=None, vmax=None, mean=None, std=None,
                   note: Optional[str] = None) -> Path:
    """A heat map over its image, written to ``out`` (PNG), that explains itself.

    The image is drawn at its own full resolution (at least one figure pixel per image pixel) and stays visible
    under the map (opacity grows from 0 where the map is weakest to ``alpha`` where it is strongest); NaN entries (parts of a photo the model never saw) are left uncoloured. Signed maps (both
    signs present, or ``signed=True``) use a diverging colour map centred at zero (symmetric limits), others a
    sequential one; a colour bar shows the value scale with ``label``. A map that is identically zero draws the
    image alone and says so in the picture. ``heat`` must have the image's size (map it there first, e.g.
    :func:`vitdecomp.heatmap.map_to_photo`); ``note`` adds a line under the title (e.g. which grid).
    """
    h = heat.detach().cpu().to(torch.float64).numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat, float)
    if h.ndim != 2:
        raise InputError(f"a heat map must be [H, W], got shape {h.shape}")
    rgb = to_rgb(image, mean=mean, std=std)
    if rgb.shape[:2] != h.shape:
        raise InputError(f"the heat map is {h.shape[0]}×{h.shape[1]} but the image {rgb.shape[0]}×{rgb.shape[1]}; "
                         "map the heat onto the image first (vitdecomp.heatmap.map_to_photo or scale_to)")
    H, W = h.shape
    finite = h[np.isfinite(h)]
    zero = finite.size == 0 or not np.any(finite != 0)
    dpi = 100
    scale = max(1.0, 300 / max(W, 1), 200 / max(H, 1))  # at least full resolution; small inputs drawn larger
    img_w, img_h = W * scale / dpi, H * scale / dpi
    chars = max(img_w, 3.0) * 72 / (9 * 0.6)
    text = "\n".join(wrap_caption(t, chars, 3) for t in (title, note) if t)
    head = 0.19 * (text.count("\n") + 1) + 0.15 if text else 0.1
    bar = 0 if zero else 1.0
    fig = _figure((img_w + bar + 0.25, img_h + head + 0.25), layout="constrained")
    ax = fig.subplots()
    ax.imshow(rgb, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if zero:
        ax.text(0.5, 0.5, "map is identically zero\n(the chosen components write nothing here)",
                transform=ax.transAxes, ha="center", va="center", fontsize=9, color="black",
                bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "gray"})
    else:
        name, lo, hi, _ = _heat_norm(h, signed, vmin, vmax)
        im = ax.imshow(np.ma.masked_invalid(h), cmap=cmap or name, vmin=lo, vmax=hi,
                       alpha=_alpha(h, lo, hi, alpha), interpolation="nearest")
        cb = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
        cb.set_label(label, fontsize=8)
        cb.ax.tick_params(labelsize=7)
        cb.solids.set_alpha(1)
    if text:
        ax.set_title(text, fontsize=9)
    return _save_dpi(fig, out, dpi)


def _save_dpi(fig, out, dpi) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


def segmentation_figure(image, saliency, mask, out, *, truth=None, title: Optional[str] = None,
                        mean=None, std=None) -> Path:
    """Two panels written to ``out``: the saliency over the image (colour bar, diverging at zero) and the
    predicted mask against the ground truth with a legend (green: predicted only, red: truth only, yellow: both;
    without ``truth``: the predicted mask in green)."""
    from matplotlib.patches import Patch

    rgb = to_rgb(image, mean=mean, std=std)
    sal = saliency.detach().cpu().to(torch.float64).numpy() if isinstance(saliency, torch.Tensor) else np.asarray(saliency, float)
    m = (mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)).astype(bool)
    if sal.shape != rgb.shape[:2] or m.shape != rgb.shape[:2]:
        raise InputError(f"saliency {sal.shape} and mask {m.shape} must have the image's size {rgb.shape[:2]}")
    fig = _figure((7.6, 3.9 + (0.3 if title else 0)), layout="constrained")
    a1, a2 = fig.subplots(1, 2)
    a1.imshow(rgb)
    name, lo, hi, _ = _heat_norm(sal, None, None, None)
    im = a1.imshow(sal, cmap=name, vmin=lo, vmax=hi, alpha=_alpha(sal, lo, hi, 0.7))
    cb = fig.colorbar(im, ax=a1, fraction=0.046, pad=0.02)
    cb.set_label("saliency (class-logit share)", fontsize=8)
    cb.solids.set_alpha(1)
    a1.set_title("saliency", fontsize=9)
    col = np.zeros(rgb.shape, dtype=np.float64)
    handles = []
    if truth is not None:
        t = (truth.detach().cpu().numpy() if isinstance(truth, torch.Tensor) else np.asarray(truth)).astype(bool)
        col[m & ~t] = (0, 1, 0)
        col[t & ~m] = (1, 0, 0)
        col[m & t] = (1, 1, 0)
        handles = [Patch(color=(0, 1, 0), label="predicted only"), Patch(color=(1, 0, 0), label="ground truth only"),
                   Patch(color=(1, 1, 0), label="both")]
        a2.set_title("mask (saliency > mean) vs ground truth", fontsize=9)
    else:
        col[m] = (0, 1, 0)
        handles = [Patch(color=(0, 1, 0), label="predicted (saliency > mean)")]
        a2.set_title("mask (saliency > mean)", fontsize=9)
    shade = (m | (t if truth is not None else m))[..., None]
    a2.imshow((np.where(shade, 0.5 * rgb / 255 + 0.5 * col, rgb / 255)).clip(0, 1))
    a2.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=len(handles), fontsize=7,
              frameon=False)
    for a in (a1, a2):
        a.set_xticks([])
        a.set_yticks([])
    if title:
        fig.suptitle(wrap_caption(title, 90, 2), fontsize=10)
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
