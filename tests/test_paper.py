"""``bias="paper"``: the paper's own RepDecompose convention (METHOD.md §1), checked against an independent
re-implementation of its walk written here from the model's own modules (hooks on timm / open_clip blocks), in
float64 with perturbed norms and biases; the paper's MaxViT z; the paper's ``layer:NN`` labels."""

import copy

import pytest
import timm
import torch

import vitdecomp
from vitdecomp import testing
from vitdecomp.errors import UnsupportedModelError

SMALL = dict(depth=3, img_size=32, patch_size=8, embed_dim=48, num_heads=3)

FAMILIES = {
    "deit": ("deit_tiny_patch16_224", {}),
    "dino": ("vit_small_patch16_224.dino", {}),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", dict(patch_size=8)),  # LayerScale, register tokens
    "vit_avg_fc_norm": ("vit_tiny_patch16_224", dict(global_pool="avg")),  # norm after pooling
    "vit_avg_norm": ("vit_tiny_patch16_224", dict(global_pool="avg", fc_norm=False)),  # norm per token, then pool
}


def build(name, extra, dtype=torch.float64):
    model = timm.create_model(name, pretrained=False, **{**SMALL, **extra}).eval()
    return testing.perturb_parameters(model).to(dtype)


def paper_ln(leaves, ln):
    """The paper's LayerNorm on a sum of leaves (frozen σ with the module's eps and biased variance): leaf k →
    γ ⊙ (u_k − μ(u)/M) / σ + β/M."""
    if isinstance(ln, torch.nn.Identity):
        return leaves
    x = sum(leaves)
    M = len(leaves)
    mu = x.mean(-1, keepdim=True)
    sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ln.eps)
    return [ln.weight * (u - mu / M) / sigma + ln.bias / M for u in leaves]


def timm_reference(model, x, start=0):
    """The paper's leaves for a timm ViT, by hand: the stream entering block ``start`` (embed / init), per block
    each head's W_O^(h) o_h + b_O / H (times LayerScale) and the MLP write; then the final norm(s) and pooling.
    Returns (names, leaves [B, D] each, the hook captures for token checks)."""
    cap = {}
    hs = [model.blocks[start].register_forward_pre_hook(lambda m, a: cap.__setitem__("init", a[0]))]
    for i, blk in enumerate(model.blocks):
        hs.append(blk.attn.proj.register_forward_pre_hook(lambda m, a, i=i: cap.__setitem__(("o", i), a[0])))
        hs.append(blk.attn.qkv.register_forward_hook(lambda m, a, o, i=i: cap.__setitem__(("qkv", i), o)))
        hs.append(blk.ls2.register_forward_hook(lambda m, a, o, i=i: cap.__setitem__(("mlp", i), o)))
    hs.append(model.norm.register_forward_pre_hook(lambda m, a: cap.__setitem__("final", a[0])))
    with torch.no_grad():
        z = model.forward_head(model.forward_features(x), pre_logits=True)
    for h in hs:
        h.remove()
    names, leaves = ["embed" if start == 0 else "init"], [cap["init"]]
    for i in range(start, len(model.blocks)):
        blk = model.blocks[i]
        H = blk.attn.num_heads
        o = cap[("o", i)].unflatten(-1, (H, -1))  # [B, N, H, dh]
        W = blk.attn.proj.weight.unflatten(1, (H, -1))  # [D, H, dh]
        g = blk.ls1.gamma if hasattr(blk.ls1, "gamma") else 1.0
        for h in range(H):
            names.append(f"blocks.{i}.attn.head.{h}")
            leaves.append((o[..., h, :] @ W[:, h].T + blk.attn.proj.bias / H) * g)
        names.append(f"blocks.{i}.mlp")
        leaves.append(cap[("mlp", i)])
    torch.testing.assert_close(sum(leaves), cap["final"], rtol=1e-12, atol=1e-12)  # the leaves are the stream
    leaves = paper_ln(leaves, model.norm)
    p = model.num_prefix_tokens
    leaves = [u[:, 0] if model.global_pool == "token" else u[:, p:].mean(1) for u in leaves]
    leaves = paper_ln(leaves, model.fc_norm)
    torch.testing.assert_close(sum(leaves), z, rtol=1e-12, atol=1e-12)
    return names, leaves, cap


