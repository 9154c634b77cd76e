"""The auto adapter on windowed attention (issue #13): branches that reach the stream through a roll, a padding,
a window partition / reverse and a crop, timm's 2×2 patch merging, on real timm Swin / SwinV2 / SwinV2-Cr
architectures with random weights (small widths, two stages, shifted windows, padded windows)."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

import vitdecomp  # noqa: E402
from vitdecomp import testing  # noqa: E402
from vitdecomp.errors import UnsupportedModelError  # noqa: E402

# grid 10×10 at stage 0 with window 4: padded windows, shifted in block 1; the 5×5 stage 1 pads the merge too
SWIN = {"img_size": 40, "patch_size": 4, "window_size": 4, "embed_dim": 16, "depths": (2, 2), "num_heads": (2, 4)}
MODELS = {
    "swin": ("swin_tiny_patch4_window7_224", SWIN),
    "swinv2": ("swinv2_tiny_window8_256", SWIN),
    "swinv2_cr": ("swinv2_cr_tiny_224", {**SWIN, "img_size": 32}),
    # 16 channels on the 16×16 grid: [B, 16, 16, 16] is NCHW or NHWC by shape alone (the model declares NHWC)
    "swinv2_c16": ("swinv2_tiny_window8_256", {**SWIN, "img_size": 64}),
}


def _model(key, dtype=torch.float32):
    name, kw = MODELS[key]
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, **kw).eval()
    testing.perturb_parameters(m)
    return m.to(dtype)


def _images(key, n=2, dtype=torch.float32):
    s = MODELS[key][1]["img_size"]
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _plugin_name(key, name):
    """The timm-swin plugin's name for an auto component (it says ``stages`` for V1/V2's ``layers``; V2's MLP
    branch is the ``norm2`` module's output, which it calls ``mlp``)."""
    name = name.replace("layers.", "stages.", 1) if name.startswith("layers.") else name
    return name[: -len("norm2")] + "mlp" if key != "swin" and name.endswith(".norm2") else name


@pytest.mark.parametrize("key", list(MODELS))
def test_swin_family_auto_exact_with_heads_and_equal_to_plugin(key):
    m = _model(key)
    x = _images(key)
    dec = vitdecomp.decompose(m, x, adapter="auto", heads=True)
    assert float(dec.error) <= 1e-5
    assert dec.meta["adapter"] == "auto"
    top = "stages" if key == "swinv2_cr" else "layers"
    # heads of the shifted block of stage 0 (padded windows), and of stage 1 after the patch merging
    for blk in (f"{top}.0.blocks.0", f"{top}.0.blocks.1", f"{top}.1.blocks.1"):
        assert f"{blk}.attn.head.0" in dec.names and f"{blk}.attn.bias" in dec.names
    assert f"{top}.1.downsample.norm.bias" in dec.names
    assert m.layers[0].blocks[1].shift_size != (0, 0) if key != "swinv2_cr" else \
        m.stages[0].blocks[1].shift_size != (0, 0)

    # float64: exact to 1e-10, and every component equals the timm-swin plugin's (names mapped)
    m64, x64 = m.double(), x.double()
    auto = vitdecomp.decompose(m64, x64, adapter="auto", heads=True)
    plug = vitdecomp.decompose(m64, x64, adapter="timm-swin", heads=True)
    assert float(auto.error) <= 1e-10
    mapped = {_plugin_name(key, n): n for n in auto.names}
    assert set(mapped) == set(plug.names), set(mapped) ^ set(plug.names)
    for pn, an in mapped.items():
        a, p = auto[an], plug[pn]
        assert float((a - p).norm()) <= 1e-10 * max(float(p.norm()), float(plug.representation.norm()) * 1e-3), (an, pn)


@pytest.mark.parametrize("key", list(MODELS))
def test_swin_family_auto_attributions(key):
    m = _model(key)
    res = testing.check_attributions(m, _images(key, 1), adapter="auto", start=2)  # and from block 2 (stage 1)
    assert res and all(worst <= 1e-6 for _, worst, _ in res)
    assert sum(checked for _, _, checked in res) > 0  # token splits (heads at their query rows) were compared


