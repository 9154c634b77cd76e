"""The auto adapter through linear shortcut paths on the residual stream: a residual add whose stream operand is
the stream through pools, convolutions, linear layers and norms (CoAtNet's strided MBConv / transformer
shortcuts, MViTv2's ``shortcut_proj_attn`` + ``shortcut_pool_attn``), max-pooling at the forward's own indices
(MViTv2's MaxPool2d, Hiera's max over its unrolled mask units), and the refusals that remain."""

import dataclasses

import pytest
import timm
import torch

import vitdecomp
from vitdecomp import UnsupportedModelError, testing
from vitdecomp.graph import _shortcut


def images(dtype=torch.float64, n=2, size=64, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _coatnet():
    # CoAtNet-nano's layout (MBConv, MBConv, transformer, transformer stages) at small widths; stage widths differ
    # from the grid sides (the oracle reads a [1, C, h, w] write as NHWC when C equals h)
    from timm.models.maxxvit import MaxxVit, model_cfgs

    c = model_cfgs["coatnet_nano_rw"]
    return MaxxVit(dataclasses.replace(c, embed_dim=(24, 32, 48, 64), depths=(1, 2, 2, 1), stem_width=16,
                                       transformer_cfg=dataclasses.replace(c.transformer_cfg, dim_head=16)),
                   img_size=64)


def _mvitv2():
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    return MultiScaleVit(MultiScaleVitCfg(depths=(1, 2, 1, 1), embed_dim=32, num_heads=1), img_size=64)


BUILD = {
    "coatnet_nano_rw_224": _coatnet,
    "mvitv2_tiny": _mvitv2,
    "hiera_tiny_224": lambda: timm.create_model("hiera_tiny_224", img_size=64, embed_dim=32, stages=(1, 2, 2, 1)),
    "levit_128s": lambda: timm.create_model("levit_128s", img_size=64),
}


def model(name):
    """The architecture of timm's ``name`` at small sizes, random weights perturbed."""
    return testing.perturb_parameters(BUILD[name]().eval())


def mvit():
    return model("mvitv2_tiny")


def attributions_ok(res):
    return bool(res) and all(err <= 1e-6 for _, err, _ in res)


# (model, names that must be components: transitions' constants, heads where the attention is a standard one)
CASES = [
    ("coatnet_nano_rw_224", {"stages.0.blocks.0.shortcut.expand.bias", "stages.1.blocks.0.shortcut.expand.bias",
                             "stages.1.blocks.1.conv3_1x1", "stages.2.blocks.1.attn.head.2", "stages.2.blocks.0.attn.bias",
                             "stages.3.blocks.0.mlp", "norm.bias"}),
    ("mvitv2_tiny", {"stages.1.blocks.0.norm1.bias", "stages.1.blocks.0.shortcut_proj_attn.bias",
                     "stages.1.blocks.0.attn", "stages.1.blocks.1.mlp", "stages.3.blocks.0.mlp",
                     "norm.bias"}),
    ("hiera_tiny_224", {"blocks.1.norm1.bias", "blocks.1.proj.bias", "blocks.1.attn", "blocks.4.attn.head.3",
                        "blocks.5.attn.head.7", "blocks.5.proj.bias", "head.norm.bias"}),
]


@pytest.mark.parametrize("name,expect", CASES, ids=[c[0] for c in CASES])
def test_shortcut_models_exact_in_both_precisions_with_module_path_names(name, expect):
    m = model(name)
    f32 = vitdecomp.decompose(m, images(torch.float32), adapter="auto")
    assert f32.error <= 1e-5 and expect <= set(f32.names), (f32.error, sorted(expect - set(f32.names)))
    assert vitdecomp.choose_adapter(m).name == "auto"  # (timm-maxvit declines CoAtNet's MBConv stages)
    m = m.double()
    f64 = vitdecomp.decompose(m, images(), adapter="auto")
    assert f64.error <= 1e-10
    blocks = vitdecomp.decompose(m, images(), adapter="auto", heads=False)
    assert torch.allclose(blocks.contributions.sum(1), f64.contributions.sum(1), atol=1e-10)
    paper = vitdecomp.decompose(m, images(), adapter="auto", bias="paper")
    assert paper.error <= 1e-10 and not [c for c in paper.components if c.kind == "const"]
    cut = vitdecomp.decompose(m, images(), adapter="auto", start=2)  # a cut after a transition
    assert cut.names[0] == "init" and cut.error <= 1e-10


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_shortcut_models_match_the_attribution_oracle(name):
    m = model(name)
    res = testing.check_attributions(m, images(torch.float32, 1), adapter="auto", tokens=name.startswith("coat"),
                                     start=2)
    assert attributions_ok(res), res


def test_coatnet_patch_shortcuts_keep_token_detail():
    # 2×2 average pool + 1×1 conv: patch convolutions, so token detail lives on each stage's grid
    m = model("coatnet_nano_rw_224").double()
    dec = vitdecomp.decompose(m, images(), adapter="auto", tokens="source")
    assert dec.error <= 1e-10
    testing.check_token_sums(dec)
    grid = dec.grid_of("stages.2.blocks.0.attn.head.0")
    assert dec.token_contributions("stages.2.blocks.0.attn.head.0").shape[1] == grid.h * grid.w == 16
    assert (dec.grid_of("stages.0.blocks.0.conv3_1x1").h, dec.grid.h) == (16, 32)


def test_maxpool_on_the_stream_with_ties_is_exact_and_matches_the_oracle():
    # a constant image makes every position of MViTv2's stream equal (ties everywhere in the shortcut's max
    # pool); a tiny perturbation of it makes near-ties. The pool's own indices (return_indices on the same
    # input) route every write, so the decomposition stays exact and agrees with autograd's routing.
    m = mvit().double()
    flat = torch.zeros(2, 3, 64, 64, dtype=torch.float64)
    near = flat + 1e-9 * images()
    for x in (flat, near):
        dec = vitdecomp.decompose(m, x, adapter="auto")
        assert dec.error <= 1e-10, dec.error
        res = testing.check_attributions(m, x[:1], adapter="auto", tokens=False, start=None)
        assert attributions_ok(res), res


def test_hiera_group_max_with_ties_is_exact_and_matches_the_oracle():
    m = model("hiera_tiny_224").double()
    for x in (torch.zeros(2, 3, 64, 64, dtype=torch.float64), 1e-9 * images()):
        dec = vitdecomp.decompose(m, x, adapter="auto")
        assert dec.error <= 1e-10, dec.error
        res = testing.check_attributions(m, x[:1], adapter="auto", tokens=False, start=None)
        assert attributions_ok(res), res


def test_group_max_map_splits_ties_as_amax_gradient_does():
    # the recorded map of x.view(B, s, -1, C).amax(1) against autograd's own gradient of amax
    x = torch.tensor([[[1.0, 2.0], [3.0, 2.0], [3.0, 5.0], [0.0, 2.0]]], dtype=torch.float64)  # [1, 4, 2]
    gm = _shortcut.GroupMaxMap(None, 2)

    class Rec:
        pass

    class Hooks:
        def post(self, module, fn):
            fn(x)

    rec = Rec()
    gm.install(Hooks(), rec)
    u = torch.randn(1, 1, 4, 2, dtype=torch.float64)
    y = gm.forward_fn(rec)(u)
    xx = x.clone().requires_grad_(True)
    out = xx.view(1, 2, -1, 2).amax(dim=1)
    for r in range(2):
        for c in range(2):
            g, = torch.autograd.grad(out[0, r, c], xx, retain_graph=True)
            assert torch.allclose(y[0, 0, r, c], (g[0] * u[0, 0]).sum())
    assert torch.allclose(gm.forward_fn(rec)(x.unsqueeze(1))[0, 0], x.view(1, 2, -1, 2).amax(1)[0])


def test_maxpool_map_uses_the_forward_indices():
    pool = torch.nn.MaxPool2d(3, 2, 1)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    x[:, :, 0, 0] = x[:, :, 0, 1]  # a tie inside a window
    rec = type("Rec", (), {})()

    class Hooks:
        def pre(self, module, fn):
            fn(x)

    mp = _shortcut.MaxPoolMap(pool)
    mp.install(Hooks(), rec)
    y = mp.forward_fn(rec)(x.flatten(2).transpose(1, 2).unsqueeze(1))  # the map applied to the input itself
    assert torch.equal(y[:, 0].transpose(1, 2).reshape(2, 4, 3, 3), pool(x))


def test_token_detail_through_a_max_pool_is_refused_by_name():
    with pytest.raises(UnsupportedModelError, match=r"stages.1.blocks.0.shortcut_pool_attn .*MaxPool2d"):
        vitdecomp.decompose(mvit(), images(torch.float32), adapter="auto", tokens="source")
    with pytest.raises(UnsupportedModelError, match=r"blocks.1 of Hiera.*max over groups"):
        vitdecomp.decompose(model("hiera_tiny_224"), images(torch.float32), adapter="auto", tokens="source")


def test_a_step_that_is_not_linear_on_the_stream_still_refuses_with_its_name():
    # LeViT's attention downsample replaces the stream by an attention without a shortcut: named, with its line
    m = model("levit_128s")
    with pytest.raises(UnsupportedModelError) as exc:
        vitdecomp.decompose(m, images(torch.float32), adapter="auto")
    msg = str(exc.value)
    assert "inside module stages.1.downsample.attn_downsample" in msg and "levit.py" in msg and "not linear" in msg, msg
    # an activation on CoAtNet's shortcut: the add's stream operand is no longer reached through freezable steps
    m = model("coatnet_nano_rw_224")
    blk = m.stages[1].blocks[0]
    blk.shortcut.expand = torch.nn.Sequential(blk.shortcut.expand, torch.nn.GELU()).eval()
    with pytest.raises(UnsupportedModelError, match=r"stages.1.blocks.0.shortcut.pool .*second reader"):
        vitdecomp.decompose(m, images(torch.float32), adapter="auto")


def test_nextvit_channel_concatenation_of_the_stream_and_a_projected_branch():
    # NextViT's transformer block: x = cat([x, projection(x) + mhca(projection(x))], channels); the projection
    # (1×1 conv + BatchNorm) is a shortcut path, the concatenation two channel selections of the new stream
    m = testing.perturb_parameters(timm.create_model("nextvit_small", pretrained=False, depths=(1, 4, 5, 1)).eval())
    f32 = vitdecomp.decompose(m, images(torch.float32, size=32), adapter="auto")
    assert f32.error <= 1e-5
    assert {"stages.1.blocks.3.projection.norm.bias", "stages.1.blocks.3.mhca",
            "stages.1.blocks.3.e_mhsa.head.0", "stages.2.blocks.4.e_mhsa.bias", "stages.3.blocks.0.mlp"} \
        <= set(f32.names), f32.names
    dec = vitdecomp.decompose(m.double(), images(size=32), adapter="auto", bias="paper", tokens="source")
    assert dec.error <= 1e-10 and not [c for c in dec.components if c.kind == "const"]
    for name in ("stages.1.blocks.3.mhca", "stages.0.blocks.0.mhca"):  # a write beside the
        tok = dec.token_contributions(name)  # concatenation, and one whose stream feeds it
        assert torch.allclose(tok.sum(1), dec.contributions[:, dec.names.index(name)], atol=1e-10)
    # the oracle cannot place the spatially reduced attention's source splits: totals only
    res = testing.check_attributions(m, images(torch.float32, 1, size=32), adapter="auto", tokens=False, start=None)
    assert attributions_ok(res), res


def test_maxvit_in_auto_follows_the_strided_mbconv_shortcut():
    # MaxViT's MBConv with stride (2×2 average pool + 1×1 conv shortcut) through the auto adapter (the timm-maxvit
    # plugin handles MaxViT by dispatch); its block / grid attention reaches the stream through the window walk
    from timm.models.maxxvit import MaxxVit, model_cfgs

    cfg = dataclasses.replace(model_cfgs["maxvit_rmlp_pico_rw"], depths=(1, 1, 1, 1))
    m = testing.perturb_parameters(MaxxVit(cfg, img_size=64).eval())
    f32 = vitdecomp.decompose(m, images(torch.float32), adapter="auto")
    assert f32.error <= 1e-5
    assert {"stages.0.blocks.0.conv.conv3_1x1", "stages.1.blocks.0.conv.conv3_1x1",
            "stages.1.blocks.0.attn_grid.mlp"} <= set(f32.names), f32.names
    assert vitdecomp.decompose(m.double(), images(), adapter="auto").error <= 1e-10
    res = testing.check_attributions(m, images(torch.float32, 1), adapter="auto", tokens=False, start=None)
    assert attributions_ok(res), res