def assert_components(dec, names, leaves, tol):
    assert [c.name for c in dec.components] == names
    assert not any(c.kind == "const" for c in dec.components)
    for n, ref in zip(names, leaves):
        rel = (dec[n] - ref).norm() / ref.norm()
        assert rel <= tol, (n, float(rel))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_timm_vit_matches_the_papers_walk(family, photo_batch):
    model = build(*FAMILIES[family])
    x = photo_batch(names=("astronaut", "coffee"), dtype=torch.float64)
    names, leaves, _ = timm_reference(model, x)
    dec = vitdecomp.decompose(model, x, bias="paper", check=True)
    assert dec.meta["bias"] == "paper"
    assert_components(dec, names, leaves, 1e-12)
    # the explicit default differs from the paper per component (it centres each leaf by its own mean)
    exp = vitdecomp.decompose(model, x)
    assert (exp["blocks.1.mlp"] - dec["blocks.1.mlp"]).norm() > 1e-3 * dec["blocks.1.mlp"].norm()


@pytest.mark.parametrize("family", ["deit", "vit_avg_fc_norm"])
def test_start_and_branch_level(family, photo_batch):
    model = build(*FAMILIES[family])
    x = photo_batch(names=("chelsea", "rocket"), dtype=torch.float64)
    names, leaves, _ = timm_reference(model, x, start=1)
    dec = vitdecomp.decompose(model, x, bias="paper", start=1, check=True)
    assert_components(dec, names, leaves, 1e-12)
    for mode in ("paper", "explicit", "even"):  # heads=False is the sum of the heads in every mode
        hd = vitdecomp.decompose(model, x, bias=mode, start=1)
        br = vitdecomp.decompose(model, x, bias=mode, start=1, heads=False)
        for i in (1, 2):
            parts = [hd[f"blocks.{i}.attn.head.{h}"] for h in range(3)]
            if mode == "explicit":
                parts.append(hd[f"blocks.{i}.attn.bias"])
            torch.testing.assert_close(sum(parts), br[f"blocks.{i}.attn"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(hd["blocks.2.mlp"], br["blocks.2.mlp"], rtol=1e-12, atol=1e-14)


def test_token_detail(photo_batch):
    """With tokens="source" the components are unchanged, their token parts sum to them, and a head's part at a
    source patch j is the paper's uncentred A_0j · W_O^(h) v_j through the final norm (the constants' shares sit
    on the CLS row, where they are written)."""
    model = build(*FAMILIES["deit"])
    x = photo_batch(names=("astronaut", "coffee"), dtype=torch.float64)
    names, leaves, cap = timm_reference(model, x)
    dec = vitdecomp.decompose(model, x, bias="paper", tokens="source", check=True)
    assert_components(dec, names, leaves, 1e-12)
    T = dec.grid.num_tokens
    for n in names:
        parts = dec.token_details[n].materialize(T)
        torch.testing.assert_close(parts.sum(1), dec[n], rtol=1e-12, atol=1e-13)
    fin = cap["final"][:, 0]
    sigma = torch.sqrt(fin.var(-1, unbiased=False) + model.norm.eps)[:, None, None]
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        H, B, N = a.num_heads, x.shape[0], T
        q, k, v = cap[("qkv", i)].reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4)
        A = torch.softmax((q * a.scale) @ k.transpose(-2, -1), -1)[:, :, 0]  # CLS query row [B, H, N]
        W = a.proj.weight.unflatten(1, (H, -1))
        for h in range(H):
            want = A[:, h, :, None] * (v[:, h] @ W[:, h].T) * model.norm.weight / sigma  # [B, N, D]
            got = dec.token_details[f"blocks.{i}.attn.head.{h}"].materialize(T)
            torch.testing.assert_close(got[:, 1:], want[:, 1:], rtol=1e-12, atol=1e-13)


def test_float32(photo_batch):
    m64 = build(*FAMILIES["dinov2_reg4"])
    m32 = copy.deepcopy(m64).float()
    x = photo_batch(names=("astronaut", "coffee"), dtype=torch.float64)
    names, leaves, _ = timm_reference(m64, x)
    dec = vitdecomp.decompose(m32, x.float(), bias="paper", check=True)
    assert_components(dec, names, [u.float() for u in leaves], 1e-5)


def clip_reference(v, x):
    """The paper's walk on an open_clip visual tower at branch level (each attention branch is the sum of its
    heads' leaves: γ ⊙ (u_attn − H·μ/M)/σ + H·β/M through the final norm), by hand from the blocks' writes."""
    cap = {}
    blocks = v.transformer.resblocks
    hs = [blocks[0].register_forward_pre_hook(lambda m, a: cap.__setitem__("embed", a[0]))]
    for i, blk in enumerate(blocks):
        hs.append(blk.ls_1.register_forward_hook(lambda m, a, o, i=i: cap.__setitem__(("attn", i), o)))
        hs.append(blk.ls_2.register_forward_hook(lambda m, a, o, i=i: cap.__setitem__(("mlp", i), o)))
    with torch.no_grad():
        z = v(x)
    for h in hs:
        h.remove()
    H = blocks[0].attn.num_heads
    names = ["embed"] + [f"blocks.{i}.{b}" for i in range(len(blocks)) for b in ("attn", "mlp")]
    writes = [cap["embed"]] + [cap[(b, i)] for i in range(len(blocks)) for b in ("attn", "mlp")]
    count = [1] + [H, 1] * len(blocks)  # leaves per component at head level
    cls = [u[:, 0] for u in writes]
    xs, M, ln = sum(cls), sum(count), v.ln_post
    mu = xs.mean(-1, keepdim=True)
    sigma = torch.sqrt(xs.var(-1, unbiased=False, keepdim=True) + ln.eps)
    out = [(ln.weight * (u - c * mu / M) / sigma + c * ln.bias / M) @ v.proj for u, c in zip(cls, count)]
    torch.testing.assert_close(sum(out), z, rtol=1e-12, atol=1e-12)
    return names, out


def test_open_clip_matches_the_papers_walk(tiny_clip_name, photo_batch):
    import open_clip

    clip = open_clip.create_model(tiny_clip_name, pretrained=None)
    v = testing.perturb_parameters(clip.visual.eval()).double()
    x = photo_batch(names=("astronaut", "coffee"), dtype=torch.float64)
    names, leaves = clip_reference(v, x)
    br = vitdecomp.decompose(v, x, bias="paper", heads=False, check=True)
    assert_components(br, names, leaves, 1e-12)
    hd = vitdecomp.decompose(v, x, bias="paper", check=True)
    for i in range(2):
        heads = [hd[c.name] for c in hd.components if c.name.startswith(f"blocks.{i}.attn.head.")]
        torch.testing.assert_close(sum(heads), br[f"blocks.{i}.attn"], rtol=1e-12, atol=1e-14)


def test_adapters_without_paper_convention_say_so():
    from vitdecomp_plugins.timm_vit import TimmViTAdapter

    class NoPaper(TimmViTAdapter):
        name = "no-paper"
        paper_bias = False

    m = build(*FAMILIES["deit"], dtype=torch.float32)
    with pytest.raises(UnsupportedModelError, match="bias='paper'.*'no-paper'.*does not declare paper_bias"):
        vitdecomp.decompose(m, torch.randn(1, 3, 32, 32), adapter=NoPaper(), bias="paper")


# ------------------------------------------------------------------------------------------- Swin (grid streams)
SWIN = dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2, 2), num_heads=(2, 2, 2),
            num_classes=0)


