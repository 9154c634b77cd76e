"""Attention pooling with learned queries as a mixer (:meth:`vitdecomp.graph.Graph.attention_pool`).

The pooled rows are ``P = proj(Σ_h A_h (x W_V^(h)ᵀ + b_V^(h)))`` with ``A_h`` ``[Q, n]`` the forward's attention
weights of the learned queries over the read rows. With ``A`` frozen, a read row ``x_m`` reaches a pooled row ``r``
through head ``h`` as ``A_h[r, m] · x_m @ K_h`` with ``K_h = W_V^(h)ᵀ W_O^(h)ᵀ`` ``[D, D_out]``: one term per head
on the read stream, row weights ``Σ_r w[r] A_h[r, :]``. The constants — ``W_O^(h) b_V^(h)`` (each head's weights
sum to one), ``b_O`` and a positional table added before the value projection (through ``A``) — are the component
``<name>.bias``.
"""

from __future__ import annotations

import torch

from ..engine import index_tensor
from . import GraphError

__all__ = ["install", "backward"]


def install(graph, hooks, op, rec, where) -> None:
    x = op.extra
    n = len(x["rows"])

    def on_q(out):
        rec.q = out

    def on_k(out):
        if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[1] != x["H"] or out.shape[2] != n:
            raise GraphError(f"{where}: its key module returns "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}; expected "
                             f"[B, {x['H']}, {n}, dh] (heads × the {n} rows it reads)")
        rec.k = out

    hooks.post(x["q"], on_q)
    hooks.post(x["k"], on_k)


def backward(op, rec, terms, rows, pos, emitted, tokens, device, dtype, row_detail, share=None) -> None:
    """Turn the pooled stream's terms into terms on the read stream and emit the constant (see module docstring)."""
    from .._records import Component

    s, x = op.stream, op.extra
    H = x["H"]
    sel = index_tensor(rows[id(s)], device)
    q = rec.q.to(dtype).index_select(2, sel)  # [B, H, R, dh]
    A = torch.softmax((q * x["scale"]) @ rec.k.to(dtype).transpose(-2, -1), dim=-1)  # [B, H, R, n]
    Wv = x["v_weight"].detach().to(dtype)
    D = Wv.shape[-1]
    Wv = Wv.view(H, -1, D)  # [H, dh, D]
    dh = Wv.shape[1]
    proj = x["proj"]
    if proj is None:
        Wo = torch.eye(H * dh, device=device, dtype=dtype).view(H * dh, H, dh)
    else:
        Wo = proj.weight.detach().to(dtype).view(-1, H, dh)  # [D_out, H, dh]
    K = [Wv[h].T @ Wo[:, h, :].T for h in range(H)]  # [D, D_out]
    # constants per pooled row: Σ_h W_O^h b_V^h + b_O, and a positional table through the value path
    c = torch.zeros(Wo.shape[0], device=device, dtype=dtype)
    if x["v_bias"] is not None:
        bv = x["v_bias"].detach().to(dtype).view(H, dh)
        c = c + sum(Wo[:, h, :] @ bv[h] for h in range(H))
    if proj is not None and proj.bias is not None:
        c = c + proj.bias.detach().to(dtype)
    u = c.expand(A.shape[0], A.shape[2], -1)
    if x["pos"] is not None:
        pv = x["pos"].detach().to(dtype) @ Wv.reshape(H * dh, D).T  # [n, H·dh]
        pv = pv.view(-1, H, dh).transpose(0, 1)  # [H, n, dh]
        u = u + torch.einsum("bhrn,hnk,dhk->brd", A, pv, Wo)
    (r,) = x["reads"]
    R = rows[id(r)]
    at = index_tensor([pos[id(r)][m] for m in x["rows"]], device)
    new, total, per_row = [], None, None
    from ._engine import _Term, _apply, _mm

    for t in terms[id(s)]:
        cm = _apply(torch.einsum("br,brd->bd", t.w, u), t.M)
        total = cm if total is None else total + cm
        if tokens:
            pr = _apply(t.w.unsqueeze(-1) * u, t.M)
            per_row = pr if per_row is None else per_row + pr
        for h in range(H):
            w = torch.zeros(A.shape[0], len(R), device=device, dtype=dtype)
            w.index_copy_(1, at, torch.einsum("br,brn->bn", t.w, A[:, h]))
            new.append(_Term(w, _mm(K[h], t.M)))
    terms.setdefault(id(r), []).extend(new)
    detail = row_detail(s, per_row) if tokens else None
    if share is not None:
        share(total, detail)
    else:
        emitted.append((Component(f"{op.name}.bias", "const"), total, detail))

