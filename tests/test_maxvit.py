"""MaxViT (timm MaxxVit) plugin: exactness, names, options, and spatial placement against brute force.

Two tiny real architectures with random weights (perturbed norms, LayerScale and BatchNorm statistics): a ``_tf_``
variant (NormMlpClassifierHead, TF relative position bias, interleaved qkv, shortcut conv bias) and an ``_rw_``
variant (per-position LayerNorm2d before pooling, relative position MLP, head-first qkv, LayerScale).
"""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

import vitdecomp  # noqa: E402
from vitdecomp import testing  # noqa: E402
from vitdecomp.decomposition import tolerance_for  # noqa: E402
from vitdecomp.errors import InputError, UnsupportedModelError  # noqa: E402

IMG = 64
COMMON = dict(img_size=IMG, embed_dim=(24, 32, 40, 48), depths=(1, 2, 1, 1), transformer_dim_head=8, num_classes=10)
CONFIGS = {
    "tf": ("maxvit_tiny_tf_224", dict(COMMON, stem_width=16, head_hidden_size=40)),
    "rw": ("maxvit_rmlp_pico_rw_256", dict(COMMON, stem_width=(8, 16), transformer_init_values=0.5,
                                           transformer_rel_pos_dim=16)),
}




def _build(variant):
    torch.manual_seed(0)
    name, kw = CONFIGS[variant]
    model = timm.create_model(name, **kw).eval()
    testing.perturb_parameters(model)
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def model(variant):
    return _build(variant)


@pytest.fixture(scope="module")
def model64(model):
    import copy

    return copy.deepcopy(model).double()


def _reference(m, x):
    """z from timm's own modules: pooled features through the head's norm (tf) / forward_head(pre_logits) (rw)."""
    from timm.layers import NormMlpClassifierHead

    feats = m.forward_features(x)
    if isinstance(m.head, NormMlpClassifierHead):
        return m.head.norm(m.head.global_pool(feats)).flatten(1)
    return m.forward_head(feats, pre_logits=True)


def test_conformance(model):
    results = testing.run_conformance(model, (IMG, IMG), reference=_reference)
    for dtype, opts, err in results:
        assert err <= tolerance_for(dtype), (dtype, opts, err)
    worst32 = max(e for d, _, e in results if d == torch.float32)
    worst64 = max(e for d, _, e in results if d == torch.float64)
    assert worst32 < 1e-6 and worst64 < 1e-13


def test_dispatch_and_names(model):
    ad = vitdecomp.find_adapter(model)
    assert ad.name == "timm-maxvit"
    x = torch.randn(1, 3, IMG, IMG)
    dec = vitdecomp.decompose(model, x, check=True)
    names = dec.names
    assert names[0] == "stem"
    assert "stages.1.blocks.1.attn_block.attn.head.3" in names and "stages.1.blocks.1.attn_grid.attn.head.0" in names
    assert "stages.1.blocks.1.attn_block.attn.bias" in names and "stages.1.blocks.1.attn_grid.mlp" in names
    assert "stages.2.blocks.0.conv" in names
    c = dec.components[dec.index("stages.1.blocks.1.attn_grid.attn.head.2")]
    assert (c.kind, c.block, c.stage, c.head, c.branch) == ("head", 2, 1, 2, "grid")
    c = dec.components[dec.index("stages.1.blocks.1.attn_block.mlp")]
    assert (c.kind, c.branch) == ("mlp", "block")
    assert dec.components[dec.index("stages.2.blocks.0.conv")].kind == "conv"
    has_bias = model.stages[0].blocks[0].conv.shortcut.expand.bias is not None
    assert ("stages.0.blocks.0.conv.shortcut.bias" in names) == has_bias
    assert names[-1] == ("head.norm.bias" if ad.readout(model) is None else "norm.bias")
    # heads=False groups heads and the projection bias into the branch
    coarse = vitdecomp.decompose(model, x, heads=False, check=True)
    assert "stages.1.blocks.1.attn_block.attn" in coarse.names and not any(".head." in n for n in coarse.names)
    branch = coarse["stages.1.blocks.1.attn_block.attn"]
    fine = sum(dec[n] for n in names if n.startswith("stages.1.blocks.1.attn_block.attn."))
    torch.testing.assert_close(branch, fine, rtol=1e-5, atol=1e-6)
    assert len(dec.group("block")) == 1 + sum(len(s.blocks) for s in model.stages) + 1


