"""Exact decomposition of a pre-norm Hugging Face vision transformer, shared by the family modules.

The family modules describe a model as a :class:`Plan` (its blocks, readout rows, final norm, projection and a
function that runs the library's own forward and returns z). :func:`decompose_plan` then runs that forward
once with hooks and keeps, at the readout rows only (the token positions that reach z):

* each block's attention-head outputs before the output projection (the input of ``o_proj``/``out_proj``), which
  every attention implementation (eager, sdpa, flash, flex) produces the same way;
* each block's MLP branch output (after LayerScale where the block has one);
* in token mode, the readout rows of every attention matrix: taken from the attention module's returned weights
  when the implementation returns them (eager), else recomputed from the readout queries and all keys (sdpa and
  other fused kernels); never all queries × all sources × D;
* the input of the final norm (to freeze its statistics with the module's own eps and the biased variance).

Readout. z is the concatenation over *groups* g of Σ_r w[g, r] · norm(h)[r] (then an optional projection):
one group with row 0 for CLS readouts, rows 0 and 1 with weight ½ for DeiT-with-teacher, and two groups (CLS,
mean of patches) for DINOv2's classification input. With the norm frozen, every component's contribution is
``finish(Σ_r w[g, r] s[b, r] u[b, r])`` where ``s = 1/σ`` and ``finish`` centres, scales by γ, concatenates
the groups and projects; the norm offset β is a component of its own.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import attrs
import torch

from vitdecomp import Component, Decomposition, TokenGrid
from vitdecomp.decomposition import FactorTokens, RowTokens, TokenDetail
from vitdecomp.engine import HookSet, freeze_norm, index_tensor, is_identity, to_device

__all__ = ["BlockParts", "Plan", "decompose_plan"]


@attrs.define(eq=False)
class BlockParts:
    """One pre-norm block ``x + γ1·o_proj(attn(norm1(x)))``, ``x + mlp_branch(norm2(x))``.

    ``attention`` is the module that returns ``(output, weights_or_None)``; ``q``/``k``/``v``/``o`` its linear
    maps (``o`` the output projection ``[D, H·dh]``); ``gamma`` the attention LayerScale vector or None;
    ``mlp_out`` the module whose output is the whole MLP branch (its LayerScale included).
    """

    index: int
    layer: torch.nn.Module
    attention: torch.nn.Module
    q: torch.nn.Linear
    k: torch.nn.Linear
    v: torch.nn.Linear
    o: torch.nn.Linear
    num_heads: int
    head_dim: int
    scaling: float
    gamma: Optional[torch.Tensor]
    mlp_out: torch.nn.Module


@attrs.define(eq=False)
class Plan:
    """Everything :func:`decompose_plan` needs to know about one model.

    ``groups``: per readout group, a list of ``(token index, weight)`` pairs; ``norm``: the final per-token norm
    (None if z is read before it) named ``norm_name`` in component names; ``proj``: ``[G·D, d]`` matrix applied to
    the concatenated groups (or None); ``run(images) -> z`` runs the library's own forward.
    """

    blocks: Sequence[BlockParts]
    groups: Sequence[Sequence[tuple]]
    norm: Optional[torch.nn.Module]
    norm_name: str
    proj: Optional[torch.Tensor]
    run: Callable[[torch.Tensor], torch.Tensor]
    grid: TokenGrid
    meta: dict = attrs.field(factory=dict)


@attrs.define(eq=False)
class GroupFactorTokens(TokenDetail):
    """An attention head split by source token when z concatenates G pooled groups:
    ``out[b, t] = concat_g weight[b, g, t] · (values[b, t] @ matrix.T)``."""

    weight: torch.Tensor  # [B, G, T]
    values: torch.Tensor  # [B, T, k]
    matrix: torch.Tensor  # [D, k]

    def materialize(self, num_tokens: int) -> torch.Tensor:
        vm = self.values @ self.matrix.T  # [B, T, D]
        out = self.weight.unsqueeze(-1) * vm.unsqueeze(1)  # [B, G, T, D]
        B, G, T, D = out.shape
        return out.permute(0, 2, 1, 3).reshape(B, T, G * D)


class _Record:
    __slots__ = ("o", "mlp", "attn_rows", "q", "k", "v")

    def __init__(self):
        self.o = self.mlp = self.attn_rows = self.q = self.k = self.v = None


def _first_arg(args, kwargs):
    if args:
        return args[0]
    return kwargs.get("hidden_states", kwargs.get("input"))


def decompose_plan(plan: Plan, images: torch.Tensor, *, start: int, tokens: bool) -> Decomposition:
    """Run ``plan.run(images)`` once with hooks; return the exact decomposition (explicit constants, heads split)."""
    device, dtype = images.device, images.dtype
    row_list = sorted({r for g in plan.groups for r, _ in g})
    pos = {r: i for i, r in enumerate(row_list)}
    rows = index_tensor(row_list, device)
    G, R = len(plan.groups), len(row_list)
    W = torch.zeros(G, R, dtype=torch.float64)
    for gi, grp in enumerate(plan.groups):
        for r, wt in grp:
            W[gi, pos[r]] += float(wt)
    W = to_device(W, device, dtype)  # staged through pinned memory: no stream synchronisation

    recs = {bp.index: _Record() for bp in plan.blocks if bp.index >= start}
    captured = {}

    def at_rows(x):
        return x.index_select(1, rows)

    with HookSet() as hooks:
        hooks.pre_kw(plan.blocks[start].layer, lambda a, kw: captured.__setitem__("init", at_rows(_first_arg(a, kw))))
        if plan.norm is not None and not is_identity(plan.norm):
            def on_norm(x):
                if x.ndim == 2:  # a norm applied to the already selected row (CLIP's post_layernorm on CLS)
                    if row_list != [0] or G != 1:
                        raise RuntimeError("a pooled-vector final norm needs a single readout row")
                    captured["norm_in"] = x.unsqueeze(1)
                else:
                    captured["norm_in"] = at_rows(x)
            hooks.pre(plan.norm, on_norm)
        for bp in plan.blocks:
            if bp.index < start:
                continue
            _install(hooks, bp, recs[bp.index], rows, tokens)
        z = plan.run(images)

    B = images.shape[0]
    fin = freeze_norm(plan.norm, captured["norm_in"]) if "norm_in" in captured else None
    s = fin.inv_scale if fin is not None else torch.ones(B, R, device=device, dtype=dtype)  # [B, R]
    P = W.unsqueeze(0) * s.unsqueeze(1)  # [B, G, R]
    proj = plan.proj.to(device=device, dtype=dtype) if plan.proj is not None else None

    def finish(u: torch.Tensor) -> torch.Tensor:
        """[..., G, D] pooled stream values → [..., D_out] contributions to z."""
        if fin is not None:
            u = fin.apply_linear(u)
        u = u.reshape(*u.shape[:-2], -1)
        return u @ proj if proj is not None else u

    comps: List[Component] = []
    values: List[torch.Tensor] = []
    details = {}

    def add_rows(comp: Component, u: torch.Tensor):
        """``u`` [B, R, D]: the component's stream values at the readout rows."""
        comps.append(comp)
        values.append(finish(torch.einsum("bgr,brd->bgd", P, u)))
        if tokens:
            per_row = finish(P.permute(0, 2, 1).unsqueeze(-1) * u.unsqueeze(2))  # [B, R, D_out]
            details[comp.name] = RowTokens(rows=rows, values=per_row)

    init = captured.get("init")
    if init is None:
        raise RuntimeError("the hook on the first decomposed block did not fire")
    add_rows(Component("embed", "embed") if start == 0 else Component("init", "residual", block=start), init)

    for bp in plan.blocks:
        if bp.index < start:
            continue
        r = recs[bp.index]
        if r.o is None or r.mlp is None:
            raise RuntimeError(
                f"hooks of blocks.{bp.index} ({type(bp.layer).__name__}) did not fire: the model's forward does "
                "not call its modules as this adapter expects")
        H, dh = bp.num_heads, bp.head_dim
        Wo = bp.o.weight.detach().to(dtype).view(-1, H, dh)  # [D, H, dh]
        if bp.gamma is not None:
            Wo = Wo * bp.gamma.detach().to(dtype).view(-1, 1, 1)
        so = torch.einsum("bgr,brhk->bghk", P, r.o)
        heads = finish(torch.einsum("bghk,dhk->bhgd", so, Wo))  # [B, H, D_out]
        if tokens:
            A = r.attn_rows.to(dtype)  # [B, H, R, N]
            att = torch.einsum("bgr,bhrn->bghn", P, A)
            v = r.v  # [B, H, N, dh]
        for h in range(H):
            comp = Component(f"blocks.{bp.index}.attn.head.{h}", "head", block=bp.index, head=h)
            comps.append(comp)
            values.append(heads[:, h])
            if tokens:
                if G == 1:
                    M = finish(Wo[:, h, :].T.unsqueeze(-2)).T  # [D_out, dh]
                    details[comp.name] = FactorTokens(weight=att[:, 0, h], values=v[:, h], matrix=M)
                else:
                    if fin is not None:
                        M = fin.apply_linear(Wo[:, h, :].T).T  # [D, dh]
                    else:
                        M = Wo[:, h, :]
                    details[comp.name] = GroupFactorTokens(weight=att[:, :, h], values=v[:, h], matrix=M)
        if bp.o.bias is not None:
            b = bp.o.bias.detach().to(dtype)
            if bp.gamma is not None:
                b = b * bp.gamma.detach().to(dtype)
            add_rows(Component(f"blocks.{bp.index}.attn.bias", "const", block=bp.index), b.expand(B, R, -1))
        add_rows(Component(f"blocks.{bp.index}.mlp", "mlp", block=bp.index), r.mlp)

    if fin is not None and fin.bias is not None:
        beta = fin.bias  # added after the frozen linear part: pooled with the weights only
        pooled = (W.sum(1, keepdim=True) * beta).reshape(-1)  # [G·D]
        pooled = pooled @ proj if proj is not None else pooled
        comps.append(Component(f"{plan.norm_name}.bias", "const"))
        values.append(pooled.expand(B, -1))
        if tokens:
            per_row = (W.T.unsqueeze(-1) * beta).reshape(R, -1)  # [R, G·D]
            per_row = per_row @ proj if proj is not None else per_row
            details[f"{plan.norm_name}.bias"] = RowTokens(rows=rows, values=per_row.expand(B, -1, -1))

    return Decomposition(contributions=torch.stack(values, 1), components=tuple(comps), representation=z,
                         grid=plan.grid, token_details=details, meta=dict(plan.meta))


