"""The auto adapter on staged (hierarchical) timm models: grid streams between stages, patch / overlapping
convolutions, norms on the stream, residual adds outside the blocks."""

import pytest
import timm
import torch

import vitdecomp
from vitdecomp import InputError, UnsupportedModelError, testing


def images(dtype=torch.float64, n=2, size=64):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=dtype)


def focalnet(**kw):
    from timm.models.focalnet import FocalNet

    return testing.perturb_parameters(FocalNet(**{"depths": (1, 2, 1, 1), "embed_dim": 24, **kw}).eval())


#: (model, image size, names that must be components, heads split somewhere)
STAGED = [
    ("pvt_v2_b0", dict(depths=(1, 1, 1, 1)), 64,  # overlapping 3×3 stride-2 patch embeds, sub-sampled attention
     {"stages.1.blocks.0.mlp", "stages.1.downsample.proj.bias", "stages.2.blocks.0.attn.head.1", "stages.3.norm.bias"}),
    ("twins_pcpvt_small", dict(img_size=64, depths=(1, 1, 1, 1)), 64,  # position conv: a residual outside blocks
     {"pos_block.0.proj.0", "patch_embeds.1.proj.bias", "blocks.1.0.attn.head.1", "blocks.2.0.mlp"}),
    ("edgenext_xx_small", {}, 64,  # norm before a 2×2 patch conv; branches permuted back to NCHW
     {"stages.1.downsample.0.bias", "stages.1.downsample.1.bias", "stages.2.blocks.1.mlp"}),
    ("visformer_tiny", dict(img_size=64), 64,  # eval BatchNorm on the grid, position tables added on the stream
     {"patch_embed2.proj.bias", "patch_embed2.norm.bias", "pos_embed2", "stage2.0.attn.head.2", "stage3.0.mlp"}),
]


@pytest.mark.parametrize("name,kw,size,expect", STAGED, ids=[s[0] for s in STAGED])
def test_staged_timm_models_exact_with_module_path_names(name, kw, size, expect):
    model = testing.perturb_parameters(timm.create_model(name, pretrained=False, **kw).eval())
    f32 = vitdecomp.decompose(model, images(torch.float32, size=size), adapter="auto")
    assert f32.error <= 1e-5 and expect <= set(f32.names), (f32.error, f32.names)
    assert vitdecomp.choose_adapter(model).name == "auto"
    f64 = vitdecomp.decompose(model.double(), images(size=size), adapter="auto", heads=False)
    assert f64.error <= 1e-10
    paper = vitdecomp.decompose(model, images(size=size), adapter="auto", bias="paper")
    assert paper.error <= 1e-10 and not [c for c in paper.components if c.kind == "const"]


def test_focalnet_patch_convs_exact_with_tokens_on_each_stage_grid():
    model = focalnet()
    dec = vitdecomp.decompose(model, images(torch.float32), adapter="auto")
    assert dec.error <= 1e-5
    model = model.double()
    dec = vitdecomp.decompose(model, images(), adapter="auto", tokens="source")
    assert dec.error <= 1e-10 and dec.meta["adapter"] == "auto"
    assert {"embed", "layers.1.downsample.proj.bias", "layers.1.downsample.norm.bias", "layers.1.blocks.1.modulation",
            "layers.3.blocks.0.mlp", "norm.bias"} <= set(dec.names)
    testing.check_token_sums(dec)
    grid = dec.grid_of("layers.2.blocks.0.mlp")
    assert (grid.h, grid.w) == (4, 4) and dec.token_contributions("layers.2.blocks.0.mlp").shape[1] == 16
    assert (dec.grid.h, dec.grid.w) == (16, 16)  # the first stage's grid
    start = vitdecomp.decompose(model, images(), adapter="auto", start=2)
    assert start.names[0] == "init" and start.error <= 1e-10


def test_patch_convs_on_odd_grids_drop_the_positions_they_never_read():
    # 76 px: a 19×19 first stage; each 2×2 conv reads 18×18 of it (floor), the rest reach z by no path
    model = focalnet(depths=(1, 1, 1, 1)).double()
    x = images(size=76)
    for kw in ({"tokens": "source"}, {"tokens": "source", "bias": "paper"}):
        dec = vitdecomp.decompose(model, x, adapter="auto", **kw)
        assert dec.error <= 1e-10
        testing.check_token_sums(dec)
    assert (dec.grid_of("layers.1.blocks.0.mlp").h, dec.grid.h) == (9, 19)
    res = testing.check_attributions(model.float(), x[:1].float(), adapter="auto", start=None)
    assert res and all(err <= 1e-6 for _, err, _ in res) and res[0][2] > 0, res


