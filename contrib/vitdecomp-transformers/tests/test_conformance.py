"""The vitdecomp conformance kit on every supported class, with both attention implementations."""

from __future__ import annotations

import pytest
import torch

import vitdecomp
from vitdecomp import testing

from hf_models import (SIZE, build, clip_config, clip_vision_config, deit_config, dinov2_config, dinov2_reg_config,
                      vit_config)


def cls_token(backbone):
    return lambda m, x: getattr(m, backbone)(x).last_hidden_state[:, 0] if backbone else m(x).last_hidden_state[:, 0]


def dinov2_cls_input(backbone, npre):
    def ref(m, x):
        h = getattr(m, backbone)(x).last_hidden_state
        return torch.cat([h[:, 0], h[:, npre:].mean(1)], 1)
    return ref


# (class, config factory, reference z from the library's own outputs, adapter name, fixed input size)
CASES = {
    "ViTModel": (vit_config, cls_token(None), "transformers-vit", True),
    "ViTForImageClassification": (vit_config, cls_token("vit"), "transformers-vit", True),
    "DeiTModel": (deit_config, cls_token(None), "transformers-vit", True),
    "DeiTForImageClassification": (deit_config, cls_token("deit"), "transformers-vit", True),
    "DeiTForImageClassificationWithTeacher": (deit_config, lambda m, x: m.deit(x).last_hidden_state[:, :2].mean(1),
                                              "transformers-vit", True),
    "Dinov2Model": (dinov2_config, lambda m, x: m(x).pooler_output, "transformers-dinov2", False),
    "Dinov2ForImageClassification": (dinov2_config, dinov2_cls_input("dinov2", 1), "transformers-dinov2", False),
    "Dinov2WithRegistersModel": (dinov2_reg_config, lambda m, x: m(x).pooler_output, "transformers-dinov2", False),
    "Dinov2WithRegistersForImageClassification": (dinov2_reg_config, dinov2_cls_input("dinov2_with_registers", 4),
                                                  "transformers-dinov2", False),
    "CLIPVisionModel": (clip_vision_config, lambda m, x: m(x).pooler_output, "transformers-clip", True),
    "CLIPVisionModelWithProjection": (clip_vision_config, lambda m, x: m(x).image_embeds, "transformers-clip", True),
    "CLIPModel": (clip_config, lambda m, x: m.get_image_features(pixel_values=x).pooler_output, "transformers-clip", True),
    "CLIPForImageClassification": (clip_config, lambda m, x: m.vision_model(x).last_hidden_state[:, 1:].mean(1),
                                   "transformers-clip", True),
}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("cls_name", list(CASES))
def test_conformance(cls_name, attn, registry):
    make_config, reference, adapter, fixed = CASES[cls_name]
    model = build(cls_name, make_config(attn))
    assert registry.find_adapter(model).name == adapter
    results = testing.run_conformance(model, (SIZE, SIZE), reference=reference, fixed_size=fixed, registry=registry)
    worst = {dt: max(e for d, _, e in results if d == dt) for dt in (torch.float32, torch.float64)}
    assert worst[torch.float32] <= 1e-5 and worst[torch.float64] <= 1e-10, worst


@pytest.mark.parametrize("cls_name", ["ViTForImageClassification", "DeiTForImageClassification",
                                      "Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification",
                                      "CLIPForImageClassification"])
