"""XCiT through the auto adapter: cross-covariance heads split by the output projection, the class-attention tail
(class row: class attention over class and patch rows; patch rows: ``x + γ1 ⊙ norm1(x)``, doubled by the block's
last add), exact and checked against the conformance kit's attribution oracle."""

import pytest
import timm
import torch

import vitdecomp
from vitdecomp import InputError, UnsupportedModelError, testing


def build(name, img, **extra):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, img_size=img, depth=2, **extra).eval()
    return testing.perturb_parameters(m)


def _ref(m, x):
    return m.forward_head(m.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("name,img,size", [("xcit_nano_12_p16_224", 64, (64, 48)),
                                           ("xcit_nano_12_p8_224", 32, (32, 24))])
def test_conformance(name, img, size):
    # non-square images: the Fourier position encoding and the LPI convolutions follow the image's own grid
    results = testing.run_conformance(build(name, img), size, adapter="auto", fixed_size=False, reference=_ref)
    assert max(e for dt, _, e in results if dt == torch.float32) <= 1e-5
    assert max(e for dt, _, e in results if dt == torch.float64) <= 1e-10


@pytest.mark.parametrize("extra", [{"tokens_norm": True}, {"global_pool": "avg"}])
def test_tokens_norm_and_mean_readout_match_the_oracle(extra):
    # tokens_norm: norm2 on the class and the patch rows (one constant); 'avg': z is the mean of the patch rows,
    # which the class row never reaches (its writes drop out of the graph)
    m = build("xcit_nano_12_p16_224", 64, **extra)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for dt, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        dec = vitdecomp.decompose(m.to(dt), x.to(dt), adapter="auto", tokens="source")
        assert dec.error <= tol
    assert ("cls_token" in dec.names) == ("global_pool" not in extra)
    testing.check_attributions(m, x, adapter="auto", start=None)


def test_names_heads_and_grid():
    m = build("xcit_nano_12_p16_224", 64).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert vitdecomp.find_adapter(m).name == "auto"  # no family plugin claims XCiT: the fallback
    dec = vitdecomp.decompose(m, x, tokens="source")
    for name in ("embed", "blocks.1.attn.head.3", "blocks.1.attn.bias", "blocks.1.local_mp", "blocks.0.mlp",
                 "cls_token", "cls_attn_blocks.0.attn.bias", "cls_attn_blocks.0.norm2.bias", "cls_attn_blocks.1.mlp",
                 "norm.bias"):
        assert name in dec.names, name
    assert dec.names.index("blocks.1.mlp") < dec.names.index("cls_token") < dec.names.index("cls_attn_blocks.0.mlp")
    assert dec.meta["channel_heads"] == ["blocks.0.attn", "blocks.1.attn"]
    assert (dec.grid.num_prefix, dec.grid.h, dec.grid.w) == (1, 4, 4)
    # the class token sits at the grid's prefix position; a channel-attention head's split lies at its own tokens
    assert dec.token_contributions("cls_token")[:, 1:].abs().max() == 0
    head = dec.token_contributions("blocks.1.attn.head.3")
    torch.testing.assert_close(head.sum(1), dec["blocks.1.attn.head.3"], rtol=1e-10, atol=1e-12)
    assert head[:, 0].abs().max() == 0  # the class row joins after the blocks
    # heads=False: the XCA heads and their bias are the block-level write
    blocks = vitdecomp.decompose(m, x, heads=False)
    split = sum(dec[f"blocks.1.attn.head.{h}"] for h in range(4)) + dec["blocks.1.attn.bias"]
    torch.testing.assert_close(blocks["blocks.1.attn"], split, rtol=1e-10, atol=1e-12)


def test_start_inside_the_blocks_and_refused_in_the_class_tail():
    m = build("xcit_nano_12_p16_224", 64).double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    dec = vitdecomp.decompose(m, x, start=1)
    assert dec.names[0] == "init" and dec.error <= 1e-10
    with pytest.raises(InputError, match=r"start=2: blocks 2\.\.3 of Xcit are class-attention blocks"):
        vitdecomp.decompose(m, x, start=2)


def test_an_unknown_class_block_is_refused_by_name():
    m = build("xcit_nano_12_p16_224", 64)
    m.cls_attn_blocks[1].norm2 = torch.nn.Tanh().eval()  # no longer a block whose rows the derivation knows
    with pytest.raises(UnsupportedModelError,
                       match=r"module model\.cls_attn_blocks\.1 .*xcit\.py.*class-attention block whose parts"):
        vitdecomp.decompose(m, torch.randn(1, 3, 64, 64), adapter="auto")


def test_fused_cross_covariance_attention_matches_the_oracle():
    # timm's experimental fused path: scaled_dot_product_attention(q̂·τ, k̂, v, scale=1) over channels
    m = build("xcit_nano_12_p16_224", 64)
    for blk in list(m.blocks) + list(m.cls_attn_blocks):
        blk.attn.fused_attn = True
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    assert vitdecomp.decompose(m, x, adapter="auto").names.count("blocks.1.attn.head.0") == 1
    testing.check_attributions(m, x, adapter="auto", start=None)
