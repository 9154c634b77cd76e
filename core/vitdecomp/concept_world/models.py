"""Architectures of the concept world's models and loading of the shipped weights.

Every model takes the concept world's normalised 64×64 images (:func:`vitdecomp.datasets.normalize`).

* ``clip`` — a small open_clip ``CLIP``: ViT vision tower (patch 8 = an 8×8 grid, width 64, 4 layers, 4 heads) and a 2-layer text
  transformer over the word-level :class:`~vitdecomp.datasets.WordTokenizer`, embedding dimension 64; trained
  contrastively on image / caption pairs. The alignment target for the other models.
* ``deit`` — a timm ``VisionTransformer`` (DeiT-style: CLS readout, patch 8 = an 8×8 grid, width 64, 4 blocks × 4 heads);
* ``swin`` — a timm ``SwinTransformer`` (patch 8 = an 8×8 grid, window 4, widths 64/128, depths 2/2, heads 4/8);
* ``maxvit`` — a timm ``MaxxVit`` (stem 16, two MaxViT stages of width 32/64, window and grid 4×4, 16-wide heads)
  that reads the images at **32×32** (:func:`prepare` average-pools 2×2; the 64×64 cost is 4× on a CPU).

Sizes are chosen so that each reaches ≥ 0.95 held-out accuracy on every factor (the CLIP ≥ 0.90 zero-shot) in well
under an hour on one CPU core (``vitdecomp.concept_world.train``; the measured numbers are in ``models.json``).

The classifiers (``deit``, ``swin``, ``maxvit``) predict every factor at once: ``num_classes`` = 25 logits, one
slice per factor in :data:`~vitdecomp.datasets.FACTOR_NAMES` order (:data:`FACTOR_SLICES`). The ``*_spurious``
variants have 2 classes (small / large) and were fine-tuned from the classifiers on :class:`~vitdecomp.datasets.SpuriousConceptWorld`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

import torch

from ..datasets import FACTORS, FACTOR_NAMES, WordTokenizer

__all__ = ["WEIGHTS_DIR", "MANIFEST", "IMAGE_SIZE", "FACTOR_SLICES", "NUM_FACTOR_CLASSES", "build", "load",
           "load_clip", "tokenizer", "input_size", "prepare", "manifest", "describe", "TARGETS", "SPURIOUS", "ARCH_CONFIGS"]

#: Where the shipped weights live (package data).
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "data" / "concept_world"
MANIFEST = WEIGHTS_DIR / "models.json"
IMAGE_SIZE = 64
TARGETS = ("deit", "swin", "maxvit")
SPURIOUS = tuple(f"{t}_spurious" for t in TARGETS)


def _slices() -> Dict[str, slice]:
    out, k = {}, 0
    for f in FACTOR_NAMES:
        out[f] = slice(k, k + len(FACTORS[f]))
        k += len(FACTORS[f])
    return out


#: Factor → the slice of a classifier's logits that predicts it.
FACTOR_SLICES: Dict[str, slice] = _slices()
NUM_FACTOR_CLASSES = sum(len(v) for v in FACTORS.values())

CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 8, "width": 64, "layers": 4, "head_width": 16,
                   "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": WordTokenizer().vocab_size, "width": 64, "heads": 2,
                 "layers": 2, "mlp_ratio": 2.0},
}


def _arch(name: str) -> str:
    return name[: -len("_spurious")] if name.endswith("_spurious") else name


def input_size(name: str) -> int:
    """The image side model ``name`` reads (64, or 32 for MaxViT)."""
    return 32 if _arch(name) == "maxvit" else IMAGE_SIZE


def prepare(name: str, images: torch.Tensor) -> torch.Tensor:
    """Concept-world images ``[B, 3, 64, 64]`` (normalised) → the input of model ``name``."""
    s = input_size(name)
    if images.shape[-1] == s:
        return images
    return torch.nn.functional.adaptive_avg_pool2d(images, s)


def tokenizer() -> WordTokenizer:
    """The small CLIP's tokenizer."""
    return WordTokenizer(context_length=CLIP_CONFIG["text_cfg"]["context_length"])