def test_readout_head_gives_the_models_logits(cls_name, registry):
    make_config, *_ = CASES[cls_name]
    model = build(cls_name, make_config())
    x = torch.randn(2, 3, SIZE, SIZE)
    dec = vitdecomp.decompose(model, x, registry=registry, check=True)
    head = registry.find_adapter(model).readout(model)
    with torch.no_grad():
        torch.testing.assert_close(head(dec.total()), model(x).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls_name", ["DeiTForImageClassificationWithTeacher", "CLIPVisionModelWithProjection"])
def test_no_readout_when_logits_are_not_linear_in_z(cls_name, registry):
    model = build(cls_name, CASES[cls_name][0]())
    assert registry.find_adapter(model).readout(model) is None


def test_eager_and_sdpa_agree_component_by_component(registry):
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    decs = []
    for attn in ("eager", "sdpa"):
        model = build("Dinov2WithRegistersModel", dinov2_reg_config(attn)).double()
        decs.append(vitdecomp.decompose(model, x, tokens="source", registry=registry, check=True))
    a, b = decs
    assert a.names == b.names and a.meta["attn_implementation"] == "eager" and b.meta["attn_implementation"] == "sdpa"
    torch.testing.assert_close(a.contributions, b.contributions, rtol=1e-9, atol=1e-11)
    name = "blocks.1.attn.head.2"
    torch.testing.assert_close(a.token_contributions(name), b.token_contributions(name), rtol=1e-9, atol=1e-11)


def test_component_names_and_token_grid(registry):
    model = build("Dinov2WithRegistersForImageClassification", dinov2_reg_config())
    dec = vitdecomp.decompose(model, torch.randn(1, 3, SIZE, 48), tokens="source", registry=registry, check=True)
    assert dec.names[0] == "embed" and dec.names[-1] == "layernorm.bias"
    assert dec.names[1:7] == tuple(f"blocks.0.attn.head.{h}" for h in range(4)) + ("blocks.0.attn.bias", "blocks.0.mlp")
    assert (dec.grid.num_prefix, dec.grid.h, dec.grid.w) == (4, 4, 6)  # CLS + 3 registers; non-square input
    assert dec.representation.shape == (1, 64)  # cat(CLS, mean of patches)
    assert dec.spatial_map("blocks.1.attn.head.0").shape == (1, 4, 6, 64)
    clip = build("CLIPModel", clip_config())
    dec = vitdecomp.decompose(clip, torch.randn(1, 3, SIZE, SIZE), registry=registry)
    assert dec.names[-1] == "post_layernorm.bias" and dec.representation.shape == (1, 24)


def test_start_and_size_errors(registry):
    model = build("ViTModel", vit_config())
    x = torch.randn(1, 3, SIZE, SIZE)
    with pytest.raises(vitdecomp.InputError, match="out of range"):
        vitdecomp.decompose(model, x, start=2, registry=registry)
    dec = vitdecomp.decompose(model, x, start=1, registry=registry, check=True)
    assert dec.names[0] == "init" and dec.components[0].kind == "residual"
    dino = build("Dinov2Model", dinov2_config())
    with pytest.raises(vitdecomp.InputError, match="divisible"):
        vitdecomp.decompose(dino, torch.randn(1, 3, SIZE, 36), registry=registry)


def test_dispatch_says_no_to_other_libraries(registry):
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4)
    for ad in (r.obj for r in registry.adapters):
        assert not ad.supports(model)
        assert "not one of" in ad.explain(model)
    with pytest.raises(vitdecomp.NoAdapterError):
        registry.find_adapter(model)


def test_installed_entry_points_find_the_pack(monkeypatch, capsys):
    from vitdecomp import Registry

    reg = Registry.from_entry_points(lenient=True)
    names = {p.name: p for p in reg.plugins()}
    for ep in ("hf_vit", "hf_dinov2", "hf_clip", "hf_loader"):
        assert names[ep].distribution == "vitdecomp-transformers" and not names[ep].builtin
    assert "hf" in reg.loaders
    monkeypatch.setenv("VITDECOMP_TRACE", "1")
    assert reg.find_adapter(build("CLIPVisionModel", clip_vision_config())).name == "transformers-clip"
    assert "hf_clip:transformers-clip -> True" in capsys.readouterr().err
    monkeypatch.setenv("VITDECOMP_DISABLE_PLUGINS", "vitdecomp-transformers")
    assert not any(p.distribution == "vitdecomp-transformers" for p in Registry.from_entry_points(lenient=True).plugins())


def test_dinov2_swiglu_ffn(registry):
    model = build("Dinov2Model", dinov2_config(use_swiglu_ffn=True))
    testing.run_conformance(model, (SIZE, SIZE), reference=lambda m, x: m(x).pooler_output, fixed_size=False,
                            registry=registry)