def swin_model(dtype=torch.float64, v2=False):
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    torch.manual_seed(0)
    return testing.perturb_parameters((SwinTransformerV2 if v2 else SwinTransformer)(**SWIN).eval()).to(dtype)


def swin_reference(m, x, start=0):
    """The paper's walk on a timm Swin by hand: leaves are full ``[B, H, W, C]`` maps on the stage where
    they are written — the stream entering block ``start`` (embed / init), each head's W_O^(h) o_h + b_O / H put
    back from its (shifted) window with timm's own ``window_reverse`` and roll, each MLP write — carried through
    every later patch merging (2×2 gather, then the paper's LayerNorm: γ ⊙ (u_k − μ/M)/σ + β/M, then the
    reduction; V2: reduction, then that norm), the final norm by the same rule, and the mean over positions.
    V2's res-post-norm sits inside the branch: the paper's norm rule over the H heads of that branch, and the
    MLP leaf is ``norm2``'s output."""
    from timm.models.swin_transformer import window_reverse
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    v2 = isinstance(m, SwinTransformerV2)
    blocks = [(S, b, blk) for S, st in enumerate(m.layers) for b, blk in enumerate(st.blocks)]
    cap, hs = {}, []
    for gi, (S, b, blk) in enumerate(blocks):
        hs.append(blk.register_forward_pre_hook(lambda mod, a, gi=gi: cap.__setitem__(("in", gi), a[0])))
        hs.append(blk.attn.proj.register_forward_pre_hook(lambda mod, a, gi=gi: cap.__setitem__(("o", gi), a[0])))
        hs.append((blk.norm2 if v2 else blk.mlp).register_forward_hook(
            lambda mod, a, o, gi=gi: cap.__setitem__(("mlp", gi), o)))
    hs.append(m.norm.register_forward_pre_hook(lambda mod, a: cap.__setitem__("final", a[0])))
    with torch.no_grad():
        z = m.forward_head(m.forward_features(x), pre_logits=True)
    for h in hs:
        h.remove()

    def paper_ln(ln, us):  # over the last axis, per position
        u = sum(us)
        mu, sd = u.mean(-1, keepdim=True), (u.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
        return [ln.weight * (t - mu / len(us)) / sd + ln.bias / len(us) for t in us]

    names, leaves, gi = [], [], 0
    for S, st in enumerate(m.layers):
        ds = st.downsample
        if leaves and not isinstance(ds, torch.nn.Identity):
            B, H, W, C = leaves[0].shape
            x4 = [u.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3) for u in leaves]
            leaves = paper_ln(ds.norm, [ds.reduction(t) for t in x4]) if v2 else \
                [ds.reduction(t) for t in paper_ln(ds.norm, x4)]
        for b, blk in enumerate(st.blocks):
            if gi == start:
                names, leaves = ["embed" if start == 0 else "init"], [cap[("in", gi)]]
            if gi >= start:
                B, H, W, C = leaves[0].shape
                at = blk.attn
                Hh = at.num_heads
                o = cap[("o", gi)].unflatten(-1, (Hh, -1))  # [B·nW, N, H, dh] in shifted windows
                Wo = at.proj.weight.unflatten(1, (Hh, -1))
                heads = []
                for h in range(Hh):
                    y = (o[..., h, :] @ Wo[:, h].T + at.proj.bias / Hh).view(-1, *blk.window_size, C)
                    y = window_reverse(y, blk.window_size, H, W)
                    names.append(f"stages.{S}.blocks.{b}.attn.head.{h}")
                    heads.append(torch.roll(y, shifts=tuple(blk.shift_size), dims=(1, 2)))
                leaves += paper_ln(blk.norm1, heads) if v2 else heads
                names.append(f"stages.{S}.blocks.{b}.mlp")
                leaves.append(cap[("mlp", gi)].reshape(B, H, W, C))
            gi += 1
    torch.testing.assert_close(sum(leaves), cap["final"], rtol=1e-12, atol=1e-12)  # the leaves are the stream
    out = [u.mean((1, 2)) for u in paper_ln(m.norm, leaves)]
    torch.testing.assert_close(sum(out), z, rtol=1e-12, atol=1e-12)
    return names, out


