"""BEiT, Data2Vec-vision, SigLIP vision and the ViT-MAE encoder: conformance (sums at every granularity and the
attribution oracle, eager and sdpa), z as the model defines it, names, readout, refusals, ``hf:`` loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitdecomp
from vitdecomp import testing

from hf_models import (SIZE, beit_config, build, data2vec_vision_config, siglip_config, siglip_vision_config,
                       transformers, vitmae_config)


def make(cls_name, config, **kw):
    """``build`` plus relative position bias tables away from their zero init (perturb_parameters leaves them), so
    the bias really shapes the attention rows."""
    model = build(cls_name, config, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def mae_noise(m, x):
    n = m.embeddings.patch_embeddings.num_patches
    return torch.arange(n, dtype=torch.float32).expand(x.shape[0], n)


def _cls_pool(m, x):
    base = m if type(m).__name__.endswith("Model") else m.base_model
    out = base(pixel_values=x)
    return out.pooler_output if base.pooler is not None else out.last_hidden_state[:, 0]


# (class, config factory, extra model kwargs, reference z from the library's own outputs, adapter)
CASES = {
    "BeitModel-mean": ("BeitModel", beit_config, {}, lambda m, x: m(x).pooler_output, "transformers-beit"),
    "BeitModel-cls-shared-bias": ("BeitModel", lambda a: beit_config(
        a, use_mean_pooling=False, use_relative_position_bias=False, use_shared_relative_position_bias=True),
        {}, lambda m, x: m(x).pooler_output, "transformers-beit"),
    "BeitModel-no-pooler-no-layerscale": ("BeitModel", lambda a: beit_config(
        a, use_mean_pooling=False, layer_scale_init_value=0.0), {"add_pooling_layer": False},
        lambda m, x: m(x).last_hidden_state[:, 0], "transformers-beit"),
    "BeitForImageClassification": ("BeitForImageClassification", beit_config, {}, _cls_pool, "transformers-beit"),
    "Data2VecVisionModel": ("Data2VecVisionModel", data2vec_vision_config, {},
                            lambda m, x: m(x).last_hidden_state[:, 0], "transformers-beit"),
    "Data2VecVisionModel-cls-shared-bias": ("Data2VecVisionModel", lambda a: data2vec_vision_config(
        a, use_mean_pooling=False, use_relative_position_bias=False, use_shared_relative_position_bias=True,
        use_absolute_position_embeddings=True), {"add_pooling_layer": True}, lambda m, x: m(x).pooler_output,
        "transformers-beit"),
    "Data2VecVisionForImageClassification": ("Data2VecVisionForImageClassification", data2vec_vision_config, {},
                                             _cls_pool, "transformers-beit"),
    "SiglipVisionModel": ("SiglipVisionModel", siglip_vision_config, {}, lambda m, x: m(x).pooler_output,
                          "transformers-siglip"),
    "SiglipVisionModel-no-head": ("SiglipVisionModel", lambda a: siglip_vision_config(a, vision_use_head=False), {},
                                  lambda m, x: m(x).last_hidden_state.mean(1), "transformers-siglip"),
    "SiglipModel": ("SiglipModel", siglip_config, {},
                    lambda m, x: m.get_image_features(pixel_values=x).pooler_output, "transformers-siglip"),
    "SiglipForImageClassification": ("SiglipForImageClassification", siglip_config, {},
                                     lambda m, x: m.vision_model(x).last_hidden_state.mean(1), "transformers-siglip"),
    # the same noise as the adapter: with every patch kept any noise gives this z up to rounding (tested below)
    "ViTMAEModel": ("ViTMAEModel", vitmae_config, {}, lambda m, x: m(x, noise=mae_noise(m, x)).last_hidden_state[:, 0],
                    "transformers-vitmae"),
}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", list(CASES))
def test_conformance(case, attn, registry):
    cls_name, make_config, kw, reference, adapter = CASES[case]
    model = make(cls_name, make_config(attn), **kw)
    assert registry.find_adapter(model).name == adapter
    results = testing.run_conformance(model, (SIZE, SIZE), reference=reference, registry=registry,
                                      cuda_placement=attn == "sdpa")
    worst = {dt: max(e for d, _, e in results if d == dt) for dt in (torch.float32, torch.float64)}
    assert worst[torch.float32] <= 1e-5 and worst[torch.float64] <= 1e-10, worst


def test_beit_relative_position_bias_shapes_the_token_split(registry):
    """The relative position bias changes which tokens a head reads; sdpa's recomputed rows (with the bias the
    layer passes) agree with the weights eager returns, token by token, and dropping the bias would not."""
    x = torch.randn(1, 3, SIZE, SIZE, dtype=torch.float64)
    decs = []
    for attn in ("eager", "sdpa"):
        model = make("BeitModel", beit_config(attn)).double()
        decs.append(vitdecomp.decompose(model, x, tokens="source", registry=registry, check=True))
    a, b = decs
    name = "blocks.1.attn.head.2"
    # BEiT's eager path runs its softmax in float32 even for float64 models: agreement to float32 rounding
    ta, tb = a.token_contributions(name), b.token_contributions(name)
    assert float((ta - tb).norm()) <= 1e-6 * float(ta.norm())
    testing.check_attributions(model, x, registry=registry)  # the oracle reads the forward's own weights
    # without the bias the rows differ (so the agreement above is not vacuous)
    attn = model.layers[1].attention
    h = model.layers[1].layernorm_before
    with torch.no_grad():
        st = {}
        hk = model.layers[1].register_forward_pre_hook(lambda m, a: st.__setitem__("x", a[0]))
        model(x)
        hk.remove()
        u = h(st["x"])
        q = attn.q_proj(u).view(1, -1, 4, 8).transpose(1, 2)
        k = attn.k_proj(u).view(1, -1, 4, 8).transpose(1, 2)
        plain = torch.softmax(q @ k.transpose(-2, -1) * attn.scaling, -1)
        bias = model.layers[1].relative_position_bias((SIZE // 8, SIZE // 8), False, dim_size=u.shape[1])
        biased = torch.softmax(q @ k.transpose(-2, -1) * attn.scaling + bias, -1)
    assert float((plain - biased).abs().max()) > 1e-2


def test_names_readout_and_layerscale(registry):
    model = make("BeitForImageClassification", beit_config(num_labels=5))
    x = torch.randn(2, 3, SIZE, SIZE)
    dec = vitdecomp.decompose(model, x, tokens="source", registry=registry, check=True)
    assert dec.names[:7] == ("embed",) + tuple(f"blocks.0.attn.head.{h}" for h in range(4)) + ("blocks.0.attn.bias",
                                                                                              "blocks.0.mlp")
    assert dec.names[-1] == "pooler.layernorm.bias" and "layernorm.bias" not in dec.names
    assert (dec.grid.num_prefix, dec.grid.h, dec.grid.w) == (1, 4, 4)
    head = registry.find_adapter(model).readout(model)
    with torch.no_grad():
        torch.testing.assert_close(head(dec.total()), model(x).logits, rtol=1e-4, atol=1e-5)
    # lambda_2 is the MLP write's LayerScale: zero it and that write, and only that one, vanishes
    m64 = model.double()
    d = vitdecomp.decompose(m64, x.double(), heads=False, registry=registry, check=True)
    with torch.no_grad():
        m64.beit.layers[1].lambda_2.zero_()
    d0 = vitdecomp.decompose(m64, x.double(), heads=False, registry=registry, check=True)
    assert float(d0["blocks.1.mlp"].abs().max()) == 0.0 and float(d["blocks.1.mlp"].abs().max()) > 0
    assert float(d0["blocks.0.mlp"].abs().max()) > 0
    cls = build("BeitModel", beit_config(use_mean_pooling=False))
    assert vitdecomp.decompose(cls, x[:1], registry=registry).names[-1] == "layernorm.bias"
    d2v = make("Data2VecVisionForImageClassification", data2vec_vision_config(num_labels=3))
    dd = vitdecomp.decompose(d2v, x, registry=registry, check=True)
    assert dd.names[-1] == "pooler.layernorm.bias" and dd.names[3] == "blocks.0.attn.head.2"
    with torch.no_grad():
        torch.testing.assert_close(registry.find_adapter(d2v).readout(d2v)(dd.total()), d2v(x).logits,
                                   rtol=1e-4, atol=1e-5)


def test_siglip_map_head(registry):
    model = build("SiglipVisionModel", siglip_vision_config())
    x = torch.randn(2, 3, SIZE, SIZE)
    dec = vitdecomp.decompose(model, x, tokens="source", registry=registry, check=True)
    assert dec.names[-3:] == ("post_layernorm.bias", "head.bias", "head.mlp")
    assert dec.grid.num_prefix == 0 and dec.grid.num_tokens == 16
    assert set(dec.meta["spread_tokens"]) == {"head.bias", "head.mlp"}
    assert dec.spatial_map("blocks.1.attn.head.0").shape == (2, 4, 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(dec.total(), model(x).pooler_output, rtol=1e-4, atol=1e-5)
    clf = build("SiglipForImageClassification", siglip_config())
    d = vitdecomp.decompose(clf, x, registry=registry, check=True)
    assert d.names[-1] == "post_layernorm.bias"  # the classifier reads the patch mean, not the MAP head
    with torch.no_grad():
        torch.testing.assert_close(registry.find_adapter(clf).readout(clf)(d.total()), clf(x).logits,
                                   rtol=1e-4, atol=1e-5)


def test_vitmae_z_does_not_depend_on_the_shuffle(registry):
    model = build("ViTMAEModel", vitmae_config()).double()
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    dec = vitdecomp.decompose(model, x, tokens="source", registry=registry, check=True)
    with torch.no_grad():
        for seed in range(3):  # the model's own forward, its own random shuffle
            torch.manual_seed(seed)
            out = model(x)
            assert out.mask.sum() == 0  # mask_ratio 0: nothing dropped
            torch.testing.assert_close(out.last_hidden_state[:, 0], dec.representation, rtol=1e-10, atol=1e-12)
    assert dec.names[-1] == "layernorm.bias" and (dec.grid.h, dec.grid.w) == (4, 4)


def test_vitmae_with_masking_is_refused(registry):
    model = build("ViTMAEModel", vitmae_config(mask_ratio=0.75))
    ad = registry.find_adapter(model)
    assert ad.name == "transformers-vitmae" and "mask_ratio=0.75" in ad.explain(model)
    with pytest.raises(vitdecomp.UnsupportedModelError, match="mask_ratio = 0"):
        vitdecomp.decompose(model, torch.randn(1, 3, SIZE, SIZE), registry=registry)


# ---------------------------------------------------------------------------------------------- hf: loading


def _image():
    from PIL import Image

    return Image.fromarray((np.random.default_rng(1).random((40, 50, 3)) * 255).astype("uint8"))


STATS = dict(image_mean=[0.2, 0.4, 0.6], image_std=[0.5, 0.25, 0.3])  # away from every processor's defaults

LOAD_CASES = [
    ("BeitForImageClassification", lambda: beit_config(num_labels=4),
     lambda: transformers.BeitImageProcessor(size={"height": SIZE, "width": SIZE}, do_center_crop=False, **STATS),
     "BeitForImageClassification"),
    ("Data2VecVisionModel", data2vec_vision_config,
     lambda: transformers.BeitImageProcessor(size={"height": SIZE, "width": SIZE}, do_center_crop=False, **STATS),
     "Data2VecVisionModel"),
    ("SiglipVisionModel", siglip_vision_config,
     lambda: transformers.SiglipImageProcessor(size={"height": SIZE, "width": SIZE}, **STATS), "SiglipVisionModel"),
    ("SiglipModel", siglip_config,
     lambda: transformers.SiglipImageProcessor(size={"height": SIZE, "width": SIZE}, **STATS), "SiglipModel"),
    # a pre-training checkpoint (random mask) loads as the encoder with every patch kept
    ("ViTMAEForPreTraining", lambda: vitmae_config(mask_ratio=0.75, decoder_hidden_size=16,
                                                   decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                                   decoder_intermediate_size=32),
     lambda: transformers.ViTImageProcessor(size={"height": SIZE, "width": SIZE}, **STATS), "ViTMAEModel"),
]


@pytest.mark.parametrize("cls_name,config,processor,loads_as", LOAD_CASES)
def test_load_saved_checkpoint(tmp_path, registry, cls_name, config, processor, loads_as):
    model = make(cls_name, config())
    proc = processor()
    path = tmp_path / cls_name
    model.save_pretrained(path)
    proc.save_pretrained(path)
    loaded = vitdecomp.load_model(f"hf:{path}", registry=registry)
    assert type(loaded.model).__name__ == loads_as and not loaded.model.training
    img = _image()
    x = loaded.preprocess(img).unsqueeze(0)  # the saved processor's size, mean and std
    torch.testing.assert_close(x, proc(images=img, return_tensors="pt")["pixel_values"], rtol=0, atol=0)
    dec = vitdecomp.decompose(loaded.model, x, registry=registry, check=True, tokens="source")
    with torch.no_grad():
        if loads_as == "ViTMAEModel":  # the weights came back: the saved encoder, every patch kept
            assert model.vit.config.mask_ratio == 0.75 and loaded.model.config.mask_ratio == 0.0
            model.vit.config.mask_ratio = 0.0
            ref = vitdecomp.representation(model.vit, x, registry=registry)
        else:
            ref = vitdecomp.representation(model, x, registry=registry)
        torch.testing.assert_close(dec.representation, ref)
        if "Classification" in cls_name:
            head = registry.find_adapter(loaded.model).readout(loaded.model)
            torch.testing.assert_close(head(dec.representation), loaded.model(pixel_values=x).logits)
