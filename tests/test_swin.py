"""The timm Swin (V1 / V2 / V2-Cr) plugin: conformance, options, and spatial maps checked against brute force.

Tiny real timm architectures with random weights and perturbed norms. The brute-force maps do not use the plugin:
they freeze every norm at its forward statistics and every branch at its forward output (hooks on the model's own
modules), add one component's value at one image position (through the model's own roll / window reverse /
patch merging), and read the change in z — one batch row per position.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

timm = pytest.importorskip("timm")

import vitdecomp  # noqa: E402
from vitdecomp import testing  # noqa: E402
from vitdecomp.errors import InputError, UnsupportedModelError  # noqa: E402
from vitdecomp_plugins.swin import TimmSwinAdapter  # noqa: E402

IMG = (32, 40)  # non-square, and odd stage grids (8×10 → 4×5 → 2×3): window padding and merge padding




def _ref(m, x):
    return m.forward_head(m.forward_features(x), pre_logits=True)


@functools.lru_cache(maxsize=None)
def _build(arch: str, window: int = 2, img=IMG):
    torch.manual_seed(0)
    m = timm.create_model(arch, pretrained=False, img_size=img, window_size=window, embed_dim=16, depths=(2, 2, 2),
                          num_heads=(2, 2, 4), num_classes=7).eval()
    testing.perturb_parameters(m)
    return m


def model(kind: str = "v1", **kw):
    arch = {"v1": "swin_tiny_patch4_window7_224", "v2": "swinv2_tiny_window8_256", "cr": "swinv2_cr_tiny_224"}[kind]
    return copy.deepcopy(_build(arch, **kw))


# ------------------------------------------------------------------------------------------------ conformance
@pytest.mark.parametrize("kind", ["v1", "v2", "cr"])
def test_conformance(kind):
    # Swin components live on their own stage's grid (dec.grid_of(name)); the kit checks token sums there.
    results = testing.run_conformance(model(kind), IMG, reference=_ref)
    f32 = max(e for dt, _, e in results if dt == torch.float32)
    f64 = max(e for dt, _, e in results if dt == torch.float64)
    assert f32 <= 1e-5 and f64 <= 1e-10


def test_adapter_dispatch_and_readout():
    m = model("v1")
    ad = vitdecomp.find_adapter(m)
    assert isinstance(ad, TimmSwinAdapter) and ad.name == "timm-swin" and ad.families == ("Swin", "SwinV2", "SwinV2-Cr")
    assert ad.readout(m) is m.head.fc
    assert ad.middle_start(m) == 3
    assert vitdecomp.find_adapter(model("v2")).name == "timm-swin"


def test_wrong_image_size_names_both_sizes():
    m = model("v1")
    with pytest.raises(InputError, match=r"48×48.*32×40"):
        vitdecomp.decompose(m, torch.randn(1, 3, 48, 48))


def test_unsupported_pooling():
    m = model("v1")
    m.reset_classifier(7, global_pool="max")
    with pytest.raises(UnsupportedModelError, match="global_pool"):
        vitdecomp.decompose(m, torch.randn(1, 3, *IMG))


# ------------------------------------------------------------------------------------------------ names and options
def test_component_names_forward_order():
    dec = vitdecomp.decompose(model("v1"), torch.randn(1, 3, *IMG))
    names = dec.names
    assert names[0] == "embed" and names[-1] == "norm.bias"
    i = names.index
    assert i("stages.0.blocks.1.mlp") < i("stages.1.downsample.norm.bias") < i("stages.1.blocks.0.attn.head.0")
    assert names[i("stages.0.blocks.0.attn.head.0"):i("stages.0.blocks.0.mlp") + 1] == (
        "stages.0.blocks.0.attn.head.0", "stages.0.blocks.0.attn.head.1", "stages.0.blocks.0.attn.bias",
        "stages.0.blocks.0.mlp")
    c = dec.components[i("stages.2.blocks.1.attn.head.3")]
    assert (c.kind, c.block, c.stage, c.head) == ("head", 5, 2, 3)
    assert dec.components[i("stages.2.downsample.norm.bias")].kind == "const"


@pytest.mark.parametrize("start", [3, (1, 1), "stages.1.blocks.1"])
def test_start_forms_agree(start):
    m, x = model("v1").double(), torch.randn(2, 3, *IMG, dtype=torch.float64)
    dec = vitdecomp.decompose(m, x, start=start, check=True)
    assert dec.names[0] == "init" and dec.components[0].kind == "residual"
    assert dec.names[1] == "stages.1.blocks.1.attn.head.0"


def test_start_at_stage_boundary_folds_the_merge_into_init():
    m, x = model("v2").double(), torch.randn(2, 3, *IMG, dtype=torch.float64)
    dec = vitdecomp.decompose(m, x, start=(1, 0), check=True)
    assert "stages.1.downsample.norm.bias" not in dec.names and "stages.2.downsample.norm.bias" in dec.names
    # init = the residual stream entering stages.1.blocks.0 = everything before it in the full decomposition
    full = vitdecomp.decompose(m, x)
    before = [n for n in full.names if full.names.index(n) < full.names.index("stages.1.blocks.0.attn.head.0")]
    torch.testing.assert_close(dec["init"], full.select(names=before).total(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dec["stages.2.blocks.1.mlp"], full["stages.2.blocks.1.mlp"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("start", [6, (3, 0), (1, 2), "blocks.1"])
def test_bad_start_is_an_input_error(start):
    with pytest.raises(InputError, match="start"):
        vitdecomp.decompose(model("v1"), torch.randn(1, 3, *IMG), start=start)


def test_heads_off_is_grouped_branch():
    m, x = model("v2"), torch.randn(2, 3, *IMG)
    on = vitdecomp.decompose(m, x)
    off = vitdecomp.decompose(m, x, heads=False, check=True)
    assert "stages.1.blocks.0.attn" in off.names and not any(c.kind == "head" for c in off.components)
    parts = [n for n in on.names if n.startswith("stages.1.blocks.0.attn.")]
    torch.testing.assert_close(off["stages.1.blocks.0.attn"], on.select(names=parts).total())


def test_batch_rows_are_independent():
    m, x = model("v1").double(), torch.randn(3, 3, *IMG, dtype=torch.float64)
    both = vitdecomp.decompose(m, x, tokens="source")
    one = vitdecomp.decompose(m, x[1:2], tokens="source")
    torch.testing.assert_close(both.contributions[1:2], one.contributions, rtol=1e-10, atol=1e-12)
    name = "stages.1.blocks.1.attn.head.1"
    torch.testing.assert_close(both.spatial_map(name)[1:2], one.spatial_map(name), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------ spatial maps
def _layers(m):
    return m.stages if type(m).__name__ == "SwinTransformerV2Cr" else m.layers


def _is_v2(m):
    return type(m).__name__ in ("SwinTransformerV2", "SwinTransformerV2Cr")


def _norms(m):
    return [mod for n, mod in m.named_modules() if isinstance(mod, torch.nn.LayerNorm) and not n.startswith("patch_embed")]


def _branch_modules(m, blk):
    """(attention point, attention branch output module, MLP branch output module)."""
    v2 = _is_v2(m)
    return (blk.norm1, blk.norm1, blk.norm2) if v2 else (blk.drop_path1, blk.drop_path1, blk.drop_path2)


def brute_force_map(m, x, target, head=None):
    """Exact contribution of ``target`` at every position of its grid, from the model's own forward.

    ``target``: ``"embed"``, ``(stage, block, "mlp")`` or ``(stage, block, "head")`` with ``head``. Returns
    ``[B, h, w, D]``: batch row ``b·N + n`` of the replicated pass adds the component's value at position ``n`` only.
    """
    B = x.shape[0]
    v2 = _is_v2(m)
    norms = _norms(m)
    branch_out = [mod for st in _layers(m) for blk in st.blocks for mod in _branch_modules(m, blk)[1:]]
    stats, outs, hs = {}, {}, []
    try:
        for ln in norms:
            hs.append(ln.register_forward_pre_hook(
                lambda mod, a: stats.__setitem__(mod, torch.rsqrt(a[0].var(-1, unbiased=False, keepdim=True) + mod.eps))))
        for mod in branch_out + [m.patch_embed]:
            hs.append(mod.register_forward_hook(lambda mod, a, o: outs.__setitem__(mod, o)))
        with torch.no_grad():
            _ref(m, x)
    finally:
        for h in hs:
            h.remove()

    mode = "out"
    if target == "embed":
        point, value = m.patch_embed, outs[m.patch_embed]
        if type(m).__name__ == "SwinTransformerV2Cr":  # its patch embedding writes [B, C, h, w]
            value, mode = value.permute(0, 2, 3, 1), "out_nchw"
    else:
        S, b, what = target
        blk = _layers(m)[S].blocks[b]
        a_in, a_out, m_out = _branch_modules(m, blk)
        if what == "mlp":
            point, value = m_out, outs[m_out]
            value = value.reshape(outs[a_out].shape)  # V1's MLP runs on [B, H·W, C]
        else:
            # the head's own output (projection bias removed) in image order, as the model's roll-back places it:
            # the attention output with every other head's channels zeroed at the projection's input
            dh = blk.attn.proj.in_features // blk.attn.num_heads
            keep = torch.zeros(blk.attn.proj.in_features, dtype=x.dtype)
            keep[head * dh:(head + 1) * dh] = 1
            got = {}
            h1 = blk.attn.proj.register_forward_pre_hook(lambda mod, a: (a[0] * keep,))
            h2 = a_in.register_forward_pre_hook(lambda mod, a: got.__setitem__("v", a[0]))
            try:
                with torch.no_grad():
                    _ref(m, x)
            finally:
                h1.remove(), h2.remove()
            value = got["v"] - blk.attn.proj.bias
            point = a_in
            mode = "in" if v2 else "out"  # V2: added before the (frozen) post-norm; V1: the branch output itself
    h, w = value.shape[1], value.shape[2]
    N = h * w
    rep = lambda t: t.repeat_interleave(N, 0)  # noqa: E731
    delta = torch.zeros((B * N,) + tuple(value.shape[1:]), dtype=x.dtype)
    for bb in range(B):
        for n in range(N):
            i, j = divmod(n, w)
            delta[bb * N + n, i, j] = value[bb, i, j]

    hs = []
    try:
        for ln in norms:  # frozen norms: the base statistics, whatever the (perturbed) input
            s = rep(stats[ln])
            hs.append(ln.register_forward_hook(
                lambda mod, a, o, s=s: (a[0] - a[0].mean(-1, keepdim=True)) * s * mod.weight + mod.bias))
        for mod in branch_out:  # frozen branches (registered after the norms: these outputs win)
            if mod is not point:
                hs.append(mod.register_forward_hook(lambda mod_, a, out, o=outs[mod]: rep(o)))
        if mode == "out":
            base = rep(outs[point])
            hs.append(point.register_forward_hook(lambda mod_, a, out: base + delta.view_as(base)))
        elif mode == "out_nchw":
            base = rep(outs[point])
            hs.append(point.register_forward_hook(lambda mod_, a, out: base + delta.permute(0, 3, 1, 2)))
        else:
            hs.append(point.register_forward_pre_hook(lambda mod_, a: (a[0] + delta,)))
        with torch.no_grad():
            zp = _ref(m, x.repeat_interleave(N, 0))
    finally:
        for hh in hs:
            hh.remove()
    with torch.no_grad():
        z = _ref(m, x)
    return (zp - rep(z)).view(B, h, w, -1)


CASES = [
    ("embed", None, "embed"),
    ((0, 0, "head"), 1, "stages.0.blocks.0.attn.head.1"),   # unshifted, two merges to go
    ((0, 1, "head"), 0, "stages.0.blocks.1.attn.head.0"),   # shifted (roll by 1)
    ((0, 1, "mlp"), None, "stages.0.blocks.1.mlp"),
    ((1, 1, "head"), 1, "stages.1.blocks.1.attn.head.1"),   # shifted, padded windows (4×5 grid)
    ((2, 1, "head"), 2, "stages.2.blocks.1.attn.head.2"),   # shifted in one axis only, padded
]


@pytest.mark.parametrize("kind", ["v1", "v2", "cr"])
def test_spatial_maps_match_brute_force(kind):
    m, x = model(kind).double(), torch.randn(1, 3, *IMG, dtype=torch.float64)
    dec = vitdecomp.decompose(m, x, tokens="source")
    for target, head, name in CASES:
        want = brute_force_map(m, x, target, head)
        got = dec.spatial_map(name)
        assert got.shape == want.shape, name
        err = float((got - want).norm() / want.norm())
        assert err < 1e-9, f"{kind} {name}: spatial map differs from brute force by {err:.2e}"
        torch.testing.assert_close(got.sum((1, 2)), dec[name], rtol=1e-10, atol=1e-12)


def test_shifted_map_is_not_displaced():
    """In a shifted block, the map un-rolled by the shift agrees with brute force; the rolled one does not."""
    m, x = model("v1", window=4, img=(32, 32)).double(), torch.randn(1, 3, 32, 32, dtype=torch.float64)
    blk = m.layers[0].blocks[1]
    assert blk.shift_size == (2, 2)
    dec = vitdecomp.decompose(m, x, tokens="source")
    name = "stages.0.blocks.1.attn.head.0"
    want = brute_force_map(m, x, (0, 1, "head"), 0)
    got = dec.spatial_map(name)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    displaced = torch.roll(got, shifts=(-2, -2), dims=(1, 2))
    assert float((displaced - want).norm() / want.norm()) > 1e-2


def test_grids_and_patch_sizes():
    dec = vitdecomp.decompose(model("v2"), torch.randn(1, 3, *IMG), tokens="source")
    assert dec.grid_of("embed") == vitdecomp.TokenGrid(0, 8, 10, (4, 4))
    assert dec.grid_of("stages.1.blocks.0.mlp") == vitdecomp.TokenGrid(0, 4, 5, (8, 8))
    assert dec.grid_of("stages.2.downsample.norm.bias") == vitdecomp.TokenGrid(0, 2, 3, (16, 16))
    assert dec.grid_of("norm.bias") == vitdecomp.TokenGrid(0, 2, 3, (16, 16))
    stage = dec.group("stage")
    assert stage.spatial_map("stages.1").shape == (1, 4, 5, dec.contributions.shape[-1])


def test_saved_spatial_maps_keep_their_stage_grids(tmp_path):
    m = model("v1")
    dec = vitdecomp.decompose(m, torch.randn(1, 3, *IMG), tokens="source")
    path = tmp_path / "swin.safetensors"
    dec.save(path, tokens=True)
    back = vitdecomp.Decomposition.load(path)
    other = next(n for n in dec.names if dec.grid_of(n) != dec.grid)  # a component on another stage's grid
    assert back.grid_of(other) == dec.grid_of(other)
    torch.testing.assert_close(back.spatial_map(other), dec.spatial_map(other))


def test_v2_cr_names_stages_and_refuses_stage_norms():
    """SwinV2-Cr: names from its own module paths (``stages.S.blocks.B``), its last block's ``norm3`` (the final
    norm) frozen on the stream; a ``norm3`` before a later patch merging (``extra_norm_stage``) is refused, named."""
    m = model("cr")
    dec = vitdecomp.decompose(m, torch.randn(1, 3, *IMG), tokens="source")
    assert dec.names[0] == "embed" and "stages.1.downsample.norm.bias" in dec.names
    assert dec.names[-1] == "stages.2.blocks.1.norm3.bias" and "stages.2.blocks.1.attn.head.3" in dec.names
    assert dec.grid_of("stages.1.blocks.0.mlp").h == 4 and dec.grid_of("stages.1.blocks.0.mlp").w == 5
    torch.manual_seed(0)
    ns = timm.create_model("swinv2_cr_tiny_224", img_size=IMG, window_size=2, embed_dim=16, depths=(2, 2, 2),
                           num_heads=(2, 2, 4), extra_norm_stage=True).eval()
    with pytest.raises(UnsupportedModelError, match=r"stages\.0\.blocks\.1\.norm3 .*last stage only"):
        vitdecomp.decompose(ns, torch.randn(1, 3, *IMG))
