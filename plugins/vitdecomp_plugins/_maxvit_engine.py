"""Exact decomposition of timm MaxViT (``MaxxVit`` with ``MaxxVitBlock`` stages): one hooked forward + a readout.

The residual stream of a MaxViT is a stack of feature maps ("levels"): level ``-1`` is the stem output (stride 2),
level ``s`` the output of stage ``s`` (stride ``2^(s+2)``). A component *writes* a map ``u[b, y, x, :]`` on one level:

* ``stem`` on level -1; ``init`` (``start=k``) on the level of the map entering block k;
* every branch of a block of stage s (MBConv, block/grid attention heads, their biases, MLPs) on level s, and so
  does the stride-2 shortcut's 1×1-conv bias of the stage's first block.

Everything between a level and z is linear once the final norm's statistics are frozen: the identity residual
additions, and at each later stage transition the shortcut ``expand(avgpool2x2(u))`` (the conv bias is its own
component). The 2×2 average pools act per channel and the 1×1 convs per position, so a level-l map reaches z as

    c = M_l · Σ_{(y, x)} w_l[b, y, x] · u[b, y, x, :]

with ``M_l`` = (final norm's γ ⊙ centring) ∘ (the later shortcut convs' weight matrices), a batch-independent
``[D, C_l]`` matrix, and ``w_l`` a per-position scalar weight: the final pooling weight of the final-stage cell the
position falls in, divided by the number of level-l positions in that cell (every avg2 pool halves each side), times
the frozen final norm's ``1/σ`` (per image for the ``_tf_`` head, which normalises the pooled vector; per final
position for the ``_rw_`` head, which normalises every position before pooling).

Component level (no token detail): the hooks reduce every captured map to the *reduction grid* right away — 1×1
for ``_tf_`` heads, the final-stage grid for ``_rw_`` heads (their ``1/σ`` is per final position and only known at
the end of the forward) — so nothing larger than the final grid is kept per component, and the shared matrices
``M_l`` are applied once per component after the forward: O(C·D²) per image.

Spatial level (``tokens="source"``): each component's contribution is split over the positions of the level where
it writes, ``c[b, t] = w_l[b, t] · M_l u[b, t]``, on ``TokenGrid(0, H_l, W_l, patch_size=image/H_l)``. Attention
outputs are taken before the output projection (per head) *in the partitioned layout* and un-partitioned with timm's
own ``window_reverse`` / ``grid_reverse`` to their true (y, x) positions, so block windows and grid cells are never
mixed. A position's share is what flows from that position to z: after a stride-2 shortcut it is carried by the
pooled cell that contains it, not re-assigned to the coarser grid. The map is kept lazily (values, per-position
weight, matrix) and materialised per component on request.

Source tokens of attention heads (``dec.meta["source_tokens"]``, tokens mode only): the head's contribution split by
the position it *reads* from, ``a[b, j] · M_l W_O^h v^h_j`` with ``a[b, j] = Σ_q w_l[b, q] A^h_{qj}`` summed over the
queries of j's own window / grid cell. The attention matrix is recomputed window by window from the captured
q/k (``[windows, heads, N, N]`` with N the window size: never queries × sources × D).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, List, Optional, Tuple

import attrs
import torch
import torch.nn.functional as F

from vitdecomp import Component, Decomposition, TokenGrid
from vitdecomp.decomposition import FactorTokens, TokenDetail
from vitdecomp.engine import FrozenNorm, HookSet, freeze_norm, is_identity

__all__ = ["MaxViTPlan", "build_plan", "run_maxvit", "PositionTokens", "ConstTokens", "SourceTokens"]


# ---------------------------------------------------------------------------------------------------- token details
@attrs.define(eq=False)
class PositionTokens(FactorTokens):
    """``out[b, t] = weight[b, t] · (values[b, t] @ matrix.T)`` with ``values`` given as a ``[B, H, W, k]`` map.

    Same meaning as :class:`FactorTokens`; the weight is applied on the narrow side (k channels) before the
    projection to D, and the map is flattened row-major only when materialised.
    """

    def materialize(self, num_tokens: int) -> torch.Tensor:
        B = self.values.shape[0]
        vals = self.values.reshape(B, -1, self.values.shape[-1])
        if vals.shape[1] != num_tokens:
            raise ValueError(f"token map has {vals.shape[1]} positions, the grid {num_tokens}")
        return (vals * self.weight.reshape(B, -1, 1)) @ self.matrix.T


@attrs.define(eq=False)
class ConstTokens(TokenDetail):
    """A constant written at every position: ``out[b, t] = weight[b, t] · vector`` (``vector`` [D] or [B, D])."""

    weight: torch.Tensor  # [B, T]
    vector: torch.Tensor

    def materialize(self, num_tokens: int) -> torch.Tensor:
        vec = self.vector if self.vector.ndim == 2 else self.vector.unsqueeze(0)
        return self.weight.reshape(self.weight.shape[0], -1, 1) * vec.unsqueeze(1)


class SourceTokens(Mapping):
    """Head name → :class:`TokenDetail` splitting the head by the position it reads from (``dec.meta``).

    A read-only mapping rather than a dict, so that ``Decomposition.save`` records a one-line summary of it
    instead of trying to serialise tensors into the JSON header.
    """

    def __init__(self, details: Dict[str, TokenDetail]):
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


# ---------------------------------------------------------------------------------------------------- the plan
@attrs.define(eq=False)
class PartitionSpec:
    """One ``PartitionAttentionCl`` (``attn_block`` or ``attn_grid``)."""

    prefix: str            # stages.S.blocks.B.attn_block
    branch: str            # "block" | "grid"
    module: torch.nn.Module
    num_heads: int
    head_dim: int
    head_first: bool
    out_weight: torch.Tensor          # [C, H*dh]
    out_bias: Optional[torch.Tensor]  # [C]
    gamma1: Optional[torch.Tensor]    # ls1
    gamma2: Optional[torch.Tensor]    # ls2 (informational: the MLP is captured after ls2)


@attrs.define(eq=False)
class BlockSpec:
    index: int
    stage: int
    local: int
    prefix: str
    module: torch.nn.Module
    shortcut_bias: Optional[torch.Tensor]  # 1x1 conv bias of a stride-2 shortcut
    parts: List[PartitionSpec]


@attrs.define(eq=False)
class MaxViTPlan:
    blocks: List[BlockSpec]
    grids: Dict[int, Tuple[int, int]]       # level -> (H_l, W_l)
    channels: Dict[int, int]                 # level -> C_l
    expand: Dict[int, Optional[torch.Tensor]]  # stage t -> [C_t, C_{t-1}] shortcut weight (None: identity)
    final_norm: torch.nn.Module
    final_norm_name: str
    per_position_norm: bool                   # rw: norm before pooling; tf: norm of the pooled vector
    image_size: Tuple[int, int]

    @property
    def num_stages(self) -> int:
        return len(self.expand)

    def level_of_block_input(self, b: BlockSpec) -> int:
        return b.stage - 1 if b.local == 0 else b.stage


def _linear_weight(mod) -> torch.Tensor:
    w = mod.weight.detach()
    return w.reshape(w.shape[0], -1)


def build_plan(model, image_size) -> MaxViTPlan:
    """Read the structure the decomposition needs (assumes :func:`maxvit._problems` found nothing)."""
    H, W = image_size
    stem_stride = int(getattr(model.stem, "stride", 2))
    grids = {-1: (H // stem_stride, W // stem_stride)}
    channels = {-1: int(model.stem.out_chs)}
    expand: Dict[int, Optional[torch.Tensor]] = {}
    blocks: List[BlockSpec] = []
    g = 0
    for s, stage in enumerate(model.stages):
        gh, gw = grids[s - 1]
        grids[s] = (gh // 2, gw // 2)
        for j, blk in enumerate(stage.blocks):
            conv = blk.conv
            sc_bias = None
            if j == 0:
                ex = conv.shortcut.expand
                if is_identity(ex):
                    expand[s] = None
                    channels[s] = channels[s - 1]
                else:
                    expand[s] = _linear_weight(ex)
                    channels[s] = ex.out_channels
                    sc_bias = None if ex.bias is None else ex.bias.detach()
            parts = []
            for attr, branch in (("attn_block", "block"), ("attn_grid", "grid")):
                pm = getattr(blk, attr, None)
                if pm is None:
                    continue
                at = pm.attn
                parts.append(PartitionSpec(
                    prefix=f"stages.{s}.blocks.{j}.{attr}", branch=branch, module=pm,
                    num_heads=at.num_heads, head_dim=at.dim_head, head_first=at.head_first,
                    out_weight=at.proj.weight.detach(), out_bias=None if at.proj.bias is None else at.proj.bias.detach(),
                    gamma1=None if is_identity(pm.ls1) else pm.ls1.gamma.detach(),
                    gamma2=None if is_identity(pm.ls2) else pm.ls2.gamma.detach(),
                ))
            blocks.append(BlockSpec(index=g, stage=s, local=j, prefix=f"stages.{s}.blocks.{j}", module=blk,
                                    shortcut_bias=sc_bias, parts=parts))
            g += 1
    per_position = not is_identity(model.norm)
    final_norm, name = (model.norm, "norm") if per_position else (model.head.norm, "head.norm")
    return MaxViTPlan(blocks=blocks, grids=grids, channels=channels, expand=expand, final_norm=final_norm,
                      final_norm_name=name, per_position_norm=per_position, image_size=(H, W))


# ---------------------------------------------------------------------------------------------------- capture
class _Capture:
    """What one component's hooks keep: the reduced map (always) and the full map (tokens mode)."""

    __slots__ = ("level", "reduced", "native")

    def __init__(self, level: int):
        self.level = level
        self.reduced = None   # [B, Hr, Wr, C]
        self.native = None    # [B, H_l, W_l, C] channels-last, true positions


