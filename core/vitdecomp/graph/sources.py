"""Head sources: where a head write's per-head outputs are read during the model's own forward.

A source's :meth:`HeadSource.install` registers hooks that fill a record with

* ``o`` ``[B, H, R, dh]``: each head's output before the output projection, at the stream rows ``rows``
  (already reduced over rows by ``reduce`` when the engine passes one);
* in token mode, ``attn`` ``[B, H, R, N]`` (the attention weights of those rows over the N source tokens, as the
  forward used them) and ``v`` ``[B, H, N, dh]`` (the values they weight).

Sources here cover fused-qkv timm attention (:class:`ProjInput` + :class:`FusedQKV`), any attention whose
product is recorded while it runs (:class:`TracedAttention`: the auto adapter's head splits), talking-heads attention
(:class:`TalkingHeads`), separate q/k/v projections (:class:`SeparateQKV`, Hugging Face) and attention modules
that do not call their output projection as a module (:class:`InProj`: ``nn.MultiheadAttention``, open_clip) and
shifted-window attention on a grid stream (:class:`WindowHeads`: Swin; heads placed at their query rows) and any
partitioned attention given by its row map (:class:`PartitionHeads`: MaxViT's block and grid attention) and
attention that mixes channels within each token (:class:`TokenwiseHeads`: XCiT's cross-covariance attention).
A new attention flavour is a new source (any object with ``num_heads`` and ``install``).
"""

from __future__ import annotations

from typing import Callable, Optional

import attrs
import torch
import torch.nn.functional as F

from ..errors import UnsupportedModelError

__all__ = ["HeadSource", "ProjInput", "FusedQKV", "TracedAttention", "TalkingHeads", "SeparateQKV", "InProj",
           "WindowHeads", "PartitionHeads", "TokenwiseHeads"]


class HeadSource:
    """Protocol (see the module docstring)."""

    num_heads: int

    def install(self, hooks, rec, rows: torch.Tensor, tokens: bool, reduce) -> None:  # pragma: no cover
        raise NotImplementedError


def _first(args, kwargs, *names):
    if args:
        return args[0]
    for n in names:
        if kwargs.get(n) is not None:
            return kwargs[n]
    return None