@pytest.mark.parametrize("v2, start", [(False, 0), (False, 2), (False, 3), (True, 0), (True, 3)])
def test_swin_matches_the_papers_walk(v2, start):
    """start: full depth, a stage boundary (its merge inside init), mid-stage."""
    m = swin_model(v2=v2)
    torch.manual_seed(3)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert any(any(blk.shift_size) for st in m.layers for blk in st.blocks)  # shifted windows are exercised
    names, leaves = swin_reference(m, x, start)
    dec = vitdecomp.decompose(m, x, bias="paper", start=start or None, check=True)
    assert dec.meta["bias"] == "paper"
    assert_components(dec, names, leaves, 1e-12)
    br = vitdecomp.decompose(m, x, bias="paper", start=start or None, heads=False, check=True)
    for n in br.names:
        if n.endswith(".attn"):
            torch.testing.assert_close(br[n], dec[n + ".head.0"] + dec[n + ".head.1"], rtol=1e-12, atol=1e-14)
    tok = vitdecomp.decompose(m, x, bias="paper", start=start or None, tokens="source", check=True)
    assert_components(tok, names, leaves, 1e-12)
    for n in names:
        parts = tok.token_contributions(n)
        assert parts.shape[1] == tok.grid_of(n).num_tokens
        torch.testing.assert_close(parts.sum(1), tok[n], rtol=1e-10, atol=1e-12)
    # the explicit default differs per component (merge norms centre each leaf by its own mean)
    exp = vitdecomp.decompose(m, x, start=start or None)
    assert (exp["stages.2.blocks.1.mlp"] - dec["stages.2.blocks.1.mlp"]).norm() > 1e-3 * dec["stages.2.blocks.1.mlp"].norm()


