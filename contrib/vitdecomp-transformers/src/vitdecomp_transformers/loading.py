"""Model strings ``hf:<repo id or local dir>``: ``from_pretrained`` plus the checkpoint's image processor.

The model class is the one the checkpoint's ``config.architectures`` names when this pack supports it
(``ViTForImageClassification``, ``DeiTForImageClassificationWithTeacher``, ``Dinov2Model``, ``CLIPModel``,
``SwinForImageClassification``, ``Swinv2Model``, ``BeitForImageClassification``, ``SiglipModel``, ...),
else the base model of its ``model_type`` (a ``ViTMAEForPreTraining`` checkpoint loads as ``ViTMAEModel``, with
``config.mask_ratio`` set to 0 so that every patch is kept). ``random_init=True`` (or ``pretrained=False``)
builds that class from the checkpoint's config with random weights; ``weights=DIR`` loads from a local directory
instead of ``spec``.
"""

from __future__ import annotations

import os
import warnings

from vitdecomp import LoadedModel, hookimpl
from vitdecomp.errors import UnknownModelError, WeightsUnavailableError

from .beit import _CLASSES as _BEIT
from .clip import _CLASSES as _CLIP
from .dinov2 import _CLASSES as _DINOV2
from .siglip import _CLASSES as _SIGLIP
from .swin import _CLASSES as _SWIN
from .vit import _CLASSES as _VIT
from .vitmae import _CLASSES as _VITMAE

__all__ = ["load_hf", "HFImagePreprocess"]

SUPPORTED_ARCHITECTURES = _VIT + _DINOV2 + _CLIP + _SWIN + _BEIT + _SIGLIP + _VITMAE
_BASE_OF_TYPE = {
    "vit": "ViTModel", "deit": "DeiTModel", "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel", "clip": "CLIPModel", "clip_vision_model": "CLIPVisionModel",
    "swin": "SwinModel", "swinv2": "Swinv2Model", "beit": "BeitModel", "data2vec-vision": "Data2VecVisionModel",
    "siglip": "SiglipModel", "siglip_vision_model": "SiglipVisionModel", "vit_mae": "ViTMAEModel",
}

_OFFLINE_HINT = (
    "Could not obtain the Hugging Face checkpoint {what} ({err}). If this machine is offline, download it on a "
    "connected one (`huggingface-cli download {repo} --local-dir DIR`, or `from_pretrained(...)` followed by "
    "`save_pretrained(DIR)` for the model and its image processor), copy DIR here and pass 'hf:DIR' "
    "(or load_model('hf:{repo}', weights='DIR')). random_init=True builds the model from a local config with "
    "random weights."
)


class HFImagePreprocess:
    """PIL image (or array) → ``[3, H, W]`` float tensor, using the checkpoint's image processor."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image):
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"HFImagePreprocess({type(self.processor).__name__})"


class _MissingPreprocess:
    """Stands in when a checkpoint has no image-processor config: tensors still work, images raise."""

    def __init__(self, where: str, err: str):
        self.where, self.err = where, err

    def __call__(self, image):
        raise WeightsUnavailableError(
            f"{self.where} has no image processor ({self.err}); save one next to the model "
            "(e.g. AutoImageProcessor.from_pretrained(<original repo>).save_pretrained(DIR)) or preprocess the "
            "images yourself")

    def __repr__(self) -> str:
        return f"<no image processor for {self.where}>"


def _looks_like_path(s: str) -> bool:
    """A repo id is ``name`` or ``org/name``; anything else (or an existing path) is a directory."""
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s or os.path.exists(s)


def _model_class(config, what: str):
    import transformers

    archs = [a for a in (getattr(config, "architectures", None) or []) if a in SUPPORTED_ARCHITECTURES]
    name = archs[0] if archs else _BASE_OF_TYPE.get(getattr(config, "model_type", None))
    if name is None:
        found = getattr(config, "architectures", None) or getattr(config, "model_type", "?")
        raise UnknownModelError(
            f"{what} is a {found} checkpoint; vitdecomp-transformers supports {list(SUPPORTED_ARCHITECTURES)} "
            "(model types " + ", ".join(sorted(_BASE_OF_TYPE)) + ")")
    return getattr(transformers, name)


def load_hf(spec, *, pretrained=True, weights=None, random_init=False, device="cpu", **kwargs):
    """``hf:<repo id or local dir>``: the model in eval mode and a preprocess built from its image processor."""
    import transformers

    what = f"hf:{spec}"
    source = os.fspath(weights) if weights is not None else os.path.expanduser(spec)
    if not source:
        raise UnknownModelError("Model string 'hf:' names no repository or directory; use 'hf:<repo id or local dir>'")
    if (weights is not None or _looks_like_path(source)) and not os.path.isdir(source):
        raise WeightsUnavailableError(
            f"{what}: local directory {source!r} does not exist (pass a directory written by save_pretrained "
            "or huggingface-cli download --local-dir)")
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - hub, network and file errors all mean: not obtainable here
        raise WeightsUnavailableError(_OFFLINE_HINT.format(what=what, err=f"{type(exc).__name__}: {exc}", repo=spec)) from exc
    cls = _model_class(config, what)
    if getattr(config, "model_type", None) == "vit_mae":
        config.mask_ratio = 0.0  # keep every patch: the encoder as a feature extractor (see vitmae.py)
    if random_init or not pretrained:
        model = cls._from_config(config, **kwargs)
    else:
        try:
            model = cls.from_pretrained(source, **{"config": config, **kwargs})
        except Exception as exc:  # noqa: BLE001
            raise WeightsUnavailableError(_OFFLINE_HINT.format(what=what, err=f"{type(exc).__name__}: {exc}", repo=spec)) from exc
    model = model.to(device).eval()
    try:
        preprocess = HFImagePreprocess(transformers.AutoImageProcessor.from_pretrained(source))
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"{what}: no image processor could be loaded ({type(exc).__name__}); "
                      "LoadedModel.preprocess will raise when called", RuntimeWarning, stacklevel=2)
        preprocess = _MissingPreprocess(what, f"{type(exc).__name__}: {exc}")
    return LoadedModel(model=model, preprocess=preprocess, name=what)


@hookimpl
def register_model_loaders(register):
    register("hf", load_hf)
