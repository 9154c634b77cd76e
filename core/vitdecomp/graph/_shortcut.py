"""Linear shortcut paths on the residual stream (the ``auto`` adapter; :mod:`._autostage`, :mod:`.auto`).

A residual add ``s' + b`` whose stream operand ``s'`` is not the stream ``s`` itself but reached from it through
*freezable* steps (:func:`freezable_step`: layout changes, identities, average / max pooling, convolutions and
linear layers without an activation, frozen norms) while the branch ``b`` also reads ``s``: the steps are mixers
on the stream (each a transition into a new grid stream, or a norm on it) and the branch is a write on the
stream they give (CoAtNet's strided MBConv: ``x = shortcut(x) + conv_branch(x)``, shortcut = 2×2 average pool +
1×1 conv; MViTv2's ``shortcut_proj_attn`` / ``shortcut_pool_attn``; NextViT's ``projection``).

* **Recorded maps** (:func:`add_map`, read backwards by :func:`backward`): a step whose forward action on a
  write is a fixed linear map once the forward ran. Every write of the stream it reads is carried *forward*
  through it (:class:`._conv.MapTerm`, as a general convolution is: every row its own group, the queued
  write maps sent through the map, then pooled by the next stream's terms). Exact; no token detail.
  :class:`MaxPoolMap`: a ``MaxPool2d`` at the forward's indices — a hook runs the same pool with
  ``return_indices=True`` on the module's input (the same kernel, so ties resolve as the forward's did and the
  values are identical) and writes are gathered at them. :class:`AvgPoolMap`: an average pool that does not
  tile the map (its own pooling applied to every write). :class:`GroupMaxMap`: Hiera's
  ``x.view(B, s, -1, C).amax(dim=1)``, at the maxima of the pooled module's output, ties split evenly as
  ``amax``'s gradient does (tied values are equal, so any split is exact). :class:`GroupNormMap`: a
  ``GroupNorm`` on the stream at the forward's per-image, per-group ``1/σ``, each write centred by its own group
  mean over all positions (β is a constant write of the stream it gives).
* :func:`linear_conv`: a ``Linear`` on the channels as the equivalent 1×1 conv (a one-slot patch convolution).
* :func:`add_select`: ``torch.cat`` of grid streams along the channels, each part a channel selection of the
  new stream, read backwards as one shared matrix (token detail kept).
* :func:`opened_heads`: heads of an attention traced through, split by proj's columns when proj reads the
  attention product itself.
* Token-stream blocks (:func:`transitions`, :func:`enter_transition`): a ``blocks`` member whose last add's
  stream operand is the block's input through a norm, a Linear and a max over groups of rows (Hiera).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ._conv import MapTerm

__all__ = ["freezable_step", "MapTerm", "maxpool_indices"]


def _bn_fixed(mod) -> bool:
    return (isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and not mod.training
            and mod.running_var is not None)


def freezable_step(mod) -> bool:
    """A module that is a fixed linear map of its input once the forward ran (statistics / indices frozen):
    identities, average and max pools, convolutions, linear layers, norms, eval BatchNorm with running
    statistics. Its own handler on the stream decides which configurations it follows (and refuses the rest
    by name)."""
    from ..engine import supported_norm
    from .auto import _identity

    return (_identity(mod) or supported_norm(mod) or _bn_fixed(mod)
            or isinstance(mod, (torch.nn.AvgPool2d, torch.nn.MaxPool2d, torch.nn.Conv2d,
                                torch.nn.Linear)))


def maxpool_indices(mod, x):
    """The argmax indices ``mod`` (a ``MaxPool2d``) used on ``x`` [B, C, H, W]: the same pool run again with
    ``return_indices=True`` (identical kernel and tie-breaking, so the selected values equal the forward's)."""
    with torch.no_grad():
        _, idx = F.max_pool2d(x, mod.kernel_size, mod.stride, mod.padding, mod.dilation, ceil_mode=mod.ceil_mode,
                              return_indices=True)
    return idx


class _RecordedMap:
    """A fixed linear map of ``module``'s (see :func:`add_map`): ``install`` hooks what it needs from the forward
    onto ``rec`` (nothing by default), ``fired`` says it did, ``forward_fn(rec)`` is its action on a write's map
    ``[B, k, R, C]``."""

    def __init__(self, module):
        self.module = module

    def install(self, hooks, rec):
        pass

    def fired(self, rec) -> bool:
        return True


class MaxPoolMap(_RecordedMap):
    """A ``MaxPool2d`` on a grid stream read as ``[B, C, H, W]``: a hook records the forward's indices; its forward
    action on a write ``[B, k, H·W, C]`` is the gather ``y[b, k, r', c] = u[b, k, idx[b, c, r'], c]``."""

    def install(self, hooks, rec):
        def on_in(x):
            rec.map_idx = maxpool_indices(self.module, x).flatten(2)  # [B, C, R']

        hooks.pre(self.module, on_in)

    def fired(self, rec) -> bool:
        return getattr(rec, "map_idx", None) is not None

    def forward_fn(self, rec):
        idx = rec.map_idx

        def fn(P):  # [B, k, R, C] -> [B, k, R', C]
            B, k, R, C = P.shape
            ix = idx.unsqueeze(1).expand(B, k, C, idx.shape[-1])
            return torch.gather(P.transpose(2, 3), 3, ix).transpose(2, 3)

        return fn


def add_map(g, src, dst, mapping, *, channels: int, name: str, stage=None) -> None:
    """A fixed linear map from grid stream ``src`` into grid stream ``dst``, recorded in the forward
    (``mapping``: a :class:`_RecordedMap`; ``channels``: the width of ``dst``); without a constant. The writes
    of ``src`` are carried forward through it (exact; no token detail)."""
    from . import GraphError, _Op

    if src.grid is None or dst.grid is None:
        raise GraphError(f"pack {g.pack!r}, node {name!r}: a recorded map joins two streams with their own grids")
    g.ops.append(_Op("merge", dst, name=name, module=None,
                     extra={"src": src, "norm": None, "map": mapping, "geometry": None, "channels": int(channels),
                            "cargs": {} if stage is None else {"stage": int(stage)}}))


def backward(op, rec, terms_dst, device, dtype, tokens):
    """A recorded map read backwards: the source stream's terms carry their writes forward through it. Returns
    ``(None, terms of the source stream)`` (a map has no constant)."""
    from ._hier import gterms

    x = op.extra
    src, dst = x["src"], op.stream
    terms = gterms(terms_dst, dst, device, x["channels"])
    B = terms[0].w.shape[0]
    fn = x["map"].forward_fn(rec)
    what = f"{op.name} ({type(x['map'].module).__name__})"
    return None, [MapTerm(B, src.rows, device, dtype, fn, t, what) for t in terms]


class AvgPoolMap(_RecordedMap):
    """An ``AvgPool2d`` that is no patch pool (padding, overlapping or ceil-mode windows; the divisor depends on
    the position only): its own pooling applied to every write's map."""

    def __init__(self, module, hw):
        super().__init__(module)
        self.hw = hw

    def forward_fn(self, rec):
        m, (h, w) = self.module, self.hw

        def fn(P):  # [B, k, R, C] -> [B, k, R', C]
            B, k, R, C = P.shape
            y = F.avg_pool2d(P.reshape(B * k, h, w, C).permute(0, 3, 1, 2), m.kernel_size, m.stride, m.padding,
                             m.ceil_mode, m.count_include_pad, m.divisor_override)
            return y.flatten(2).transpose(1, 2).reshape(B, k, -1, C)

        return fn


class GroupNormMap(_RecordedMap):
    """A ``GroupNorm`` on a grid stream read as ``[B, C, H, W]``, frozen at the forward's statistics: a hook
    records ``1/σ`` per image and channel group from the module's input; its forward action on a write
    ``[B, k, H·W, C]`` is ``γ ⊙ (u − mean_g(u)) / σ_g`` — each write centred by its own mean over the group's
    channels and *all* positions (which is why it is carried forward: it mixes rows). Its β is a constant of
    the stream it writes (added by the caller)."""

    def install(self, hooks, rec):
        m = self.module

        def on_in(x):
            xg = x.detach().to(torch.float64).reshape(x.shape[0], m.num_groups, -1)
            rec.map_inv = torch.rsqrt(xg.var(-1, unbiased=False) + m.eps)  # [B, G]

        hooks.pre(m, on_in)

    def fired(self, rec) -> bool:
        return getattr(rec, "map_inv", None) is not None

    def forward_fn(self, rec):
        m = self.module
        inv = rec.map_inv

        def fn(P):  # [B, k, R, C] -> [B, k, R, C]
            B, k, R, C = P.shape
            G = m.num_groups
            u = P.reshape(B, k, R, G, C // G)
            u = (u - u.mean((2, 4), keepdim=True)) * inv.to(P.dtype)[:, None, None, :, None]
            u = u.reshape(B, k, R, C)
            return u if m.weight is None else u * m.weight.detach().to(P.dtype)

        return fn


def pool_map(mod, hw):
    """The recorded map of a pool on a ``[B, C, h, w]`` stream (``hw``: its grid)."""
    return MaxPoolMap(mod) if isinstance(mod, torch.nn.MaxPool2d) else AvgPoolMap(mod, hw)


def linear_conv(lin):
    """A ``Linear`` on the channels of a grid stream as the 1×1 ``Conv2d`` with its weight and bias (a patch
    convolution of one slot: token detail as for any patch conv)."""
    conv = torch.nn.Conv2d(lin.in_features, lin.out_features, 1, bias=lin.bias is not None)
    conv = conv.to(device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.detach()[:, :, None, None])
        if lin.bias is not None:
            conv.bias.copy_(lin.bias.detach())
    return conv.requires_grad_(False)


def _peel_layout(node, model, names=("contiguous",)):
    from .auto import _identity

    while isinstance(node, torch.fx.Node):
        if node.op == "call_method" and node.target in names:
            node = node.args[0]
        elif node.op == "call_module" and _identity(model.get_submodule(node.target[len("model."):])):
            node = node.args[0]
        else:
            break
    return node


def _product(n) -> bool:
    """``n`` is an attention product itself (``scaled_dot_product_attention`` or a ``matmul``): a head's output
    with nothing added after the product (MViTv2's residual pooling ``A·V + q`` is no standard head)."""
    import operator

    return isinstance(n, torch.fx.Node) and (
        (n.op == "call_function" and n.target in (F.scaled_dot_product_attention, operator.matmul, torch.matmul))
        or (n.op == "call_method" and n.target == "matmul"))


def _heads_at(pnode, H, proj, shapes, peel):
    """Whether proj's input at trace node ``pnode`` holds H heads as contiguous channel groups of an attention
    product (the pattern :func:`opened_heads` describes); ``shapes``: node → shape, ``peel``: through
    identities and ``contiguous``."""
    inp = peel(pnode.args[0] if pnode.args else None)
    if not (isinstance(inp, torch.fx.Node) and inp.op == "call_method" and inp.target in ("reshape", "view")):
        return False
    si, src = shapes.get(inp), peel(inp.args[0])
    if isinstance(proj, torch.nn.Linear) and si is not None and len(si) == 3 and si[-1] == proj.in_features:
        if not (isinstance(src, torch.fx.Node) and src.op == "call_method" and src.target in ("transpose", "permute")):
            return False
        if src.target == "permute":
            pm = src.args[1] if len(src.args) == 2 else src.args[1:]
            ok = [d % 4 for d in pm] == [0, 2, 1, 3]
        else:
            ok = sorted(d % 4 for d in src.args[1:3]) == [1, 2]
        so = shapes.get(src.args[0])
        return bool(ok and _product(src.args[0]) and so is not None and len(so) == 4 and so[1] == H
                    and so[1] * so[3] == proj.in_features and so[2] == si[1])
    if isinstance(proj, torch.nn.Conv2d) and tuple(proj.kernel_size) == (1, 1) and proj.groups == 1 \
            and si is not None and len(si) == 4 and si[1] == proj.in_channels:
        so = shapes.get(src)
        swapped = isinstance(src, torch.fx.Node) and src.op == "call_method" and src.target == "transpose" and \
            sorted(d % 4 for d in src.args[1:3]) == [2, 3] and _product(src.args[0])  # (A·V)ᵀ: [B, H, dh, N]
        return bool((_product(src) or swapped) and so is not None and len(so) == 4 and so[1] == H
                    and so[1] * so[2] == si[1] and so[3] == si[2] * si[3])
    return False


def leaf_heads(att, in_shape) -> bool:
    """Whether attention module ``att`` (``num_heads``, ``proj``) holds its heads as contiguous channel groups of
    proj's input, read from its own trace on an input of ``in_shape`` (:func:`opened_heads`)."""
    if not (isinstance(getattr(att, "num_heads", None), int) and isinstance(getattr(att, "proj", None),
                                                                              (torch.nn.Linear, torch.nn.Conv2d))):
        return False
    return _leaf_heads(att, tuple(in_shape))


def _leaf_heads(att, in_shape):
    """:func:`_heads_at` on the attention module's own trace (a leaf of the stage trace), its shapes propagated
    on a zero input of ``in_shape``; cached per module and shape."""
    from torch.fx.passes.shape_prop import ShapeProp

    from .auto import _LeafTracer, _cached, _identity

    def derive():
        import inspect

        params = list(inspect.signature(att.forward).parameters.values())[1:]
        if any(p.default is inspect.Parameter.empty for p in params if p.kind not in (p.VAR_POSITIONAL,
                                                                                       p.VAR_KEYWORD)):
            return False  # a required argument besides the input (MViTv2's feature size): no standalone trace
        concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        try:
            graph = _LeafTracer().trace(att, concrete_args=concrete or None)
            gm = torch.fx.GraphModule(att, graph)
            w = att.proj.weight
            with torch.no_grad():
                ShapeProp(gm).propagate(torch.zeros(in_shape, dtype=w.dtype, device=w.device))
        except Exception:  # noqa: BLE001 - not traceable on its own: no head split
            return False
        shapes = {n: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
                  if hasattr(n.meta.get("tensor_meta"), "shape")}

        def peel(n):
            while isinstance(n, torch.fx.Node) and ((n.op == "call_method" and n.target == "contiguous") or (
                    n.op == "call_module" and _identity(att.get_submodule(n.target)))):
                n = n.args[0]
            return n

        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        pnode = peel(out[0] if isinstance(out, (tuple, list)) else out)
        if not (isinstance(pnode, torch.fx.Node) and pnode.op == "call_module" and pnode.target == "proj"):
            return False
        return _heads_at(pnode, att.num_heads, att.proj, shapes, peel)

    return _cached(att, ("leaf-heads", tuple(in_shape)), derive)


def opened_heads(model, onode, bpath, shapes):
    """Heads of an attention inside a block the derivation opened: ``(attention path, proj, H)`` when the
    attention (a module with ``num_heads`` H and a ``proj``) holds its heads as contiguous channel groups of
    proj's input, ``o`` the attention product itself — a Linear reading ``reshape(transpose(o, 1, 2))`` with
    ``o`` ``[B, H, N, dh]``, or a 1×1 conv reading ``view(o)`` ``[B, H·dh, h, w]`` with ``o`` ``[B, H, dh, N]``,
    the product or its transpose (CoAtNet's ``Attention2d``). The write is the attention itself (a leaf of the
    stage trace: its own trace is read) or its ``proj`` (traced through: the stage trace is read). Else None
    (the branch stays one write)."""

    mod = model.get_submodule(bpath)
    if isinstance(getattr(mod, "num_heads", None), int) and isinstance(getattr(mod, "proj", None), torch.nn.Module):
        parent, att = bpath, mod
    else:
        parent, _, leaf = bpath.rpartition(".")
        att = model.get_submodule(parent) if leaf == "proj" and parent else None
    H = getattr(att, "num_heads", None)
    proj = getattr(att, "proj", None)
    if not isinstance(H, int) or H < 1 or proj is None or not isinstance(onode, torch.fx.Node) or \
            onode.op != "call_module":
        return None
    target = model.get_submodule(onode.target[len("model."):])
    if target is att:  # the attention is a leaf: its own trace
        ins = shapes.get(onode.args[0]) if onode.args else None
        return (parent, proj, H) if ins is not None and _leaf_heads(att, ins) else None
    if target is not proj:
        return None
    return (parent, proj, H) if _heads_at(onode, H, proj, shapes, lambda n: _peel_layout(n, model)) else None


# ---------------------------------------------------------------------------------------------- token-stream blocks
class GroupMaxMap(_RecordedMap):
    """``x.view(B, s, -1, C).amax(dim=1)`` on a ``[B, N, C]`` stream (Hiera's max-pool over its unrolled mask
    units), frozen at the forward: the output row ``r'`` and channel ``c`` take the input rows ``j·N/s + r'``
    that attain the maximum, split evenly among ties (as ``amax``'s own gradient does; tied values are equal, so
    every split is exact). ``module``: the module whose output is the pooled value (its hook records the maxima)."""

    def __init__(self, module, s):
        super().__init__(module)
        self.s = int(s)

    def install(self, hooks, rec):
        s = self.s

        def on_out(y):
            v = y.reshape(y.shape[0], s, -1, y.shape[-1])
            hit = (v == v.amax(1, keepdim=True)).to(v.dtype)
            rec.map_idx = hit / hit.sum(1, keepdim=True)  # [B, s, N/s, C]

        hooks.post(self.module, on_out)

    def fired(self, rec) -> bool:
        return getattr(rec, "map_idx", None) is not None

    def forward_fn(self, rec):
        wt, s = rec.map_idx, self.s

        def fn(P):  # [B, k, N, C] -> [B, k, N/s, C]
            B, k, R, C = P.shape
            return (P.reshape(B, k, s, R // s, C) * wt.unsqueeze(1)).sum(2)

        return fn


class Transition:
    """A block whose residual stream operand is the block's input through freezable steps (Hiera's stage
    transition ``x = do_pool(proj(norm1(x)))``, then ``x + attn(norm1(x))``): ``steps`` in forward order —
    ``("norm", path, module)``, ``("linear", path, module)``, ``("gmax", path of the pooled module, s)`` — and
    the block's writes on the stream they give."""

    def __init__(self, steps, writes):
        self.steps, self.writes = steps, writes


def _steps_to(node, x, block):
    """The freezable steps from ``x`` to ``node`` in forward order, or None."""
    from ..engine import supported_norm
    from .auto import _identity

    steps = []
    while node is not x:
        if not isinstance(node, torch.fx.Node):
            return None
        if node.op == "call_method" and node.target == "amax":  # (max(dim) returns a pair: not followed)
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            view = node.args[0]
            if dim not in (1, (1,), [1]) or node.kwargs.get("keepdim") or not (
                    isinstance(view, torch.fx.Node) and view.op == "call_method"
                    and view.target in ("view", "reshape") and len(view.args) == 5):
                return None
            s, src = view.args[2], view.args[0]
            if not isinstance(s, int) or view.args[3] != -1 or not (isinstance(src, torch.fx.Node)
                                                                    and src.op == "call_module"):
                return None
            steps.append(("gmax", src.target, s))
            node = src
            continue
        if node.op == "call_module":
            mod = block.get_submodule(node.target)
            if not _identity(mod):
                if supported_norm(mod):
                    steps.append(("norm", node.target, mod))
                elif isinstance(mod, torch.nn.Linear):
                    steps.append(("linear", node.target, mod))
                else:
                    return None
            node = node.args[0]
            continue
        return None
    return steps[::-1]


def derive_transition(block, prefix):
    """:class:`Transition` of ``block`` (``prefix``: its path and a dot), or None when its trace is no add chain
    ending in freezable steps from its input."""
    from .auto import _ADD, _peel, _trace

    try:
        graph = _trace(block, block, prefix[:-1])
    except Exception:  # noqa: BLE001 - the caller raises the plain derivation's reason
        return None
    x = next(n for n in graph.nodes if n.op == "placeholder")
    cur = next(n for n in graph.nodes if n.op == "output").args[0]
    writes = []

    def is_add(n):
        return isinstance(n, torch.fx.Node) and ((n.op == "call_function" and n.target in _ADD)
                                                 or (n.op == "call_method" and n.target in ("add", "add_")))

    while is_add(cur) and len(cur.args) == 2 and not cur.kwargs:
        a, b = cur.args
        if a is x or b is x:
            return None  # a plain add chain down to the input: no transition
        if is_add(a) or is_add(b):
            stream, branch = (a, b) if is_add(a) else (b, a)
            writes.append(_peel(branch, block, prefix)[:3])
            cur = stream
            continue
        for sa, ba in ((a, b), (b, a)):
            steps = _steps_to(sa, x, block)
            if steps:
                writes.append(_peel(ba, block, prefix)[:3])
                return Transition(steps, writes[::-1])
        return None
    return None


def transitions(model) -> dict:
    """``{block index: Transition}`` for the blocks of a token-stream model's ``blocks`` list that are no plain
    add chain but one ending in freezable steps from the block's input (cached per model)."""
    from ..errors import UnsupportedModelError
    from .auto import _block_writes, _cached

    def derive():
        out = {}
        for i, blk in enumerate(model.blocks):
            try:
                _block_writes(blk, f"blocks.{i}.")
            except UnsupportedModelError:
                t = derive_transition(blk, f"blocks.{i}.")
                if t is not None:
                    out[i] = t
        return out

    return _cached(model, "transitions", derive)


def _shrink(grid, s):
    """The token grid after pooling groups of ``s`` rows (a label only: token detail is refused on it)."""
    from .._records import TokenGrid

    r = int(round(s ** 0.5))
    if r * r == s and grid.h % r == 0 and grid.w % r == 0:
        return TokenGrid(0, grid.h // r, grid.w // r, (grid.patch_size[0] * r, grid.patch_size[1] * r))
    return TokenGrid(0, 1, grid.h * grid.w // s, grid.patch_size)


def enter_transition(g, x, block, path, t: Transition):
    """Put a transition block's steps on the graph (inside its block): norms on the stream, a Linear as a 1×1
    conv into a new stream, a max over groups of rows as a recorded map into a stream of ``rows / s`` rows.
    Returns the stream the block's writes go to."""
    from ..errors import UnsupportedModelError

    C = None
    for kind, p, m in t.steps:
        if kind == "norm":
            g.norm(x, m, name=f"{path}.{p}")
            if C is None and getattr(m, "normalized_shape", None):
                C = int(m.normalized_shape[-1])
        elif kind == "linear":
            ns = g.stream(f"{path}.{p}", x.rows, grid=x.grid)
            g.conv(x, ns, linear_conv(m), name=f"{path}.{p}.bias")
            x, C = ns, m.out_features
        else:  # gmax: m is the group size s, p the module whose output is pooled
            if C is None or x.rows % m:
                raise UnsupportedModelError(f"auto adapter: in {path} the max over groups of {m} rows of "
                                            f"{path}.{p}'s output does not tile the {x.rows} rows of the stream")
            ns = g.stream(f"{path}.pool", x.rows // m, grid=_shrink(x.grid, m))
            add_map(g, x, ns, GroupMaxMap(block.get_submodule(p), m), channels=C, name=f"{path}.{p}.pool")
            x = ns
    return x


def token_grid(model, images, N, grid):
    """``grid``, or the model's own token grid when it names one (Hiera's ``tokens_spatial_shape`` and
    ``patch_stride``) and the patch embedding's conventions found none."""
    from .._records import TokenGrid

    if grid.h * grid.w == N:
        return grid
    shape = getattr(model, "tokens_spatial_shape", None)
    stride = getattr(model, "patch_stride", None)
    if isinstance(shape, (list, tuple)) and len(shape) == 2 and int(shape[0]) * int(shape[1]) == N:
        ps = tuple(int(v) for v in stride) if isinstance(stride, (list, tuple)) and len(stride) == 2 else \
            (images.shape[-2] // int(shape[0]), images.shape[-1] // int(shape[1]))
        return TokenGrid(0, int(shape[0]), int(shape[1]), ps)
    return grid


# ---------------------------------------------------------------------------------------------- channel concatenation
def add_select(g, src, dst, offset: int, width: int, total: int, *, name: str) -> None:
    """Grid stream ``src`` (``width`` channels) is the channel slice ``offset:offset + width`` of grid stream
    ``dst`` (``total`` channels), as in ``torch.cat([a, b], dim=channels)`` (NextViT's transformer block): read
    backwards, every term of ``dst`` becomes one on ``src`` through the selection of those channels (the same
    matrix for every group, so token detail is kept)."""
    from . import GraphError, _Op

    if src.grid is None or dst.grid is None or (src.grid.h, src.grid.w) != (dst.grid.h, dst.grid.w):
        raise GraphError(f"pack {g.pack!r}, node {name!r}: a channel concatenation joins grid streams of one grid")
    g.ops.append(_Op("merge", dst, name=name, module=None,
                     extra={"src": src, "norm": None, "select": (int(offset), int(width), int(total)),
                            "geometry": (np.arange(src.rows, dtype=np.int64),), "cargs": {}}))


def select_backward(op, rec, terms_dst, device, dtype, tokens):
    """:func:`add_select` read backwards. Returns ``(None, terms of the source stream)``."""
    from ._hier import gterms

    off, width, total = op.extra["select"]
    terms = gterms(terms_dst, op.stream, device, total)
    E = torch.zeros(width, total, device=device, dtype=dtype)
    E[:, off:off + width] = torch.eye(width, device=device, dtype=dtype)
    return None, [t.through(E) for t in terms]
