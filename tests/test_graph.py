"""The contribution-graph description API (vitdecomp.graph): a hand-written description of a real timm ViT
runs exactly on the core engine, and impossible descriptions fail naming the pack, the node and what was expected."""

import pytest
import timm
import torch

from vitdecomp import TokenGrid, testing
from vitdecomp.graph import FusedQKV, Graph, GraphError, ProjInput, execute


def tiny_vit():
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32, patch_size=8, embed_dim=48, num_heads=3,
                          global_pool="avg", fc_norm=False).eval()
    return testing.perturb_parameters(m)


def describe(m, *, extra=None, pool_rows=None, norm_at=0, output=True):
    """A plain ViT written by hand: one stream, heads and MLP per block, final norm, mean of the patch rows."""
    grid = TokenGrid(num_prefix=1, h=4, w=4, patch_size=(8, 8))
    g = Graph("test-pack", run=lambda x: m.forward_head(m.forward_features(x), pre_logits=True), grid=grid)
    x = g.stream("tokens", 17)
    g.embed(x, m.blocks[0])
    for i, blk in enumerate(m.blocks):
        a = blk.attn
        with g.block(i, f"blocks.{i}", x, entry=blk):
            g.heads(x, ProjInput(a.proj, a.num_heads, FusedQKV(a.qkv, a.q_norm, a.k_norm, a.scale)), a.proj.weight,
                    a.proj.bias)
            g.branch(x, blk.mlp, name="mlp")
            if extra is not None:
                extra(g, blk)
    g.norm(x, m.norm, name="norm", at=norm_at)
    rows = pool_rows if pool_rows is not None else list(range(1, 17))
    pooled = g.pool(x, rows, [1.0 / len(rows)] * len(rows))
    if output:
        g.output(pooled)
    return g


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_hand_written_description_is_exact(dtype, tol):
    m = tiny_vit().to(dtype)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    for kw in ({}, {"tokens": True}, {"start": 1}):
        with torch.no_grad():
            dec = execute(describe(m), x, **kw)
        assert dec.error <= tol, (kw, dec.error)
        assert dec.names[0] == ("init" if kw.get("start") else "embed") and dec.names[-1] == "norm.bias"
        if kw.get("tokens"):
            testing.check_token_sums(dec)


def test_stream_that_never_reaches_the_readout():
    m, x = tiny_vit(), torch.randn(1, 3, 32, 32)

    def side(g, blk):
        s = g.streams[-1] if g.streams[-1].name == "side" else g.stream("side", 17)
        g.branch(s, blk.mlp, name="side_mlp")

    with pytest.raises(GraphError, match=r"'test-pack'.*blocks\.1\.side_mlp.*'side' never reaches the readout"):
        execute(describe(m, extra=side), x)


def test_mixers_with_mismatched_rows():
    m, x = tiny_vit(), torch.randn(1, 3, 32, 32)
    with pytest.raises(GraphError, match=r"'test-pack'.*node 'pool'.*rows \[17\].*rows in 0\.\.16"):
        execute(describe(m, pool_rows=[0, 17]), x)
    with pytest.raises(GraphError, match=r"'test-pack'.*node 'norm'.*sees 17 rows; the stream declares 17 from row 1"):
        with torch.no_grad():
            execute(describe(m, norm_at=1), x)


def test_a_batchnorm_that_is_no_fixed_affine_map_is_refused():
    g = Graph("test-pack", run=lambda x: x, grid=TokenGrid(0, 4, 2, (2, 2)))
    s = g.stream("tokens", 4)
    for bn in (torch.nn.BatchNorm1d(8), torch.nn.BatchNorm1d(8, track_running_stats=False).eval()):
        with pytest.raises(GraphError, match=r"'test-pack'.*node 'bn'.*eval mode with running statistics"):
            g.norm(s, bn, name="bn")
    g.norm(s, torch.nn.BatchNorm1d(8).eval(), name="bn")  # eval, running statistics: accepted


