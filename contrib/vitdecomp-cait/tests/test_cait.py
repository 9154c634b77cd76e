"""Exactness of the CaiT pack on timm's real CaiT architecture with random, perturbed weights."""

import pytest
import timm
import torch

import vitdecomp
from vitdecomp import Registry, testing
from vitdecomp.graph import GraphError

from vitdecomp_cait import cait

SMALL = dict(depth=2, img_size=32, patch_size=8, embed_dim=48, num_heads=4)


@pytest.fixture(scope="module")
def registry():
    return Registry.from_plugins([cait])


def build(**kw):
    torch.manual_seed(0)
    m = timm.create_model("cait_xxs24_224", **{**SMALL, **kw}).eval()
    testing.perturb_parameters(m)  # norms and both LayerScales away from their init
    with torch.no_grad():  # timm initialises Linear biases to zero: make them count
        for name, p in m.named_parameters():
            if name.endswith(".bias") and "norm" not in name:
                p.add_(0.2 * torch.randn_like(p))
    return m


def reference(m, x):
    return m.forward_head(m.forward_features(x), pre_logits=True)


def test_conformance(registry):
    """float32 and float64, every granularity, token sums, bad inputs, simulated CUDA."""
    results = testing.run_conformance(build(), (32, 32), reference=reference, registry=registry)
    assert {r[0] for r in results} == {torch.float32, torch.float64}


def test_names_streams_and_blocks(registry):
    m = build()
    dec = vitdecomp.decompose(m, torch.randn(2, 3, 32, 32), registry=registry, check=True)
    heads = [f"blocks.{i}.attn.head.{h}" for i in range(2) for h in range(4)]
    assert dec.names == ("embed", *heads[:4], "blocks.0.attn.bias", "blocks.0.mlp", *heads[4:], "blocks.1.attn.bias",
                         "blocks.1.mlp", "cls_token", "blocks_token_only.0.attn.bias", "blocks_token_only.0.mlp",
                         "blocks_token_only.1.attn.bias", "blocks_token_only.1.mlp", "norm.bias")
    assert dec.components[dec.index("blocks_token_only.1.mlp")].block == 3  # global block index: depth + j


def test_start_in_class_blocks_makes_class_stream_init(registry):
    m, x = build(), torch.randn(2, 3, 32, 32)
    full = vitdecomp.decompose(m, x, registry=registry)
    dec = vitdecomp.decompose(m, x, registry=registry, start=3, check=True)
    # the patch stream keeps its components; the class stream entering block 3 is one component
    assert "blocks.1.mlp" in dec.names and "cls_token" not in dec.names and "blocks_token_only.0.mlp" not in dec.names
    # writes after the cut are the same components; init carries the class token as block 3 reads it
    for name in ("blocks_token_only.1.attn.bias", "blocks_token_only.1.mlp", "norm.bias"):
        torch.testing.assert_close(dec[name], full[name])
    assert dec.components[dec.index("init")].kind == "residual"
    with pytest.raises(vitdecomp.InputError, match="out of range"):
        vitdecomp.decompose(m, x, registry=registry, start=4)


def test_patch_tokens_are_placed_after_the_class_token(registry):
    m, x = build(), torch.randn(1, 3, 32, 32)
    dec = vitdecomp.decompose(m, x, registry=registry, tokens="source")
    assert dec.token_contributions("blocks.0.attn.head.1").shape == (1, 17, 48)
    mlp = dec.token_contributions("blocks.1.mlp")
    assert mlp[:, 0].abs().max() == 0 and mlp[:, 1:].abs().amax(-1).min() > 0  # patch writes sit on patch tokens
    cls = dec.token_contributions("blocks_token_only.0.mlp")
    assert cls[:, 1:].abs().max() == 0  # the class stream's writes sit on the class token
    assert dec.spatial_map("embed").shape == (1, 4, 4, 48)