def _install(hooks: HookSet, bp: BlockParts, r: _Record, rows: torch.Tensor, tokens: bool) -> None:
    H, dh = bp.num_heads, bp.head_dim

    def on_o_in(x):
        B = x.shape[0]
        r.o = x.index_select(1, rows).view(B, -1, H, dh)  # [B, R, H, dh]

    def on_mlp(out):
        r.mlp = out.index_select(1, rows)

    hooks.pre(bp.o, on_o_in)
    hooks.post(bp.mlp_out, on_mlp)
    if not tokens:
        return

    def heads_of(x):  # [B, N, H·dh] → [B, H, N, dh]
        return x.view(x.shape[0], x.shape[1], H, dh).transpose(1, 2)

    def on_q(out):
        r.q = heads_of(out.index_select(1, rows))

    def on_k(out):
        r.k = heads_of(out)

    def on_v(out):
        r.v = heads_of(out)

    def on_attention(out):
        weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        if isinstance(weights, torch.Tensor) and weights.ndim == 4:
            # the implementation returned the probabilities it used (eager): take their readout rows
            r.attn_rows = weights.index_select(2, rows)
        else:
            # fused kernels (sdpa, flash, flex) return none: recompute the readout rows from queries and keys
            r.attn_rows = torch.softmax((r.q @ r.k.transpose(-2, -1)) * bp.scaling, dim=-1)
        r.q = r.k = None

    hooks.post(bp.q, on_q)
    hooks.post(bp.k, on_k)
    hooks.post(bp.v, on_v)
    hooks.post(bp.attention, on_attention)