def test_missing_output_and_hooks_that_never_fire():
    m, x = tiny_vit(), torch.randn(1, 3, 32, 32)
    with pytest.raises(GraphError, match=r"'test-pack'.*no output"):
        execute(describe(m, output=False), x)

    def unused(g, blk):  # the classifier head is not run by forward_head(pre_logits=True)
        g.branch(g.streams[0], m.head, name="never")

    m.head = torch.nn.Linear(48, 48)
    with pytest.raises(GraphError, match=r"'test-pack'.*blocks\.0\.never.*did not fire"):
        with torch.no_grad():
            execute(describe(m, extra=unused), x)


def test_hierarchical_pieces_check_their_geometry():
    """Grid streams, merges and post-norms refuse descriptions whose grids or streams do not fit."""
    lin, ln = torch.nn.Linear(64, 32, bias=False), torch.nn.LayerNorm(64)
    g = Graph("test-pack", run=lambda x: x, grid=TokenGrid(0, 5, 4, (4, 4)))
    with pytest.raises(GraphError, match=r"'test-pack', stream 's9'.*12 positions.*13 rows"):
        g.stream("s9", 13, grid=TokenGrid(0, 3, 4, (4, 4)))
    a = g.stream("s0", 20, grid=TokenGrid(0, 5, 4, (4, 4)))
    b = g.stream("s1", 4, grid=TokenGrid(0, 2, 2, (8, 8)))  # 5×4 merges to 3×2, not 2×2
    with pytest.raises(GraphError, match=r"'test-pack', node 'down'.*5×4.*gives 3×2.*'s1' declares 2×2"):
        g.merge(a, b, norm=ln, reduction=lin, name="down")
    c = g.stream("s1", 6, grid=TokenGrid(0, 3, 2, (8, 8)))
    with pytest.raises(GraphError, match="bias-free"):
        g.merge(a, c, norm=ln, reduction=torch.nn.Linear(64, 32), name="down")
    flat = g.stream("tokens", 20)
    with pytest.raises(GraphError, match="post_norm"):
        g.heads(flat, None, torch.zeros(16, 16), post_norm=torch.nn.LayerNorm(16))