def test_swin_float32():
    m64 = swin_model()
    torch.manual_seed(3)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    names, leaves = swin_reference(m64, x)
    dec = vitdecomp.decompose(copy.deepcopy(m64).float(), x.float(), bias="paper", check=True)
    assert_components(dec, names, [u.float() for u in leaves], 1e-5)


# ------------------------------------------------------------------------------------------- MaxViT paper z
MAXVIT = dict(img_size=64, embed_dim=(24, 32, 40, 48), depths=(1, 2, 1, 1), transformer_dim_head=8, num_classes=10)


@pytest.mark.parametrize("name, extra", [
    ("maxvit_tiny_tf_224", dict(stem_width=16, head_hidden_size=40)),
    ("maxvit_rmlp_pico_rw_256", dict(stem_width=(8, 16), transformer_init_values=0.5, transformer_rel_pos_dim=16)),
])
def test_maxvit_paper_readout(name, extra, photo_batch):
    from vitdecomp_plugins.maxvit import MaxViTAdapter

    torch.manual_seed(0)
    m = testing.perturb_parameters(timm.create_model(name, **MAXVIT, **extra).eval()).double()
    x = photo_batch(size=(64, 64), names=("astronaut", "coffee"), dtype=torch.float64)
    ad = MaxViTAdapter(readout="paper")
    with torch.no_grad():
        z = m.forward_features(x).mean((-1, -2))  # the paper's z, from timm directly
    torch.testing.assert_close(vitdecomp.representation(m, x, adapter=ad), z, rtol=0, atol=0)
    for tokens in (None, "source"):
        dec = vitdecomp.decompose(m, x, adapter=ad, tokens=tokens, check=True)
        assert dec.error <= 1e-12 and dec.meta["readout"] == "paper"
        torch.testing.assert_close(dec.representation, z, rtol=1e-14, atol=1e-14)
    default = vitdecomp.decompose(m, x)
    if name.endswith("_tf_224"):  # no head.norm: its β is no component, and the MBConv of block 0 is raw
        assert "head.norm.bias" in default.names and "head.norm.bias" not in dec.names
        with torch.no_grad():
            feats = {}
            hk = m.stages[3].blocks[0].conv.register_forward_hook(lambda mod, a, o: feats.__setitem__("c", o))
            m.forward_features(x)
            hk.remove()
        # the last stage's MBConv output enters z through the residuals and the mean only
        conv_out = feats["c"] - m.stages[3].blocks[0].conv.shortcut(m.stages[2](m.stages[1](m.stages[0](m.stem(x)))))
        torch.testing.assert_close(dec["stages.3.blocks.0.conv"], conv_out.mean((-1, -2)), rtol=1e-10, atol=1e-12)
    else:  # forward_features ends with model.norm: the paper's z is the default
        torch.testing.assert_close(dec.contributions, default.contributions, rtol=1e-12, atol=1e-14)
    with pytest.raises(vitdecomp.InputError, match="readout"):
        MaxViTAdapter(readout="pooled")


# ------------------------------------------------------------------------------------------- layer labels
def test_paper_names_vit(photo_batch):
    model = build(*FAMILIES["deit"])
    dec = vitdecomp.decompose(model, photo_batch(names=("coffee",), dtype=torch.float64))
    nm = vitdecomp.paper_names(dec)
    assert nm["blocks.2.attn.head.1"] == "layer:00.head:1" and nm["blocks.0.attn.head.0"] == "layer:02.head:0"
    assert nm["blocks.0.attn.bias"] == "layer:02.bias" and nm["blocks.1.mlp"] == "layer:01.mlp"
    assert nm["embed"] == "embed" and nm["norm.bias"] == "norm.bias"
    assert len(set(nm.values())) == len(nm)
    br = vitdecomp.paper_names(["init", "blocks.1.attn", "blocks.1.mlp", "blocks.2.attn", "blocks.2.mlp"])
    assert br == {"init": "init", "blocks.1.attn": "layer:01", "blocks.1.mlp": "layer:01.mlp",
                  "blocks.2.attn": "layer:00", "blocks.2.mlp": "layer:00.mlp"}