def test_start_forms(model):
    x = torch.randn(2, 3, IMG, IMG)
    a = vitdecomp.decompose(model, x, start=2, check=True)
    b = vitdecomp.decompose(model, x, start=(1, 1), check=True)
    c = vitdecomp.decompose(model, x, start="stages.1.blocks.1", check=True)
    assert a.names == b.names == c.names and a.names[0] == "init"
    init = a.components[0]
    assert (init.kind, init.block, init.stage) == ("residual", 2, 1)
    torch.testing.assert_close(a.contributions, b.contributions)
    # init = everything before block 2 in the full decomposition
    full = vitdecomp.decompose(model, x)
    before = [i for i, comp in enumerate(full.components) if comp.block is None and comp.kind != "const"
              or comp.block is not None and comp.block < 2]
    torch.testing.assert_close(a["init"], full.contributions[:, before].sum(1), rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match="out of range"):
        vitdecomp.decompose(model, x, start=(0, 3))
    with pytest.raises(InputError, match="out of range"):
        vitdecomp.decompose(model, x, start=99)


def test_bad_inputs_and_head(model):
    x = torch.randn(2, 3, IMG, IMG)
    with pytest.raises(InputError, match=r"96×96.*64×64"):
        vitdecomp.decompose(model, torch.randn(1, 3, 96, 96))
    ad = vitdecomp.find_adapter(model)
    z = vitdecomp.representation(model, x)
    with torch.no_grad():
        logits = ad.head_function(model)(z)
        torch.testing.assert_close(logits, model(x), rtol=1e-5, atol=1e-5)
        lin = ad.readout(model)
        if lin is not None:
            torch.testing.assert_close(lin(z), model(x), rtol=1e-5, atol=1e-5)
    assert ad.middle_start(model) == 3  # first block of stage 2


def test_unsupported_coatnet():
    torch.manual_seed(0)
    m = timm.create_model("coatnet_pico_rw_224", img_size=64, embed_dim=(16, 32, 32, 64), depths=(1, 1, 1, 1),
                          stem_width=(8, 16), num_classes=5).eval()
    # the family adapter declines it (naming the parts) and dispatch falls back to the auto adapter
    choice = vitdecomp.choose_adapter(m)
    assert choice.adapter.name == "auto" and choice.how == "fallback"
    said = {name: why for name, _, ok, why in choice.claims}
    assert "CoAtNet" in said["timm-maxvit"] and "declined" in said["timm-maxvit"]
    assert vitdecomp.decompose(m, torch.randn(1, 3, 64, 64)).error <= 1e-5
    with pytest.raises(UnsupportedModelError, match="CoAtNet"):
        vitdecomp.decompose(m, torch.randn(1, 3, 64, 64), adapter="timm-maxvit")


# ------------------------------------------------------------------------------------------------ brute force
def _branch_modules(model):
    """Every module whose output is a branch output (replaced by its recorded value when frozen)."""
    mods = [model.stem]
    for stage in model.stages:
        for blk in stage.blocks:
            mods.append(blk.conv.conv3_1x1)
            for pm in (blk.attn_block, blk.attn_grid):
                mods += [pm.ls1, pm.ls2]
    return mods


def _frozen_jacobian_map(model, x, target, leaf_from_record):
    """Brute force: replace every branch output by its recorded value, freeze the final norm's statistics,
    make ``target``'s output a leaf u (``leaf_from_record(recorded)``), and read the exact map
    ``map[b, y, x, d] = Σ_c u[b, ..c.., y, x] ∂z_d/∂u`` with one backward pass per output dimension.
    The positions are timm's own: u is the module's output tensor as the model produced it."""
    from timm.layers import NormMlpClassifierHead

    final = model.norm if not isinstance(model.head, NormMlpClassifierHead) else model.head.norm
    rec, handles = {}, []
    mods = _branch_modules(model)
    if target not in mods:
        mods.append(target)
    for m in mods:
        handles.append(m.register_forward_hook(lambda mod, a, out: rec.__setitem__(mod, out.detach().clone())))
    handles.append(final.register_forward_pre_hook(lambda mod, a: rec.__setitem__("final", a[0].detach().clone())))
    with torch.no_grad():
        _reference(model, x)
    for h in handles:
        h.remove()
    fin_in = rec["final"]
    sigma = (fin_in.var(1, unbiased=False, keepdim=True) + final.eps).sqrt()

    def frozen_norm(mod, args, out):
        t = args[0]
        y = (t - t.mean(1, keepdim=True)) / sigma
        return y * mod.weight.view(1, -1, 1, 1) + mod.bias.view(1, -1, 1, 1)

    u = leaf_from_record(rec[target]).clone().requires_grad_(True)
    handles = [m.register_forward_hook(lambda mod, a, out: rec[mod]) for m in mods if m is not target]
    handles.append(target.register_forward_hook(lambda mod, a, out: u))
    handles.append(final.register_forward_hook(frozen_norm))
    try:
        with torch.enable_grad():
            z = _reference(model, x)
            maps = []
            for d in range(z.shape[1]):
                (g,) = torch.autograd.grad(z[:, d].sum(), u, retain_graph=True)
                maps.append(g * u.detach())
    finally:
        for h in handles:
            h.remove()
    m = torch.stack(maps, -1)  # [B, *u.shape[1:], D]
    return m


