"""Model loaders for the built-in prefixes ``timm:`` and ``open_clip:`` (real loading code, offline-aware)."""

from __future__ import annotations

import difflib
import os

from vitdecomp.api import LoadedModel
from vitdecomp.errors import UnknownModelError, WeightsUnavailableError

__all__ = ["load_timm", "load_open_clip"]

_OFFLINE_HINT = (
    "Pretrained weights could not be obtained for {what} ({err}). If this machine is offline, pass a local "
    "checkpoint with weights=PATH (load_model(..., weights='model.safetensors') or --weights PATH on the CLI), "
    "or use random_init=True / --random-init for a randomly initialised model."
)


def _suggest(name, names):
    family = name.split("_")[0].split("-")[0].lower()
    pool = [n for n in names if n.lower().startswith(family[:3])] or list(names)
    return difflib.get_close_matches(name, pool, n=5, cutoff=0.3)


def _check_file(weights):
    if not os.path.exists(weights):
        raise WeightsUnavailableError(f"Checkpoint file {weights!r} does not exist")


def load_timm(spec, *, pretrained=True, weights=None, random_init=False, device="cpu", **kwargs):
    """``timm:<name>[.<tag>]``: ``timm.create_model`` with pretrained weights, a local file, or random init."""
    import timm
    from timm.data import create_transform, resolve_data_config

    base = spec.split(".")[0]
    if not timm.is_model(base):
        close = _suggest(base, timm.list_models())
        raise UnknownModelError(f"timm has no model named {spec!r}" + (f"; did you mean {close}?" if close else ""))
    try:
        if weights is not None:
            _check_file(weights)
            model = timm.create_model(spec, pretrained=True, pretrained_cfg_overlay={"file": os.fspath(weights)}, **kwargs)
        elif random_init or not pretrained:
            model = timm.create_model(spec, pretrained=False, **kwargs)
        else:
            model = timm.create_model(spec, pretrained=True, **kwargs)
    except (UnknownModelError, WeightsUnavailableError):
        raise
    except Exception as exc:  # noqa: BLE001 - hub/network/file errors all mean: no weights
        if weights is None and (random_init or not pretrained):
            raise
        raise WeightsUnavailableError(_OFFLINE_HINT.format(what=f"timm:{spec}", err=f"{type(exc).__name__}: {exc}")) from exc
    model = model.to(device).eval()
    overrides = {}
    if "img_size" in kwargs:  # the model was built for another input size than its pretrained config says
        size = kwargs["img_size"]
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        overrides["input_size"] = (3, *size)
    preprocess = create_transform(**resolve_data_config(overrides, model=model))
    return LoadedModel(model=model, preprocess=preprocess, name=f"timm:{spec}")


def load_open_clip(spec, *, pretrained=True, weights=None, random_init=False, device="cpu", **kwargs):
    """``open_clip:<arch>[/<pretrained tag>]``: the whole CLIP model (``.visual`` is what gets decomposed)."""
    import open_clip

    arch, _, tag = spec.partition("/")
    if arch not in open_clip.list_models():
        close = _suggest(arch, open_clip.list_models())
        raise UnknownModelError(f"open_clip has no model named {arch!r}" + (f"; did you mean {close}?" if close else ""))
    if weights is not None:
        _check_file(weights)
        source = os.fspath(weights)
    elif random_init or not pretrained:
        source = None
    else:
        if not tag:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            raise WeightsUnavailableError(
                f"open_clip:{arch} needs a pretrained tag, e.g. open_clip:{arch}/{tags[0] if tags else '<tag>'} "
                f"(known: {tags}), or weights=PATH / random_init=True"
            )
        source = tag
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=source, device=device, **kwargs)
    except Exception as exc:  # noqa: BLE001
        if source is None:
            raise
        raise WeightsUnavailableError(_OFFLINE_HINT.format(what=f"open_clip:{spec}", err=f"{type(exc).__name__}: {exc}")) from exc
    model.eval()
    tokenizer = open_clip.get_tokenizer(arch)
    return LoadedModel(model=model, preprocess=preprocess, name=f"open_clip:{spec}", tokenizer=tokenizer)