@pytest.mark.parametrize("pad_first", [False, True])
def test_window_rows_follow_the_models_roll_pad_partition(pad_first):
    """The row map of a shifted, padded window partition is the partition itself applied to position indices."""
    from vitdecomp.graph._hier import window_rows

    H, W, win, sh = 5, 7, (2, 3), (1, 1)
    idx = torch.arange(H * W).view(1, H, W, 1).double()
    pad = lambda t: torch.nn.functional.pad(t + 1, (0, 0, 0, (3 - W % 3) % 3, 0, (2 - H % 2) % 2)) - 1  # noqa: E731
    x = pad(idx) if pad_first else idx
    x = torch.roll(x, shifts=(-1, -1), dims=(1, 2))
    x = x if pad_first else pad(x)
    Hp, Wp = x.shape[1], x.shape[2]
    want = x.view(1, Hp // 2, 2, Wp // 3, 3, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1).long()
    assert window_rows(H, W, win, sh, pad_first).tolist() == want.tolist()
    assert (window_rows(H, W, win, sh, True) != window_rows(H, W, win, sh, False)).any()


def test_partition_row_maps_are_timms_partitions():
    """MaxViT's block (window) and grid partitions as row maps: timm's own partition applied to position indices."""
    from timm.models.maxxvit import grid_partition, window_partition

    from vitdecomp.graph import grid_rows, window_rows

    H, W, ps = 8, 12, (2, 4)
    idx = torch.arange(H * W).view(1, H, W, 1)
    assert window_rows(H, W, ps).tolist() == window_partition(idx, list(ps)).reshape(-1).tolist()
    assert grid_rows(H, W, ps).tolist() == grid_partition(idx, list(ps)).reshape(-1).tolist()
    assert grid_rows(H, W, ps).tolist() != window_rows(H, W, ps).tolist()
    with pytest.raises(ValueError, match="8×12 grid does not split into 3×4"):
        grid_rows(H, W, (3, 4))


def test_downsample_checks_its_geometry():
    g = Graph("test-pack", run=lambda x: x, grid=TokenGrid(0, 4, 4, (4, 4)))
    a = g.stream("s0", 16, grid=TokenGrid(0, 4, 4, (4, 4)))
    b = g.stream("s1", 4, grid=TokenGrid(0, 2, 2, (8, 8)))
    odd = g.stream("s2", 15, grid=TokenGrid(0, 5, 3, (4, 4)))
    with pytest.raises(GraphError, match=r"'test-pack', node 'short'.*5×3 grid of 's2'.*even sides halved"):
        g.downsample(odd, b, weight=None, channels=8, name="short")
    with pytest.raises(GraphError, match=r"node 'short'.*shape \(6, 8\).*expected \[16, C\]"):
        g.downsample(a, b, weight=torch.zeros(6, 8), channels=16, name="short")
    g.downsample(a, b, weight=torch.zeros(16, 8, 1, 1), channels=16, name="short")


@pytest.mark.parametrize("G,tiled", [(1, False), (5, False), (4, True)])
def test_grouped_rows_apply_each_rows_group_matrix_in_place(G, tiled):
    """Token detail on a grid stream: row r of a map is ``v[r] @ mats[group[r]]`` (groups of unequal size, one
    empty; or a 2×2 tile of permuted groups on a 4×6 grid, as patch merging makes), written into a fresh map or
    added into the one given (a component's several parts), against a row-by-row product."""
    import numpy as np

    from vitdecomp.graph._hier import _GTerm, _Tile, _tiled

    R, k, D = (24 if tiled else 23), 3, 4
    if tiled:
        host = np.array([[2, 0], [3, 1]])[np.arange(4)[:, None] % 2, np.arange(6)[None, :] % 2].reshape(-1)
    elif G > 1:
        host = np.random.default_rng(0).choice([0, 1, 3, 4], size=R)
    else:
        host = np.zeros(R, dtype=np.int64)
    t = _GTerm(torch.ones(2, R, dtype=torch.float64), torch.from_numpy(host), host, G)
    if tiled:
        t._order = _tiled(host, G, (4, 6), "cpu")
        assert isinstance(t.layout(), _Tile) and _tiled(host, G, (6, 4), "cpu") is None
    v = torch.randn(2, R, k, dtype=torch.float64)
    mats = torch.randn(G, k, D, dtype=torch.float64)
    want = torch.stack([v[:, r] @ mats[host[r]] for r in range(R)], 1)
    got = t.apply_rows(v, mats)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    base = torch.randn(2, R, D, dtype=torch.float64)
    acc = base.clone()
    assert t.apply_rows(v, mats, acc) is acc
    torch.testing.assert_close(acc, base + want, rtol=0, atol=1e-13)


class _NormResidual(torch.nn.Module):
    """``x + γ ⊙ norm(x)`` on the stream's own path (the patch rows of XCiT's class-attention blocks)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.gamma = torch.nn.Parameter(torch.randn(dim))

    def forward(self, x):
        return x + self.gamma * self.norm(x)


def _vit_with_norm_residual():
    m = tiny_vit()
    torch.manual_seed(1)
    m.blocks = torch.nn.Sequential(m.blocks[0], testing.perturb_parameters(_NormResidual(48)), m.blocks[1])
    return m.eval()


def _describe_norm_residual(m, name="blocks.1"):
    grid = TokenGrid(num_prefix=1, h=4, w=4, patch_size=(8, 8))
    g = Graph("test-pack", run=lambda x: m.forward_head(m.forward_features(x), pre_logits=True), grid=grid)
    x = g.stream("tokens", 17)
    g.embed(x, m.blocks[0])
    for i, path in ((0, "blocks.0"), (1, "blocks.2")):
        blk, a = m.get_submodule(path), m.get_submodule(path).attn
        with g.block(i, path, x, entry=blk):
            g.heads(x, ProjInput(a.proj, a.num_heads, FusedQKV(a.qkv, a.q_norm, a.k_norm, a.scale)), a.proj.weight,
                    a.proj.bias)
            g.branch(x, blk.mlp, name="mlp")
        if i == 0:
            g.norm_residual(x, m.blocks[1].norm, gamma=m.blocks[1].gamma, name=name)
    g.norm(x, m.norm, name="norm")
    g.output(g.pool(x, list(range(1, 17)), [1.0 / 16] * 16))
    return g


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_norm_residual_is_exact_and_matches_the_oracle(dtype, tol):
    """Graph.norm_residual: the stream plus its own frozen norm. Exact with and without token detail and in the
    paper's convention; every component (the writes before it pass through I + γ·norm, its offset γ⊙β is a
    constant) equals the attribution oracle's value, computed from the model's forward by autograd alone."""
    from vitdecomp.graph import GraphAdapter

    m = _vit_with_norm_residual().to(dtype)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    for kw in ({}, {"tokens": True}, {"bias": "paper"}, {"tokens": True, "bias": "paper"}):
        with torch.no_grad():
            dec = execute(_describe_norm_residual(m), x, **kw)
        assert dec.error <= tol, (kw, dec.error)
        assert ("blocks.1.bias" in dec.names) == (kw.get("bias") != "paper")
        if kw.get("tokens"):
            testing.check_token_sums(dec)
    if dtype != torch.float64:
        return

    class Pack(GraphAdapter):
        name = "test-pack"

        def supports(self, model):
            return True

        def representation(self, model, images):
            return model.forward_head(model.forward_features(images), pre_logits=True)

        def describe(self, model, images):
            return _describe_norm_residual(model)

    with torch.no_grad():
        dec = execute(_describe_norm_residual(m), x[:1])
    orc = testing.attribution_oracle(m, x[:1], dec, adapter=Pack(), writes={"blocks.1.bias": ["blocks.1.norm.bias"]})
    for name in dec.names:
        torch.testing.assert_close(dec[name][0], orc.contributions[name], rtol=1e-8, atol=1e-10 * float(orc.z.norm()))


def test_constants_under_one_name_are_one_component():
    """norm_residual's offset named like the attention constant of the block it belongs to joins it: one
    component, the sum of both constants (the oracle: both parameters' writes)."""
    m = _vit_with_norm_residual().double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        sep = execute(_describe_norm_residual(m), x, tokens=True)
        one = execute(_describe_norm_residual(m, name="blocks.0.attn"), x, tokens=True)
    assert "blocks.1.bias" not in one.names and len(one.names) == len(sep.names) - 1
    assert one.names.count("blocks.0.attn.bias") == 1
    torch.testing.assert_close(one["blocks.0.attn.bias"], sep["blocks.0.attn.bias"] + sep["blocks.1.bias"])
    torch.testing.assert_close(one.token_contributions("blocks.0.attn.bias"),
                               sep.token_contributions("blocks.0.attn.bias") + sep.token_contributions("blocks.1.bias"))
    assert one.error <= 1e-10
    with pytest.raises(GraphError, match="norm_residual needs a norm"):
        Graph("p", run=lambda x: x, grid=TokenGrid(0, 1, 1, (1, 1))).norm_residual(
            Graph("p", run=lambda x: x, grid=TokenGrid(0, 1, 1, (1, 1))).stream("s", 1), torch.nn.Identity(), name="n")


def test_rows_products_of_channels_first_maps_are_exact():
    # an NCHW map seen as rows [B, R, C] (strides C·R, 1, R) is multiplied as transposed matrices, not copied
    from vitdecomp.graph._hier import _channels_first, _GTerm, _rows_mm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=g, dtype=torch.float64).transpose(1, 2)  # [B, R = 7, C = 5]
    M = torch.randn(5, 4, generator=g, dtype=torch.float64)
    assert _channels_first(x) and not _channels_first(x.contiguous())
    want = torch.einsum("brc,cd->brd", x, M)
    torch.testing.assert_close(_rows_mm(x, M), want, rtol=0, atol=1e-13)
    torch.testing.assert_close(_rows_mm(x.contiguous(), M), want, rtol=0, atol=1e-13)
    term = _GTerm(torch.ones(3, 7, dtype=torch.float64), torch.zeros(7, dtype=torch.long), None, 1, Ms=M[None])
    start = torch.randn(3, 7, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(term.apply_rows(x, out=start.clone()), start + want, rtol=0, atol=1e-13)
