"""Shared traversal for plain (non-hierarchical) sequence transformers: timm ViT and open_clip's ViT.

The model's own forward runs once with hooks. Per block the hooks keep, at the readout rows only (the token
positions that reach the representation: CLS, distillation token, or every patch for average pooling):

* the attention heads' outputs before the output projection, ``o[b, h, r, :]``;
* the MLP branch output (after LayerScale) ``m[b, r, :]``;
* in token mode the readout rows of each attention matrix (recomputed from the readout queries and the keys;
  never all queries × all sources × D) and the values.

After the pass, the frozen final norms give per-row factors s[b, r] (pooling weight ÷ σ) and a batch-independent
linear map L (centring, γ, projection); every contribution is L(Σ_r s[b, r] u[b, r]).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import attrs
import torch
import torch.nn.functional as F

from vitdecomp import Component, Decomposition, TokenGrid
from vitdecomp.decomposition import FactorTokens, RowTokens
from vitdecomp.engine import HookSet, freeze_norm, index_tensor, is_identity, to_device

__all__ = ["AttentionSpec", "BlockSpec", "ReadoutSpec", "run_sequence"]


@attrs.define(eq=False)
class AttentionSpec:
    """How to read one attention module.

    ``style``: ``"timm"`` (hook the output projection's input and the q/k norms) or ``"inproj"`` (a module with
    ``in_proj_weight``/``in_proj_bias``, recomputed from its input at the readout rows: ``nn.MultiheadAttention``
    and open_clip's ``Attention``).
    """

    module: torch.nn.Module
    style: str
    num_heads: int
    head_dim: int
    out_weight: torch.Tensor  # [D, H*dh]
    out_bias: Optional[torch.Tensor]
    scale: float
    batch_first: bool = True
    logit_scale: Optional[torch.Tensor] = None  # scaled cosine attention (open_clip)
    logit_scale_max: float = 0.0
    head_scale: Optional[torch.Tensor] = None  # [H, 1, 1]
    q_norm: Optional[torch.nn.Module] = None
    k_norm: Optional[torch.nn.Module] = None


@attrs.define(eq=False)
class BlockSpec:
    """One pre-norm block ``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))``.

    ``attn_gamma`` is the attention LayerScale vector (None for identity); ``mlp_out`` the module whose output
    is the whole MLP branch (LayerScale included).
    """

    prefix: str
    module: torch.nn.Module
    attn: AttentionSpec
    attn_gamma: Optional[torch.Tensor]
    mlp_out: torch.nn.Module


@attrs.define(eq=False)
class ReadoutSpec:
    """From the last block's output to z.

    ``rows``: token indices that reach z; ``weights``: their pooling weights (summing to 1 for mean pooling);
    ``norm``: per-token norm applied before pooling (module or None) named ``norm_name``; ``post_norm``: norm
    applied to the pooled vector (``post_norm_name``); ``proj``: matrix [D, d] applied last (``pooled @ proj``).
    ``run``: calls the model's own forward and returns z.
    """

    rows: List[int]
    weights: torch.Tensor
    norm: Optional[torch.nn.Module]
    norm_name: str
    post_norm: Optional[torch.nn.Module]
    post_norm_name: str
    proj: Optional[torch.Tensor]
    run: Callable[[torch.Tensor], torch.Tensor]
    final_input_module: Optional[torch.nn.Module] = None  # module whose *input* is the last block's output


def _rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return x.index_select(1, rows)


class _BlockRecord:
    def __init__(self):
        self.o = None        # [B, H, R', dh]
        self.mlp = None      # [B, R', D]
        self.attn_rows = None  # [B, H, R, N] or reduced [B, H, 1, N]
        self.v = None        # [B, H, N, dh]
        self.q = None


def run_sequence(
    images: torch.Tensor,
    blocks: Sequence[BlockSpec],
    readout: ReadoutSpec,
    *,
    embed_name: str,
    start: int,
    tokens: bool,
    grid: TokenGrid,
    meta: dict,
    input_module_of_block: Callable[[int], torch.nn.Module],
    seq_first: bool = False,
) -> Decomposition:
    """Run the model once and return the exact decomposition (explicit constants, heads split)."""
    device, dtype = images.device, images.dtype
    rows = index_tensor(readout.rows, device)
    # token tensors inside blocks are [B, N, D] (or [N, B, D] for sequence-first transformers)
    def at_rows(x):
        return _rows(x.transpose(0, 1) if seq_first else x, rows)

    w = to_device(readout.weights, device, dtype)
    # Pooling weights are known up front when no per-token norm sits between the blocks and the pooling;
    # then every capture can be reduced over rows immediately (component mode only).
    prereduce = is_identity(readout.norm) and not tokens and len(readout.rows) > 1
    rec = [_BlockRecord() for _ in blocks]
    captured = {}

    def reduce_rows(t):  # t: [..., R, X] with rows on dim -2
        return (t * w.view(*([1] * (t.ndim - 2)), -1, 1)).sum(-2, keepdim=True)

    with HookSet() as hooks:
        hooks.pre(input_module_of_block(start), lambda x: captured.__setitem__("init", at_rows(x)))
        if readout.norm is not None and not is_identity(readout.norm):
            hooks.pre(readout.norm, lambda x: captured.__setitem__("final_in", _rows(x, rows)))
        if readout.post_norm is not None and not is_identity(readout.post_norm):
            hooks.pre(readout.post_norm, lambda x: captured.__setitem__("post_in", x))
        for bi, spec in enumerate(blocks):
            if bi < start:
                continue
            r = rec[bi]
            _install_attention_hooks(hooks, spec.attn, r, rows, tokens, prereduce, reduce_rows)

            def on_mlp(out, r=r):
                m = at_rows(out)
                r.mlp = reduce_rows(m) if prereduce else m

            hooks.post(spec.mlp_out, on_mlp)
        z = readout.run(images)

    # ---------------------------------------------------------------- frozen readout
    Rp = 1 if prereduce else len(readout.rows)
    B = images.shape[0]
    fin = freeze_norm(readout.norm, captured["final_in"]) if "final_in" in captured else None
    post = freeze_norm(readout.post_norm, captured["post_in"]) if "post_in" in captured else None
    if prereduce:
        s = torch.ones(B, 1, device=device, dtype=dtype)
    else:
        s = w.unsqueeze(0).expand(B, -1).clone()
        if fin is not None:
            s = s * fin.inv_scale
    if post is not None:
        s = s * post.inv_scale.unsqueeze(-1)
    proj = readout.proj.to(dtype) if readout.proj is not None else None

    def L(u: torch.Tensor) -> torch.Tensor:
        """The batch-independent linear map from the stream (after row reduction) to z."""
        if fin is not None:
            u = fin.apply_linear(u)
        if post is not None:
            u = post.apply_linear(u)
        if proj is not None:
            u = u @ proj
        return u

    comps: List[Component] = []
    values: List[torch.Tensor] = []
    details = {}

    def add(comp: Component, pooled: torch.Tensor, row_vals: Optional[torch.Tensor] = None):
        comps.append(comp)
        values.append(pooled)
        if tokens and row_vals is not None:
            details[comp.name] = RowTokens(rows=rows, values=row_vals)

    def add_rowwise(comp: Component, u_rows: torch.Tensor):
        """u_rows: [B, R', D] stream values at the readout rows."""
        weighted = u_rows * s.unsqueeze(-1)
        pooled = L(weighted.sum(1))
        add(comp, pooled, L(weighted) if tokens else None)

    first_block_name = embed_name if start == 0 else "init"
    init = captured["init"]
    if prereduce:
        init = reduce_rows(init)
    add_rowwise(Component(first_block_name, "embed" if start == 0 else "residual", block=None if start == 0 else start), init)

    for bi, spec in enumerate(blocks):
        if bi < start:
            continue
        r = rec[bi]
        a = spec.attn
        if r.o is None or r.mlp is None:
            raise RuntimeError(f"hooks of {spec.prefix} did not fire: the model's forward does not call its modules as expected")
        H, dh = a.num_heads, a.head_dim
        Wo = a.out_weight.to(dtype).view(-1, H, dh)  # [D, H, dh]
        gamma = spec.attn_gamma.to(dtype) if spec.attn_gamma is not None else None
        o = r.o  # [B, H, R', dh]
        so = torch.einsum("bhrk,br->bhk", o, s)
        heads = torch.einsum("bhk,dhk->bhd", so, Wo)
        if gamma is not None:
            heads = heads * gamma
        heads = L(heads)  # [B, H, D_out]
        if tokens:
            # a[b, h, j] = Σ_r s[b, r] A[b, h, r, j]
            att = torch.einsum("bhrn,br->bhn", r.attn_rows, s)
            Wg = Wo * gamma.view(-1, 1, 1) if gamma is not None else Wo
        for h in range(H):
            comp = Component(f"{spec.prefix}.attn.head.{h}", "head", block=bi, head=h)
            comps.append(comp)
            values.append(heads[:, h])
            if tokens:
                M = L(Wg[:, h, :].T).T  # [D_out, dh]
                details[comp.name] = FactorTokens(weight=att[:, h], values=r.v[:, h], matrix=M)
        if a.out_bias is not None:
            b = a.out_bias.to(dtype)
            if gamma is not None:
                b = b * gamma
            add_rowwise(Component(f"{spec.prefix}.attn.bias", "const", block=bi), b.expand(B, Rp, -1))
        add_rowwise(Component(f"{spec.prefix}.mlp", "mlp", block=bi), r.mlp)

    # constants of the readout
    if fin is not None and fin.bias is not None:
        beta = fin.bias
        after = beta * w.sum()
        if post is not None:
            after = post.apply_linear(after.expand(B, -1)) * post.inv_scale.unsqueeze(-1)
        else:
            after = after.expand(B, -1)
        if proj is not None:
            after = after @ proj
        row_vals = None
        if tokens:
            rv = beta.view(1, 1, -1) * w.view(1, -1, 1)
            if post is not None:
                rv = post.apply_linear(rv.expand(B, -1, -1)) * post.inv_scale.view(B, 1, 1)
            else:
                rv = rv.expand(B, -1, -1)
            row_vals = rv @ proj if proj is not None else rv
        add(Component(f"{readout.norm_name}.bias", "const"), after, row_vals)
    if post is not None and post.bias is not None:
        after = post.bias.expand(B, -1)
        if proj is not None:
            after = after @ proj
        row_vals = None
        if tokens:  # after pooling there is no token: spread evenly over the readout rows
            row_vals = (after.unsqueeze(1) / len(readout.rows)).expand(-1, len(readout.rows), -1)
        add(Component(f"{readout.post_norm_name}.bias", "const"), after, row_vals)

    contributions = torch.stack(values, 1)
    return Decomposition(contributions=contributions, components=tuple(comps), representation=z,
                         grid=grid, token_details=details, meta=meta)


def _install_attention_hooks(hooks: HookSet, a: AttentionSpec, r: _BlockRecord, rows, tokens, prereduce, reduce_rows):
    H, dh = a.num_heads, a.head_dim
    if a.style == "timm":
        m = a.module

        def on_proj_in(x):
            B, N, _ = x.shape
            o = _rows(x, rows).view(B, -1, H, dh).permute(0, 2, 1, 3)  # [B, H, R, dh]
            r.o = reduce_rows(o) if prereduce else o

        hooks.pre(m.proj, on_proj_in)
        if tokens:
            def on_qkv(out):
                B, N, _ = out.shape
                # copy: a view would keep the whole qkv buffer (3× the memory) alive
                r.v = out.view(B, N, 3, H, dh)[:, :, 2].permute(0, 2, 1, 3).contiguous()

            def on_q(q):
                r.q = q.index_select(2, rows)

            def on_k(k):
                attn = torch.softmax((r.q * a.scale) @ k.transpose(-2, -1), dim=-1)  # [B, H, R, N]
                r.attn_rows = attn
                r.q = None

            hooks.post(m.qkv, on_qkv)
            hooks.post(m.q_norm, on_q)
            hooks.post(m.k_norm, on_k)
        return

    if a.style == "inproj":
        m = a.module

        def on_in(args, kwargs):
            x = args[0] if args else kwargs.get("query")
            if x is None:
                x = kwargs.get("x")
            if not a.batch_first:
                x = x.transpose(0, 1)
            B, N, D = x.shape
            W, bias = m.in_proj_weight, m.in_proj_bias
            qkv = F.linear(x, W, bias)
            q, k, v = qkv.chunk(3, dim=-1)
            q = _rows(q, rows).view(B, -1, H, dh).transpose(1, 2)
            k = k.view(B, N, H, dh).transpose(1, 2)
            v = v.view(B, N, H, dh).transpose(1, 2)
            if a.logit_scale is not None:
                logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
                logits = logits * torch.clamp(a.logit_scale, max=a.logit_scale_max).exp()
            else:
                if a.q_norm is not None:
                    q, k = a.q_norm(q), a.k_norm(k)
                logits = (q * a.scale) @ k.transpose(-2, -1)
            attn = torch.softmax(logits, dim=-1)  # [B, H, R, N]
            o = attn @ v
            if a.head_scale is not None:
                o = o * a.head_scale
            r.o = reduce_rows(o) if prereduce else o
            if tokens:
                r.attn_rows = attn
                r.v = (v * a.head_scale if a.head_scale is not None else v).contiguous()

        hooks.pre_kw(m, on_in)
        return
    raise ValueError(f"unknown attention style {a.style!r}")
