"""Engine part for convolutional stage transitions between grid streams (the ``auto`` adapter's staged models:
FocalNet, PVTv2, EfficientFormer, ...), read backwards in the grouped-term algebra of :mod:`._hier`.

* **Patch convolution** (kernel == stride, no padding, one group): every position of the stream it reads lies in
  exactly one output patch, at one of its ``S = sh·sw`` slots, so it is the 2×2 patch merging generalised to
  ``S`` slots: a term of the new stream becomes one on the stream it reads with ``S``× the groups
  (``group'[p] = S·group[P(p)] + k(p)``, ``Ms'[S·g + k] = W_kᵀ @ Ms[g]``, ``W_k`` the kernel's tap ``k``);
  positions the convolution never reads (sides not a multiple of the stride) get weight 0. Component level stays
  near one forward and token detail works as for Swin.
* **Any other convolution** (overlapping kernels, padding, groups): its map from a position is not one matrix
  per group, so the writes of the stream it reads are carried *forward* through it instead: each write's map
  (pooled by nothing: every row its own group) is convolved with the module's own weights without bias (one
  batched ``conv2d`` for all of a stream's writes), then pooled by the terms of the new stream. Exact; it costs
  one convolution of the module's size per live write. Token detail is not available through it.
* **Norms on a grid stream** (LayerNorm / LayerNorm2d / RMSNorm at the forward's statistics, eval-mode
  BatchNorm at its running statistics): each row's ``1/σ`` joins the weights, the linear part is one matrix
  shared by every group; β (BatchNorm: ``β − γ·μ/σ``) is the component ``<name>.bias``.

The constants (a convolution's bias, a norm's offset) are components of kind ``const`` on the new stream.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .._records import Component
from ..engine import freeze_norm
from ._hier import GroupedRows, _const, _dev, _GTerm, _rows_mm, _tiled, gterms

__all__ = ["patch_geometry", "is_patch_conv", "MapTerm"]


def is_patch_conv(conv) -> bool:
    """A Conv2d that reads every input position at most once: kernel == stride, no padding, one group."""
    return (tuple(conv.kernel_size) == tuple(conv.stride) and all(p == 0 for p in _pad(conv))
            and tuple(conv.dilation) == (1, 1) and conv.groups == 1)


def _pad(conv):
    p = conv.padding
    if isinstance(p, str):
        return (0, 0) if p == "valid" else (-1, -1)
    return tuple(p)


def patch_geometry(H: int, W: int, sh: int, sw: int):
    """Parent (output position) and slot (``ky·sw + kx``) of every input position of a patch convolution on an
    ``H × W`` grid (parent −1: never read), and the output size."""
    Ho, Wo = H // sh, W // sw
    y, x = np.divmod(np.arange(H * W, dtype=np.int64), W)
    inside = (y < Ho * sh) & (x < Wo * sw)
    parent = np.where(inside, (y // sh) * Wo + x // sw, -1)
    slot = np.where(inside, (y % sh) * sw + x % sw, 0)
    return parent, slot, (Ho, Wo)


class _SlotTerm(_GTerm):
    """A grouped term chained through a patch convolution with ``slots`` slots (the 2×2 merge's chain with
    ``S`` in place of 4)."""

    __slots__ = ("slots",)

    def __init__(self, w, group, host, G, chain, slots):
        super().__init__(w, group, host, G, chain=chain)
        self.slots = slots

    def finish(self) -> None:
        if not self.pending:
            return
        P = torch.cat(self.pending, 1) if len(self.pending) > 1 else self.pending[0]
        self.pending = []
        L, up = self.chain
        S = self.slots
        self.base = up.defer(_rows_mm(P.reshape(*P.shape[:-2], self.G // S, S * P.shape[-1]), L))

    @property
    def Ms(self) -> torch.Tensor:
        if self._Ms is None:
            L, up = self.chain  # L [S·C, C']: slot k's block is rows k·C:(k+1)·C
            S = self.slots
            C = L.shape[0] // S
            self._Ms = torch.matmul(L.view(1, S, C, -1), up.Ms.unsqueeze(1)).reshape(self.G, C, -1)
        return self._Ms


class MapTerm(_GTerm):
    """The stream a fixed linear map ``fn`` reads, every row its own group (weights one): the queued writes'
    maps ``[B, k, R, C]`` are sent forward through ``fn`` (``[B, k, R, C] → [B, k, R', C']``, without any
    constant) and pooled by ``chain[1]``, the term of the stream the map writes. ``what``: the map, for the
    refusal of token detail."""

    __slots__ = ("fn", "what")

    def __init__(self, B, R, device, dtype, fn, up, what):
        group = torch.arange(R, device=device)
        super().__init__(torch.ones(B, R, device=device, dtype=dtype), group, np.arange(R, dtype=np.int64), R,
                         chain=(None, up))
        self.fn, self.what = fn, what

    def pool(self, u: torch.Tensor) -> torch.Tensor:
        return u  # every row is its own group, weight one

    def finish(self) -> None:
        if not self.pending:
            return
        P = torch.cat(self.pending, 1) if len(self.pending) > 1 else self.pending[0]  # [B, k, R, C]
        self.pending = []
        y = self.fn(P)  # [B, k, R', C']
        up = self.chain[1]
        self.base = up.defer(up.pool(y.transpose(1, 2)).transpose(1, 2))

    @property
    def Ms(self):
        from ..errors import UnsupportedModelError

        raise UnsupportedModelError(f"token detail through {self.what} (carried forward as a fixed map) is not "
                                    "supported; use tokens=None for this model")


def conv(op, rec, terms_dst, device, dtype, tokens):
    """A convolution from grid stream ``src`` into ``dst`` read backwards. Returns ``(component entry or None,
    terms of the source stream)``."""
    x = op.extra
    c = x["conv"]
    src, dst = x["src"], op.stream
    Cn = c.out_channels
    terms = gterms(terms_dst, dst, device, Cn)
    entry = None
    if c.bias is not None:
        total, parts = _const(terms, c.bias.detach().to(dtype))
        entry = (Component(op.name, "const", **x.get("cargs", {})), total, GroupedRows(parts) if tokens else None)
    B = terms[0].w.shape[0]
    if not x["patch"]:
        h, w = src.grid.h, src.grid.w
        weight = c.weight.detach().to(dtype)

        def fn(P):  # [B, k, R, C] -> [B, k, R', C']: the convolution without its bias
            B, k, R, C = P.shape
            y = F.conv2d(P.reshape(B * k, h, w, C).permute(0, 3, 1, 2), weight, None, c.stride, c.padding,
                         c.dilation, c.groups)
            return y.reshape(B, k, y.shape[1], -1).transpose(2, 3)

        what = f"{op.name} (an overlapping, padded or grouped convolution)"
        return entry, [MapTerm(B, src.rows, device, dtype, fn, t, what) for t in terms]
    sh, sw = c.stride
    S = sh * sw
    W = c.weight.detach().to(dtype)  # [C', C, sh, sw]
    L = W.permute(2, 3, 1, 0).reshape(S * W.shape[1], Cn).contiguous()  # slot k = ky·sw + kx: rows k·C:(k+1)·C
    parent, slot, _ = x["geometry"]
    inside = parent >= 0
    par = np.where(inside, parent, 0)
    pi = _dev(par, device)
    keep = _dev(inside.astype(np.float64), device).to(dtype)
    new = []
    for t in terms:
        host = np.where(inside, t.host[par] * S + slot, 0)
        nt = _SlotTerm(t.w.index_select(1, pi) * keep, _dev(host, device), host, t.G * S, chain=(L, t), slots=S)
        if tokens and inside.all():
            nt._order = _tiled(host, nt.G, (src.grid.h, src.grid.w), device)
        new.append(nt)
    return entry, new


def _batchnorm(module):
    return isinstance(module, torch.nn.modules.batchnorm._BatchNorm)


def norm(op, rec, terms, device, dtype, tokens, paper=False):
    """A norm on a grid stream whose terms are grouped, read backwards. Returns ``(component entries, new
    terms)``; ``paper``: no centring of the writes, the stream's −γ·μ/σ (and β) returned as the constant to
    split."""
    s = op.stream
    mod = op.module
    D = rec.val.shape[-1]
    tl = gterms(terms, s, device, D)
    if _batchnorm(mod):  # eval mode: a fixed affine map per channel
        inv = torch.rsqrt(mod.running_var.detach().to(dtype) + mod.eps)
        g = inv if mod.weight is None else mod.weight.detach().to(dtype) * inv
        A = torch.diag(g)
        b = -mod.running_mean.detach().to(dtype) * g
        if mod.bias is not None:
            b = b + mod.bias.detach().to(dtype)
        total, parts = _const(tl, b)
        new = [t.through(A) for t in tl]
        return (total, GroupedRows(parts) if tokens else None), new
    fn = freeze_norm(mod, rec.val)
    inv = fn.inv_scale.reshape(rec.val.shape[0], -1)
    total, parts = None, []
    if fn.bias is not None:
        total, parts = _const(tl, fn.bias)
    if paper and fn.center:
        gv = fn.weight if fn.weight is not None else torch.ones(D, device=device, dtype=dtype)
        tc, pc = _const(tl, gv, -rec.val.mean(-1) * inv)
        total = tc if total is None else total + tc
        parts += pc
    A = torch.eye(D, device=device, dtype=dtype)
    if fn.center and not paper:
        A = A - 1.0 / D
    if fn.weight is not None:
        A = A * fn.weight
    new = [t.through(A, t.w * inv) for t in tl]
    return (None if total is None else (total, GroupedRows(parts) if tokens else None)), new