def _unpartition(t: torch.Tensor, part: PartitionSpec, size: Tuple[int, int]) -> torch.Tensor:
    """[B·nW, wh, ww, C] partitioned → [B, H, W, C] at true positions (timm's own inverse)."""
    from timm.models.maxxvit import grid_reverse, window_reverse

    ps = list(part.module.partition_size)
    if part.branch == "block":
        return window_reverse(t, ps, list(size))
    return grid_reverse(t, ps, list(size))


def _partition(t: torch.Tensor, part: PartitionSpec) -> torch.Tensor:
    """[B, H, W, C] → [B·nW, wh, ww, C] (timm's own partition)."""
    from timm.models.maxxvit import grid_partition, window_partition

    ps = list(part.module.partition_size)
    if part.branch == "block":
        return window_partition(t, ps)
    return grid_partition(t, ps)


def run_maxvit(model, images: torch.Tensor, plan: MaxViTPlan, *, start: int, tokens: bool, sources: bool,
               representation, meta: dict, final_norm: bool = True, paper: bool = False) -> Decomposition:
    """Run the model's own forward once with hooks, then read every component out exactly. ``final_norm=False``
    (pooled-norm models only): z is the pooled final stage itself, without ``head.norm`` (the paper's z).
    ``paper`` (not with ``tokens``): the paper's convention, see :func:`_paper_shares`."""
    device, dtype = images.device, images.dtype
    B = images.shape[0]
    S = plan.num_stages
    Hf, Wf = plan.grids[S - 1]
    red = (Hf, Wf) if plan.per_position_norm else (1, 1)  # reduction grid

    def reduce_cl(t: torch.Tensor) -> torch.Tensor:
        """channels-last [B, H_l, W_l, C] → mean over each reduction cell → [B, Hr, Wr, C]."""
        if red == (1, 1):
            return t.mean((1, 2), keepdim=True)
        h, w = t.shape[1:3]
        rh, rw = h // red[0], w // red[1]
        return t.reshape(t.shape[0], red[0], rh, red[1], rw, t.shape[-1]).mean((2, 4))

    def reduce_nchw(t: torch.Tensor) -> torch.Tensor:
        """NCHW [B, C, H_l, W_l] → [B, Hr, Wr, C]."""
        if red == (1, 1):
            return t.mean((2, 3), keepdim=True).permute(0, 2, 3, 1)
        h, w = t.shape[-2:]
        return F.avg_pool2d(t, (h // red[0], w // red[1])).permute(0, 2, 3, 1)

    caps: Dict[str, _Capture] = {}
    qkv_caps: Dict[str, torch.Tensor] = {}
    captured = {}
    order: List[Tuple[str, Component]] = []  # (capture key or const marker, component), forward order

    def add_nchw_hook(hooks, module, key, level, pre=False):
        cap = caps[key] = _Capture(level)

        def fn(t):
            cap.reduced = reduce_nchw(t)
            if tokens:
                cap.native = t.permute(0, 2, 3, 1)

        (hooks.pre if pre else hooks.post)(module, fn)

    with HookSet() as hooks:
        # ---------------------------------------------------------------- the first component
        if start == 0:
            add_nchw_hook(hooks, model.stem, "stem", -1)
            order.append(("stem", Component("stem", "embed")))
        else:
            b0 = plan.blocks[start]
            add_nchw_hook(hooks, b0.module, "init", plan.level_of_block_input(b0), pre=True)
            order.append(("init", Component("init", "residual", block=start, stage=b0.stage)))
        # ---------------------------------------------------------------- blocks
        for blk in plan.blocks[start:]:
            s, g = blk.stage, blk.index
            if blk.shortcut_bias is not None:
                order.append(("const:shortcut", Component(f"{blk.prefix}.conv.shortcut.bias", "const", block=g, stage=s)))
            add_nchw_hook(hooks, blk.module.conv.conv3_1x1, f"{blk.prefix}.conv", s)
            order.append((f"{blk.prefix}.conv", Component(f"{blk.prefix}.conv", "conv", block=g, stage=s)))
            for part in blk.parts:
                key = f"{part.prefix}.attn"
                cap = caps[key] = _Capture(s)
                size = plan.grids[s]

                def on_proj_in(t, cap=cap, part=part, size=size):
                    if red == (1, 1):
                        cap.reduced = t.reshape(B, -1, t.shape[-1]).mean(1).view(B, 1, 1, -1)
                        if tokens:
                            cap.native = _unpartition(t, part, size)
                    else:
                        full = _unpartition(t, part, size)
                        cap.reduced = reduce_cl(full)
                        if tokens:
                            cap.native = full

                hooks.pre(part.module.attn.proj, on_proj_in)
                if sources:
                    hooks.post(part.module.attn.qkv, lambda t, key=key: qkv_caps.__setitem__(key, t))
                for h in range(part.num_heads):
                    order.append((f"head:{key}:{h}", Component(f"{key}.head.{h}", "head", block=g, stage=s, head=h,
                                                               branch=part.branch)))
                if part.out_bias is not None:
                    order.append((f"const:attnbias:{key}", Component(f"{key}.bias", "const", block=g, stage=s,
                                                                     branch=part.branch)))
                mkey = f"{part.prefix}.mlp"
                mcap = caps[mkey] = _Capture(s)

                def on_mlp(t, cap=mcap):
                    cap.reduced = reduce_cl(t)
                    if tokens:
                        cap.native = t

                hooks.post(part.module.ls2, on_mlp)
                order.append((mkey, Component(mkey, "mlp", block=g, stage=s, branch=part.branch)))
        if final_norm:
            hooks.pre(plan.final_norm, lambda t: captured.__setitem__("final_in", t))
        z = representation(images)

    # ---------------------------------------------------------------- frozen final norm
    if not final_norm:  # the mean over the final positions is z: no norm to freeze
        if plan.per_position_norm:
            raise ValueError("final_norm=False applies to pooled-norm (head.norm) MaxViT models only")
        fin = FrozenNorm(weight=None, bias=None, inv_scale=torch.ones(B, 1, 1, device=device, dtype=dtype),
                         center=False)
    else:
        fin = freeze_norm(plan.final_norm, captured["final_in"].permute(0, 2, 3, 1))  # inv_scale [B, h, w]
    if plan.per_position_norm:
        v = fin.inv_scale / (Hf * Wf)             # [B, Hf, Wf]
    else:
        v = fin.inv_scale.reshape(B, 1, 1)        # [B, 1, 1]
    vsum = v.sum((1, 2))                          # [B]
    D = plan.channels[S - 1]
    eye = torch.eye(D, device=device, dtype=dtype)
    G = eye - 1.0 / D if fin.center and not paper else eye  # centring (paper: the stream's mean, a constant)
    if fin.weight is not None:
        G = fin.weight.to(dtype).unsqueeze(1) * G
    M: Dict[int, torch.Tensor] = {}
    acc = G
    for lvl in range(S - 1, -2, -1):
        M[lvl] = acc                              # [D, C_lvl]
        if lvl >= 0 and plan.expand[lvl] is not None:
            acc = acc @ plan.expand[lvl].to(dtype)

    weights_cache: Dict[int, torch.Tensor] = {}

    def level_weight(lvl: int) -> torch.Tensor:
        """w_l[b, y, x]: the per-position weight of level l (see the module docstring)."""
        if lvl not in weights_cache:
            h, w = plan.grids[lvl]
            rh, rw = h // v.shape[1], w // v.shape[2]
            weights_cache[lvl] = (v.repeat_interleave(rh, 1).repeat_interleave(rw, 2) / (rh * rw)).contiguous()
        return weights_cache[lvl]

    def grid_of(lvl: int) -> TokenGrid:
        h, w = plan.grids[lvl]
        return TokenGrid(num_prefix=0, h=h, w=w, patch_size=(plan.image_size[0] // h, plan.image_size[1] // w))

    def pooled(cap: _Capture) -> torch.Tensor:   # Σ_p w_p u_p in stream space: [B, C]
        return torch.einsum("bhwc,bhw->bc", cap.reduced, v)

    comps: List[Component] = []
    values: List[torch.Tensor] = []
    details: Dict[str, TokenDetail] = {}
    grids: Dict[str, TokenGrid] = {}
    src_details: Dict[str, TokenDetail] = {}
    parts_by_key = {f"{p.prefix}.attn": (p, blk) for blk in plan.blocks for p in blk.parts}
    blocks_by_prefix = {blk.prefix: blk for blk in plan.blocks}
    head_cache: Dict[str, torch.Tensor] = {}

    for key, comp in order:
        if key.startswith("head:"):
            _, akey, h = key.split(":")
            h = int(h)
            part, blk = parts_by_key[akey]
            lvl = blk.stage
            if akey not in head_cache:
                cap = caps[akey]
                Hn, dh = part.num_heads, part.head_dim
                Wo = part.out_weight.to(dtype).view(-1, Hn, dh)            # [C, H, dh]
                if part.gamma1 is not None:
                    Wo = Wo * part.gamma1.to(dtype).view(-1, 1, 1)
                so = pooled(cap).view(B, Hn, dh)
                # per head in stream space first (B·C² work), then the shared map M_l once
                head_cache[akey] = torch.einsum("bhk,chk->bhc", so, Wo) @ M[lvl].T  # [B, H, D]
                if tokens:
                    head_cache[akey + ":mats"] = torch.einsum("dc,chk->hdk", M[lvl], Wo)  # [H, D, dh]
            values.append(head_cache[akey][:, h])
            comps.append(comp)
            if tokens:
                cap = caps[akey]
                dh = part.head_dim
                mats = head_cache[akey + ":mats"]
                details[comp.name] = PositionTokens(weight=level_weight(lvl), values=cap.native[..., h * dh:(h + 1) * dh],
                                                    matrix=mats[h])
                grids[comp.name] = grid_of(lvl)
            continue
        if key.startswith("const:"):
            if key == "const:shortcut":
                blk = blocks_by_prefix[comp.name[: -len(".conv.shortcut.bias")]]
                vec, lvl = blk.shortcut_bias.to(dtype), blk.stage
            else:
                akey = key.split(":", 2)[2]
                part, blk = parts_by_key[akey]
                vec, lvl = part.out_bias.to(dtype), blk.stage
                if part.gamma1 is not None:
                    vec = vec * part.gamma1.to(dtype)
            mv = M[lvl] @ vec                                              # [D]
            values.append(vsum.unsqueeze(1) * mv)
            comps.append(comp)
            if tokens:
                details[comp.name] = ConstTokens(weight=level_weight(lvl), vector=mv)
                grids[comp.name] = grid_of(lvl)
            continue
        cap = caps[key]
        lvl = cap.level
        values.append(pooled(cap) @ M[lvl].T)
        comps.append(comp)
        if tokens:
            details[comp.name] = PositionTokens(weight=level_weight(lvl), values=cap.native, matrix=M[lvl])
            grids[comp.name] = grid_of(lvl)

    # ---------------------------------------------------------------- the final norm's offset
    if fin.bias is not None:
        beta = fin.bias.to(dtype)
        comps.append(Component(f"{plan.final_norm_name}.bias", "const"))
        values.append(beta.expand(B, -1))
        if tokens:  # per final position for rw (exactly β/N there); spread evenly over the final grid for tf
            details[comps[-1].name] = ConstTokens(weight=torch.full((B, Hf * Wf), 1.0 / (Hf * Wf), device=device,
                                                                    dtype=dtype), vector=beta)
            grids[comps[-1].name] = grid_of(S - 1)

    if sources:
        for akey, (part, blk) in parts_by_key.items():
            if akey not in qkv_caps:
                continue
            _source_details(akey, part, blk, qkv_caps[akey], level_weight(blk.stage), caps[akey],
                            head_cache[akey + ":mats"], plan.grids[blk.stage], src_details)

    if paper:
        cen = None
        if fin.center:  # −γ·μ_p/σ_p at each final position, through the pooling: Σ_p v_p (−μ_p) γ
            mu = captured["final_in"].to(dtype).mean(1)  # [B, h, w]
            g = fin.weight.to(dtype) if fin.weight is not None else torch.ones(D, device=device, dtype=dtype)
            cen = (v * -mu).sum((1, 2))[:, None] * g
        comps, values = _paper_shares(comps, values, cen)
    meta = dict(meta)
    meta["levels"] = {str(k): list(vv) for k, vv in sorted(plan.grids.items())}
    if sources:
        meta["source_tokens"] = SourceTokens(src_details)
    return Decomposition(contributions=torch.stack(values, 1), components=tuple(comps), representation=z,
                         grid=grid_of(S - 1), token_details=details, token_grids=grids, meta=meta)


def _paper_shares(comps, values, cen):
    """The paper's convention from the components read out with an uncentred final norm: an attention's output
    bias goes b_O / H to each of its heads; a shortcut bias, the final norm's β and its centring ``cen`` (−γ·μ/σ
    pooled, or None) are split evenly over the leaves present where they enter (every earlier non-constant
    component, heads counted one by one)."""
    vals = list(values)
    leaves: List[int] = []
    keep = []
    for i, c in enumerate(comps):
        if c.kind != "const":
            leaves.append(i)
            keep.append(i)
            continue
        if c.name.endswith(".attn.bias"):
            heads = [j for j in leaves if comps[j].kind == "head" and comps[j].name.startswith(c.name[:-4] + "head.")]
            for j in heads:
                vals[j] = vals[j] + values[i] / len(heads)
        else:  # a shortcut bias, or the final norm's β
            for j in leaves:
                vals[j] = vals[j] + values[i] / len(leaves)
    if cen is not None:
        for j in leaves:
            vals[j] = vals[j] + cen / len(leaves)
    return [comps[i] for i in keep], [vals[i] for i in keep]


def _source_details(akey, part: PartitionSpec, blk: BlockSpec, qkv: torch.Tensor, weight: torch.Tensor, cap: _Capture,
                    mats: torch.Tensor, size, out: Dict[str, TokenDetail]) -> None:
    """Split each head of one partition attention by the source position it reads (see the module docstring)."""
    at = part.module.attn
    Bp = qkv.shape[0]
    wh, ww = qkv.shape[1:3]
    N = wh * ww
    Hn, dh = part.num_heads, part.head_dim
    if part.head_first:
        q, k, v = qkv.reshape(Bp, N, Hn, 3 * dh).transpose(1, 2).chunk(3, dim=3)
    else:
        q, k, v = qkv.reshape(Bp, N, 3, Hn, dh).transpose(1, 3).unbind(2)
    logits = (q * at.scale) @ k.transpose(-2, -1)                 # [B', H, N, N]
    if at.rel_pos is not None:
        logits = at.rel_pos(logits)
    attn = logits.softmax(-1)
    wq = _partition(weight.unsqueeze(-1), part).reshape(Bp, N)     # query weights in the partitioned layout
    a = torch.einsum("pq,phqj->pjh", wq, attn)                     # [B', N, H]
    a = _unpartition(a.reshape(Bp, wh, ww, Hn), part, size)        # [B, H_l, W_l, H]
    vals = _unpartition(v.transpose(1, 2).reshape(Bp, wh, ww, Hn * dh), part, size)  # [B, H_l, W_l, H*dh]
    for h in range(Hn):
        out[f"{akey}.head.{h}"] = PositionTokens(weight=a[..., h].contiguous(), values=vals[..., h * dh:(h + 1) * dh],
                                                 matrix=mats[h])
