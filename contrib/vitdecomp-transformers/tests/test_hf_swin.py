"""Hugging Face Swin / SwinV2 as graph descriptions: conformance (sums and the attribution oracle, which places
every component's map on its stage grid independently of the engine), names, grids, readout."""

from __future__ import annotations

import pytest
import torch

import vitdecomp
from vitdecomp import testing

from hf_models import build, transformers

IMG = 24  # grids 6×6 → 3×3 (odd: merge padding, padded shifted windows) → 2×2 (window clamped, no shift)
SMALL = dict(image_size=IMG, patch_size=4, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 2, 4], window_size=2,
             mlp_ratio=2.0)


def swin_config(attn="sdpa"):
    return transformers.SwinConfig(attn_implementation=attn, **SMALL)


def swinv2_config(attn="eager"):  # transformers' Swinv2 has no sdpa path
    return transformers.Swinv2Config(attn_implementation="eager", **SMALL)


CASES = {
    "SwinModel": swin_config, "SwinForImageClassification": swin_config,
    "Swinv2Model": swinv2_config, "Swinv2ForImageClassification": swinv2_config,
}


def _z(m, x):
    base = m if type(m).__name__.endswith("Model") else m.base_model
    return base(pixel_values=x).pooler_output


@pytest.mark.parametrize("cls_name,attn", [(c, "sdpa") for c in CASES if "v2" not in c] + [("SwinModel", "eager")]
                         + [(c, "eager") for c in CASES if "v2" in c])
def test_conformance(cls_name, attn, registry):
    model = build(cls_name, CASES[cls_name](attn))
    assert registry.find_adapter(model).name == "transformers-swin"
    results = testing.run_conformance(model, (IMG, IMG), reference=_z, registry=registry)
    worst = {dt: max(e for d, _, e in results if d == dt) for dt in (torch.float32, torch.float64)}
    assert worst[torch.float32] <= 1e-5 and worst[torch.float64] <= 1e-10, worst


@pytest.mark.parametrize("cls_name", ["SwinForImageClassification", "Swinv2ForImageClassification"])
def test_names_grids_and_readout(cls_name, registry):
    model = build(cls_name, CASES[cls_name]())
    x = torch.randn(2, 3, IMG, IMG)
    dec = vitdecomp.decompose(model, x, tokens="source", registry=registry, check=True)
    names = dec.names
    assert names[:5] == ("embed", "stages.0.blocks.0.attn.head.0", "stages.0.blocks.0.attn.head.1",
                         "stages.0.blocks.0.attn.bias", "stages.0.blocks.0.mlp")
    i = names.index
    assert i("stages.0.blocks.1.mlp") < i("stages.0.downsample.norm.bias") < i("stages.1.blocks.0.attn.head.0")
    assert names[-1] == "layernorm.bias" and "stages.2.downsample.norm.bias" not in names
    c = dec.components[i("stages.2.blocks.1.attn.head.3")]
    assert (c.kind, c.block, c.stage, c.head) == ("head", 5, 2, 3)
    assert dec.meta["head_tokens"] == "query"
    assert dec.grid_of("embed") == vitdecomp.TokenGrid(0, 6, 6, (4, 4))
    assert dec.grid_of("stages.0.downsample.norm.bias") == vitdecomp.TokenGrid(0, 3, 3, (8, 8))
    assert dec.grid_of("stages.2.blocks.0.mlp") == vitdecomp.TokenGrid(0, 2, 2, (16, 16))
    assert dec.spatial_map("stages.1.blocks.1.attn.head.0").shape == (2, 3, 3, 64)
    head = registry.find_adapter(model).readout(model)
    with torch.no_grad():
        torch.testing.assert_close(head(dec.total()), model(x).logits, rtol=1e-4, atol=1e-5)


def test_start_and_size_errors(registry):
    model = build("SwinModel", swin_config()).double()
    x = torch.randn(1, 3, IMG, IMG, dtype=torch.float64)
    full = vitdecomp.decompose(model, x, registry=registry)
    dec = vitdecomp.decompose(model, x, start=2, registry=registry, check=True)  # first block of stage 1
    assert dec.names[0] == "init" and "stages.0.downsample.norm.bias" not in dec.names
    torch.testing.assert_close(dec["stages.2.blocks.1.mlp"], full["stages.2.blocks.1.mlp"], rtol=1e-10, atol=1e-12)
    with pytest.raises(vitdecomp.InputError, match="out of range"):
        vitdecomp.decompose(model, x, start=6, registry=registry)
    with pytest.raises(vitdecomp.InputError, match="input size"):
        vitdecomp.decompose(model, torch.randn(1, 3, IMG, 32, dtype=torch.float64), registry=registry)