def _cl_map(m):   # channels-last u: [B, H, W, C, D] → [B, H, W, D]
    return m.sum(3)


def _nchw_map(m):  # [B, C, H, W, D] → [B, H, W, D]
    return m.sum(1)


def _head_only(model, x, part_module, head):
    """ls1 output of one partition attention with only head ``head`` (no projection bias): the head's own output
    at timm's true positions."""
    at = part_module.attn
    H, dh = at.num_heads, at.dim_head
    out = {}

    def keep_head(mod, args):
        t = args[0].clone()
        mask = torch.zeros(H * dh, dtype=t.dtype)
        mask[head * dh:(head + 1) * dh] = 1
        return (t * mask,)

    hs = [at.proj.register_forward_pre_hook(keep_head),
          at.proj.register_forward_hook(lambda mod, a, o: o - mod.bias if mod.bias is not None else o),
          part_module.ls1.register_forward_hook(lambda mod, a, o: out.__setitem__("u", o.detach().clone()))]
    with torch.no_grad():
        _reference(model, x)
    for h in hs:
        h.remove()
    return out["u"]


@pytest.mark.parametrize("which", ["stem", "conv", "block_head", "grid_head", "mlp"])
def test_spatial_maps_match_brute_force(model64, which):
    """Each spatial map equals the exact frozen linear response of z to that component's output at each
    position, computed by autograd through timm's own modules (block windows / grid cells, shortcut pooling,
    final norm). A map shifted, transposed or mixed between windows and grid cells fails."""
    m = model64
    torch.manual_seed(1)
    x = torch.randn(2, 3, IMG, IMG, dtype=torch.float64)
    dec = vitdecomp.decompose(m, x, tokens="source", check=True)
    if which == "stem":
        name, target = "stem", m.stem
        brute = _nchw_map(_frozen_jacobian_map(m, x, target, lambda r: r))
    elif which == "conv":  # a stride-2 MBConv: its map lives on the stage-1 grid and reaches z via two shortcuts
        name, target = "stages.1.blocks.0.conv", m.stages[1].blocks[0].conv.conv3_1x1
        brute = _nchw_map(_frozen_jacobian_map(m, x, target, lambda r: r))
    elif which == "mlp":
        pm = m.stages[1].blocks[1].attn_grid
        name = "stages.1.blocks.1.attn_grid.mlp"
        brute = _cl_map(_frozen_jacobian_map(m, x, pm.ls2, lambda r: r))
    else:
        attr = "attn_block" if which == "block_head" else "attn_grid"
        pm = getattr(m.stages[0].blocks[0], attr)
        head = 1
        name = f"stages.0.blocks.0.{attr}.attn.head.{head}"
        u = _head_only(m, x, pm, head)
        brute = _cl_map(_frozen_jacobian_map(m, x, pm.ls1, lambda r: u))
    got = dec.spatial_map(name)
    assert got.shape == brute.shape, (got.shape, brute.shape)
    scale = dec.representation.norm(dim=-1).max()
    err = float((got - brute).abs().max() / scale)
    assert err < 1e-10, f"{name}: spatial map differs from brute force by {err:.2e}"
    # the test would notice a misplacement: the map is not invariant to the partition's permutation
    if which in ("block_head", "grid_head"):
        assert float((got.flip(1) - brute).abs().max() / scale) > 1e-6
        torch.testing.assert_close(got.sum((1, 2)), dec[name])