@attrs.define(eq=False)
class ProjInput(HeadSource):
    """Head outputs are the input of the output projection ``proj`` (``[B, N, H·dh]``, heads contiguous).
    ``attention`` (a :class:`FusedQKV`, :class:`TalkingHeads` or :class:`SeparateQKV`) supplies token detail."""

    proj: torch.nn.Module
    num_heads: int
    attention: Optional[object] = None

    def install(self, hooks, rec, rows, tokens, reduce):
        H = self.num_heads

        def on_proj_in(x):
            B = x.shape[0]
            o = x.index_select(1, rows).reshape(B, -1, H, x.shape[-1] // H).permute(0, 2, 1, 3)
            rec.o = reduce(o) if reduce is not None else o

        hooks.pre(self.proj, on_proj_in)
        if tokens:
            if self.attention is None:
                raise NotImplementedError("token detail needs an attention source")
            self.attention.install(hooks, rec, rows, H)


@attrs.define(eq=False)
class FusedQKV:
    """timm ``Attention``: values from the fused ``qkv`` output, attention rows recomputed from the outputs of
    ``q_norm``/``k_norm`` (Identity modules still run) with ``scale``."""

    qkv: torch.nn.Module
    q_norm: torch.nn.Module
    k_norm: torch.nn.Module
    scale: float

    def install(self, hooks, rec, rows, H):
        def on_qkv(out):
            B, N, C = out.shape
            # copy: a view would keep the whole qkv buffer (3× the memory) alive
            rec.v = out.view(B, N, 3, H, C // (3 * H))[:, :, 2].permute(0, 2, 1, 3).contiguous()

        def on_q(q):
            rec.q = q.index_select(2, rows)

        def on_k(k):
            rec.attn = torch.softmax((rec.q * self.scale) @ k.transpose(-2, -1), dim=-1)
            rec.q = None

        hooks.post(self.qkv, on_qkv)
        hooks.post(self.q_norm, on_q)
        hooks.post(self.k_norm, on_k)


class _AttentionProduct(torch.overrides.TorchFunctionMode):
    """Active only while one attention module runs: records its attention product, either a fused
    ``scaled_dot_product_attention(q, k, v, attn_mask)`` or a ``softmax`` followed by ``weights @ v``."""

    def __init__(self):
        super().__init__()
        self.found, self.softmax_seen, self.count = None, False, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
            a = dict(zip(names, args), **kwargs)
            self.found, self.count = ("sdpa", a), self.count + 1
        elif func in (torch.softmax, torch.Tensor.softmax, F.softmax):
            self.softmax_seen = True
        elif self.softmax_seen and func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__):
            self.found, self.count, self.softmax_seen = ("weights", (args[0], args[1])), self.count + 1, False
        return out


@attrs.define(eq=False)
class TracedAttention:
    """Token detail for an attention module whose head outputs are its ``proj`` input (BEiT, EVA, relpos ViT:
    rotary embeddings, relative-position biases): while ``module`` runs, its attention product is recorded —
    a fused ``F.scaled_dot_product_attention`` (weights recomputed at the stream rows from its queries, keys,
    ``scale`` and additive or boolean ``attn_mask``) or ``softmax`` followed by ``weights @ v`` (the weights as
    the product used them) — with its values. Exactly one attention product per call, non-causal."""

    module: torch.nn.Module

    def install(self, hooks, rec, rows, H):
        where = type(self.module).__name__
        state = {}

        def enter(x):
            mode = _AttentionProduct()
            mode.__enter__()
            state["mode"] = mode

        def leave(out):
            mode = state.pop("mode", None)
            if mode is None:
                return
            mode.__exit__(None, None, None)
            if out is None:  # the forward raised: nothing to record
                return
            if mode.count != 1:
                raise UnsupportedModelError(
                    f"token detail: {where} computed {mode.count} attention products; expected one "
                    "(F.scaled_dot_product_attention, or softmax then weights @ values)")
            kind, a = mode.found
            if kind == "weights":
                w, v = a
                if w.ndim != 4 or w.shape[1] != H:
                    raise UnsupportedModelError(f"token detail: {where}'s attention weights are {tuple(w.shape)}; "
                                                f"expected [B, {H}, N, N]")
                rec.attn, rec.v = w.index_select(2, rows), v.contiguous()
                return
            q, k, v = a["query"], a["key"], a["value"]
            if a.get("is_causal") or q.ndim != 4 or q.shape[1] != H:
                raise UnsupportedModelError(
                    f"token detail: {where} calls scaled_dot_product_attention with queries {tuple(q.shape)}"
                    f"{' (causal)' if a.get('is_causal') else ''}; expected [B, {H}, N, dh], non-causal")
            scale = a.get("scale")
            scale = q.shape[-1] ** -0.5 if scale is None else scale
            logits = (q.index_select(2, rows) * scale) @ k.transpose(-2, -1)
            mask = a.get("attn_mask")
            if mask is not None:  # broadcast to [B, H, N, N], then the stream rows
                mask = torch.broadcast_to(mask, (*q.shape[:-1], k.shape[-2])).index_select(2, rows)
                logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
            rec.attn, rec.v = torch.softmax(logits, dim=-1), v.contiguous()

        hooks.pre(self.module, enter)
        hooks.post(self.module, leave, always=True)


@attrs.define(eq=False)
class TokenwiseHeads:
    """Token detail for attention that mixes *channels* within each token (XCiT's cross-covariance attention,
    ``softmax(q̂ᵀk̂ · τ)`` of shape ``[B, H, dh, dh]`` applied to every token's values): at the forward's
    attention weights, head ``h``'s output at token ``n`` is a linear function of token ``n``'s own values only,
    so its token split is exact and lies at that token. Recorded from ``proj``'s input (``[B, N, H·dh]``, heads
    contiguous): ``v`` is each head's output per token, ``attn`` the identity over tokens (an expanded view)."""

    proj: torch.nn.Module

    def install(self, hooks, rec, rows, H):
        def on_proj_in(x):
            B, N, C = x.shape
            rec.v = x.reshape(B, N, H, C // H).permute(0, 2, 1, 3).contiguous()
            eye = torch.eye(N, device=x.device, dtype=x.dtype).index_select(0, rows)
            rec.attn = eye.expand(B, H, -1, -1)

        hooks.pre(self.proj, on_proj_in)


@attrs.define(eq=False)
class TalkingHeads:
    """Talking-heads attention (CaiT): values from the fused ``qkv`` output; the attention weights the values
    actually meet are the output of the post-softmax head mixer ``mix`` (``[B, N, N, H]``)."""

    qkv: torch.nn.Module
    mix: torch.nn.Module

    def install(self, hooks, rec, rows, H):
        def on_qkv(out):
            B, N, C = out.shape
            rec.v = out.view(B, N, 3, H, C // (3 * H))[:, :, 2].permute(0, 2, 1, 3).contiguous()

        def on_mix(out):  # [B, N(query), N(source), H]
            rec.attn = out.index_select(1, rows).permute(0, 3, 1, 2)

        hooks.post(self.qkv, on_qkv)
        hooks.post(self.mix, on_mix)


@attrs.define(eq=False)
class SeparateQKV:
    """Separate ``q``/``k``/``v`` projections; the attention rows are taken from ``attention``'s returned
    weights when it returns them (``(out, weights)``), else recomputed as ``softmax(scale · q kᵀ + bias)``, where
    ``bias`` (optional) is the sum of what ``bias_arg(args, kwargs)`` picks from the call of ``attention`` and the
    output of ``bias_module`` (``[1 or B, H, N, N]``; a boolean one is a mask): relative position biases (BEiT)
    and attention masks that a fused kernel applies without returning its weights."""

    q: torch.nn.Module
    k: torch.nn.Module
    v: torch.nn.Module
    attention: torch.nn.Module
    scale: float
    bias_arg: Optional[Callable] = None
    bias_module: Optional[torch.nn.Module] = None

    def install(self, hooks, rec, rows, H):
        state = {}

        def heads_of(x):
            return x.view(x.shape[0], x.shape[1], H, -1).transpose(1, 2)

        def on_call(args, kwargs):
            state.clear()
            b = self.bias_arg(args, kwargs)
            if b is not None:
                state["arg"] = b

        def on_bias(out):
            state["module"] = out

        def on_q(out):
            rec.q = heads_of(out.index_select(1, rows))

        def on_k(out):
            rec.k = heads_of(out)

        def on_v(out):
            rec.v = heads_of(out)

        def on_attention(out):
            weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            if isinstance(weights, torch.Tensor) and weights.ndim == 4:
                rec.attn = weights.index_select(2, rows)
            else:
                logits = (rec.q @ rec.k.transpose(-2, -1)) * self.scale
                for b in (state.get("module"), state.get("arg")):
                    if b is None:
                        continue
                    b = b.index_select(-2, rows)
                    if b.dtype == torch.bool:
                        logits = logits.masked_fill(~b, float("-inf"))
                    else:
                        logits = logits + b.to(logits.dtype)
                rec.attn = torch.softmax(logits, dim=-1)
            rec.q = rec.k = None
            state.clear()

        if self.bias_arg is not None:
            hooks.pre_kw(self.attention, on_call)
        if self.bias_module is not None:
            hooks.post(self.bias_module, on_bias)
        hooks.post(self.q, on_q)
        hooks.post(self.k, on_k)
        hooks.post(self.v, on_v)
        hooks.post(self.attention, on_attention)


@attrs.define(eq=False)
class InProj(HeadSource):
    """An attention module with ``in_proj_weight``/``in_proj_bias`` whose output projection is not called as a
    module (``nn.MultiheadAttention``, open_clip's ``Attention``): queries at the stream rows, all keys and
    values are recomputed from its input, with optional scaled-cosine logits and head scaling."""

    module: torch.nn.Module
    num_heads: int
    scale: float
    batch_first: bool = True
    logit_scale: Optional[torch.Tensor] = None
    logit_scale_max: float = 0.0
    head_scale: Optional[torch.Tensor] = None  # [H, 1, 1]
    q_norm: Optional[torch.nn.Module] = None
    k_norm: Optional[torch.nn.Module] = None

    def install(self, hooks, rec, rows, tokens, reduce):
        H, m = self.num_heads, self.module

        def on_in(args, kwargs):
            x = _first(args, kwargs, "query", "x")
            if not self.batch_first:
                x = x.transpose(0, 1)
            B, N, D = x.shape
            dh = D // H
            q, k, v = F.linear(x, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1)
            q = q.index_select(1, rows).view(B, -1, H, dh).transpose(1, 2)
            k = k.view(B, N, H, dh).transpose(1, 2)
            v = v.view(B, N, H, dh).transpose(1, 2)
            if self.logit_scale is not None:
                logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
                logits = logits * torch.clamp(self.logit_scale, max=self.logit_scale_max).exp()
            else:
                if self.q_norm is not None:
                    q, k = self.q_norm(q), self.k_norm(k)
                logits = (q * self.scale) @ k.transpose(-2, -1)
            attn = torch.softmax(logits, dim=-1)  # [B, H, R, N]
            if self.head_scale is not None:
                v = v * self.head_scale
            o = attn @ v
            rec.o = reduce(o) if reduce is not None else o
            if tokens:
                rec.attn, rec.v = attn, v.contiguous()

        hooks.pre_kw(m, on_in)


def _heads_from_partitions(hooks, rec, proj, num_heads, win, rows, reduce) -> None:
    """Record ``rec.o`` [B, H, rows, dh]: ``proj``'s input (head outputs in partition order, any shape whose leading
    axes flatten to ``win.size`` rows per image) brought back to grid order by the row map ``win`` (the grid
    position each partitioned row holds, −1 for padding), restricted to the stream rows ``rows``."""
    import numpy as np

    from ..engine import to_device

    valid = win >= 0
    R = int(valid.sum())
    inv = np.empty(R, dtype=np.int64)
    inv[win[valid]] = np.nonzero(valid)[0]
    inv = inv[rows.cpu().numpy()] if rows.numel() != R else inv
    inv_t = to_device(torch.from_numpy(np.ascontiguousarray(inv)), rows.device)

    def on_proj_in(x):
        C = x.shape[-1]
        x = x.reshape(-1, win.size, C)  # [B, partitions · rows, H·dh] per image
        o = x.index_select(1, inv_t)
        o = o.view(o.shape[0], o.shape[1], num_heads, C // num_heads).permute(0, 2, 1, 3)
        rec.o = reduce(o) if reduce is not None else o

    hooks.pre(proj, on_proj_in)


@attrs.define(eq=False)
class WindowHeads(HeadSource):
    """Shifted-window attention (Swin) on a stream with its own ``h × w`` grid: head outputs are the input of
    ``proj`` in window order (``[B·nW, wh·ww, H·dh]``: cyclic shift by ``-shift``, zero-padded to whole windows,
    partitioned row-major; ``pad_first``: padded, then shifted, as in Hugging Face's Swin). The row map — the
    block's own roll / pad / partition applied to position indices — brings them back to grid order, so each head
    sits where the model writes it. Token detail places a head at its *query* rows (``detail = "query"``: the
    split by the tokens it reads is not computed)."""

    proj: torch.nn.Module
    num_heads: int
    hw: tuple
    window: tuple
    shift: tuple = (0, 0)
    pad_first: bool = False
    detail = "query"

    def install(self, hooks, rec, rows, tokens, reduce):
        from ._hier import window_rows

        H, W = self.hw
        win = window_rows(H, W, tuple(self.window), tuple(self.shift), self.pad_first)
        _heads_from_partitions(hooks, rec, self.proj, self.num_heads, win, rows, reduce)


@attrs.define(eq=False)
class PartitionHeads(HeadSource):
    """Attention over partitions of a grid stream, given by a row map (MaxViT's block windows and grid cells):
    the head outputs are the input of ``proj`` in partition order (``[B·nP, ..., H·dh]``, any shape whose leading
    axes flatten to ``rows.size`` rows per image), and ``rows[i]`` is the grid position partitioned row ``i``
    holds (−1: padding), e.g. :func:`vitdecomp.graph.window_rows` / :func:`vitdecomp.graph.grid_rows`. Heads sit
    at their query rows (``detail = "query"``). With ``attention`` (an object whose ``install(hooks, rec, H)``
    sets ``rec.attn`` [B·nP, H, N, N] and ``rec.v`` [B·nP, H, N, dh] in partition order) token detail also
    splits each head by the position it reads, in ``dec.meta["source_tokens"]``."""

    proj: torch.nn.Module
    num_heads: int
    rows: object  # numpy int array
    attention: Optional[object] = None
    detail = "query"

    def install(self, hooks, rec, rows, tokens, reduce):
        import numpy as np

        _heads_from_partitions(hooks, rec, self.proj, self.num_heads, np.asarray(self.rows, dtype=np.int64), rows,
                               reduce)
        if tokens and self.attention is not None:
            rec.sources = {}
            self.attention.install(hooks, rec, self.num_heads)