def test_overlapping_convs_carry_the_writes_forward_and_refuse_token_detail():
    # FocalNet with overlapping downsampling convs (3×3 stride 2, padding 1): the general mixer, same model
    model = focalnet(use_overlap_down=True).double()
    dec = vitdecomp.decompose(model, images(), adapter="auto")
    assert dec.error <= 1e-10 and "layers.2.downsample.proj.bias" in dec.names
    ref = vitdecomp.decompose(model, images(), adapter="auto", heads=False)
    assert torch.allclose(dec.contributions.sum(1), ref.contributions.sum(1), atol=1e-10)
    with pytest.raises(UnsupportedModelError, match=r"token detail .*layers.1.downsample.proj.*overlapping"):
        vitdecomp.decompose(model, images(), adapter="auto", tokens="source")


def test_staged_attributions_match_the_oracle():
    res = testing.check_attributions(focalnet(), images(torch.float32, 1), adapter="auto")
    assert res and all(err <= 1e-6 for _, err, _ in res) and res[0][2] > 0, res
    pvt = testing.perturb_parameters(timm.create_model("pvt_v2_b0", pretrained=False, depths=(1, 1, 1, 1)).eval())
    res = testing.check_attributions(pvt, images(torch.float32, 1), adapter="auto", tokens=False)
    assert res and all(err <= 1e-6 for _, err, _ in res), res


def test_visformer_conv_projection_splits_heads_at_their_query_rows():
    # a 1×1-conv qkv / proj on [B, C, H, W]: heads are channel groups of proj's input (oracle: next test)
    model = testing.perturb_parameters(timm.create_model("visformer_tiny", pretrained=False, img_size=64).eval())
    model = model.double()
    dec = vitdecomp.decompose(model, images(), adapter="auto", tokens="source")
    assert dec.error <= 1e-10 and dec.meta["head_tokens"] == "query"
    assert {f"stage{s}.{b}.attn.head.{h}" for s in (2, 3) for b in range(4) for h in range(3)} <= set(dec.names)
    assert not [n for n in dec.names if n.endswith("attn")]  # proj has no bias: no attn.bias component
    testing.check_token_sums(dec)
    grid = dec.grid_of("stage3.1.attn.head.0")
    assert (grid.h, grid.w) == (2, 2) and dec.token_contributions("stage3.1.attn.head.0").shape[1] == 4
    ref = vitdecomp.decompose(model, images(), adapter="auto", heads=False)
    for blk in ("stage2.0.attn", "stage3.3.attn"):
        heads = sum(dec.contributions[:, dec.names.index(f"{blk}.head.{h}")] for h in range(3))
        assert torch.allclose(heads, ref.contributions[:, ref.names.index(blk)], atol=1e-12)


def test_batchnorm_transitions_match_the_oracle():
    # eval BatchNorm on the stream: its constant β − γ·μ/σ is attributed by the oracle through the running mean;
    # Visformer's position tables are written on the NCHW grid, its conv-projection heads at their query rows
    vis = testing.perturb_parameters(timm.create_model("visformer_tiny", pretrained=False, img_size=64).eval())
    res = testing.check_attributions(vis, images(torch.float32, 1), adapter="auto", start=None)
    assert res and all(err <= 1e-6 for _, err, _ in res) and res[0][2] > 0, res
    from timm.models.efficientformer import EfficientFormer

    eff = EfficientFormer(depths=(1, 1, 1, 2), embed_dims=(16, 24, 32, 48), num_vit=1)
    eff = testing.perturb_parameters(eff.eval())
    res = testing.check_attributions(eff, images(torch.float32, 1, size=224), adapter="auto", tokens=False, start=None)
    assert res and all(err <= 1e-6 for _, err, _ in res), res


def test_conformance_kit_on_a_staged_model():
    results = testing.run_conformance(focalnet(), (64, 64), adapter="auto", fixed_size=False,
                                      reference=lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True))
    worst = {dt: max(e for d, _, e in results if d == dt) for dt in (torch.float32, torch.float64)}
    assert worst[torch.float32] <= 1e-5 and worst[torch.float64] <= 1e-10, worst


def test_efficientformer_batchnorm_downsampling_and_flat_tail():
    # 3×3 stride-2 conv + eval BatchNorm between stages; the last stage flattens to tokens (a Flat member of its
    # blocks list) and ends in attention blocks on [B, N, C]
    from timm.models.efficientformer import EfficientFormer

    model = testing.perturb_parameters(EfficientFormer(depths=(1, 1, 1, 2), embed_dims=(16, 24, 32, 48),
                                                       num_vit=1).eval()).double()
    dec = vitdecomp.decompose(model, images(size=224, n=1), adapter="auto")
    assert dec.error <= 1e-10
    assert {"stages.1.downsample.conv.bias", "stages.1.downsample.norm.bias", "stages.0.blocks.0.token_mixer",
            "stages.3.blocks.2.token_mixer.head.0", "norm.bias"} <= set(dec.names), dec.names


