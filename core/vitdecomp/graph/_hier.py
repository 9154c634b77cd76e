"""Engine part for hierarchical streams (a stream on its own grid, e.g. a Swin stage): patch merging, window heads
placed at their query rows, post-norms inside a branch.

Algebra. On a stream with a grid the map to z is a list of *grouped terms* ``(w [B, R], group [R], Ms [G, C, D])``:
row ``r`` reaches z as ``w[b, r] · u[b, r] @ Ms[group[r]]``. A plain term ``(w, M)`` is the case ``G = 1``. A
2×2 patch merging turns every term of the merged stream into one on the stream it reads with 4× the groups: row
``p`` goes to its parent ``P(p)`` in slot ``k(p)``, so ``w'[p] = w[P(p)] / σ[P(p)]`` (the merge norm frozen),
``group'[p] = 4·group[P(p)] + k(p)`` and ``Ms'[4g + k] = A_k @ Ms[g]`` (``A_k``: the slot's block of the merge's
linear part). A write is pooled over rows by group, weighted by ``w`` (``[B, G, C]``), and the pooled groups are
carried merge by merge through the slot blocks ``A_k`` to z, so component level never forms ``Ms`` and stays near
one forward; token detail composes ``Ms`` once per stream (lazily) and applies ``Ms[group[r]]`` written straight
into the component's ``[B, R, D]`` map at each group's rows — a row of ``t × t`` merge tiles at a time on even
grids, group by group otherwise — so the map and a slice of products are all it holds (several parts of a
component add into the same map).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import List, Optional

import numpy as np
import torch

from .._records import Component
from ..decomposition import TokenDetail
from ..engine import freeze_norm, to_device

__all__ = ["merge_slots", "window_rows", "grid_rows", "SourceTokens"]


# ---------------------------------------------------------------------------------------------- geometry (host)
def merge_slots(H: int, W: int):
    """Parent position (on the ``ceil(H/2) × ceil(W/2)`` grid) and merge slot of every position of an H × W grid,
    from the reshape timm's / Hugging Face's 2×2 patch merging applies (pad odd sides, gather ``(dw, dh)``-major)."""
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


def window_rows(H: int, W: int, window, shift, pad_first: bool = False) -> np.ndarray:
    """For each row of a block's window-partitioned tensor (cyclic shift by ``-shift``, pad to whole windows,
    partition; ``pad_first``: pad, then shift the padded grid, as Hugging Face's Swin does), the grid position it
    holds (−1: padding)."""
    idx = np.arange(H * W, dtype=np.int64).reshape(H, W)
    wh, ww = window
    ph, pw = (wh - H % wh) % wh, (ww - W % ww) % ww
    if pad_first and (ph or pw):
        idx = np.pad(idx, ((0, ph), (0, pw)), constant_values=-1)
    if any(shift):
        idx = np.roll(idx, shift=(-shift[0], -shift[1]), axis=(0, 1))
    if not pad_first and (ph or pw):
        idx = np.pad(idx, ((0, ph), (0, pw)), constant_values=-1)
    Hp, Wp = H + ph, W + pw
    return idx.reshape(Hp // wh, wh, Wp // ww, ww).transpose(0, 2, 1, 3).reshape(-1)


def grid_rows(H: int, W: int, grid) -> np.ndarray:
    """For each row of a grid-partitioned tensor (MaxViT's grid attention: ``grid = (gh, gw)`` cells per
    partition, each partition the positions ``(i·H/gh + y, j·W/gw + x)`` for fixed ``(y, x)``), the grid position
    it holds. The block (window) partition is :func:`window_rows` without shift."""
    gh, gw = grid
    if H % gh or W % gw:
        raise ValueError(f"a {H}×{W} grid does not split into {gh}×{gw} grid cells")
    idx = np.arange(H * W, dtype=np.int64).reshape(gh, H // gh, gw, W // gw)
    return idx.transpose(1, 3, 0, 2).reshape(-1)


def _dev(a: np.ndarray, device) -> torch.Tensor:
    return to_device(torch.from_numpy(np.ascontiguousarray(a)), device)


# ---------------------------------------------------------------------------------------------- grouped terms
def _channels_first(x: torch.Tensor) -> bool:
    """``x`` [B, R, k] is a channels-first map seen as rows (an NCHW tensor's ``flatten(2).transpose(1, 2)``, or a
    product of one): flattening its rows would copy it, a batched product reads it as transposed matrices."""
    return x.ndim == 3 and x.shape[0] > 1 and not x.is_contiguous() and x.transpose(1, 2).is_contiguous()


def _rows_mm(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``x @ M`` as one 2-D product (a batched ``x`` would make matmul broadcast ``M`` per batch entry); a
    channels-first ``x`` as one batched product of its transposed matrices (no copy of ``x``)."""
    if _channels_first(x):
        return torch.bmm(x, M.expand(x.shape[0], *M.shape))
    return (x.reshape(-1, x.shape[-1]) @ M).view(*x.shape[:-1], M.shape[-1])