def test_paper_names_maxvit():
    names = []
    for s, b in ((0, 0), (1, 0)):
        p = f"stages.{s}.blocks.{b}"
        names += [f"{p}.conv", f"{p}.attn_block.attn.head.0", f"{p}.attn_block.mlp", f"{p}.attn_grid.attn.head.0",
                  f"{p}.attn_grid.mlp"]
    nm = vitdecomp.paper_names(["stem"] + names)
    assert nm["stages.1.blocks.0.attn_grid.attn.head.0"] == "layer:00.head:0"  # even: grid attention
    assert nm["stages.1.blocks.0.attn_block.attn.head.0"] == "layer:01.head:0"  # odd: block attention
    assert nm["stages.0.blocks.0.attn_grid.mlp"] == "layer:02.mlp"
    assert nm["stages.0.blocks.0.conv"] == "layer:03.conv" and nm["stem"] == "stem"


def maxvit_reference(m, x, paper_readout):
    """The paper's walk on a timm MaxViT by hand: leaves (the stem, each MBConv branch, each head's
    W_O^(h) o_h + b_O / H un-partitioned with timm's own inverse and times LayerScale, each MLP write) are carried
    as full maps through the stride-2 shortcuts (2×2 mean pool, then a 1×1 conv whose bias is split over the
    leaves present); z: their mean over positions (the paper's z), or the final LayerNorm2d by the paper's rule."""
    from timm.layers import NormMlpClassifierHead
    from timm.models.maxxvit import grid_reverse, window_reverse

    cap = {}
    hs = [m.stem.register_forward_hook(lambda mod, a, o: cap.__setitem__("stem", o))]
    blocks = [(s, b, blk) for s, st in enumerate(m.stages) for b, blk in enumerate(st.blocks)]
    for s, b, blk in blocks:
        hs.append(blk.conv.conv3_1x1.register_forward_hook(lambda mod, a, o, k=(s, b): cap.__setitem__(("conv", k), o)))
        for part in ("attn_block", "attn_grid"):
            pm = getattr(blk, part)
            hs.append(pm.attn.proj.register_forward_pre_hook(
                lambda mod, a, k=(s, b, part): cap.__setitem__(("o", k), a[0])))
            hs.append(pm.ls2.register_forward_hook(lambda mod, a, o, k=(s, b, part): cap.__setitem__(("mlp", k), o)))
    hs.append(m.norm.register_forward_pre_hook(lambda mod, a: cap.__setitem__("fin", a[0])))
    with torch.no_grad():
        m.forward_features(x)
    for h in hs:
        h.remove()
    names, leaves = ["stem"], [cap["stem"]]
    for s, b, blk in blocks:
        p = f"stages.{s}.blocks.{b}"
        sc = blk.conv.shortcut
        if b == 0:  # the stride-2 shortcut: every leaf present is pooled and projected, its bias split evenly
            bias = sc.expand.bias / len(leaves) if sc.expand.bias is not None else None
            leaves = [torch.nn.functional.conv2d(sc.pool(u), sc.expand.weight, bias) for u in leaves]
        names.append(f"{p}.conv")
        leaves.append(cap[("conv", (s, b))])
        size = leaves[0].shape[-2:]
        for part, rev in (("attn_block", window_reverse), ("attn_grid", grid_reverse)):
            pm = getattr(blk, part)
            at = pm.attn
            H = at.num_heads
            o = cap[("o", (s, b, part))].unflatten(-1, (H, -1))  # partitioned [B', wh, ww, H, dh]
            W = at.proj.weight.unflatten(1, (H, -1))
            g = pm.ls1.gamma if hasattr(pm.ls1, "gamma") else 1.0
            for h in range(H):
                head = rev(o[..., h, :] @ W[:, h].T + at.proj.bias / H, list(pm.partition_size), list(size))
                names.append(f"{p}.{part}.attn.head.{h}")
                leaves.append((head * g).permute(0, 3, 1, 2))
            names.append(f"{p}.{part}.mlp")
            leaves.append(cap[("mlp", (s, b, part))].permute(0, 3, 1, 2))
    torch.testing.assert_close(sum(leaves), cap["fin"], rtol=1e-12, atol=1e-12)  # the leaves are the stream

    def paper_ln2d(ln, us):  # over channels, per position
        u = sum(us)
        mu, sd = u.mean(1, keepdim=True), (u.var(1, unbiased=False, keepdim=True) + ln.eps).sqrt()
        return [ln.weight[:, None, None] * (t - mu / len(us)) / sd + ln.bias[:, None, None] / len(us) for t in us]

    if not is_id(m.norm):  # rw: LayerNorm2d per position, then the mean (also the paper's z)
        leaves = paper_ln2d(m.norm, leaves)
    out = [u.mean((-1, -2)) for u in leaves]
    if isinstance(m.head, NormMlpClassifierHead) and not paper_readout:  # tf default: head.norm on the pooled map
        out = [t[:, :, 0, 0] for t in paper_ln2d(m.head.norm, [u[:, :, None, None] for u in out])]
    return names, out


