"""Is a batch of images preprocessed the way the model expects? The model's own preprocessing config (timm's
``pretrained_cfg``, open_clip's ``image_mean``/``image_std``, a torchvision ``Normalize`` in the LoadedModel's
transform, a Hugging Face image processor) says what normalised images look like: x = (p − mean) / std for pixel
values p in [0, 1]. Two mistakes are refused because they are unambiguous (finite values pass otherwise):

* **0–255 pixel values** (floats never divided by 255, normalised or not): some value, mapped back to pixel
  units (x·std + mean, per channel; mean 0 and std 1 when the preprocessing is unknown), lies outside
  [−MARGIN, 1 + MARGIN] with MARGIN = 8, i.e. more than eight whole pixel ranges beyond [0, 1]. A normalised image
  maps back into [0, 1] (a little beyond after bicubic resizing); random normal test inputs stay inside.
* **unnormalised [0, 1] images** for a model whose preprocessing normalises (some channel mean > 0): an image
  whose every value lies in [0, 1] and spans at least half of it (max − min ≥ 0.5). A normalised photo takes
  negative values wherever a pixel is darker than the mean; one that stays within [0, 1] with that span would
  need every pixel within [mean, mean + std] and half of that range used.

``check_input=False`` (``decompose``, ``extract``; ``--no-input-check`` on the CLI) accepts anything finite.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .errors import InputError

__all__ = ["input_stats", "check_image_range", "MARGIN"]

#: how far beyond [0, 1] (in pixel units, x·std + mean) a value may lie before the batch is called 0–255 data
MARGIN = 8.0


def _pair(mean, std) -> Optional[Tuple[tuple, tuple]]:
    try:
        m, s = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError):
        return None
    if not m or len(m) != len(s) or any(v <= 0 for v in s):
        return None
    return m, s


def _from_transform(t) -> Optional[Tuple[tuple, tuple, str]]:
    """mean/std of a torchvision ``Normalize`` inside a (nested) Compose, or of a Hugging Face image processor."""
    proc = getattr(t, "processor", None) or t  # the transformers pack's HFImagePreprocess wraps the processor
    if hasattr(proc, "image_mean") and hasattr(proc, "image_std"):
        if getattr(proc, "do_normalize", True) is False:
            return (0.0,), (1.0,), f"{type(proc).__name__} (do_normalize=False)"
        got = _pair(proc.image_mean, proc.image_std)
        if got:
            return (*got, f"the image processor {type(proc).__name__}")
    for step in getattr(t, "transforms", None) or ():
        if type(step).__name__ == "Normalize" and hasattr(step, "mean") and hasattr(step, "std"):
            got = _pair(step.mean, step.std)
            if got:
                return (*got, "the preprocessing transform's Normalize")
        inner = _from_transform(step) if hasattr(step, "transforms") else None
        if inner:
            return inner
    return None


def input_stats(model, preprocess=None) -> Optional[Tuple[tuple, tuple, str]]:
    """``(mean, std, where)`` of the normalisation the model's preprocessing applies, or None when unknown.

    Looked up in ``preprocess`` (or a :class:`vitdecomp.LoadedModel`'s), then on the module: timm's
    ``pretrained_cfg``/``default_cfg``, open_clip's ``image_mean``/``image_std`` (on the model or ``.visual``)."""
    if preprocess is None and not isinstance(model, torch.nn.Module):
        preprocess = getattr(model, "preprocess", None)
    if preprocess is not None:
        got = _from_transform(preprocess)
        if got:
            return got
        if getattr(preprocess, "transforms", None) is not None:  # a Compose that does not normalise
            return (0.0,), (1.0,), "the preprocessing transform (it has no Normalize)"
    module = getattr(model, "model", model) if not isinstance(model, torch.nn.Module) else model
    for where in (module, getattr(module, "visual", None)):
        if where is None:
            continue
        for attr in ("pretrained_cfg", "default_cfg"):
            cfg = getattr(where, attr, None)
            if isinstance(cfg, dict) and cfg.get("mean") is not None and cfg.get("std") is not None:
                got = _pair(cfg["mean"], cfg["std"])
                if got:
                    return (*got, f"timm's {attr}")
        mean, std = getattr(where, "image_mean", None), getattr(where, "image_std", None)
        if mean is not None and std is not None:
            got = _pair(mean, std)
            if got:
                return (*got, "open_clip's image_mean/image_std")
    return None


def _fmt(v) -> str:
    return "(" + ", ".join(f"{x:.3g}" for x in v) + ")"


def check_image_range(images: torch.Tensor, stats=None, *, what: str = "images") -> None:
    """Raise :class:`InputError` (with ``.index``, the image's position in the batch) when ``images`` ``[B, C, H,
    W]`` hold 0–255 pixel values or, for a model whose preprocessing normalises, unnormalised [0, 1] images (the
    rules in this module's docstring). ``stats``: :func:`input_stats`'s answer (None: unknown preprocessing, only
    the 0–255 rule with mean 0, std 1). One pass over the batch; the host reads 2·B·C numbers."""
    if images.ndim != 4 or images.shape[0] == 0:
        return
    B, C = images.shape[:2]
    mean, std, where = stats if stats is not None else ((0.0,), (1.0,), None)
    if len(mean) not in (1, C):
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    flat = images.detach().reshape(B, C, -1)
    lo, hi = flat.amin(-1), flat.amax(-1)  # [B, C]
    mm = torch.stack([lo, hi]).to("cpu", torch.float64)
    lo, hi = mm[0], mm[1]
    m = torch.tensor(mean, dtype=torch.float64).expand(C)
    s = torch.tensor(std, dtype=torch.float64).expand(C)
    p_lo, p_hi = lo * s + m, hi * s + m  # pixel units
    cfg = (f"mean {_fmt(mean)}, std {_fmt(std)} from {where}" if where else
           "mean 0, std 1: this model's preprocessing config is unknown")
    accepted = (f"accepted: images preprocessed and normalised as the model expects, x = (p − mean) / std for "
                f"pixels p in [0, 1] ({cfg}), i.e. per channel from {_fmt([(0 - a) / b for a, b in zip(m, s)])} to "
                f"{_fmt([(1 - a) / b for a, b in zip(m, s)])}")
    override = "; pass check_input=False (--no-input-check) for inputs that are legitimately outside it"
    bad = ((p_lo < -MARGIN) | (p_hi > 1 + MARGIN)).any(1)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        err = InputError(
            f"{what}[{i}] holds values in [{float(lo[i].min()):.4g}, {float(hi[i].max()):.4g}], which look like "
            f"0–255 pixel values (divide by 255 before normalising, or use the model's preprocessing); {accepted}"
            + override)
        err.index = i
        raise err
    if stats is not None and max(mean) > 0:
        a, b = lo.amin(1), hi.amax(1)
        bad = (a >= 0) & (b <= 1) & (b - a >= 0.5)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            err = InputError(
                f"{what}[{i}] holds values in [{float(a[i]):.4g}, {float(b[i]):.4g}], which look like unnormalised "
                f"[0, 1] pixels (this model's preprocessing normalises them: apply mean/std, or use the model's "
                f"preprocessing); {accepted}" + override)
            err.index = i
            raise err
