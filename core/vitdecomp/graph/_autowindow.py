"""The staged ``auto`` adapter's row-permuting steps: windowed attention branches and patch merging.

A *row step* moves rows without touching their channels: a reshape / view / permute / transpose / flatten of the
tensor's leading axes, ``torch.roll`` (Swin's cyclic shift), ``F.pad`` (padding to whole windows), slicing off
that padding (``x[:, :H, :W, :]``), and a model-library function on the trace that does only that (timm's
``window_reverse``, registered as an fx leaf). Nothing is assumed about what a chain of them does: its row map is
read *numerically*, by running the trace's own nodes (with the forward's sizes) on two probes — a tensor whose
entry at (row r, channel c) is ``r·C + c + 1`` and a random one — and requiring that every output entry is the
input entry of one row at the same channel (or a zero of padding) on both: a row permutation with padding, the
model's roll / pad / partition defining it.

* :func:`branch_chain` peels a residual branch (its value where it is added to the stream) through row steps and
  identities down to the module computing it; :func:`row_map` gives the partitioned row each stream position
  holds. The write is then that module's (``layers.0.blocks.0.attn``): split into heads at ``proj``'s input
  (:class:`~vitdecomp.graph.sources.PartitionHeads` with the row map, heads at their query rows), or one
  block-level write (``Graph.branch(..., rows=)``). A norm after the row steps (SwinV2's res-post-norm,
  ``x + norm1(window_reverse(attn(x)))``) is the heads' ``post_norm``.
* :func:`patch_merge` recognises a 2×2 patch merging on the stream: row steps that gather each 2×2 cell into one
  row of 4·C channels in the order of :func:`vitdecomp.graph._hier.merge_slots` (pad odd sides, ``(dw, dh)``-major,
  as timm's ``PatchMerging``), then a norm and a bias-free ``Linear`` (or the Linear first, SwinV2):
  :meth:`Graph.merge`.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F

#: methods that only move rows / axes (channels stay the last axis: checked numerically)
_ROW_METHODS = ("reshape", "view", "permute", "transpose", "contiguous", "flatten", "unflatten", "squeeze",
                "unsqueeze", "roll", "narrow")
_ROW_FUNCTIONS = (torch.roll, F.pad, operator.getitem, torch.narrow, torch.reshape, torch.permute, torch.transpose,
                  torch.flatten)


def meta_use(n) -> bool:
    """A node that reads a value's metadata only (``x.shape`` / ``x.dtype`` via ``getattr``, ``x.size()``,
    ``x.dim()``), not its data."""
    return (n.op == "call_function" and n.target is getattr) or (n.op == "call_method" and n.target in ("size", "dim"))


def _library_function(fn) -> bool:
    """A function of the model's library on the trace (an fx leaf such as timm's ``window_reverse``): allowed as
    a row step only if the probes show it is one."""
    return callable(fn) and (getattr(fn, "__module__", "") or "").startswith("timm.")


def is_row_step(n) -> bool:
    if n.op == "call_method":
        return n.target in _ROW_METHODS
    if n.op == "call_function":
        if n.target is F.pad:
            mode = n.kwargs.get("mode", n.args[2] if len(n.args) > 2 else "constant")
            value = n.kwargs.get("value", n.args[3] if len(n.args) > 3 else None)
            return mode == "constant" and value in (None, 0, 0.0)
        return n.target in _ROW_FUNCTIONS or _library_function(n.target)
    return False


def _tensor_inputs(n, values):
    """The input nodes of ``n`` whose value in the forward is a tensor (recorded values are non-tensors only)."""
    return [a for a in n.all_input_nodes if a not in values]


def layer_scale(mod):
    """The per-channel vector of a layer-scale module (timm's ``LayerScale`` / ``LayerScale2d``, MetaFormer's
    ``Scale``), else None."""
    name = type(mod).__name__
    g = getattr(mod, "gamma", None) if name in ("LayerScale", "LayerScale2d") else \
        getattr(mod, "scale", None) if name == "Scale" else None
    if isinstance(g, torch.Tensor) and g.dim() == 1 and not getattr(mod, "inplace", False):
        return g
    return None


def branch_chain(model, node, values, identity, scales=None):
    """``(module path, module, its output node, [row steps from it to node, in forward order])`` when ``node`` is a
    module's output through row steps and identities (each with exactly one tensor input), else None.
    ``scales``: a list that receives the vector of one layer-scale module on the way (then peeled too)."""
    chain = []
    while True:
        if node.op == "call_module":
            mod = model.get_submodule(node.target[len("model."):])
            if identity(mod) and node.args:
                chain.append(node)
                node = node.args[0]
                continue
            if scales is not None and not scales and layer_scale(mod) is not None and node.args:
                scales.append(layer_scale(mod))  # a per-channel factor commutes with moving rows
                chain.append(node)
                node = node.args[0]
                continue
            if isinstance(mod, torch.nn.Sequential):
                return None
            return node.target[len("model."):], mod, node, chain[::-1]
        if not is_row_step(node) or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return None
        if _tensor_inputs(node, values) != [node.args[0]]:
            return None
        chain.append(node)
        node = node.args[0]


def record_values(gm, images):
    """Every node's output in one forward of ``images[:1]`` that is not a tensor (sizes, shapes, tuples): what a
    replay of row steps needs besides the probe."""
    out = {}

    class _Run(torch.fx.Interpreter):
        def run_node(self, n):
            r = super().run_node(n)
            if not isinstance(r, torch.Tensor) and not (isinstance(r, (tuple, list))
                                                        and any(isinstance(t, torch.Tensor) for t in r)):
                out[n] = r
            return r

    with torch.no_grad():
        _Run(gm).run(images[:1])
    return out


def _replay(chain, start, x, values, model):
    env = {start: x}

    def arg(a):
        if a in env:
            return env[a]
        if a in values:
            return values[a]
        raise KeyError(a)

    for n in chain:
        args = torch.fx.node.map_arg(n.args, arg)
        kwargs = torch.fx.node.map_arg(n.kwargs, arg)
        if n.op == "call_method":
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        elif n.op == "call_function":
            env[n] = n.target(*args, **kwargs)
        else:  # an identity module
            env[n] = args[0]
    return env[chain[-1]] if chain else x


def _probes(shape, C):
    rows = int(np.prod(shape[:-1]))
    idx = (torch.arange(rows, dtype=torch.float64).unsqueeze(1) * C + torch.arange(C, dtype=torch.float64) + 1)
    rnd = torch.randn(rows, C, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    return idx.reshape(shape), rnd.reshape(shape)


def _as_rows(t, lay, C):
    """A replay output ``t`` ([1, ...]) as ``[positions, C]`` in grid order for stream layout ``lay``."""
    if lay == "nchw":
        t = t.flatten(2).transpose(1, 2)
    elif lay == "ncl":
        t = t.transpose(1, 2)
    return t.reshape(-1, C)


def _source_rows(out_idx, out_rnd, rnd_in, C):
    """For each output row, the input row it holds (−1: a row of padding), or a reason string when the output is
    not a row selection of the input (channels kept)."""
    v = out_idx.round()
    if not torch.equal(v, out_idx) or (v < 0).any():
        return "moves values that are not whole rows (a step that computes, not only moves)"
    zero = v == 0
    r = torch.div(v - 1, C, rounding_mode="floor")
    c = (v - 1) - r * C
    ch = torch.arange(C, dtype=torch.float64).expand_as(v)
    pad = zero.all(1)
    if (zero.any(1) & ~pad).any() or not torch.equal(c[~pad], ch[~pad]):
        return "mixes channels or parts of rows"
    src = r[:, 0].long()
    if not (r[~pad] == r[~pad][:, :1]).all():
        return "mixes parts of rows"
    src[pad] = -1
    rin = rnd_in.reshape(-1, C)
    want = torch.where(pad.unsqueeze(1), torch.zeros_like(out_rnd), rin[src.clamp_min(0)])
    if not torch.equal(want, out_rnd):
        return "is not the same row selection on another input (not a pure data movement)"
    return src


def _host():
    """Outside any active dispatch mode: the probes are real host tensors even while the model runs on simulated
    (fake) CUDA tensors (the conformance kit's placement check), where no value could be read."""
    import contextlib

    try:
        from torch.utils._python_dispatch import _disable_current_modes
    except ImportError:  # pragma: no cover - private torch API moved
        return contextlib.nullcontext()
    return _disable_current_modes()


def row_map(chain, onode, shapes, values, model, lay, C, rows, memo=None):
    """Cached in ``memo`` (a dict kept per model structure and image size) under the module output node."""
    if memo is None:
        with _host():
            return _row_map(chain, onode, shapes, values, model, lay, C, rows)
    key = ("rows", onode, tuple(chain), lay)
    if key not in memo:
        with _host():
            memo[key] = _row_map(chain, onode, shapes, values, model, lay, C, rows)
    return memo[key]


def _row_map(chain, onode, shapes, values, model, lay, C, rows):
    """For a module output (node ``onode``, shape from ``shapes``) reaching the stream through ``chain``: numpy
    ``win`` with ``win[i]`` the stream position partitioned row ``i`` of the module's output holds (−1: a row
    cut off, e.g. window padding), for :class:`~vitdecomp.graph.sources.PartitionHeads`; or a reason string.
    ``lay``: the stream's layout at the add; ``rows``: its number of positions."""
    shape = shapes.get(onode)
    if shape is None or shape[-1] != C:
        return f"its output {shape} does not keep the stream's {C} channels last"
    pi, pr = _probes(shape, C)
    try:
        with torch.no_grad():
            oi, orr = _replay(chain, onode, pi, values, model), _replay(chain, onode, pr, values, model)
    except Exception as exc:  # noqa: BLE001 - a step that needs a value the replay does not have
        return f"its steps cannot be replayed on a probe ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
    try:
        oi, orr = _as_rows(oi, lay, C), _as_rows(orr, lay, C)
    except Exception:  # noqa: BLE001
        return f"its steps give {tuple(oi.shape)}, not the stream's layout"
    if oi.shape[0] != rows:
        return f"its steps give {oi.shape[0]} positions; the stream has {rows}"
    src = _source_rows(oi, orr, pr, C)
    if isinstance(src, str):
        return src
    if (src < 0).any():
        return "leaves stream positions without a row of its output"
    R = int(np.prod(shape[:-1]))
    if len(set(src.tolist())) != rows:
        return "writes one row of its output to two stream positions"
    win = np.full(R, -1, dtype=np.int64)
    win[src.numpy()] = np.arange(rows, dtype=np.int64)
    return win


def forward_chain(start, nodes, values):
    """The row steps reading ``start`` one after another (each the only tensor reader of the previous one), up to
    the first node that is not one: ``(chain, that node)``."""
    chain, cur = [], start
    while True:
        users = [u for u in cur.users if not meta_use(u)]
        if len(users) != 1:
            return chain, None
        u = users[0]
        if not is_row_step(u) or _tensor_inputs(u, values) != [cur] or u.args[0] is not cur:
            return chain, u
        chain.append(u)
        cur = u


def patch_merge(key, gs, lay, nodes, shapes, values, model, supported_norm):
    """A 2×2 patch merging reading the stream value ``key`` (a :class:`._autostage._Grid` ``gs`` in layout
    ``lay``): ``(norm, reduction, norm_first, last node, out shape, nodes consumed)``, a reason string, or None
    when the steps after ``key`` are no gather of 2×2 cells at all."""
    with _host():
        return _patch_merge(key, gs, lay, nodes, shapes, values, model, supported_norm)


def _patch_merge(key, gs, lay, nodes, shapes, values, model, supported_norm):
    from ._hier import merge_slots

    chain, nxt = forward_chain(key, nodes, values)
    if not chain or nxt is None or nxt.op != "call_module":
        return None
    end = chain[-1]
    shp = shapes.get(end)
    C, h, w = gs.C, gs.h, gs.w
    parent, slot, (h2, w2) = merge_slots(h, w)
    if shp is None or len(shp) != 4 or tuple(shp[1:]) != (h2, w2, 4 * C):
        return None
    if lay not in ("nhwc", "nlc"):
        return f"gathers 2×2 cells from the stream in layout {lay} (supported: [B, H, W, C] / [B, N, C])"
    base = torch.arange(h * w * C, dtype=torch.float64) + 1
    pi = base.reshape(1, h, w, C) if lay == "nhwc" else base.reshape(1, h * w, C)
    pr = torch.randn(pi.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    try:
        with torch.no_grad():
            oi, orr = _replay(chain, key, pi, values, model), _replay(chain, key, pr, values, model)
    except Exception as exc:  # noqa: BLE001
        return f"gathers rows by steps that cannot be replayed ({type(exc).__name__})"
    # the gathered tensor as [cells, 4, C]: slot k of cell p must hold child (parent⁻¹(p), slot k)
    oi, orr = oi.reshape(-1, C), orr.reshape(-1, C)
    src = _source_rows(oi, orr, pr.reshape(-1, C), C)
    if isinstance(src, str):
        return f"gathers 2×2 cells, but {src}"
    want = np.full(h2 * w2 * 4, -1, dtype=np.int64)
    want[parent * 4 + slot] = np.arange(h * w)
    if not np.array_equal(src.numpy(), want):
        return ("gathers 2×2 cells in an order other than timm's PatchMerging ((dw, dh)-major slots); "
                "Graph.merge needs that order")
    mods = []
    cur = nxt
    consumed = list(chain)
    for _ in range(2):
        if cur is None or cur.op != "call_module" or len([a for a in cur.args if isinstance(a, torch.fx.Node)]) != 1:
            break
        mods.append((cur, model.get_submodule(cur.target[len("model."):])))
        consumed.append(cur)
        users = [u for u in cur.users if not (u.op == "call_function" and u.target is getattr)]
        cur = users[0] if len(users) == 1 else None
    kinds = ["norm" if supported_norm(m) else "linear" if isinstance(m, torch.nn.Linear) else "other"
             for _, m in mods]
    if kinds[:2] == ["norm", "linear"]:
        norm, red, first = mods[0][1], mods[1][1], True
    elif kinds[:2] == ["linear", "norm"]:
        norm, red, first = mods[1][1], mods[0][1], False
    else:
        return ("gathers 2×2 cells into 4·C channels, but is not followed by a norm and a Linear (supported: "
                "timm's PatchMerging, norm → reduction or reduction → norm)")
    if red.bias is not None:
        return "is a patch merging whose reduction Linear has a bias (Graph.merge takes a bias-free one)"
    last = consumed[-1]
    return norm, red, first, last, shapes.get(last), consumed


def _heads_proj(mod):
    """The Linear output projection that splits ``mod``'s heads (timm's fused-qkv Attention, or a trace ending
    ``proj(transpose(A·V, 1, 2).reshape(..))``), or None."""
    from .auto import _proj_of_heads, _split_heads

    proj = mod.proj if _split_heads(mod) else _proj_of_heads(mod, loose=True)
    return proj if isinstance(proj, torch.nn.Linear) else None


def _param_path(model, p):
    return next((n for n, q in model.named_parameters() if q is p), None)


def window_branch(g, gs, lay, bnode, model, values, shapes, rel, outer=None, memo=None):
    """Register the write of a residual branch whose value ``bnode`` is a module's output through row steps
    (heads at proj's input with the numerically derived row map, else one write with ``rows=``). Returns None
    when registered, else the reason it is not such a branch."""
    from .auto import _identity
    from .sources import PartitionHeads

    scales = []
    found = branch_chain(model, bnode, values, _identity, scales)
    if found is None:
        return "it reaches the stream through a step that computes (not only moves rows), or through no module"
    path, mod, onode, chain = found
    gamma = scales[0] if scales else None  # (the replay passes the layer scale's call as an identity)
    if outer is not None:  # named by the outermost module returning it (``mlp``, not ``mlp.fc2``)
        path, mod = outer(path, mod, onode)
    if shapes.get(bnode) is None:
        return "its shape is unknown"
    win = row_map(chain, onode, shapes, values, model, lay, gs.C, gs.stream.rows, memo)
    if isinstance(win, str):
        return f"the output of {path} reaches it through steps that are no row permutation: {win}"
    proj = _heads_proj(mod)
    if proj is not None and getattr(mod, "num_heads", None):
        g.heads(gs.stream, PartitionHeads(proj, mod.num_heads, win), proj.weight, proj.bias, gamma=gamma,
                name=rel(path))
    else:
        ident = win.size == gs.stream.rows and np.array_equal(win, np.arange(win.size))
        shp = shapes.get(onode)
        if ident and shp is not None and len(shp) == 3 and shp[0] == 1:  # rows in grid order already
            win = None
        g.branch(gs.stream, mod, name=rel(path), kind="attn" if "attn" in path.rsplit(".", 1)[-1] else "mlp",
                 gamma=gamma, rows=win)
    return None


def post_norm_heads(g, gs, bpath, bmod, onode, model, values, shapes, rel, oracle, memo=None, lay=None) -> bool:
    """A branch ``norm(steps(attn(..)))`` whose module is a norm (SwinV2's res-post-norm) and whose input is a
    head-splittable attention's output through row steps: heads with ``post_norm=norm`` (True), else False (the
    norm's output is then one write)."""
    from ..engine import is_identity, supported_norm
    from .auto import _identity
    from .sources import PartitionHeads

    if bmod is None or is_identity(bmod) or not supported_norm(bmod) or gs.stream.grid is None:
        return False
    inp = onode.args[0] if onode.args else None
    if not isinstance(inp, torch.fx.Node) or len(onode.all_input_nodes) != 1:
        return False
    vals = values()
    found = branch_chain(model, inp, vals, _identity)
    if found is None:
        return False
    apath, amod, aonode, chain = found
    proj = _heads_proj(amod)
    ilay = gs.layout(shapes.get(inp, ()), lay) if shapes.get(inp) is not None else None
    if proj is None or not getattr(amod, "num_heads", None) or ilay not in ("nhwc", "nlc"):
        return False
    win = row_map(chain, aonode, shapes, vals, model, ilay, gs.C, gs.stream.rows, memo)
    if isinstance(win, str):
        return False
    g.heads(gs.stream, PartitionHeads(proj, amod.num_heads, win), proj.weight, proj.bias, post_norm=bmod,
            name=rel(apath))
    # the attribution oracle's constant: proj's bias and the post-norm's β, both inside this branch
    paths = (_param_path(model, proj.bias), _param_path(model, getattr(bmod, "bias", None)))
    oracle[f"{apath}.bias"] = [p for p in paths if p is not None]
    return True


def _scope(n):
    """Module paths (without ``model.``) node ``n`` runs inside, from its trace metadata (kept in ``n.meta``)."""
    got = n.meta.get("_vitdecomp_scope")
    if got is not None:
        return got
    out = set()
    for k, v in (n.meta.get("nn_module_stack") or {}).items():
        for p in ([k] if isinstance(k, str) else []) + ([v[0]] if isinstance(v, tuple) and v and
                                                        isinstance(v[0], str) else []):
            out.add(p[len("model."):] if p.startswith("model.") else p)
    if n.op == "call_module":
        out.add(n.target[len("model."):])
    out = frozenset(out)
    n.meta["_vitdecomp_scope"] = out
    return out


def outer_module(model, nodes, onode, path, member, identity):
    """The shallowest module strictly inside ``member`` (a member of a blocks list traced through) whose forward
    returns ``onode``'s value (through identities inside it), e.g. ``mlp`` for ``mlp.fc2 → mlp.drop2``: the write
    is named by it. ``(path, module)``; ``(path of onode, its module)`` when there is none."""
    if not member or not path.startswith(member + "."):
        return path, model.get_submodule(path)
    parts = path.split(".")
    depth = len(member.split("."))
    for k in range(depth + 1, len(parts)):
        anc = ".".join(parts[:k])

        def inside(n, anc=anc):
            return any(p == anc or p.startswith(anc + ".") for p in _scope(n))

        scope = [n for n in nodes if inside(n)]
        outs = [n for n in scope if any(not inside(u) and not meta_use(u) for u in n.users)]
        if len(outs) != 1:
            continue
        x = outs[0]
        while x is not onode and x.op == "call_module" and identity(model.get_submodule(x.target[len("model."):])) \
                and x.args and isinstance(x.args[0], torch.fx.Node) and inside(x.args[0]):
            x = x.args[0]
        if x is onode:
            return anc, model.get_submodule(anc)
    return path, model.get_submodule(path)


def zero_pad(n, values) -> bool:
    """``F.pad`` whose widths are all zero in the forward at this image size (an identity: DaViT's downsample pads
    to the conv's kernel only when a side is odd). ``values``: a callable giving the recorded sizes."""
    if not (n.op == "call_function" and n.target is F.pad and len(n.args) >= 2):
        return False
    widths = n.args[1]
    if not isinstance(widths, (tuple, list)):
        return False
    if any(isinstance(w, torch.fx.Node) for w in widths):
        vals = values()
        try:
            widths = [vals[w] if isinstance(w, torch.fx.Node) else w for w in widths]
        except KeyError:
            return False
    return all(isinstance(w, int) and w == 0 for w in widths)


def side_paths(key, nodes, block_targets=None):
    """Nodes computed from the stream value ``key`` by its readers whose values reach nothing but modules that
    take them as an argument after their first (``blk(x, side)``, ``attn(x_windows, side)``): a side input of
    those modules (GCViT's global query, computed from the stage's input and read by every block's attention).
    A write is its module's output whatever that module reads, so such a side path is no step on the stream's
    path (the decomposition freezes it like attention weights); a module that takes it and is on the stream's
    path is still met by the walk, which refuses what it cannot follow. Empty when no reader is one."""
    at = {n: i for i, n in enumerate(nodes)}
    out = set()
    for r in sorted((u for u in key.users if not meta_use(u)), key=at.get):
        seen, ok = {r}, True
        for x in nodes[at[r] + 1:]:
            if meta_use(x) or not any(a in seen for a in x.all_input_nodes):
                continue
            if x.op == "output":
                ok = False
                break
            if x.op == "call_module" and x.args and isinstance(x.args[0], torch.fx.Node) and x.args[0] not in seen:
                continue  # the side value enters a module after its first argument: a stop
            seen.add(x)
        if ok:
            out |= seen
    return out