def test_source_tokens(model64):
    """Heads split by source position: sums to the head, and equals brute force through the values."""
    m = model64
    torch.manual_seed(2)
    x = torch.randn(2, 3, IMG, IMG, dtype=torch.float64)
    from vitdecomp_plugins.maxvit import source_map
    from timm.models.maxxvit import grid_partition, window_partition

    dec = vitdecomp.decompose(m, x, tokens="source", check=True)
    assert len(dec.meta["source_tokens"]) == sum(1 for c in dec.components if c.kind == "head")
    with pytest.raises(KeyError, match="tokens='source'"):
        source_map(vitdecomp.decompose(m, x), "stages.0.blocks.0.attn_grid.attn.head.0")
    for attr in ("attn_block", "attn_grid"):
        pm = getattr(m.stages[0].blocks[0], attr)
        at = pm.attn
        H, dh = at.num_heads, at.dim_head
        head = 2
        name = f"stages.0.blocks.0.{attr}.attn.head.{head}"
        src = source_map(dec, name)
        torch.testing.assert_close(src.sum((1, 2)), dec[name], rtol=1e-10, atol=1e-12)
        # brute force: the head's values as a leaf at true positions, q and k frozen, other heads' values zero
        rec = {}
        hk = pm.norm1.register_forward_hook(lambda mod, a, o: rec.__setitem__("n", o.detach().clone()))
        with torch.no_grad():
            _reference(m, x)
        hk.remove()
        n = rec["n"]  # [B, Hs, Ws, C] true positions
        Wqkv, bqkv = at.qkv.weight, at.qkv.bias
        if at.head_first:
            idx = torch.arange(H * 3 * dh).view(H, 3, dh)[head, 2]
        else:
            idx = torch.arange(3 * H * dh).view(3, H, dh)[2, head]
        v_true = n @ Wqkv[idx].T + bqkv[idx]  # [B, Hs, Ws, dh]: head's values at true positions

        def leaf_to_qkv(mod, args, out):
            part = window_partition if pm.partition_block else grid_partition
            vp = part(rec["v"], list(pm.partition_size))
            out = out.detach().clone()
            keep = torch.zeros(out.shape[-1], dtype=out.dtype)
            if at.head_first:
                keep.view(H, 3, dh)[:, :2] = 1
            else:
                keep.view(3, H, dh)[:2] = 1
            out = out * keep
            out = out.index_add(out.ndim - 1, idx, vp)
            return out

        rec["v"] = v_true.clone().requires_grad_(True)
        brute = _value_map(m, x, pm, at.qkv, leaf_to_qkv, rec)
        scale = dec.representation.norm(dim=-1).max()
        err = float((src - brute).abs().max() / scale)
        assert err < 1e-10, f"{name}: source map differs from brute force by {err:.2e}"


def _value_map(m, x, pm, qkv_module, qkv_hook, rec):
    """Σ_k v[b, y, x, k] ∂z_d/∂v with every branch except ``pm``'s attention frozen (its q, k frozen by the
    hook; its projection bias and the other heads' values zeroed out)."""
    from timm.layers import NormMlpClassifierHead

    final = m.norm if not isinstance(m.head, NormMlpClassifierHead) else m.head.norm
    mods = [mm for mm in _branch_modules(m) if mm is not pm.ls1]
    store, handles = {}, []
    for mm in mods:
        handles.append(mm.register_forward_hook(lambda mod, a, out: store.__setitem__(mod, out.detach().clone())))
    handles.append(final.register_forward_pre_hook(lambda mod, a: store.__setitem__("final", a[0].detach().clone())))
    with torch.no_grad():
        _reference(m, x)
    for h in handles:
        h.remove()
    fin_in = store["final"]
    sigma = (fin_in.var(1, unbiased=False, keepdim=True) + final.eps).sqrt()

    def frozen_norm(mod, args, out):
        t = args[0]
        return ((t - t.mean(1, keepdim=True)) / sigma) * mod.weight.view(1, -1, 1, 1) + mod.bias.view(1, -1, 1, 1)

    v = rec["v"]
    handles = [mm.register_forward_hook(lambda mod, a, out: store[mod]) for mm in mods]
    handles.append(final.register_forward_hook(frozen_norm))
    handles.append(qkv_module.register_forward_hook(qkv_hook))
    handles.append(pm.attn.proj.register_forward_hook(lambda mod, a, o: o - mod.bias if mod.bias is not None else o))
    try:
        with torch.enable_grad():
            z = _reference(m, x)
            maps = []
            for d in range(z.shape[1]):
                (g,) = torch.autograd.grad(z[:, d].sum(), v, retain_graph=True)
                maps.append((g * v.detach()).sum(-1))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(maps, -1)


def test_save_load(model, tmp_path):
    x = torch.randn(2, 3, IMG, IMG)
    dec = vitdecomp.decompose(model, x, tokens="source")
    path = tmp_path / "dec.safetensors"
    dec.save(path)
    back = vitdecomp.Decomposition.load(path)
    assert back.names == dec.names
    torch.testing.assert_close(back.contributions, dec.contributions)
