"""Reduced precision (autocast) for every built-in family: the model runs in bf16, the decomposition algebra
stays in float32, and both errors are measured and reported."""

import open_clip
import pytest
import timm
import torch

import vitdecomp
from vitdecomp import testing

MODELS = {
    "vit": (lambda: timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8),
            32),
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


@pytest.mark.parametrize("family", sorted(MODELS))
def test_callers_autocast_context_reaches_only_the_forward(family):
    """Inside the caller's own torch.autocast, decompose runs the forward reduced and keeps its readout algebra in
    float32 (it used to crash in the Swin engine: bf16 pooled sums against float32 weights); it equals
    autocast="bf16" without the float32 comparison, which only the explicit argument pays for."""
    build, size = MODELS[family]
    torch.manual_seed(0)
    model = testing.perturb_parameters(build().eval())
    x = torch.randn(2, 3, size, size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dec = vitdecomp.decompose(model, x, tokens="source")
        dec.spatial_map(dec.names[3])
    assert dec.contributions.dtype == torch.float32 and dec.meta["autocast"] == "bfloat16"
    assert "error_vs_float32" not in dec.meta and dec.error < 2e-2
    ref = vitdecomp.decompose(model, x, tokens="source", autocast="bf16", compare_float32=False)
    assert "error_vs_float32" not in ref.meta
    torch.testing.assert_close(dec.contributions, ref.contributions, rtol=0, atol=0)
