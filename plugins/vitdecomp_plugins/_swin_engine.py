"""Shared traversal for hierarchical window transformers (timm Swin V1 / V2): capture, frozen readout, spatial detail.

Geometry. Stage ``S`` has an ``H_S × W_S`` grid of positions ``p`` (row-major). A patch merging at the start of
stage ``S+1`` sends position ``p`` to parent ``P(p)`` in merge slot ``k(p) ∈ 0..3`` (timm's channel order of the
2×2 gather). Everything from a stage-``S`` stream value to z is linear once the norm statistics are frozen:

    z = Σ_p  w_S[b, p] · M_S[g_S(p)] u[b, p]   (+ constants)

* ``w_S[b, p]`` is a per-image scalar: the final norm's 1/σ at the final position the chain ends in, divided by the
  number of final positions (mean pooling), times the 1/σ of every merge norm on the way;
* ``g_S(p)`` is the sequence of merge slots from ``p`` to its final position (``4^(number of later merges)`` groups);
* ``M_S[g]`` is a batch-independent ``[D, C_S]`` matrix: the merges' slot blocks (centring, γ, reduction) and the
  final norm's centring and γ, composed.

Component level never forms ``M_S``: a component's values are pooled over positions, weighted by ``w_S`` and grouped
by ``g_S`` (``[B, G_S, C_S]``), and the groups are carried stage by stage through the merges' slot blocks. Spatial
detail (``TokenDetail`` per component) applies ``M_S[g(p)]`` per position lazily, on demand.

Window attention: head outputs are captured at the input of ``attn.proj`` in window order (rolled, padded and
partitioned); ``_window_rows`` says which image position each window row belongs to, computed by applying the block's
own roll / pad / partition to a grid of position indices, so the maps are placed where the model writes (un-rolled).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from vitdecomp import Component, Decomposition, TokenGrid
from vitdecomp.decomposition import TokenDetail
from vitdecomp.engine import FrozenNorm, HookSet, freeze_norm, is_identity, to_device

__all__ = ["StagePlan", "BlockPlan", "run_hierarchical"]


# ---------------------------------------------------------------------------------------------------- plan records
@attrs.define(eq=False)
class BlockPlan:
    """One Swin block. ``post_norm``: SwinV2 (``x + norm1(attn(x))``, ``x + norm2(mlp(x))``)."""

    prefix: str
    index: int  # global block index
    module: torch.nn.Module
    attn: torch.nn.Module
    num_heads: int
    head_dim: int
    window_size: tuple
    shift_size: tuple
    post_norm: bool
    norm1: torch.nn.Module
    mlp_out: torch.nn.Module  # module whose output is the whole MLP branch


@attrs.define(eq=False)
class StagePlan:
    """One stage: an optional patch merging (``downsample``: ``reduction`` Linear + ``norm``) and its blocks.

    ``merge_norm_first``: Swin V1 (gather → norm → reduction); V2 is gather → reduction → norm.
    """

    index: int
    prefix: str
    downsample: Optional[torch.nn.Module]
    merge_norm_first: bool
    blocks: List[BlockPlan]
    patch_size: tuple  # pixels per cell of this stage's grid


# ---------------------------------------------------------------------------------------------------- geometry
def _window_rows(H: int, W: int, window: tuple, shift: tuple, device) -> torch.Tensor:
    """For each row of the block's window-partitioned tensor, the image position it belongs to (−1: padding)."""
    idx = torch.arange(H * W, device=device).view(1, H, W, 1)
    if any(shift):
        idx = torch.roll(idx, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    wh, ww = window
    pad_h, pad_w = (wh - H % wh) % wh, (ww - W % ww) % ww
    if pad_h or pad_w:
        idx = F.pad(idx, (0, 0, 0, pad_w, 0, pad_h), value=-1)
    Hp, Wp = H + pad_h, W + pad_w
    idx = idx.view(1, Hp // wh, wh, Wp // ww, ww, 1).permute(0, 1, 3, 2, 4, 5)
    return idx.reshape(-1)


def _merge_slots(H: int, W: int):
    """Parent position (on the ``ceil(H/2) × ceil(W/2)`` grid) and merge slot of every position of an H × W grid,
    from the same reshape timm's PatchMerging applies. Integer geometry, computed on the host with numpy (it
    never depends on the weights or the images, so it never needs to read the accelerator)."""
    idx = np.arange(H * W, dtype=np.int64).reshape(1, H, W, 1)
    if H % 2 or W % 2:
        idx = np.pad(idx, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), constant_values=-1)
    Hp, Wp = idx.shape[1], idx.shape[2]
    g = idx.reshape(1, Hp // 2, 2, Wp // 2, 2, 1).transpose(0, 1, 3, 4, 2, 5).reshape(-1, 4)  # [P, 4]
    keep = g >= 0
    parent = np.empty(H * W, dtype=np.int64)
    slot = np.empty(H * W, dtype=np.int64)
    parent[g[keep]] = np.broadcast_to(np.arange(g.shape[0])[:, None], g.shape)[keep]
    slot[g[keep]] = np.broadcast_to(np.arange(4)[None, :], g.shape)[keep]
    return parent, slot, (Hp // 2, Wp // 2)


def _to_device(a: np.ndarray, device) -> torch.Tensor:
    """A host index array on ``device`` (staged through pinned memory: the host does not wait for the GPU)."""
    return to_device(torch.from_numpy(np.ascontiguousarray(a)), device)


def _linear_matrix(fn: Optional[FrozenNorm], n: int, like: torch.Tensor) -> torch.Tensor:
    """The ``[n, n]`` matrix of a frozen norm's linear part (γ ⊙ centring), identity for None."""
    eye = torch.eye(n, dtype=like.dtype, device=like.device)
    return eye if fn is None else fn.apply_linear(eye).T


# ---------------------------------------------------------------------------------------------------- readout
class _Readout:
    """Frozen linear readout from every stage to z: weights ``w[S]`` [B, N_S], groups ``group[S]`` [N_S],
    merge slot blocks ``slots[S]`` [4, C_S, C_{S-1}] (into stage S), final ``final`` FrozenNorm; composite
    matrices ``composite(S)`` [G_S, D, C_S] are built lazily (spatial detail only)."""

    def __init__(self, dims, grids, w, group, n_groups, slots, final, dtype, device, group_host=None):
        self.dims, self.grids, self.w, self.group, self.n_groups = dims, grids, w, group, n_groups
        # host copies (numpy) of the integer, weight-independent groups: layout decisions never read the device
        self.group_host = group_host if group_host is not None else {S: g.cpu().numpy() for S, g in group.items()}
        self.slots, self.final = slots, final
        self.dtype, self.device = dtype, device
        self._composite: Dict[int, torch.Tensor] = {}
        self._layout: Dict[int, "_Layout"] = {}
        self._mats: Dict[int, torch.Tensor] = {}
        self._block_key, self._block = None, None
        self.last = max(dims)

    def carry(self, acc: torch.Tensor, S: int) -> torch.Tensor:
        """Pooled groups ``[B, K, G_{S-1}, C_{S-1}]`` of stage S−1 → ``[B, K, G_S, C_S]``."""
        Gk = self.slots.get(S)
        if Gk is None:  # no merge: same grid, same groups
            return acc
        B, K, G, C = acc.shape
        acc = acc.reshape(B, K, G // 4, 4, C)
        return torch.einsum("bkgjc,jdc->bkgd", acc, Gk)

    def finish(self, acc: torch.Tensor) -> torch.Tensor:
        """``[B, K, 1, C_L]`` → ``[B, K, D]`` through the final norm's linear part."""
        acc = acc[:, :, 0]
        return self.final.apply_linear(acc) if self.final is not None else acc

    def layout(self, S: int) -> _Layout:
        if S not in self._layout:
            self._layout[S] = _Layout(self.group_host[S], self.n_groups[S], tuple(self.grids[S]), self.device)
        return self._layout[S]

    def mats(self, S: int, key=None, matrix: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[G, k, D]`` in layout order: ``(M_S[g] @ matrix)ᵀ`` (``matrix`` [C_S, k]; None: identity).
        Identity is cached per stage; one ``(key, matrix)`` (the last block asked for) is cached."""
        if matrix is None:
            if S not in self._mats:
                M = self.composite(S)
                lay = self.layout(S)
                if lay.tile:
                    M = M.index_select(0, lay.tile_groups)
                self._mats[S] = M.transpose(1, 2).contiguous()
            return self._mats[S]
        if self._block_key != key:
            Mt = self.mats(S)  # [G, C, D]
            G, C, D = Mt.shape
            full = (matrix.T @ Mt.permute(1, 0, 2).reshape(C, G * D)).view(-1, G, D).permute(1, 0, 2)
            self._block_key, self._block = key, full.contiguous()
        return self._block

    def composite(self, S: int) -> torch.Tensor:
        if S not in self._composite:
            if S == self.last:
                M = _linear_matrix(self.final, self.dims[S], torch.empty(0, dtype=self.dtype, device=self.device))
                M = M.unsqueeze(0)
            else:
                up = self.composite(S + 1)  # [G_{S+1}, D, C_{S+1}]
                Gk = self.slots.get(S + 1)
                if Gk is None:
                    M = up
                else:  # M_S[g*4+k] = M_{S+1}[g] @ G_k
                    M = torch.einsum("gde,kec->gkdc", up, Gk).reshape(-1, up.shape[1], Gk.shape[-1])
            self._composite[S] = M
        return self._composite[S]


# ---------------------------------------------------------------------------------------------------- spatial detail
@attrs.define(eq=False)
class _Term:
    """``u[b, p] = weight[b, p] · (matrix @ values[b, p])`` at stage-``stage`` positions: ``values`` [B, N, k]
    (None: the constant 1, so ``matrix`` is a ``[C_S]`` vector), ``matrix`` [C_S, k] (None: identity)."""

    weight: torch.Tensor
    values: Optional[torch.Tensor]
    matrix: Optional[torch.Tensor]
    block: Optional[tuple] = None  # (key, full matrix [C_S, K], column slice): matrix = full[:, cols]


def _apply_grouped(x: torch.Tensor, layout: "_Layout", mats: torch.Tensor) -> torch.Tensor:
    """``out[b, p] = x[b, p] @ mats[group(p)]``; x [B, N, k], mats [G, k, D] in ``layout`` order → [B, N, D]."""
    B, N, k = x.shape
    G = mats.shape[0]
    if G == 1:
        return x @ mats[0]
    if layout.tile:  # regular grid: the group is a function of (i mod t, j mod t)
        t, (H, W) = layout.tile, layout.hw
        # one bmm with the groups as its batch and (image, position) as rows (no broadcast copies of mats)
        xs = x.view(B, H // t, t, W // t, t, k).permute(2, 4, 0, 1, 3, 5).reshape(t * t, -1, k)
        ys = torch.bmm(xs, mats)  # [t·t, B·n, D]
        D = ys.shape[-1]
        return ys.view(t, t, B, H // t, W // t, D).permute(2, 3, 0, 4, 1, 5).reshape(B, N, D)
    out = x.new_empty(B, N, mats.shape[-1])
    start = 0
    for g in range(G):
        c = int(layout.counts[g])
        if c:
            idx = layout.order[start:start + c]
            out.index_copy_(1, idx, x.index_select(1, idx) @ mats[g])
        start += c
    return out


class _Layout:
    """How a stage's positions fall into merge-slot groups (for applying per-group matrices position by position)."""

    def __init__(self, group: np.ndarray, n_groups: int, hw: tuple, device=None):
        """``group``: the host (numpy) copy of the stage's groups; the index tensors it derives go to ``device``."""
        self.hw = hw
        H, W = hw
        self.tile = None
        t = int(round(n_groups ** 0.5))
        if n_groups > 1 and t * t == n_groups and H % t == 0 and W % t == 0:
            g = group.reshape(H // t, t, W // t, t)
            first = g[0, :, 0, :]
            if bool((g == first.reshape(1, t, 1, t)).all()):
                self.tile = t
                self.tile_groups = _to_device(first.reshape(-1), device)
        if self.tile is None:
            self.order = _to_device(np.argsort(group, kind="stable"), device)
            self.counts = np.bincount(group, minlength=n_groups).tolist()


@attrs.define(eq=False)
class StageTokens(TokenDetail):
    """A component's exact split over the positions of its stage's grid (where it writes), carried to z through
    every later patch merging position by position: ``materialize()`` → ``[B, H_S·W_S, D]`` (row-major)."""

    readout: _Readout
    stage: int
    terms: List[_Term]

    def materialize(self, num_tokens: int) -> torch.Tensor:
        ro, S = self.readout, self.stage
        group = ro.group[S]
        if num_tokens != group.numel():
            raise ValueError(f"stage {S} grid has {group.numel()} positions, asked for {num_tokens}")
        M = ro.composite(S)  # [G, D, C_S]
        layout = ro.layout(S)
        G = M.shape[0]
        out = None
        for t in self.terms:
            if t.values is None:
                Mc = M @ t.matrix  # [G, D]
                y = Mc[group].unsqueeze(0) * t.weight.unsqueeze(-1)
            else:
                v = t.values * t.weight.unsqueeze(-1)
                B, N, k = v.shape
                if t.matrix is None:
                    y = _apply_grouped(v, layout, ro.mats(S))
                else:
                    C, D = t.matrix.shape[0], M.shape[1]
                    # cheaper of (values @ Wᵀ) then M, or the composite M @ W (shared by a block's heads)
                    K = t.block[1].shape[1] if t.block is not None else k
                    if B * N * k * C + B * N * C * D <= G * D * C * K * (k / K if t.block is not None else 1) \
                            + B * N * k * D:
                        y = _apply_grouped(v @ t.matrix.T, layout, ro.mats(S))
                    elif t.block is not None:
                        key, full, cols = t.block
                        y = _apply_grouped(v, layout, ro.mats(S, key, full)[:, cols])
                    else:
                        y = _apply_grouped(v, layout, ro.mats(S, id(t), t.matrix))
            out = y if out is None else out.add_(y)
        return out


@attrs.define(eq=False)
class _Spread(TokenDetail):
    """A constant added after pooling (the final norm's β), spread evenly over the final grid."""

    value: torch.Tensor  # [B, D]

    def materialize(self, num_tokens: int) -> torch.Tensor:
        return (self.value / num_tokens).unsqueeze(1).expand(-1, num_tokens, -1).clone()


# ---------------------------------------------------------------------------------------------------- capture
class _BlockRec:
    __slots__ = ("o", "inv1", "mlp", "shape")

    def __init__(self):
        self.o = self.inv1 = self.mlp = self.shape = None


def run_hierarchical(
    model,
    images: torch.Tensor,
    stages: List[StagePlan],
    *,
    patch_embed: torch.nn.Module,
    final_norm: Optional[torch.nn.Module],
    run,
    start: int,
    tokens: bool,
    meta: dict,
) -> Decomposition:
    """Run the model's own forward once with hooks, then build the exact decomposition.

    ``start``: global index of the first decomposed block (0: the patch embedding is the component ``embed``;
    otherwise the residual stream entering that block is ``init``). ``run(images)`` returns z.
    """
    device, dtype = images.device, images.dtype
    blocks = [b for st in stages for b in st.blocks]
    start_stage = next(st.index for st in stages for b in st.blocks if b.index == start)
    rec = {b.index: _BlockRec() for b in blocks if b.index >= start}
    cap: dict = {}
    merge_norm: Dict[int, Optional[FrozenNorm]] = {}
    stage_shape: Dict[int, tuple] = {}

    with HookSet() as hooks:
        if start == 0:
            hooks.post(patch_embed, lambda out: cap.__setitem__("first", out))
        else:
            blk0 = blocks[start].module
            hooks.pre(blk0, lambda x: cap.__setitem__("first", x))
        for st in stages:
            hooks.pre(st.blocks[0].module, lambda x, S=st.index: stage_shape.__setitem__(S, tuple(x.shape[1:])))
            if st.index > start_stage and st.downsample is not None and not is_identity(st.downsample.norm):
                hooks.pre(st.downsample.norm,
                          lambda x, S=st.index, m=st.downsample.norm: merge_norm.__setitem__(S, freeze_norm(m, x)))
        if final_norm is not None and not is_identity(final_norm):
            hooks.pre(final_norm, lambda x: cap.__setitem__("final_in", x))
        for b in blocks:
            if b.index < start:
                continue
            r = rec[b.index]

            def on_proj_in(x, r=r):
                r.o = x

            hooks.pre(b.attn.proj, on_proj_in)
            if b.post_norm:
                hooks.pre(b.norm1, lambda x, r=r, m=b.norm1: setattr(r, "inv1", freeze_norm(m, x)))
            hooks.post(b.mlp_out, lambda out, r=r: setattr(r, "mlp", out))
        z = run(images)

    # frozen final norm (statistics of the input the forward saw)
    fin = freeze_norm(final_norm, cap.pop("final_in")) if "final_in" in cap else None

    B = images.shape[0]
    L = len(stages) - 1
    # ---------------------------------------------------------------- geometry, weights and groups per stage
    grids = {S: stage_shape[S][:2] for S in stage_shape}
    dims = {S: stage_shape[S][2] for S in stage_shape}
    N = {S: grids[S][0] * grids[S][1] for S in grids}
    if fin is not None:
        w_last = fin.inv_scale.reshape(B, -1) / N[L]
    else:
        w_last = torch.full((B, N[L]), 1.0 / N[L], dtype=dtype, device=device)
    w = {L: w_last}
    # integer geometry is built on the host and copied once (non-blocking): no device→host round trips
    group_host = {L: np.zeros(N[L], dtype=np.int64)}
    n_groups = {L: 1}
    slots = {}
    for S in range(L - 1, start_stage - 1, -1):
        nxt = stages[S + 1]
        if nxt.downsample is None:
            w[S], group_host[S], n_groups[S] = w[S + 1], group_host[S + 1], n_groups[S + 1]
            continue
        parent, slot, out_hw = _merge_slots(*grids[S])
        if tuple(out_hw) != tuple(grids[S + 1]):
            raise RuntimeError(f"patch merging of stage {S + 1} maps {grids[S]} to {out_hw}, but the stage runs on {grids[S + 1]}")
        fn = merge_norm.get(S + 1)
        up = w[S + 1] if fn is None else w[S + 1] * fn.inv_scale.reshape(B, -1)
        w[S] = up.index_select(1, _to_device(parent, device))
        group_host[S] = group_host[S + 1][parent] * 4 + slot
        n_groups[S] = n_groups[S + 1] * 4
        # slot blocks of the merge into S+1: [4, C_{S+1}, C_S]
        red = nxt.downsample.reduction.weight.detach().to(dtype)  # [C', 4C]
        if fn is not None:
            if nxt.merge_norm_first:  # V1: reduction(γ ⊙ centre(x))
                A = red * fn.weight if fn.weight is not None else red
                if fn.center:
                    A = A - A.mean(1, keepdim=True)
            else:  # V2: γ ⊙ centre(reduction(x))
                A = red - red.mean(0, keepdim=True) if fn.center else red
                if fn.weight is not None:
                    A = A * fn.weight.unsqueeze(1)
        else:
            A = red
        Cn, C4 = A.shape
        slots[S + 1] = A.view(Cn, 4, C4 // 4).permute(1, 0, 2).contiguous()
    group = {S: _to_device(g, device) for S, g in group_host.items()}
    readout = _Readout(dims=dims, grids=grids, w=w, group=group, n_groups=n_groups, slots=slots, final=fin,
                       dtype=dtype, device=device, group_host=group_host)

    # ---------------------------------------------------------------- pooling helpers
    def pool(values: torch.Tensor, weight: torch.Tensor, S: int) -> torch.Tensor:
        """Σ_{p∈g} weight[b, p] values[b, p, :] → [B, G_S, k]."""
        Bv, Nv, k = values.shape
        out = values.new_zeros(Bv, n_groups[S], k)
        out.index_add_(1, group[S], values * weight.unsqueeze(-1))
        return out

    def weight_sum(weight: torch.Tensor, S: int) -> torch.Tensor:
        out = weight.new_zeros(B, n_groups[S])
        out.index_add_(1, group[S], weight)
        return out

    comps: List[Component] = []
    pooled_by_stage: Dict[int, List[torch.Tensor]] = {S: [] for S in range(start_stage, L + 1)}  # [B, K, G, C]
    details: Dict[str, TokenDetail] = {}
    token_grids: Dict[str, TokenGrid] = {}

    def grid_for(S):
        st = stages[S]
        return TokenGrid(num_prefix=0, h=grids[S][0], w=grids[S][1], patch_size=st.patch_size)

    def emit(comp: Component, S: int, pooled: torch.Tensor, terms: Optional[List[_Term]]):
        """pooled: [B, K, G_S, C_S] for K components (K = 1 unless heads)."""
        comps.append(comp)
        pooled_by_stage[S].append(pooled)
        if tokens and terms is not None:
            details[comp.name] = StageTokens(readout=readout, stage=S, terms=terms)
            token_grids[comp.name] = grid_for(S)

    # ---------------------------------------------------------------- components in forward order
    first = cap["first"]
    first = first.reshape(B, -1, first.shape[-1])
    S0 = start_stage
    if start == 0:
        comp = Component("embed", "embed")
    else:
        comp = Component("init", "residual", block=start)
    emit(comp, S0, pool(first, w[S0], S0).unsqueeze(1), [_Term(w[S0], first, None)])

    for st in stages:
        S = st.index
        if S < S0:
            continue
        if S > S0 and st.downsample is not None:
            fn = merge_norm.get(S)
            const = None
            if fn is not None and fn.bias is not None:
                beta = fn.bias
                const = (st.downsample.reduction.weight.detach().to(dtype) @ beta) if st.merge_norm_first else beta
            if const is not None:
                name = f"{st.prefix}.downsample.norm.bias"
                ws = weight_sum(w[S], S)
                emit(Component(name, "const", stage=S), S, (ws.unsqueeze(-1) * const).unsqueeze(1),
                     [_Term(w[S], None, const)])
        for b in st.blocks:
            if b.index < start:
                continue
            r = rec[b.index]
            if r.o is None or r.mlp is None:
                raise RuntimeError(f"hooks of {b.prefix} did not fire: the model's forward does not call its modules as expected")
            H_, W_ = grids[S]
            Nn = H_ * W_
            rows = _window_rows(H_, W_, b.window_size, b.shift_size, device)
            valid = rows >= 0
            pos = rows.clamp_min(0)
            o = r.o.reshape(B, -1, r.o.shape[-1])  # [B, R, H*dh] window order
            if o.shape[1] != rows.numel():
                raise RuntimeError(f"{b.prefix}: attention saw {o.shape[1]} window rows, expected {rows.numel()}")
            Hh, dh = b.num_heads, b.head_dim
            Wo = b.attn.proj.weight.detach().to(dtype)  # [C, H*dh]
            bo = b.attn.proj.bias.detach().to(dtype) if b.attn.proj.bias is not None else None
            C = Wo.shape[0]
            wb = w[S]
            if b.post_norm:
                fn1 = r.inv1
                inv1 = fn1.inv_scale.reshape(B, -1)
                Wo_eff = fn1.apply_linear(Wo.T).T  # γ ⊙ centre(W_O ·)
                bo_eff = fn1.apply_linear(bo) if bo is not None else None
                w_heads = wb * inv1
                beta1 = fn1.bias
            else:
                Wo_eff, bo_eff, w_heads, beta1 = Wo, bo, wb, None
            # heads: pool in window order (weights and groups gathered through the window rows)
            wr = w_heads.index_select(1, pos) * valid.to(dtype)
            gr = group[S].index_select(0, pos)
            ph = o.new_zeros(B, n_groups[S], o.shape[-1])
            ph.index_add_(1, gr, o * wr.unsqueeze(-1))
            ph = ph.view(B, n_groups[S], Hh, dh)
            heads = torch.einsum("bghk,chk->bhgc", ph, Wo_eff.view(C, Hh, dh))  # [B, H, G, C]
            if tokens:
                # image-order head outputs: row of each image position
                # (padding rows are written to a spare last entry: no boolean-mask indexing, no host sync)
                inv_rows = torch.empty(Nn + 1, dtype=torch.long, device=device).index_put_(
                    (torch.where(valid, rows, Nn),), torch.arange(rows.numel(), device=device))[:Nn]
                o_img = o.index_select(1, inv_rows).view(B, Nn, Hh, dh)
            for h in range(Hh):
                terms = None
                if tokens:
                    cols = slice(h * dh, (h + 1) * dh)
                    terms = [_Term(w_heads, o_img[:, :, h], Wo_eff[:, cols], block=(b.prefix, Wo_eff, cols))]
                comps.append(Component(f"{b.prefix}.attn.head.{h}", "head", block=b.index, stage=S, head=h))
                if tokens:
                    details[comps[-1].name] = StageTokens(readout=readout, stage=S, terms=terms)
                    token_grids[comps[-1].name] = grid_for(S)
            pooled_by_stage[S].append(heads)
            # attention bias (V2: the post-norm's linear part of the bias, plus its β)
            if bo_eff is not None or beta1 is not None:
                pooled = 0
                terms = []
                if bo_eff is not None:
                    pooled = weight_sum(w_heads, S).unsqueeze(-1) * bo_eff
                    terms.append(_Term(w_heads, None, bo_eff))
                if beta1 is not None:
                    pooled = pooled + weight_sum(wb, S).unsqueeze(-1) * beta1
                    terms.append(_Term(wb, None, beta1))
                emit(Component(f"{b.prefix}.attn.bias", "const", block=b.index, stage=S), S, pooled.unsqueeze(1), terms)
            m = r.mlp.reshape(B, -1, r.mlp.shape[-1])
            emit(Component(f"{b.prefix}.mlp", "mlp", block=b.index, stage=S), S, pool(m, wb, S).unsqueeze(1),
                 [_Term(wb, m, None)])

    # ---------------------------------------------------------------- carry groups through the merges to z
    acc = None
    for S in range(S0, L + 1):
        if acc is not None:
            acc = readout.carry(acc, S)
        here = pooled_by_stage[S]
        if here:
            cur = torch.cat(here, 1)
            acc = cur if acc is None else torch.cat([acc, cur], 1)
    values = readout.finish(acc)  # [B, K, D]
    if fin is not None and fin.bias is not None:
        comps.append(Component("norm.bias", "const"))
        beta = fin.bias.expand(B, -1)
        values = torch.cat([values, beta.unsqueeze(1)], 1)
        if tokens:
            details["norm.bias"] = _Spread(beta)
            token_grids["norm.bias"] = grid_for(L)
    grid = grid_for(S0)
    return Decomposition(contributions=values, components=tuple(comps), representation=z, grid=grid,
                         token_details=details if tokens else {}, token_grids=token_grids if tokens else {}, meta=meta)