def test_staged_refusals_name_the_operation_module_and_source_line():
    # TinyViT's MBConv applies an activation after its residual add: on the stream's own path, refused
    from timm.models.tiny_vit import TinyVit

    model = TinyVit(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4), window_sizes=(2, 2, 2, 2))
    with pytest.raises(UnsupportedModelError) as exc:
        vitdecomp.decompose(model.eval(), images(torch.float32), adapter="auto")
    msg = str(exc.value)
    assert "stages.0.blocks.0.act3" in msg and "tiny_vit.py" in msg and "x = self.act3(x)" in msg, msg
    # DaViT's downsample pads an odd side before its stride-2 conv (a 9×9 grid at 72 px): a padding on the
    # stream that is no window partition or patch merging (Swin's window attention, once refused here, is
    # decomposed: tests/test_auto_window.py)
    davit = timm.create_model("davit_tiny", pretrained=False, depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64),
                              num_heads=(1, 2, 3, 4)).eval()
    with pytest.raises(UnsupportedModelError, match=r"call_function pad .*davit.py.*F.pad\(x.*pads the stream"):
        vitdecomp.decompose(davit, images(torch.float32, size=72), adapter="auto")


def test_batchnorm_without_running_statistics_on_the_stream_is_refused():
    # in eval mode such a BatchNorm normalises by the batch's statistics: no fixed affine map, so it is refused by
    # name instead of being frozen (it used to reach the affine freeze and fail on running_var None)
    model = timm.create_model("visformer_tiny", pretrained=False, img_size=64).eval()
    model.norm = torch.nn.BatchNorm2d(model.norm.num_features, track_running_stats=False).eval()
    with pytest.raises(UnsupportedModelError, match=r"module norm .*BatchNorm2d"):
        vitdecomp.decompose(model, images(torch.float32), adapter="auto")


def test_staged_bad_image_size_is_an_input_error():
    model = testing.perturb_parameters(timm.create_model("visformer_tiny", pretrained=False, img_size=64).eval())
    with pytest.raises(InputError, match=r"size 96×96"):
        vitdecomp.decompose(model, images(torch.float32, size=96), adapter="auto")


def twins_svt():
    return testing.perturb_parameters(timm.create_model(
        "twins_svt_small", pretrained=False, img_size=64, depths=(2, 1, 1, 1), embed_dims=(32, 64, 96, 128),
        num_heads=(2, 2, 4, 4)).eval())


def test_twins_svt_locally_grouped_attention_splits_heads_after_the_window_reverse():
    # 7×7 windows on 16×16 … 2×2 grids (zero-padded to whole windows, cropped after the reverse), a Linear proj
    model = twins_svt()
    f32 = vitdecomp.decompose(model, images(torch.float32), adapter="auto")
    assert f32.error <= 1e-5
    model = model.double()
    dec = vitdecomp.decompose(model, images(), adapter="auto", tokens="source")
    assert dec.error <= 1e-10
    assert {"blocks.0.0.attn.head.1", "blocks.0.0.attn.bias", "blocks.3.0.attn.head.3", "blocks.0.1.attn.head.1"} \
        <= set(dec.names), dec.names
    testing.check_token_sums(dec)
    ref = vitdecomp.decompose(model, images(), adapter="auto", heads=False)
    for blk, H in (("blocks.0.0.attn", 2), ("blocks.2.0.attn", 4)):
        parts = sum(dec.contributions[:, dec.names.index(f"{blk}.head.{h}")] for h in range(H))
        parts = parts + dec.contributions[:, dec.names.index(f"{blk}.bias")]
        assert torch.allclose(parts, ref.contributions[:, ref.names.index(blk)], atol=1e-12)
    # the oracle places the sub-sampled (global) heads' sources nowhere: token splits unchecked, as for PVTv2
    res = testing.check_attributions(model.float(), images(torch.float32, 1), adapter="auto", tokens=False, start=None)
    assert res and all(err <= 1e-6 for _, err, _ in res), res


class _GroupedAttention(torch.nn.Module):
    """A minimal attention with a size argument; ``mode``: "groups" (heads contiguous channel groups of proj's
    input), "interleaved" (channels dh-major, d·H + h) or "nhwc" (groups, but proj applied on [B, h, w, C])."""

    def __init__(self, mode):
        super().__init__()
        self.num_heads, self.mode = 2, mode
        self.qkv, self.proj = torch.nn.Linear(8, 24), torch.nn.Linear(8, 8)

    def forward(self, x, size):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, 2, C // 2).permute(2, 0, 3, 1, 4).unbind(0)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        o = o.permute(0, 2, 3, 1) if self.mode == "interleaved" else o.permute(0, 2, 1, 3)
        return self.proj(o.reshape(B, size[0], size[1], C) if self.mode == "nhwc" else o.reshape(B, N, C))


def test_grouped_heads_recogniser_reads_the_channel_order_and_the_rows():
    from vitdecomp.graph._autostage import _proj_of_grouped_heads

    ok = _GroupedAttention("groups")
    assert _proj_of_grouped_heads(ok, 2, 3) is ok.proj
    assert _proj_of_grouped_heads(_GroupedAttention("interleaved"), 2, 3) is None
    assert _proj_of_grouped_heads(_GroupedAttention("nhwc"), 2, 3) is None