def test_window_branch_without_head_split_is_one_write(monkeypatch):
    """When proj does not split the heads, the attention module's output (in window order) is one write placed
    by the same row map (``Graph.branch(..., rows=)``)."""
    from vitdecomp.graph import _autowindow

    monkeypatch.setattr(_autowindow, "_heads_proj", lambda mod: None)
    m = _model("swin")
    x = _images("swin")
    dec = vitdecomp.decompose(m, x, adapter="auto", heads=True)
    assert float(dec.error) <= 1e-5
    assert "layers.0.blocks.1.attn" in dec.names and not any(".head." in n for n in dec.names)
    testing.check_attributions(m, x[:1], adapter="auto", tokens=False, start=None)
    # token detail on the stage grid sums to each write
    tok = vitdecomp.decompose(m, x, adapter="auto", heads=True, tokens="source")
    testing.check_token_sums(tok)


def test_row_map_refuses_a_step_that_computes():
    """A "row step" that changes values (here a flip of the sign) is no row permutation: named as such."""
    from vitdecomp.graph._autowindow import _source_rows

    C = 3
    idx = torch.arange(4 * C, dtype=torch.float64).reshape(4, C) + 1
    rnd = torch.randn(4, C, dtype=torch.float64)
    assert torch.equal(_source_rows(idx.flip(0), rnd.flip(0), rnd, C), torch.tensor([3, 2, 1, 0]))
    assert isinstance(_source_rows(-idx, -rnd, rnd, C), str)
    assert isinstance(_source_rows(idx.flip(1), rnd.flip(1), rnd, C), str)  # channels moved


def _poolformer(dtype=torch.float32):
    """poolformer_s12's architecture (timm's MetaFormer with its arguments), narrower and shallower."""
    from timm.layers import GroupNorm1
    from timm.models.metaformer import MetaFormer

    torch.manual_seed(0)
    m = MetaFormer(depths=(2, 1, 1, 1), dims=(24, 32, 48, 64), downsample_norm=None, mlp_act=torch.nn.GELU,
                   mlp_bias=True, norm_layers=GroupNorm1, layer_scale_init_values=1e-5, res_scale_init_values=None,
                   use_mlp_head=False).eval()
    testing.perturb_parameters(m)
    return m.to(dtype)


def test_metaformer_poolformer_auto_exact_groupnorm_inside_branches():
    """PoolFormer's GroupNorm (GroupNorm1, norm1 / norm2) sits inside the branches, so each block is two writes
    named by their modules (``token_mixer``, ``mlp``; MetaFormer's ``Scale`` layer scale is their γ, the
    Identity ``res_scale`` on the stream is followed)."""
    m = _poolformer()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    dec = vitdecomp.decompose(m, x, adapter="auto")
    assert float(dec.error) <= 1e-5
    assert "stages.0.blocks.1.token_mixer" in dec.names and "stages.3.blocks.0.mlp" in dec.names
    m64 = m.double()
    assert float(vitdecomp.decompose(m64, x.double(), adapter="auto").error) <= 1e-10
    testing.check_attributions(m, x[:1], adapter="auto", tokens=False)


@pytest.mark.parametrize("groups", [1, 4])
def test_groupnorm_on_the_stream_is_exact(groups):
    """A GroupNorm on the stream (here before a downsampling conv; 1 and 4 groups, perturbed γ and β) is frozen
    at the forward's per-image, per-group statistics and carried forward: every write is centred by its own group
    mean over all positions, β is the constant ``<path>.bias``; exact, and each component equals the attribution
    oracle's; token detail is refused by name."""
    m = _poolformer()
    gn = torch.nn.GroupNorm(groups, 24).eval()
    with torch.no_grad():
        gn.weight.copy_(1 + 0.3 * torch.randn(24))
        gn.bias.copy_(0.5 * torch.randn(24))
    m.stages[1].downsample.norm = gn
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    dec = vitdecomp.decompose(m, x, adapter="auto")
    assert float(dec.error) <= 1e-5
    assert "stages.1.downsample.norm.bias" in dec.names
    i = dec.names.index("stages.1.downsample.norm.bias")
    assert dec.components[i].kind == "const"
    assert float(dec.contributions[:, i].norm()) > 1e-3  # β reaches z
    m64, x64 = m.double(), x.double()
    dec64 = vitdecomp.decompose(m64, x64, adapter="auto")
    assert float(dec64.error) <= 1e-10
    testing.check_attributions(m64, x64[:1], adapter="auto", tokens=False)
    with pytest.raises(UnsupportedModelError, match=r"stages\.1\.downsample\.norm.*GroupNorm"):
        vitdecomp.decompose(m64, x64, adapter="auto", tokens="source")