#: Constructor settings of the classifiers (``num_classes`` aside).
ARCH_CONFIGS = {
    "deit": {"class": "timm.models.vision_transformer.VisionTransformer", "img_size": IMAGE_SIZE, "patch_size": 8,
             "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0},
    "swin": {"class": "timm.models.swin_transformer.SwinTransformer", "img_size": IMAGE_SIZE, "patch_size": 8,
             "window_size": 4, "embed_dim": 64, "depths": [2, 2], "num_heads": [4, 8], "mlp_ratio": 2.0},
    "maxvit": {"class": "timm.models.maxxvit.MaxxVit", "img_size": 32, "embed_dim": [32, 64], "depths": [1, 1],
               "block_type": ["M", "M"], "stem_width": 16, "conv": {"block_type": "mbconv", "expand_ratio": 2.0,
               "pre_norm_act": True, "stride_mode": "dw", "pool_type": "avg2", "downsample_pool_type": "avg2"},
               "transformer": {"dim_head": 16, "window_size": [4, 4], "grid_size": [4, 4], "expand_ratio": 2.0},
               "head_hidden_size": None},
}


def _build_target(arch: str, num_classes: int) -> torch.nn.Module:
    if arch not in ARCH_CONFIGS:
        raise ValueError(f"Unknown concept-world architecture {arch!r}; known: {TARGETS}")
    c = {k: v for k, v in ARCH_CONFIGS[arch].items() if k != "class"}
    if arch == "deit":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(num_classes=num_classes, **c)
    if arch == "swin":
        from timm.models.swin_transformer import SwinTransformer

        c["depths"], c["num_heads"] = tuple(c["depths"]), tuple(c["num_heads"])
        return SwinTransformer(num_classes=num_classes, **c)
    from timm.models.maxxvit import MaxxVit, MaxxVitCfg, MaxxVitConvCfg, MaxxVitTransformerCfg

    t = dict(c["transformer"])
    t["window_size"], t["grid_size"] = tuple(t["window_size"]), tuple(t["grid_size"])
    cfg = MaxxVitCfg(embed_dim=tuple(c["embed_dim"]), depths=tuple(c["depths"]), block_type=tuple(c["block_type"]),
                     stem_width=c["stem_width"], conv_cfg=MaxxVitConvCfg(**c["conv"]),
                     transformer_cfg=MaxxVitTransformerCfg(**t), head_hidden_size=c["head_hidden_size"])
    return MaxxVit(cfg, img_size=c["img_size"], num_classes=num_classes)


def describe(name: str) -> dict:
    """The constructor settings of model ``name`` (recorded in ``models.json``)."""
    if name == "clip":
        return {"class": "open_clip.CLIP", **CLIP_CONFIG, "tokenizer": "vitdecomp.datasets.WordTokenizer"}
    arch = _arch(name)
    return {**ARCH_CONFIGS[arch], "num_classes": 2 if name.endswith("_spurious") else NUM_FACTOR_CLASSES}


def build(name: str) -> torch.nn.Module:
    """A freshly initialised model ``name`` (``"clip"``, one of :data:`TARGETS` or :data:`SPURIOUS`)."""
    if name == "clip":
        import open_clip

        return open_clip.CLIP(**CLIP_CONFIG)
    if name.endswith("_spurious"):
        return _build_target(name[: -len("_spurious")], 2)
    return _build_target(name, NUM_FACTOR_CLASSES)


def manifest() -> dict:
    """The JSON record of the shipped models (script, seed, config, training time, accuracies)."""
    if not MANIFEST.is_file():
        return {}
    return json.loads(MANIFEST.read_text())


def load(name: str) -> torch.nn.Module:
    """Model ``name`` with its shipped weights, in eval mode."""
    from safetensors.torch import load_file

    from ..errors import WeightsUnavailableError

    path = WEIGHTS_DIR / f"{name}.safetensors"
    if not path.is_file():
        raise WeightsUnavailableError(
            f"No shipped weights for concept-world model {name!r} at {path}; train them with "
            "`python -m vitdecomp.concept_world.train`"
        )
    model = build(name)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    return model.eval()


def load_clip() -> Tuple[torch.nn.Module, WordTokenizer]:
    """The small CLIP (eval mode) and its tokenizer."""
    return load("clip"), tokenizer()
