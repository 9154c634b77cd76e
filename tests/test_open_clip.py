"""Exactness of open_clip CLIP vision towers (both attention implementations) against encode_image."""

import pytest
import torch
import open_clip

import vitdecomp
from vitdecomp import testing

TEXT = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1)
VISION = dict(image_size=32, layers=3, width=48, patch_size=8, head_width=16)

CONFIGS = {
    "mha_cls": {},                                              # nn.MultiheadAttention blocks
    "custom_attention": dict(scale_heads=True, ls_init_value=0.5),  # open_clip's own Attention + LayerScale
    "avg_ln_after_pool": dict(pool_type="avg", final_ln_after_pool=True),
    "avg_ln_before_pool": dict(pool_type="avg"),
}


def build(extra):
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=24, vision_cfg={**VISION, **extra}, text_cfg=TEXT).eval()
    return testing.perturb_parameters(model)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_conformance(config):
    model = build(CONFIGS[config])
    results = testing.run_conformance(model, (32, 32), reference=lambda m, x: m.encode_image(x))
    assert max(e for d, _, e in results if d == torch.float64) <= 1e-10


def test_attention_implementation_detected_by_structure():
    plain, custom = build({}), build(CONFIGS["custom_attention"])
    assert isinstance(plain.visual.transformer.resblocks[0].attn, torch.nn.MultiheadAttention)
    assert not isinstance(custom.visual.transformer.resblocks[0].attn, torch.nn.MultiheadAttention)
    for m in (plain, custom):
        assert vitdecomp.find_adapter(m).name == "open_clip-vit"


def test_visual_or_whole_model_give_the_same_decomposition():
    model = build({})
    x = torch.randn(2, 3, 32, 32)
    a = vitdecomp.decompose(model, x)
    b = vitdecomp.decompose(model.visual, x)
    assert a.names == b.names and a.names[-1] == "ln_post.bias"
    torch.testing.assert_close(a.contributions, b.contributions)
    torch.testing.assert_close(vitdecomp.representation(model, x), model.encode_image(x))


def test_attentional_pooling_is_refused_clearly():
    model = build(dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2))
    with pytest.raises(vitdecomp.UnsupportedModelError, match="attentional pooling"):
        vitdecomp.decompose(model, torch.randn(1, 3, 32, 32))