def test_groupnorm_on_a_channels_last_stream_is_refused_by_name():
    m = _poolformer()
    # a GroupNorm on the channels-last stream [B, H, W, C] (16 × 16 × 24 here) takes H as its channel axis
    m.stages[1].downsample.norm = torch.nn.Sequential(_ToNHWC(), torch.nn.GroupNorm(1, 16), _ToNCHW()).eval()
    with pytest.raises(UnsupportedModelError, match=r"GroupNorm reading the stream in a layout other than"):
        vitdecomp.decompose(m, torch.randn(1, 3, 64, 64), adapter="auto")


class _ToNHWC(torch.nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


class _ToNCHW(torch.nn.Module):
    def forward(self, x):
        return x.permute(0, 3, 1, 2)


def test_davit_window_heads_and_channel_attention():
    """DaViT: spatial blocks (window attention, padded to whole windows, reversed and cropped) split into heads;
    the channel attention (softmax(kᵀv) applied to q: no head split at proj's input) one write; the conv
    position encodings ``x + proj(x)`` inside each block are writes of their own."""
    torch.manual_seed(0)
    m = timm.create_model("davit_tiny", pretrained=False, depths=(1, 1, 1, 1), embed_dims=(24, 48, 72, 96),
                          num_heads=(1, 2, 3, 4)).eval()
    testing.perturb_parameters(m)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    dec = vitdecomp.decompose(m, x, adapter="auto", heads=True)
    assert float(dec.error) <= 1e-5
    assert "stages.1.blocks.0.0.attn.head.1" in dec.names  # spatial (window) attention
    assert "stages.1.blocks.0.1.attn" in dec.names  # channel attention, one write
    assert "stages.0.blocks.0.0.cpe1.proj" in dec.names
    assert float(vitdecomp.decompose(m.double(), x.double(), adapter="auto").error) <= 1e-10
    res = testing.check_attributions(m.float(), x[:1], adapter="auto")
    assert sum(c for _, _, c in res) > 0


def test_gcvit_global_query_is_a_side_input_of_the_blocks():
    """GCViT computes a global query from each stage's input (MBConvs, max-pools) and feeds it to every block's
    attention: a side input of those writes, not a step on the stream. Its blocks write in window order (the
    block is traced through, its window reverse read as a row map; its LayerScale after the reverse is the heads'
    γ)."""
    torch.manual_seed(0)
    from timm.models.gcvit import GlobalContextVit

    # gcvit_xxtiny's architecture, shallower and narrower, with a LayerScale
    m = GlobalContextVit(img_size=64, depths=(2, 1, 2, 1), num_heads=(2, 4, 8, 16), embed_dim=32,
                         layer_scale=0.5).eval()
    testing.perturb_parameters(m)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    dec = vitdecomp.decompose(m, x, adapter="auto", heads=True)
    assert float(dec.error) <= 1e-5
    assert "stages.0.blocks.1.attn.head.1" in dec.names and "stages.2.blocks.1.mlp" in dec.names
    # the MBConv of a stage's downsample is a residual on the stream (x + conv_pw(...))
    assert "stages.1.downsample.conv_block.conv_pw" in dec.names
    # its downsample convs are padded: token detail is refused by name; contributions are oracle-checked
    with pytest.raises(UnsupportedModelError, match=r"token detail.*stages\.1\.downsample\.reduction"):
        vitdecomp.decompose(m, x, adapter="auto", tokens="source")
    testing.check_attributions(m, x, adapter="auto", tokens=False)


def test_swin_auto_on_simulated_cuda():
    """The row maps are read on host probes, so the derivation also runs while the model is on (simulated) CUDA
    tensors, without a host synchronisation."""
    testing.check_cuda_placement(_model("swinv2"), (40, 40), adapter="auto",
                                 granularities=({"heads": True}, {"heads": True, "tokens": "source"}))