def test_impossible_graphs_name_pack_node_and_expectation(registry):
    m, x = build(), torch.randn(1, 3, 32, 32)
    ad = cait.CaitAdapter()

    g = ad.describe(m, x)
    g.ops = [op for op in g.ops if op.kind != "cattn"]  # nothing connects the patch stream to the class stream
    with pytest.raises(GraphError, match=r"'timm-cait'.*blocks\.1\.mlp.*never reaches the readout"):
        vitdecomp.graph.execute(g, x)

    g = ad.describe(m, x)
    ca = next(op for op in g.ops if op.kind == "cattn")
    ca.extra["reads"].append(g.streams[0])  # its norm sees 1 + 16 rows; the description now says 1 + 16 + 16
    with pytest.raises(GraphError, match=r"'timm-cait'.*blocks_token_only\.0\.attn.*sees \(1, 17, 48\).*33 rows"):
        with torch.no_grad():
            vitdecomp.graph.execute(g, x)

    g = ad.describe(m, x)
    g.streams[0].rows = 15  # the patch blocks see 16 rows
    with pytest.raises(GraphError, match=r"'timm-cait'.*node 'embed'.*sees 16 rows; the stream declares 15"):
        with torch.no_grad():
            vitdecomp.graph.execute(g, x)


def test_patch_component_equals_its_route_through_class_attention(registry):
    """Independent of the engine: push one patch-block write (blocks.1.mlp, captured with a plain hook) through
    both class-attention blocks and the final norm by hand, with every norm statistic, attention weight and
    branch output frozen at the forward's values (the MLPs of the class blocks are branch outputs: held)."""
    m = build().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    seen = {}
    hooks = [m.blocks[1].mlp.register_forward_hook(lambda mod, a, out: seen.__setitem__("w", out * m.blocks[1].gamma_2))]
    for j, blk in enumerate(m.blocks_token_only):
        hooks.append(blk.norm1.register_forward_pre_hook(lambda mod, a, j=j: seen.__setitem__(f"u{j}", a[0])))
    hooks.append(m.norm.register_forward_pre_hook(lambda mod, a: seen.__setitem__("fin", a[0][:, 0])))
    try:
        dec = vitdecomp.decompose(m, x, registry=registry)
    finally:
        for h in hooks:
            h.remove()

    def frozen_norm(norm, d, u):  # linear part of a LayerNorm at the statistics of its forward input u
        sd = (u.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
        return norm.weight * (d - d.mean(-1, keepdim=True)) / sd

    dx, dcls = seen["w"], torch.zeros_like(seen["w"][:, :1])
    for j, blk in enumerate(m.blocks_token_only):
        a, u = blk.attn, seen[f"u{j}"]
        B, N, C = u.shape
        H = a.num_heads
        n = blk.norm1(u)
        q = a.q(n[:, 0]).view(B, H, 1, -1)
        k = a.k(n).view(B, N, H, -1).transpose(1, 2)
        A = torch.softmax((q * a.scale) @ k.transpose(-2, -1), dim=-1)  # [B, H, 1, N]
        dv = (frozen_norm(blk.norm1, torch.cat([dcls, dx], 1), u) @ a.v.weight.T).view(B, N, H, -1).transpose(1, 2)
        do = (A @ dv).transpose(1, 2).reshape(B, 1, C)
        dcls = dcls + blk.gamma_1 * (do @ a.proj.weight.T)
    expected = frozen_norm(m.norm, dcls[:, 0], seen["fin"])
    assert expected.norm() > 1e-3 * dec.representation.norm()  # a component that matters, not two zeros
    torch.testing.assert_close(dec["blocks.1.mlp"], expected, rtol=1e-10, atol=1e-12)


def test_autocast_forward_keeps_the_algebra_in_float32(registry):
    m, x = build(), torch.randn(2, 3, 32, 32)
    dec = vitdecomp.decompose(m, x, registry=registry, autocast="bf16", tokens="source", check=True)
    assert dec.contributions.dtype == torch.float32 and dec.meta["autocast"] == "bfloat16"
    assert 0 < dec.meta["error_vs_float32"] < 5e-2  # measured and reported against a float32 forward


def test_paper_convention_matches_a_walk_by_hand(registry):
    """bias="paper" on CaiT, against the paper's rules applied by hand (METHOD.md §1; CaiT is not in the paper, so
    its class attention follows the same rules): every leaf is tracked on the rows of cat(class, patches); a
    LayerNorm turns leaf k into γ ⊙ (u_k − μ/M)/σ + β/M over the M leaves present; the value and output biases
    of a class attention are constants split over those leaves too; a patch-block head is W_O^(h) o_h + b_O/H."""
    m = build().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    cap = {}
    hs = [m.blocks[0].register_forward_pre_hook(lambda mod, a: cap.__setitem__("embed", a[0]))]
    for i, blk in enumerate(m.blocks):
        hs.append(blk.attn.proj.register_forward_pre_hook(lambda mod, a, i=i: cap.__setitem__(("o", i), a[0])))
        hs.append(blk.mlp.register_forward_hook(lambda mod, a, o, i=i: cap.__setitem__(("mlp", i), o)))
    for j, blk in enumerate(m.blocks_token_only):
        hs.append(blk.norm1.register_forward_pre_hook(lambda mod, a, j=j: cap.__setitem__(("u", j), a[0])))
        hs.append(blk.mlp.register_forward_hook(lambda mod, a, o, j=j: cap.__setitem__(("cmlp", j), o)))
    try:
        dec = vitdecomp.decompose(m, x, registry=registry, bias="paper", check=True)
        br = vitdecomp.decompose(m, x, registry=registry, bias="paper", heads=False)
        tok = vitdecomp.decompose(m, x, registry=registry, bias="paper", tokens="source")
    finally:
        for h in hs:
            h.remove()
    z = reference(m, x)

    def pad(patch=None, cls=None):  # a leaf on the rows of cat(class, patches)
        out = torch.zeros(x.shape[0], 1 + cap["embed"].shape[1], cap["embed"].shape[2], dtype=torch.float64)
        if patch is not None:
            out[:, 1:] = patch
        if cls is not None:
            out[:, :1] = cls
        return out

    def paper_ln(ln, leaves, rows):
        u = sum(v[:, rows] for v in leaves)
        mu, sd = u.mean(-1, keepdim=True), (u.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
        return [ln.weight * (v[:, rows] - mu / len(leaves)) / sd + ln.bias / len(leaves) for v in leaves]

    names, leaves = ["embed"], [pad(patch=cap["embed"])]
    for i, blk in enumerate(m.blocks):
        H = blk.attn.num_heads
        o, W = cap[("o", i)].unflatten(-1, (H, -1)), blk.attn.proj.weight.unflatten(1, (H, -1))
        for h in range(H):
            names.append(f"blocks.{i}.attn.head.{h}")
            leaves.append(pad(patch=blk.gamma_1 * (o[..., h, :] @ W[:, h].T + blk.attn.proj.bias / H)))
        names.append(f"blocks.{i}.mlp")
        leaves.append(pad(patch=blk.gamma_2 * cap[("mlp", i)]))
    names.append("cls_token")
    leaves.append(pad(cls=m.cls_token.expand(x.shape[0], -1, -1)))
    for j, blk in enumerate(m.blocks_token_only):
        a, u = blk.attn, cap[("u", j)]
        torch.testing.assert_close(sum(leaves), u, rtol=1e-12, atol=1e-12)  # the leaves are the stream
        B, N, C = u.shape
        H, M = a.num_heads, len(leaves)
        n = blk.norm1(u)
        q = a.q(n[:, 0]).view(B, H, 1, -1)
        k = a.k(n).view(B, N, H, -1).transpose(1, 2)
        A = torch.softmax((q * a.scale) @ k.transpose(-2, -1), dim=-1)  # [B, H, 1, N], frozen
        for v_k, leaf in zip(paper_ln(blk.norm1, leaves, slice(None)), leaves):
            val = (v_k @ a.v.weight.T + a.v.bias / M).view(B, N, H, -1).transpose(1, 2)
            out = (A @ val).transpose(1, 2).reshape(B, 1, C)
            leaf[:, :1] += blk.gamma_1 * (out @ a.proj.weight.T + a.proj.bias / M)
        names.append(f"blocks_token_only.{j}.mlp")
        leaves.append(pad(cls=blk.gamma_2 * cap[("cmlp", j)]))
    final = [v[:, 0] for v in paper_ln(m.norm, leaves, slice(0, 1))]
    torch.testing.assert_close(sum(final), z, rtol=1e-12, atol=1e-12)
    assert dec.names == tuple(names)
    for name, want in zip(names, final):
        assert (dec[name] - want).norm() <= 1e-12 * want.norm(), name
    for i in range(2):
        heads = sum(dec[f"blocks.{i}.attn.head.{h}"] for h in range(4))
        torch.testing.assert_close(br[f"blocks.{i}.attn"], heads, rtol=1e-12, atol=1e-14)
    for name in names:
        torch.testing.assert_close(tok[name], dec[name], rtol=1e-12, atol=1e-14)
        parts = tok.token_details[name].materialize(tok.grid.num_tokens)
        torch.testing.assert_close(parts.sum(1), tok[name], rtol=1e-12, atol=1e-13)