class _Tile:
    """A grid whose rows' groups depend only on the position inside a ``t × t`` tile (``H``, ``W`` multiples of
    ``t``): the group of position ``(y, x)`` is ``cells[(y mod t)·t + x mod t]`` (``cells`` None: the identity)."""

    __slots__ = ("t", "H", "W", "cells")

    def __init__(self, t, H, W, cells):
        self.t, self.H, self.W, self.cells = t, H, W, cells


def _tiled(host: np.ndarray, G: int, hw, device) -> Optional[_Tile]:
    """The tiled layout of groups ``host`` on an ``hw`` grid, or None (patch merging makes one whenever every
    merge on the way saw even sides: the group is the path of merge slots, a function of ``(y, x) mod 2^m``)."""
    H, W = hw
    t = int(round(G ** 0.5))
    if G < 4 or t * t != G or H % t or W % t or host.size != H * W:
        return None
    g = host.reshape(H // t, t, W // t, t)
    cells = g[0, :, 0, :]
    if not (g == cells.reshape(1, t, 1, t)).all() or np.unique(cells).size != G:
        return None
    cells = cells.reshape(-1)
    return _Tile(t, H, W, None if (cells == np.arange(G)).all() else _dev(cells, device))


class _GTerm:
    __slots__ = ("w", "group", "host", "G", "_Ms", "chain", "_order", "pending", "count", "base", "out", "_block",
                 "shared")

    def __init__(self, w, group, host, G, Ms=None, chain=None, shared=False):
        self.w, self.group, self.host, self.G, self._Ms, self.chain = w, group, host, G, Ms, chain
        self.shared = shared  # chain through one matrix for every slot (a pooling downsample): groups unchanged
        self._order = None
        self.pending, self.count, self.base, self.out = [], 0, None, None
        self._block = None  # (key, [G, k, D]): the last block's heads' matrices, shared by its heads

    def through(self, A: torch.Tensor, w: Optional[torch.Tensor] = None) -> "_GTerm":
        """This term seen one step earlier through a matrix ``A`` shared by every group (a norm's linear part, a
        channel selection): same rows, groups and layout, ``Ms' = A @ Ms``; ``w``: new row weights (default
        the same)."""
        nt = _GTerm(self.w if w is None else w, self.group, self.host, self.G, chain=(A, self), shared=True)
        nt._order = self._order
        return nt

    def block_mats(self, key, pre: torch.Tensor) -> torch.Tensor:
        """``pre @ Ms[g]`` for every group (``pre`` [k, C], e.g. a block's output projection for all heads)."""
        if self._block is None or self._block[0] != key:
            self._block = (key, torch.matmul(pre.unsqueeze(0), self.Ms))
        return self._block[1]

    # pooled groups of every write are queued and carried to z together (each slot block is read once per
    # stream, as in one batched pass): ``defer`` returns where a write's rows will be, ``finish`` carries them
    def defer(self, P: torch.Tensor) -> int:
        """Queue pooled groups ``P`` [B, k, G, C]; returns the index of the first of its k results."""
        at = self.count
        self.pending.append(P)
        self.count += P.shape[1]
        return at

    def finish(self) -> None:
        if not self.pending:
            return
        P = torch.cat(self.pending, 1) if len(self.pending) > 1 else self.pending[0]
        self.pending = []
        if self._Ms is None and self.shared:
            self.base = self.chain[1].defer(_rows_mm(P, self.chain[0]))
        elif self._Ms is None:
            L, up = self.chain
            self.base = up.defer(_rows_mm(P.reshape(*P.shape[:-2], self.G // 4, 4 * P.shape[-1]), L))
        else:
            self.out = _rows_mm(P.flatten(-2), self._Ms.reshape(-1, self._Ms.shape[-1]))  # [B, K, D]

    def value(self, i: int) -> torch.Tensor:
        return self.out[:, i] if self.out is not None else self.chain[1].value(self.base + i)

    def depth(self) -> int:
        return 0 if self.chain is None else 1 + self.chain[1].depth()

    @property
    def Ms(self) -> torch.Tensor:
        """``[G, C, D]``: each group's matrix to z (composed through the merges on first use, then kept)."""
        if self._Ms is None and self.shared:
            L, up = self.chain  # L [C, C'], the same for every slot
            self._Ms = torch.matmul(L.unsqueeze(0), up.Ms)
        elif self._Ms is None:
            L, up = self.chain  # L [4C, C']: slot k's block is rows k·C:(k+1)·C
            C = L.shape[0] // 4
            M = torch.matmul(L.view(1, 4, C, -1), up.Ms.unsqueeze(1))  # [G', 4, C, D]
            self._Ms = M.reshape(self.G, C, -1)
        return self._Ms

    def layout(self):
        """Each non-empty group and the rows it holds, as device index tensors (host arithmetic only); a tiled
        layout (:func:`_tiled`) when the merge that made this term set one."""
        if self._order is None:
            order = np.argsort(self.host, kind="stable")
            counts = np.bincount(self.host, minlength=self.G)
            at = np.concatenate([[0], np.cumsum(counts)])
            self._order = [(g, _dev(order[at[g]:at[g + 1]], self.w.device)) for g in range(self.G) if counts[g]]
        return self._order

    def apply_rows(self, v: torch.Tensor, mats: Optional[torch.Tensor] = None,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``out[b, r] (+)= v[b, r] @ mats[group[r]]`` for ``v`` [B, R, k] (weights already applied; ``mats``
        [G, k, D], default ``Ms``), written in place at each group's rows: beside ``out`` only a slice of the
        products is held (no sorted copy of the map, no gather back to grid order); with ``out`` given the
        products are added to it. On a tiled grid one row of tile cells at a time (a batched product per tile
        row, copied into ``out`` through a strided view); otherwise group by group."""
        mats = self.Ms if mats is None else mats
        B, R, k = v.shape
        D = mats.shape[-1]
        if self.G == 1:
            if out is None:
                return _rows_mm(v, mats[0])
            if _channels_first(v):
                out.baddbmm_(v, mats[0].expand(B, k, D))
            else:
                out.view(-1, D).addmm_(v.reshape(-1, k), mats[0])
            return out
        first = out is None
        if first:
            out = v.new_empty(B, R, D)
        lay = self.layout()
        if isinstance(lay, _Tile):
            t, H, W = lay.t, lay.H, lay.W
            mt = mats if lay.cells is None else mats.index_select(0, lay.cells)  # [t·t, k, D], cell (i, j) at i·t + j
            xs = v.reshape(B, H // t, t, W // t, t, k).permute(2, 4, 0, 1, 3, 5).reshape(t * t, -1, k)
            o6 = out.view(B, H // t, t, W // t, t, D)
            for i in range(t):
                ys = torch.bmm(xs[i * t:(i + 1) * t], mt[i * t:(i + 1) * t])  # [t (cell column), B·n, D]
                ys = ys.view(t, B, H // t, W // t, D).permute(1, 2, 3, 0, 4)
                if first:
                    o6[:, :, i].copy_(ys)
                else:
                    o6[:, :, i].add_(ys)
            return out
        for g, idx in lay:
            y = _rows_mm(v.index_select(1, idx), mats[g])
            if first:
                out.index_copy_(1, idx, y)
            else:
                out.index_add_(1, idx, y)
        return out

    def pool(self, u: torch.Tensor) -> torch.Tensor:
        """``Σ_{r∈g} w[b, r] u[b, r, ...]`` → [B, G, ...] for ``u`` [B, R, ...]."""
        if self.G == 1 and u.ndim == 3:  # one batched product, no weighted copy of u
            return torch.bmm(self.w.unsqueeze(1), u)
        wu = u * self.w.view(*self.w.shape, *([1] * (u.ndim - 2)))
        out = u.new_zeros(u.shape[0], self.G, *u.shape[2:])
        return out.index_add_(1, self.group, wu)


def gterms(terms, s, device, width: int) -> List[_GTerm]:
    """The terms of hierarchical stream ``s`` (rows of ``width`` features) as grouped terms (a plain term is one
    group)."""
    out = []
    for t in terms:
        if isinstance(t, _GTerm):
            out.append(t)
            continue
        M = t.M
        if M is None:
            M = torch.eye(width, device=device, dtype=t.w.dtype)
        out.append(_GTerm(t.w, torch.zeros(s.rows, dtype=torch.long, device=device),
                          np.zeros(s.rows, dtype=np.int64), 1, Ms=M.unsqueeze(0)))
    return out


class GroupedRows(TokenDetail):
    """A component on a hierarchical stream, split over its rows: ``Σ_parts w[b, r] · (v[b, r] @ pre) @
    Ms[group[r]]`` (``v`` None: the constant row vector ``pre``)."""

    def __init__(self, parts, shared=None):
        self.parts = parts  # (term, w, v or None, pre or None)
        self.shared = shared  # (key, all heads' pre [H·dh, C], column slice of this head) for heads

    def materialize(self, num_tokens: int) -> torch.Tensor:
        out = None  # every part is added into one [B, R, D] map in place
        for term, w, v, pre in self.parts:
            if v is None:
                cm = torch.einsum("c,gcd->gd", pre, term.Ms)  # [G, D]
                # one group: the vector broadcast over the rows (no [R, D] gather of it)
                y = (cm if term.G == 1 else cm.index_select(0, term.group)).unsqueeze(0) * w.unsqueeze(-1)
                out = y if out is None else out.add_(y)
                continue
            u = v * w.unsqueeze(-1)
            B, R, k = u.shape
            C, D = term.Ms.shape[1], term.Ms.shape[2]
            mats = None
            if pre is not None and self.shared is not None:
                key, full, cols, made = self.shared
                if made is not None and term in made:  # the composite the source split already computed
                    mats = made[term][:, cols]
                # cheaper of (u @ pre) then Ms row by row, or the block's composite pre @ Ms (shared by its heads)
                elif B * R * (k * C + C * D) > term.G * full.shape[0] * C * D / (full.shape[0] / k) + B * R * k * D:
                    mats = term.block_mats(key, full)[:, cols]
            if mats is None and pre is not None:
                u = _rows_mm(u, pre)
            out = term.apply_rows(u, mats, out)
        if out.shape[1] != num_tokens:
            raise ValueError(f"the stream has {out.shape[1]} rows, the grid {num_tokens} positions")
        return out


class Lazy:
    """A component's value still queued on grouped terms: ``Σ (term, index)`` plus ``Σ factor · part`` (parts:
    other lazy values or tensors; ``bias="paper"`` adds constants' even shares this way). See :func:`resolve`."""

    __slots__ = ("refs", "extra")

    def __init__(self, refs=None, extra=None):
        self.refs = list(refs or [])
        self.extra = list(extra or [])

    def __add__(self, other) -> "Lazy":
        if isinstance(other, Lazy):
            return Lazy(self.refs + other.refs, self.extra + other.extra)
        return Lazy(self.refs, self.extra + [(other, 1.0)])

    __radd__ = __add__

    def __truediv__(self, n) -> "Lazy":
        return Lazy([], [(self, 1.0 / n)])

    def terms(self):
        for t, _ in self.refs:
            yield t
        for x, _ in self.extra:
            if isinstance(x, Lazy):
                yield from x.terms()

    def value(self):
        total = None
        for t, i in self.refs:
            x = t.value(i)
            total = x if total is None else total + x
        for x, f in self.extra:
            x = x.value() if isinstance(x, Lazy) else x
            x = x if f == 1.0 else x * f
            total = x if total is None else total + x
        return total


def resolve(values: list) -> list:
    """Carry every queued write to z, the streams furthest from z first (a stream's results join the queue of
    the one it merges into), then read each component's value."""
    terms, seen = [], set()
    for v in values:
        if isinstance(v, Lazy):
            for t in v.terms():
                while t is not None and id(t) not in seen:
                    seen.add(id(t))
                    terms.append(t)
                    t = t.chain[1] if t.chain is not None else None
    for t in sorted(terms, key=lambda t: -t.depth()):
        t.finish()
    return [v.value() if isinstance(v, Lazy) else v for v in values]


def _const(terms, c, wscale=None):
    """Contribution of the constant row vector ``c`` added at every row (rows weighted by ``wscale`` too)."""
    refs, parts = [], []
    for t in terms:
        w = t.w if wscale is None else t.w * wscale
        ws = t.w.new_zeros(t.w.shape[0], t.G).index_add_(1, t.group, w)
        refs.append((t, t.defer((ws.unsqueeze(-1) * c).unsqueeze(1))))
        parts.append((t, w, None, c))
    return Lazy(refs), parts


def contribute(terms, u, tokens):
    """A write ``u`` [B, R, C] on a hierarchical stream."""
    refs, parts = [], []
    for t in terms:
        refs.append((t, t.defer(t.pool(u).unsqueeze(1))))
        parts.append((t, t.w, u, None))
    return Lazy(refs), (GroupedRows(parts) if tokens else None)


def head_weights(op, dtype):
    """(H, W_O [D, H·dh], per-head output maps [D, H, dh] with LayerScale folded in, LayerScale γ or None) of a
    ``heads`` op."""
    H = op.module.num_heads
    Wo = op.extra["weight"].detach().to(dtype)
    Wg = Wo.view(Wo.shape[0], H, -1)
    gamma = None if op.gamma is None else op.gamma.detach().to(dtype)
    if gamma is not None:
        Wg = Wg * gamma.view(-1, 1, 1)
    return H, Wo, Wg, gamma


def heads(op, rec, terms, emitted, tokens, device, dtype, post_fn=None, paper=False):
    """Window (or any query-placed) heads on a hierarchical stream, with an optional post-norm inside the branch
    (SwinV2: ``x + norm(attn(x))``): ``<name>.head.<h>`` at their query rows, ``<name>.bias`` = the output bias
    (through the post-norm's linear part) and the post-norm's β. ``paper`` (``bias="paper"``): no ``.bias``
    component; the output bias, and the post-norm's β and centring −γ·μ/σ (its leaves are the H heads: the norm
    is inside the branch), go 1/H to each head. A source with ``rows`` and captured attention (``rec.attn``,
    ``rec.v`` in partition order) also splits each head by the position it reads (``rec.sources``)."""
    H, Wo, Wg, gamma = head_weights(op, dtype)
    C = Wo.shape[0]
    A = None
    inv = None
    if post_fn is not None:
        inv = post_fn.inv_scale.reshape(post_fn.inv_scale.shape[0], -1)
        A = torch.eye(C, device=device, dtype=dtype)
        if post_fn.center and not paper:
            A = A - 1.0 / C
        if post_fn.weight is not None:
            A = A * post_fn.weight
    o = rec.o  # [B, H, R, dh]
    full = None
    if tokens:  # every head's map [H·dh, C] (through the post-norm's linear part)
        full = Wg.permute(1, 2, 0).reshape(-1, C)
        if A is not None:
            full = full @ A
    starts = []
    for t in terms:
        w = t.w if inv is None else t.w * inv
        if t.G == 1:  # one batched product, no weighted copy of o
            pooled = torch.einsum("bhrk,br->bhk", o, w).unsqueeze(1)
        else:
            pooled = o.new_zeros(o.shape[0], t.G, H, o.shape[-1]).index_add_(
                1, t.group, o.permute(0, 2, 1, 3) * w[:, :, None, None])  # [B, G, H, dh]
        hv = torch.einsum("bghk,chk->bhgc", pooled, Wg)
        if A is not None:
            hv = _rows_mm(hv, A)
        starts.append((t, t.defer(hv)))
    total, parts = None, []
    b = op.extra["bias"]
    if b is not None:
        b = b.detach().to(dtype)
        if gamma is not None:
            b = b * gamma
        total, parts = _const(terms, b if A is None else b @ A, inv)
    if post_fn is not None and post_fn.bias is not None:
        tb, pb = _const(terms, post_fn.bias)
        total = tb if total is None else total + tb
        parts += pb
    if paper and post_fn is not None and post_fn.center:
        g = post_fn.weight if post_fn.weight is not None else torch.ones(C, device=device, dtype=dtype)
        tc, pc = _const(terms, g, -rec.post_mu.reshape(inv.shape) * inv)
        total = tc if total is None else total + tc
        parts += pc
    srcs, made = None, None
    if tokens and getattr(rec, "attn", None) is not None:
        # every head's composite pre_h @ Ms[g], one product per term for the whole block: the source split's
        # matrices are views of it, and the query maps reuse it (not recomputed per head or per map)
        made = {t: torch.matmul(full.unsqueeze(0), t.Ms) for t in terms}  # [G, H·dh, D]
        srcs = source_split(op, rec, terms, made, inv)
    cargs = op.extra.get("cargs", {})
    for h in range(H):
        detail = None
        if tokens:
            dh = Wg.shape[-1]
            pre = full[h * dh:(h + 1) * dh]  # [dh, C]
            hp = [(t, t.w if inv is None else t.w * inv, o[:, h], pre) for t in terms]
            if paper:
                hp += [(t, w / H, v, c) for t, w, v, c in parts]
            detail = GroupedRows(hp, shared=(op.name, full, slice(h * dh, (h + 1) * dh), made))
        value = Lazy([(t, at + h) for t, at in starts])
        if paper and total is not None:
            value = value + total / H
        name = f"{op.name}.head.{h}"
        emitted.append((Component(name, "head", block=op.block, head=h, **cargs), value, detail))
        if srcs is not None:
            rec.sources[name] = srcs[h]
    if total is not None and not paper:
        emitted.append((Component(f"{op.name}.bias", "const", block=op.block, **cargs), total,
                        GroupedRows(parts) if tokens else None))


def _narrow_factor():
    import attrs

    from ..decomposition import FactorTokens

    @attrs.define(eq=False)
    class NarrowFactor(FactorTokens):
        """:class:`FactorTokens` with the weight applied on the narrow side (``dh`` channels) before the product
        to D: ``(values · weight) @ matrix.T`` (same value; a [B, T, dh] product instead of a [B, T, D] one)."""

        def materialize(self, num_tokens: int) -> torch.Tensor:
            return (self.values * self.weight.unsqueeze(-1)) @ self.matrix.T

    return NarrowFactor


_NarrowFactor = _narrow_factor()


def source_split(op, rec, terms, made, inv):
    """Each head of a partitioned attention split by the position it *reads*: ``a[b, j] · (v_j @ pre_h) @ Ms[g]``
    with ``a[b, j] = Σ_{q ∈ g} w[b, q] A_qj`` over the queries of j's own partition (the attention of the forward,
    ``rec.attn`` [B·nW, H, N, N], and values ``rec.v`` [B·nW, H, N, dh] in partition order; ``op.module.rows``:
    the grid position of each partitioned row). Returns one detail per head."""
    from ..decomposition import _Summed

    src = op.module
    rows = np.asarray(src.rows)
    R = int(terms[0].w.shape[1])
    nwn = rows.size
    inv_map = np.empty(R, dtype=np.int64)
    inv_map[rows[rows >= 0]] = np.nonzero(rows >= 0)[0]
    device = terms[0].w.device
    take = _dev(np.where(rows >= 0, rows, R), device)  # padding rows read a zero weight
    back = _dev(inv_map, device)
    attn, v = rec.attn, rec.v
    Hh, N = attn.shape[1], attn.shape[-1]
    B = terms[0].w.shape[0]
    vg = v.permute(0, 2, 1, 3).reshape(B, nwn, Hh, -1).index_select(1, back)  # [B, R, H, dh] grid order
    dh = vg.shape[-1]
    parts = [[] for _ in range(Hh)]
    for t in terms:
        w = t.w if inv is None else t.w * inv
        for g in range(t.G):
            wg = w if t.G == 1 else w * (t.group == g).to(w.dtype)
            wp = torch.cat([wg, wg.new_zeros(B, 1)], 1).index_select(1, take).reshape(-1, N)  # [B·nW, N]
            a = torch.einsum("pq,phqj->pjh", wp, attn).reshape(B, nwn, Hh).index_select(1, back)  # [B, R, H]
            for h in range(Hh):
                M = made[t][g, h * dh:(h + 1) * dh].T  # [D, dh]: head h's rows of the block's pre @ Ms[g]
                parts[h].append(_NarrowFactor(weight=a[..., h].contiguous(), values=vg[:, :, h], matrix=M))
    return [p[0] if len(p) == 1 else _Summed(p) for p in parts]


class SourceTokens(Mapping):
    """Head name → :class:`TokenDetail` splitting the head by the position it reads from (``dec.meta
    ["source_tokens"]``). A read-only mapping rather than a dict, so that ``Decomposition.save`` records a
    one-line summary of it instead of trying to serialise tensors into the JSON header."""

    def __init__(self, details):
        self._d = dict(details)

    def __getitem__(self, name):
        return self._d[name]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)

    def __repr__(self):
        return f"<source-token splits of {len(self._d)} attention heads>"

    __str__ = __repr__


def merge(op, rec, terms_dst, device, dtype, tokens, paper=False):
    """A 2×2 patch merging read backwards: its constant on the merged stream, and the grouped terms of the stream
    it reads. Returns ``(component entry or None, terms of the source stream)``. ``paper``: the norm does not
    centre each leaf; the stream's centring −γ·μ/σ (through the reduction for V1) joins the constant."""
    x = op.extra
    dst = op.stream
    fn = freeze_norm(x["norm"], rec.val) if rec.val is not None else None
    red = x["reduction"].weight.detach().to(dtype)  # [C', 4C]
    Cn, C4 = red.shape
    if x["norm_first"]:  # reduction(γ ⊙ centre(x4) / σ + β)
        L = red.T.clone()  # [4C, C'] acting on row vectors
        if fn is not None:
            if fn.weight is not None:
                L = fn.weight.unsqueeze(1) * L
            if fn.center and not paper:
                L = L - L.mean(0, keepdim=True)
        const = None if fn is None or fn.bias is None else fn.bias @ red.T
        cen = None if fn is None or not fn.center else (fn.weight if fn.weight is not None
                                                        else torch.ones(C4, device=device, dtype=dtype)) @ red.T
    else:  # γ ⊙ centre(reduction(x4)) / σ + β
        L = red.T.clone()
        if fn is not None:
            if fn.center and not paper:
                L = L - L.mean(1, keepdim=True)
            if fn.weight is not None:
                L = L * fn.weight
        const = None if fn is None else fn.bias
        cen = None if fn is None or not fn.center else (fn.weight if fn.weight is not None
                                                        else torch.ones(Cn, device=device, dtype=dtype))
    L = L.contiguous()  # [4C, C'] on row vectors: slot k's block is rows k·C:(k+1)·C
    terms = gterms(terms_dst, dst, device, Cn)
    entry = None
    total, parts = None, []
    if const is not None:
        total, parts = _const(terms, const)
    if paper and cen is not None:  # −γ·μ/σ at each merged position
        tc, pc = _const(terms, cen, -rec.val.mean(-1) * fn.inv_scale.reshape(rec.val.shape[0], -1))
        total = tc if total is None else total + tc
        parts += pc
    if total is not None:
        entry = (Component(op.name, "const", **x.get("cargs", {})), total, GroupedRows(parts) if tokens else None)
    parent, slot, out_hw = x["geometry"]
    pi = _dev(parent, device)
    new = []
    for t in terms:
        w = t.w if fn is None else t.w * fn.inv_scale.reshape(t.w.shape[0], -1)
        host = t.host[parent] * 4 + slot
        nt = _GTerm(w.index_select(1, pi), _dev(host, device), host, t.G * 4, chain=(L, t))
        src = x["src"].grid
        if tokens and src is not None:
            nt._order = _tiled(host, nt.G, (src.h, src.w), device)  # None: grouped lazily, row lists
        new.append(nt)
    return entry, new



def downsample(op, rec, terms_dst, device, dtype, tokens):
    """A 2×2 average pool then a per-position linear map ``weight`` [C', C] (+ ``bias``) from grid stream ``src``
    into ``dst`` (MaxViT's stride-2 shortcut), read backwards: the same matrix for all four slots, so the grouped
    terms keep their groups (``w'[p] = w[P(p)] / 4``, ``Ms'[g] = weightᵀ @ Ms[g]``). Returns ``(component entry or
    None, terms of the source stream)``."""
    x = op.extra
    W = x["weight"]
    L = torch.eye(x["channels"], device=device, dtype=dtype) if W is None else W.detach().to(dtype).T.contiguous()
    terms = gterms(terms_dst, op.stream, device, L.shape[1])
    entry = None
    if x["bias"] is not None:
        total, parts = _const(terms, x["bias"].detach().to(dtype))
        entry = (Component(op.name, "const", **x.get("cargs", {})), total, GroupedRows(parts) if tokens else None)
    parent = x["geometry"][0]
    pi = _dev(parent, device)
    new = [_GTerm(t.w.index_select(1, pi) * 0.25, t.group.index_select(0, pi), t.host[parent], t.G, chain=(L, t),
                  shared=True) for t in terms]
    return entry, new
