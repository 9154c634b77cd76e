"""Exactness of the timm ViT family on real timm architectures with random, perturbed weights."""

import pytest
import timm
import torch

import vitdecomp
from vitdecomp import testing

SMALL = dict(depth=3, img_size=32, patch_size=8, embed_dim=48, num_heads=3)

FAMILIES = {
    "deit": ("deit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "dino": ("vit_small_patch16_224.dino", {}),  # DINO: the plain ViT architecture with CLS readout
    "dinov2": ("vit_small_patch14_dinov2", dict(patch_size=8)),  # LayerScale
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", dict(patch_size=8)),
    "vit_avg_fc_norm": ("vit_tiny_patch16_224", dict(global_pool="avg")),
    "vit_avg_norm": ("vit_tiny_patch16_224", dict(global_pool="avg", fc_norm=False)),
    "vit_clip_prenorm": ("vit_base_patch16_clip_224", {}),  # norm_pre
    "vit_dynamic": ("vit_tiny_patch16_224", dict(dynamic_img_size=True)),
}


def reference(m, x):
    return m.forward_head(m.forward_features(x), pre_logits=True)


def build(name, extra):
    kw = {**SMALL, **extra}
    model = timm.create_model(name, pretrained=False, **kw).eval()
    return testing.perturb_parameters(model)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_conformance(family):
    name, extra = FAMILIES[family]
    model = build(name, extra)
    results = testing.run_conformance(model, (32, 32), reference=reference,
                                      fixed_size=not extra.get("dynamic_img_size", False))
    worst = {dt: max(e for d, _, e in results if d == dt) for dt in (torch.float32, torch.float64)}
    assert worst[torch.float32] <= 1e-5 and worst[torch.float64] <= 1e-10, worst


def test_names_and_shapes_deit():
    model = build("deit_tiny_patch16_224", {})
    x = torch.randn(2, 3, 32, 32)
    dec = vitdecomp.decompose(model, x, check=True)
    assert dec.contributions.shape == (2, 1 + 3 * (3 + 2) + 1, 48)
    assert dec.names[:3] == ("embed", "blocks.0.attn.head.0", "blocks.0.attn.head.1")
    assert dec.names[-1] == "norm.bias" and "blocks.2.attn.bias" in dec.names and "blocks.2.mlp" in dec.names
    head = dec.components[dec.index("blocks.1.attn.head.2")]
    assert (head.kind, head.block, head.head) == ("head", 1, 2)
    assert torch.allclose(dec.representation, reference(model, x), atol=0, rtol=0)


def test_distilled_representation_is_mean_of_cls_and_dist():
    model = build("deit_tiny_distilled_patch16_224", {})
    x = torch.randn(1, 3, 32, 32)
    feats = model.forward_features(x)
    z = vitdecomp.representation(model, x)
    assert torch.allclose(z, (feats[:, 0] + feats[:, 1]) / 2)
    dec = vitdecomp.decompose(model, x, tokens="source")
    assert dec.grid.num_prefix == 2


def test_start_makes_init_component_and_matches_full():
    model = build("vit_small_patch14_dinov2", dict(patch_size=8))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model = model.double()
    full = vitdecomp.decompose(model, x)
    part = vitdecomp.decompose(model, x, start=2)
    assert part.names[0] == "init" and part.components[0].kind == "residual"
    # the init component is exactly everything the first two blocks and the embedding contribute
    early = [i for i, c in enumerate(full.components) if c.name == "embed" or (c.block is not None and c.block < 2)]
    torch.testing.assert_close(part["init"], full.contributions[:, early].sum(1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(part["blocks.2.mlp"], full["blocks.2.mlp"], rtol=1e-12, atol=1e-14)


def test_heads_sum_to_branch():
    model = build("deit_tiny_patch16_224", {})
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model = model.double()
    dec = vitdecomp.decompose(model, x)
    br = vitdecomp.decompose(model, x, heads=False)
    heads = [dec[f"blocks.1.attn.head.{h}"] for h in range(3)]
    torch.testing.assert_close(sum(heads) + dec["blocks.1.attn.bias"], br["blocks.1.attn"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(dec.group("branch").contributions, br.contributions, rtol=1e-12, atol=1e-14)


def test_even_bias_policy_spreads_constants():
    model = build("deit_tiny_patch16_224", {})
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model = model.double()
    exp = vitdecomp.decompose(model, x)
    even = vitdecomp.decompose(model, x, bias="even", check=True)
    assert not any(c.kind == "const" for c in even.components)
    consts = exp.select(kind="const").total()
    share = consts / len(even)
    torch.testing.assert_close(even["blocks.0.mlp"], exp["blocks.0.mlp"] + share, rtol=1e-12, atol=1e-14)
    # the explicit policy keeps a head's contribution independent of the granularity asked for
    tok = vitdecomp.decompose(model, x, tokens="source")
    torch.testing.assert_close(tok["blocks.0.attn.head.1"], exp["blocks.0.attn.head.1"], rtol=1e-12, atol=1e-14)


def test_token_mode_stores_only_readout_rows():
    """Token mode keeps, per head, the readout row of attention [B, T] and the values [B, T, dh] — never a
    queries × sources × D tensor."""
    model = build("deit_tiny_patch16_224", {})
    x = torch.randn(2, 3, 32, 32)
    dec = vitdecomp.decompose(model, x, tokens="source")
    detail = dec.token_details["blocks.0.attn.head.0"]
    T = dec.grid.num_tokens
    assert detail.weight.shape == (2, T) and detail.values.shape == (2, T, 16)
    assert dec.token_contributions("blocks.0.attn.head.0").shape == (2, T, 48)
    assert dec.spatial_map("blocks.0.attn.head.0").shape == (2, 4, 4, 48)


def test_token_placement_one_hot_attention():
    """Force head 0 of the last block to read one known patch; its token split must sit at that patch."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8,
                              embed_dim=48, num_heads=3).eval()
    target = (2, 1)  # row, column in the 4×4 patch grid
    tok = 1 + target[0] * 4 + target[1]
    d0 = 5
    with torch.no_grad():
        model.pos_embed[0, tok, d0] += 60.0  # a large feature only the target token carries
        attn = model.blocks[-1].attn
        dh = 16
        attn.qkv.weight[0:dh].zero_()            # head 0 queries: constant
        attn.qkv.bias[0:dh] = 0.0
        attn.qkv.bias[0] = 40.0
        attn.qkv.weight[48:48 + dh].zero_()      # head 0 keys read channel d0 only
        attn.qkv.bias[48:48 + dh] = 0.0
        attn.qkv.weight[48, d0] = 1.0
    x = torch.randn(1, 3, 32, 32)
    dec = vitdecomp.decompose(model, x, tokens="source", check=True)
    weights = dec.token_details["blocks.1.attn.head.0"].weight[0]
    assert float(weights[tok]) > 0.99 * float(weights.sum())
    mags = dec.spatial_map("blocks.1.attn.head.0")[0].norm(dim=-1)
    assert tuple(divmod(int(mags.argmax()), 4)) == target
    assert float(mags[target]) > 0.99 * float(mags.sum())


def test_non_attention_components_sit_where_they_write():
    model = build("deit_tiny_patch16_224", {})
    x = torch.randn(1, 3, 32, 32)
    dec = vitdecomp.decompose(model, x, tokens="source")
    mlp = dec.token_contributions("blocks.0.mlp")
    assert mlp[:, 1:].abs().max() == 0  # CLS readout: the MLP writes the representation at the CLS row only
    avg = build("vit_tiny_patch16_224", dict(global_pool="avg"))
    dec = vitdecomp.decompose(avg, x, tokens="source", check=True)
    mlp = dec.token_contributions("blocks.0.mlp")
    assert mlp[:, 0].abs().max() == 0 and (mlp[:, 1:].norm(dim=-1) > 0).all()


def test_batch_independence():
    model = build("deit_tiny_patch16_224", {})
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    model = model.double()
    both = vitdecomp.decompose(model, x)
    one = vitdecomp.decompose(model, x[1:2])
    torch.testing.assert_close(both.contributions[1:2], one.contributions, rtol=1e-10, atol=1e-12)


def test_readout_head_reproduces_logits():
    model = build("deit_tiny_patch16_224", dict(num_classes=7))
    x = torch.randn(2, 3, 32, 32)
    dec = vitdecomp.decompose(model, x)
    head = vitdecomp.find_adapter(model).readout(model)
    torch.testing.assert_close(head(dec.total()), model(x), rtol=1e-5, atol=1e-5)
    distilled = build("deit_tiny_distilled_patch16_224", dict(num_classes=7))
    assert vitdecomp.find_adapter(distilled).readout(distilled) is None


def test_reduced_precision_error_is_measured_and_reported():
    model = build("deit_tiny_patch16_224", {})
    x = torch.randn(2, 3, 32, 32)
    dec = vitdecomp.decompose(model, x, autocast="bf16")
    assert dec.meta["autocast"] == "bfloat16"
    # bf16 keeps ~3 significant digits: both errors are measured and reported, at bf16 precision
    assert 1e-6 < dec.error < 1e-2
    assert 1e-5 < dec.meta["error_vs_float32"] < 0.1
    vitdecomp.decompose(model, x, autocast=torch.bfloat16, check=True)  # checked against the bf16 tolerance
    with pytest.raises(vitdecomp.InputError, match="autocast"):
        vitdecomp.decompose(model, x, autocast="int8")
