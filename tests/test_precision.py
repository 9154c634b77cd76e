"""Reduced precision (autocast) for every built-in family: the model runs in bf16, the decomposition algebra
stays in float32, and both errors are measured and reported."""

import open_clip
import pytest
import timm
import torch

import vitdecomp
from vitdecomp import testing

MODELS = {
    "swin": (lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=4,
                                       embed_dim=32, depths=(2, 2), num_heads=(2, 4)), 64),
    "maxvit": (lambda: timm.create_model("maxvit_tiny_tf_224", pretrained=False, img_size=64), 64),
    "clip": (lambda: open_clip.CLIP(embed_dim=24, vision_cfg={"image_size": 32, "layers": 2, "width": 48,
                                                              "patch_size": 8, "head_width": 16},
                                    text_cfg={"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2,
                                              "layers": 1}), 32),
}


@pytest.mark.parametrize("family", sorted(MODELS))
def test_bf16_autocast_is_measured(family):
    build, size = MODELS[family]
    torch.manual_seed(0)
    model = testing.perturb_parameters(build().eval())
    x = torch.randn(2, 3, size, size)
    dec = vitdecomp.decompose(model, x, autocast="bf16", check=True)
    assert dec.contributions.dtype == dec.representation.dtype == torch.float32
    assert dec.meta["autocast"] == "bfloat16"
    assert dec.error < 2e-2 and 1e-5 < dec.meta["error_vs_float32"] < 0.1
    full = vitdecomp.decompose(model, x)  # the float32 path is untouched afterwards
    assert full.error < 1e-5 and "autocast" not in full.meta