def is_id(mod):
    return isinstance(mod, torch.nn.Identity)


@pytest.mark.parametrize("name, extra, paper_readout", [
    ("maxvit_tiny_tf_224", dict(stem_width=16, head_hidden_size=40), True),
    ("maxvit_tiny_tf_224", dict(stem_width=16, head_hidden_size=40), False),
    ("maxvit_rmlp_pico_rw_256", dict(stem_width=(8, 16), transformer_init_values=0.5, transformer_rel_pos_dim=16),
     False),
])
def test_maxvit_paper_convention_matches_the_papers_walk(name, extra, paper_readout, photo_batch):
    from vitdecomp_plugins.maxvit import MaxViTAdapter

    torch.manual_seed(0)
    m = testing.perturb_parameters(timm.create_model(name, **MAXVIT, **extra).eval()).double()
    x = photo_batch(size=(64, 64), names=("astronaut", "coffee"), dtype=torch.float64)
    names, leaves = maxvit_reference(m, x, paper_readout)
    ad = MaxViTAdapter(readout="paper" if paper_readout else "default")
    torch.testing.assert_close(sum(leaves), vitdecomp.representation(m, x, adapter=ad), rtol=1e-12, atol=1e-12)
    dec = vitdecomp.decompose(m, x, adapter=ad, bias="paper", check=True)
    assert_components(dec, names, leaves, 1e-12)
    br = vitdecomp.decompose(m, x, adapter=ad, bias="paper", heads=False)
    key = "stages.3.blocks.0.attn_grid.attn"
    heads = sum(dec[n] for n in dec.names if n.startswith(key + ".head."))
    torch.testing.assert_close(br[key], heads, rtol=1e-12, atol=1e-14)
    # with token detail: the same components, and each one's parts on its own grid sum to it
    tok = vitdecomp.decompose(m, x, adapter=ad, bias="paper", tokens="source", check=True)
    assert_components(tok, names, leaves, 1e-12)
    for n in names:
        parts = tok.token_contributions(n)
        assert parts.shape[1] == tok.grid_of(n).num_tokens
        torch.testing.assert_close(parts.sum(1), tok[n], rtol=1e-10, atol=1e-12)


def test_maxvit_float32(photo_batch):
    from vitdecomp_plugins.maxvit import MaxViTAdapter

    torch.manual_seed(0)
    m64 = testing.perturb_parameters(timm.create_model("maxvit_rmlp_pico_rw_256", **MAXVIT, stem_width=(8, 16),
                                                       transformer_init_values=0.5, transformer_rel_pos_dim=16).eval())
    m64 = m64.double()
    x = photo_batch(size=(64, 64), names=("astronaut", "coffee"), dtype=torch.float64)
    names, leaves = maxvit_reference(m64, x, False)
    dec = vitdecomp.decompose(copy.deepcopy(m64).float(), x.float(), adapter=MaxViTAdapter(), bias="paper", check=True)
    assert_components(dec, names, [u.float() for u in leaves], 1e-5)
