"""The ``auto`` adapter on staged (hierarchical) timm models: a list of stages (``stages`` or ``layers``), each with
a ``blocks`` list of residual blocks, on an image-shaped stream (``[B, C, H, W]``, ``[B, H, W, C]`` or ``[B, N, C]``
inside a stage) that changes grid between stages.

How the graph is derived: ``forward_head(forward_features(x), pre_logits=True)`` is traced once with torch.fx,
every block (``<stages>.i.blocks.j``), norm, identity and torch.nn layer a leaf and the stages, their transitions
(``downsample`` or the model's own name) and the head traced through, and run once on one image to read every
value's shape. The stream is followed from where the first stage reads it (everything before is the embedding):

* a block is a residual add chain (derived as for plain ViTs: writes named by the model's own module paths,
  ``stages.1.blocks.0.mlp``, heads split where the attention is a standard one, at their query rows: proj's
  input holds them as contiguous channel groups — ``proj(transpose(A·V).reshape)``, a 1×1-conv proj on NCHW
  (Visformer), a window reverse before proj (Twins-SVT); an attention whose output passes through more of its
  branch, EdgeNeXt's XCA feeding the block's MLP, stays inside that one write);
* a block that is no add chain is traced through (an attention module inside it — ``num_heads`` and a ``proj``
  — stays a leaf), and so is a residual block whose write comes out in window order (``[nW, n, C]`` at batch 1:
  GCViT): its residual adds ``stream + branch`` are found on the trace, each branch a write named by the
  outermost module whose output it is (``layers.0.blocks.0.mlp``), also when it reaches the add through *row
  steps* — Swin's pad / roll / window partition, the window reverse, the crop, the roll back
  (:mod:`._autowindow`: the row map is read numerically by replaying those trace nodes on probes, so the
  model's own steps define it): heads at proj's input placed by that row map
  (:class:`~vitdecomp.graph.sources.PartitionHeads`, query rows), a LayerScale after the reverse their γ, a
  norm after the reverse (SwinV2's res-post-norm) their ``post_norm``, else one write (``Graph.branch(...,
  rows=)``); values computed from the stream that only reach modules as a later argument (GCViT's global
  query ``blk(x, q_global)``) are inputs of those writes, not steps on the stream;
* a ``Conv2d`` on the stream starts a new grid stream (:meth:`Graph.conv`: a patch conv, kernel == stride, is an
  ``s×s`` merge; any other conv carries the writes forward through its weights); timm's 2×2 ``PatchMerging``
  (pad odd sides, gather ``(dw, dh)``-major — checked on a probe — then norm → reduction or reduction → norm)
  is :meth:`Graph.merge`;
* a norm (LayerNorm / LayerNorm2d / RMSNorm at the forward's statistics, eval BatchNorm2d) is frozen on the stream;
  a GroupNorm on an NCHW stream is frozen at the forward's per-image, per-group ``1/σ`` — its centring averages
  each group over all positions, which mixes rows, so it is a fixed map into a new stream that carries every
  write forward (each write centred by its own group mean; β the constant ``<path>.bias``; exact, no token
  detail); inside a branch (MetaFormer's norm1 / norm2) it is part of the write;
* a ``Linear`` on the channels of a channels-last stream is a 1×1 conv into a new stream (its bias
  ``<path>.bias``);
* an ``AvgPool2d`` that tiles the map is a patch conv of ``1/s²`` taps; any other average pool (padding,
  overlapping or ragged ceil-mode windows) and a ``MaxPool2d`` — at the forward's own indices, recorded by
  running the same pool with ``return_indices=True`` on its input, so ties resolve as the forward's did — are
  fixed maps into a new stream that carry every write forward (:mod:`._shortcut`; exact, no token detail);
* a residual add whose stream operand is not the stream itself but reached from it through such freezable
  steps (pools, convolutions, linear layers, norms, layout steps), while the branch also reads the stream, is a
  *shortcut path*: the steps are mixers on the stream and the branch a write on the stream they give (CoAtNet's
  strided MBConv / transformer blocks: 2×2 average pool + 1×1 conv; MViTv2's ``shortcut_proj_attn`` +
  ``shortcut_pool_attn`` max pool; NextViT's conv + BatchNorm ``projection``). A block that is no plain add
  chain is traced through (as above; an attention's heads split by proj's columns when proj reads the attention
  product itself, ``reshape(transpose(A·V, 1, 2))`` or CoAtNet's ``view`` of ``[B, H, dh, N]``, read from the
  attention's own trace, :func:`._shortcut.opened_heads`; MViTv2's, which adds its pooled query after the
  product, is one write); sizes it computes (MViTv2's pooled ``feat_size``) may leave a branch;
* ``torch.cat`` of grid streams on one grid along the channels (NextViT: ``cat([x, projection(x) + mhca])``) is
  a new stream whose channel slices the parts are;
* reshapes, permutes, flattens and transposes that only change the layout (NCHW / NHWC / tokens) are followed,
  and so is a padding by zero widths at the image size (DaViT's downsample) and an index that takes every row
  (``x[:, 0:]`` without prefix tokens);
* the mean over all positions (``x.mean((2, 3))``, ``x.mean(1)``, adaptive average pooling to 1×1) is the pool
  that makes z, then norms, flattens and identities on the pooled row.

Tokens a leaf stem returns (``[B, N, C]``, MViTv2's ``patch_embed``) are placed on the grid of the stem's last
convolution. Functions timm marks as not traceable (``register_notrace_function``) stay calls in the trace.

Anything else on the stream's path (an activation, a padding by non-zero widths that is no window partition or
merging, a second reader of the stream not joined by such an add: LeViT's attention downsample) is refused with
an :class:`~vitdecomp.errors.UnsupportedModelError` naming the operation, its module path and source line. Token
detail (``tokens="source"``) lives on each stage's own grid; it is refused through a convolution that is not a
patch convolution and through a recorded map (a max pool, a non-tiling average pool).
"""

from __future__ import annotations

import inspect
import operator
import re

import torch

from .._records import TokenGrid
from ..errors import UnsupportedModelError
from . import Graph, ProjInput
from ._autowindow import meta_use as _meta_use
from ._shortcut import (GroupNormMap, add_map, add_select, freezable_step, leaf_heads, linear_conv, opened_heads,
                        pool_map)

_LAYOUT = ("reshape", "view", "permute", "flatten", "transpose", "contiguous", "unflatten", "squeeze", "unsqueeze")


_LISTS = (torch.nn.Sequential, torch.nn.ModuleList)


def stage_list(model):
    """``[(path of a stage's blocks list, blocks list)]`` of a staged timm model, or None: ``stages`` / ``layers``
    whose every stage has a ``blocks`` list (FocalNet, PVTv2, EdgeNeXt, EfficientFormer), or attributes
    ``stage1``, ``stage2``, ... that are lists of blocks themselves (Visformer)."""
    if not (callable(getattr(model, "forward_head", None)) and callable(getattr(model, "forward_features", None))):
        return None
    for attr in ("stages", "layers"):
        st = getattr(model, attr, None)
        if isinstance(st, _LISTS) and len(st) and all(isinstance(getattr(s, "blocks", None), _LISTS) for s in st) \
                and any(len(s.blocks) for s in st):
            return [(f"{attr}.{i}.blocks", s.blocks) for i, s in enumerate(st)]
    bl = getattr(model, "blocks", None)  # Twins: blocks is a list of per-stage lists
    if isinstance(bl, _LISTS) and len(bl) and all(isinstance(b, _LISTS) for b in bl):
        return [(f"blocks.{i}", b) for i, b in enumerate(bl)]
    out = []
    for i in range(1, 9):
        st = getattr(model, f"stage{i}", None)
        if not isinstance(st, _LISTS):
            break
        out.append((f"stage{i}", st))
    return out if out and any(len(b) for _, b in out) else None


#: children of the model traced as one leaf: the stem before the first stage
_STEM = re.compile(r"^model\.(stem\w*|patch_embed1?|pos_drop)(\.|$)")


def _bn(mod) -> bool:
    return isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)


class _StageTracer(torch.fx.Tracer):
    """Blocks, norms, identities and torch.nn layers are leaves; the stages, their other children and the head
    are traced through; everything else (the stem) is a leaf."""

    def __init__(self, members, residual):
        # functions timm marks as not traceable (MViTv2's relative-position terms) stay calls in the graph
        super().__init__(autowrap_functions=_timm_notrace())
        self.record_stack_traces = True
        self.members = members  # every member of a blocks list
        self.residual = residual  # those that are residual blocks: leaves (decided before tracing: no nested trace)

    def is_leaf_module(self, m, q):
        from ..engine import supported_norm
        from .auto import _identity

        if q[len("model."):] in self.members:  # a residual block; any other member of a blocks list
            return q[len("model."):] in self.residual  # (EfficientFormer's Flat) is traced through
        if _attention_module(m) and any(q[len("model."):].startswith(p + ".") for p in self.members):
            return True  # an attention inside a member traced through: its output is the write (Swin's attn)
        if supported_norm(m) or _identity(m) or _bn(m) or type(m).__name__ in ("LayerScale", "LayerScale2d"):
            return True
        if _STEM.match(q):
            return True
        if type(m).__module__.startswith("torch.nn"):
            return not isinstance(m, (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict))
        return False


def _timm_notrace() -> tuple:
    try:
        from timm.layers._fx import get_notrace_functions
    except Exception:  # noqa: BLE001 - no timm (or an older one): nothing to wrap
        return ()
    return tuple(get_notrace_functions())


def _attention_module(m) -> bool:
    """An attention module with ``num_heads`` and an output projection ``proj`` (a leaf inside a member of a
    blocks list that is traced through: a branch reaching the stream through a window reverse is its output)."""
    return isinstance(getattr(m, "num_heads", None), int) and \
        isinstance(getattr(m, "proj", None), (torch.nn.Linear, torch.nn.Conv2d))


def _residual(m, path) -> bool:
    from .auto import _block_writes

    try:
        return len(_block_writes(m, path + ".", relayout=True)) > 0
    except UnsupportedModelError:  # traced through: the walk follows its steps (and names the first it cannot)
        return False


def _traceable(m) -> bool:
    try:
        _StageTracer(set(), set()).trace(m)
        return True
    except Exception:  # noqa: BLE001 - control flow on values, ...
        return False


def _layout_only(m) -> bool:
    """A module without parameters or children whose forward only changes the layout (a ``Flat``)."""
    if any(True for _ in m.children()) or any(True for _ in m.parameters()):
        return False
    try:
        graph = torch.fx.symbolic_trace(m).graph
    except Exception:  # noqa: BLE001
        return False
    return all(n.op in ("placeholder", "output") or (n.op == "call_method" and n.target in _LAYOUT)
               for n in graph.nodes)


def _derive(model, reopen=frozenset()):
    """(graph module, graph, stages attribute), traced once (cached by the caller). ``reopen``: members traced
    through although they are add chains (their writes are in window order: the walk reads the window reverse)."""
    from .auto import _Readout

    stages = stage_list(model)
    root = _Readout(model)
    members = {f"{p}.{j}": b for p, blocks in stages for j, b in enumerate(blocks)}
    residual = {p for p, b in members.items() if p not in reopen and _residual(b, p)}
    # a member that is no add chain is traced through, unless it cannot be traced: then it stays a leaf, and the
    # walk refuses it with the derivation's reason
    stuck = {p for p, b in members.items() if p not in residual and not _traceable(b)}
    residual |= stuck
    try:
        graph = _StageTracer(set(members), residual).trace(root)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is a refusal naming it
        raise UnsupportedModelError(
            f"auto adapter: forward_features/forward_head of {type(model).__name__} cannot be traced with torch.fx "
            f"through its stages ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); write a model pack "
            f"for it (CONTRIBUTING.md, 'Writing a model pack')") from exc
    opened = {p: b for p, b in members.items() if p not in residual and not _layout_only(b)}
    return torch.fx.GraphModule(root, graph), graph, stages[0][0], residual, opened, stuck


def _shapes(gm, graph, images, watch):
    """Every node's output shape for one image, and the output shapes of the modules in ``watch``."""
    sizes = set()  # nodes whose value is a size (ints, tuples of ints): no data of the stream
    shapes, outs = {"sizes": sizes}, {}

    def is_size(r):
        return isinstance(r, int) or (isinstance(r, (tuple, list)) and all(is_size(v) for v in r))

    class _Run(torch.fx.Interpreter):
        def run_node(self, n):
            r = super().run_node(n)
            if isinstance(r, torch.Tensor):
                shapes[n] = tuple(r.shape)
            elif is_size(r):
                sizes.add(n)
            return r

    hooks = [m.register_forward_hook(lambda mod, a, o, p=p: outs.__setitem__(
        p, tuple((o[0] if isinstance(o, tuple) else o).shape))) for p, m in watch.items()]
    try:
        with torch.no_grad():
            _Run(gm).run(images[:1])
    except Exception as exc:  # noqa: BLE001 - the model's own forward rejects this input (e.g. its image size)
        from ..errors import InputError

        raise InputError(f"{type(gm.model).__name__}'s forward fails on images of size "
                         f"{images.shape[-2]}×{images.shape[-1]} ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}); use the image size the model was built for") from exc
    finally:
        for h in hooks:
            h.remove()
    return shapes, outs


class _Grid:
    """A grid stream's shape: channels C on an h × w grid; ``layout`` of a value names its axes."""

    def __init__(self, stream, C, h, w):
        self.stream, self.C, self.h, self.w = stream, C, h, w

    def layout(self, shape, prefer=None):
        """The layout ``shape`` is of this stream (ambiguous when C equals a side: ``prefer``, the layout of the
        value it is computed from, wins), or None."""
        B = shape[0]
        C, h, w = self.C, self.h, self.w
        cands = {"nchw": (B, C, h, w), "nhwc": (B, h, w, C), "nlc": (B, h * w, C), "ncl": (B, C, h * w)}
        hit = [k for k, v in cands.items() if tuple(shape) == v]
        return hit[0] if len(hit) == 1 else prefer if prefer in hit else None


def describe_staged(adapter, model, images, tokens, reopen=frozenset()):
    """The contribution graph of a staged timm model (module docstring). ``reopen``: residual blocks to trace
    through instead (set on a second pass when a write of theirs is in window order)."""
    from .auto import _block_writes, _cached, _identity, _proj_of_heads, _split_heads, _where
    from ..engine import supported_norm
    from ._autowindow import (is_row_step, layer_scale, outer_module, patch_merge, post_norm_heads, record_values,
                              side_paths, window_branch, zero_pad)

    gm, graph, first_list, residual, opened, stuck = _cached(model, ("staged", reopen) if reopen else "staged",
                                                             lambda: _derive(model, reopen))
    # the first stage: the module holding the first blocks list (FocalNet's layers.0), or the list itself
    stage0 = "model." + (first_list[:-len(".blocks")] if first_list.endswith(".blocks") else first_list)
    nodes = list(graph.nodes)

    def in_stage0(n):
        stack = n.meta.get("nn_module_stack") or {}
        paths = [k if isinstance(k, str) else str(k) for k in stack]
        if n.op == "call_module":
            paths.append(n.target)
        return any(p == stage0 or p.startswith(stage0 + ".") for p in paths)

    # the first node of the first stage that reads a value from before it (not a parameter, not a shape)
    first = next((n for n in nodes if in_stage0(n) and not _meta_use(n) and any(
        not in_stage0(a) and a.op != "get_attr" for a in n.all_input_nodes)), None)
    if first is None:
        raise UnsupportedModelError(f"auto adapter: the trace of {type(model).__name__} never enters "
                                    f"{stage0[len('model.'):]}")
    start = next((a for a in first.all_input_nodes if not in_stage0(a)), None)
    blocks = {n.target: model.get_submodule(n.target[len("model."):]) for n in nodes
              if n.op == "call_module" and n.target[len("model."):] in residual}
    blocks = {t: b for t, b in blocks.items() if t[len("model."):] not in stuck}
    writes = {t[len("model."):]: _block_writes(b, t[len("model."):] + ".", relayout=True) for t, b in blocks.items()}
    watch = {f"{p}.{w}": m for p, lst in writes.items() for w, m, _ in lst}
    stem_convs = _stem_convs(model, nodes)  # a leaf stem's convolutions: the grid of tokens it returns
    watch.update(stem_convs)
    shapes, outs = _cached(model, ("shapes", tuple(images.shape[-2:]), reopen),
                           lambda: _shapes(gm, graph, images, watch))
    # a block whose write is a tensor of more than one row group at batch 1 (windows: [nW, n, C]) writes in window
    # order: traced through instead, where the walk reads the steps after that module (its window reverse)
    windowed = frozenset(p for p, lst in writes.items() for w, _, _ in lst
                         if (outs.get(f"{p}.{w}") or (1,))[0] != 1) if not reopen else frozenset()
    if windowed:  # (traceable ones: checked once)
        windowed = _cached(model, ("windowed", windowed), lambda: frozenset(
            p for p in windowed if _traceable(model.get_submodule(p))))
    if windowed and not reopen:
        return describe_staged(adapter, model, images, tokens, reopen=windowed)
    H, W = images.shape[-2:]

    memo = {}

    def values():  # the forward's sizes at every node, for replaying row steps (one forward, when first needed)
        if "values" not in memo:
            memo["values"] = _cached(model, ("values", tuple(images.shape[-2:]), reopen),
                                     lambda: record_values(gm, images))
        return memo["values"]

    # row maps, merges, side paths and write names found on this trace: kept per structure and image size
    wmemo = _cached(model, ("window-memo", tuple(images.shape[-2:]), reopen), dict)

    def memoized(key, make):
        if key not in wmemo:
            wmemo[key] = make()
        return wmemo[key]

    def oracle_writes():  # constants the attribution oracle cannot locate by name (a post-norm's β)
        if "oracle" not in memo:
            memo["oracle"] = _cached(model, "oracle-writes", dict)
        return memo["oracle"]

    def refuse(n, why=""):
        raise UnsupportedModelError(f"auto adapter: on the residual stream of {type(model).__name__}, "
                                    f"{_where(n, '').replace('module model.', 'module ', 1)} "
                                    f"{why or 'is not a step the auto adapter can freeze'}")

    arch = getattr(model, "default_cfg", {}).get("architecture", type(model).__name__) \
        if isinstance(getattr(model, "default_cfg", None), dict) else type(model).__name__
    g = None
    streams = []

    def new_stream(C, h, w, si):
        ph, pw = H // h, W // w
        s = g.stream(f"stage {si}", h * w, grid=TokenGrid(0, h, w, (ph, pw)))
        gs = _Grid(s, C, h, w)
        streams.append(gs)
        return gs

    # the embedding's shape: [B, C, h, w] (NCHW) or [B, h, w, C] (NHWC), or tokens [B, N, C] placed on the grid of
    # the convolution that made them
    shp = shapes.get(start)
    start_tokens = False
    if shp is not None and len(shp) == 3:  # tokens [B, N, C]: the grid of the last convolution before it (Twins)
        conv = next((n for n in reversed(nodes[:nodes.index(start)]) if n.op == "call_module"
                     and isinstance(model.get_submodule(n.target[6:]), torch.nn.Conv2d)), None)
        cs = shapes.get(conv)
        if cs is None or not (cs[1] == shp[2] and cs[2] * cs[3] == shp[1]):  # inside a leaf stem (MViTv2)
            cs = next((outs[p] for p in list(stem_convs)[::-1] if outs.get(p) is not None and len(outs[p]) == 4
                       and outs[p][1] == shp[2] and outs[p][2] * outs[p][3] == shp[1]), None)
        if cs is not None and cs[1] == shp[2] and cs[2] * cs[3] == shp[1]:
            shp = (shp[0], cs[2], cs[3], shp[2])  # as NHWC: the same memory order as [B, N, C]
            start_tokens = True
    if shp is None or len(shp) != 4:
        raise UnsupportedModelError(f"auto adapter: {stage0[6:]} of {type(model).__name__} reads {shp}; the staged "
                                    f"derivation needs an image-shaped map [B, C, H, W] or [B, H, W, C] there (or "
                                    f"tokens [B, N, C] of the convolution before it)")
    # NCHW or NHWC: decided by the channel count the first module reading it expects
    g = Graph(adapter.name, run=lambda im: adapter.representation(model, im), grid=None,
              meta={"adapter": adapter.name, "model": arch, "derived": "torch.fx (stages)", "head_tokens": "query"})
    val = {}
    cands = [("nchw", shp[1], shp[2], shp[3]), ("nhwc", shp[3], shp[1], shp[2])]
    # a grid whose cells tile the image with one patch size (SwinV2's 16×16×96 map of a 64×64 image is NHWC)
    tiles = [c for c in cands if H % c[2] == 0 and W % c[3] == 0 and H // c[2] == W // c[3]]
    if len(tiles) == 1 and tiles != cands:
        cands = tiles
    elif len(cands) == 2 and \
            str(getattr(model, "output_fmt", "") or "").upper().endswith("NHWC"):
        cands = cands[1:]  # C equals a side (16 channels on a 16×16 grid): the model's declared NHWC format (Swin)
    lay0 = "nhwc" if start_tokens else cands[0][0] if len(cands) == 1 else \
        _start_layout(model, nodes, start, shapes, cands)
    _, C0, h0, w0 = next(c for c in cands if c[0] == lay0)
    g0 = new_stream(C0, h0, w0, 0)
    g.grid = g0.stream.grid
    val[start] = ("s", g0, "nlc" if start_tokens else lay0)
    skip = set()  # nodes inside a residual branch outside the blocks (a position-encoding conv): not followed
    sided = set()  # stream values whose side readers were looked for
    embedded = False
    nb = 0
    z = None
    residual_adds = {}
    cur = [None, None]  # (opened member, its block context)

    def rel(path):  # a write's name inside an opened member's block context
        if cur[1] is None:
            return path
        if not path.startswith(cur[0] + "."):
            refuse(n, f"writes {path} inside {cur[0]}, from outside it")
        return path[len(cur[0]) + 1:]
    for n in nodes:
        if n is start:
            continue
        followed = [a for a in n.all_input_nodes if a in val]
        if not followed:
            continue
        if n.op == "output":
            v = val[followed[0]]
            if v[0] != "p":
                refuse(n, "returns the stream itself, not one pooled row")
            z = v[1]
            break
        if n.op == "call_function" and n.target is getattr and n.args[1] in ("shape", "dtype", "device"):
            continue
        if n.op == "call_method" and n.target in ("size", "dim"):
            continue
        if n in skip:
            continue
        v = val[followed[0]]
        key = followed[0]
        mem = _member(n, opened)
        if mem != cur[0]:  # entering / leaving a member of a blocks list that is traced through (not an add chain)
            if cur[1] is not None:
                cur[1].__exit__(None, None, None)
            cur[:] = [mem, None]
            if mem is not None and v[0] == "s":
                if not embedded:
                    g.embed(v[1].stream, opened[mem], nchw=v[2] == "nchw")
                    embedded = True
                cur[1] = g.block(nb, mem, v[1].stream, entry=opened[mem], stage=len(streams) - 1,
                                 nchw=v[2] == "nchw")
                cur[1].__enter__()
                nb += 1
        if v[0] == "s" and len(_readers(key)) > 1 and n not in residual_adds and key not in sided:
            # readers whose values only feed residual blocks as extra arguments (GCViT's global query): inputs
            # of those blocks' branches, not the stream's path
            sided.add(key)
            skip |= memoized(("side", key), lambda: side_paths(key, nodes))
            if n in skip:
                continue
        readers = [u for u in _readers(key) if u not in skip]
        if v[0] == "s" and len(readers) > 1 and n not in residual_adds:
            found = memoized(("radd", key), lambda: _residual_add(key, nodes, model, shapes.get("sizes", ())))
            inner = _common_module(readers) if found is None else None
            if inner is not None and inner != cur[0]:  # one module reads the stream several times (LeViT)
                refuse(n, f"is one of {len(readers)} reads of the stream inside module {inner}, which "
                          f"returns a new stream without adding a branch back to it (an attention without a "
                          f"shortcut, e.g. an attention downsample): a step that is not linear on the stream")
            if found is None:
                refuse(n, "is a second reader of the stream, not a branch added back to it (only residual adds "
                          "'stream + module(stream)' are supported outside the blocks, the stream operand through "
                          "layout steps or freezable linear ones: pools, convolutions, linear layers, norms); the "
                          "stream's readers here are not joined by such an add, so the stream passes through a step "
                          "that is not linear on it")
            add, branch, inside = found
            residual_adds[add] = (branch, key)
            skip |= inside
            if n in skip:
                continue
        if n in residual_adds:  # stream + module output computed from it: a write
            bnode, src = residual_adds.pop(n)
            gs = v[1]
            bpath, bmod, onode = _branch_module(model, bnode)
            if bmod is not None:  # named by the outermost module returning it (``mlp``, not ``mlp.fc2``)
                bpath, bmod = memoized(("outer", onode, cur[0]),
                                       lambda: outer_module(model, nodes, onode, bpath, cur[0], _identity))
            bl = None if bmod is None else gs.layout(shapes[onode], v[2])
            scaled = bmod is not None and layer_scale(bmod) is not None  # a LayerScale after a window reverse?
            if bl not in ("nchw", "nhwc", "nlc") or scaled:  # through row steps (a window reverse, a roll, a crop)?
                if not embedded:
                    refuse(n, "adds a branch to the stream before the first module reads it")
                why = window_branch(g, gs, v[2], bnode, model, values(), shapes, rel, memo=wmemo,
                                    outer=lambda p, m, o: memoized(("outer", o, cur[0]), lambda: outer_module(
                                        model, nodes, o, p, cur[0], _identity)))
                if why is None:
                    lay = gs.layout(shapes[n], v[2])
                    if lay is None:
                        refuse(n, f"gives {shapes[n]}, not a layout of the stream")
                    val[n] = ("s", gs, lay)
                    continue
            if bl not in ("nchw", "nhwc", "nlc"):
                if bmod is None:
                    refuse(n, f"adds {_where(bnode, '').replace('module model.', 'module ', 1)} to the stream, "
                              f"which is not a module output ({why})")
                refuse(n, f"adds the output of {bpath} (shape {shapes[onode]}, not a map of the stream in grid "
                          f"order) to the stream ({why})")
            if not embedded:
                refuse(n, "adds a branch to the stream before the first module reads it")
            if post_norm_heads(g, gs, bpath, bmod, onode, model, values, shapes, rel, oracle_writes(), memo=wmemo,
                               lay=v[2]):
                lay = gs.layout(shapes[n], v[2])
                if lay is None:
                    refuse(n, f"gives {shapes[n]}, not a layout of the stream")
                val[n] = ("s", gs, lay)
                continue
            hd = opened_heads(model, onode, bpath, shapes)  # an attention traced through: heads by proj's columns
            if hd is not None:
                apath, proj, nh = hd
                src = (_ConvQueryHeads if bl == "nchw" else _QueryHeads)(proj, nh)
                g.heads(gs.stream, src, proj.weight.flatten(1), proj.bias, name=rel(apath))
            else:
                # copied when captured: fx traces ``x += s`` as an add, and the forward may add into the output in
                # place
                g.branch(gs.stream, bmod, name=rel(bpath),
                         kind="attn" if "attn" in bpath.rsplit(".", 1)[-1] else "mlp", nchw=bl == "nchw", copy=True)
            lay = gs.layout(shapes[n], bl)
            if lay is None:
                refuse(n, f"gives {shapes[n]}, not a layout of the stream")
            val[n] = ("s", gs, lay)
            continue
        if n.op == "call_function" and n.target is torch.cat and len(followed) > 1:  # channels side by side
            val[n] = _channel_cat(n, val, g, new_stream, streams, refuse)
            continue
        if len(followed) > 1:
            refuse(n, "combines two values of the stream")
        if v[0] == "s" and zero_pad(n, values):  # F.pad by zero widths at this size (DaViT's downsample)
            val[n] = v
            continue
        if v[0] == "s" and is_row_step(n) and (n.target is torch.nn.functional.pad
                                               or _relayout(n, v[2], v[1], shapes.get(n)) is None):
            merged = memoized(("merge", key, v[2]), lambda: patch_merge(key, v[1], v[2], nodes, shapes, values(),
                                                                        model, supported_norm))
            if isinstance(merged, str):
                refuse(n, merged)
            if merged is not None:  # a 2×2 patch merging (timm's PatchMerging): a new grid stream
                norm, red, first, last, oshape, _ = merged
                si = len(streams)
                ns = new_stream(red.out_features, oshape[1], oshape[2], si)
                npath = next(p for p, m in model.named_modules() if m is norm)
                g.merge(v[1].stream, ns.stream, norm=norm, reduction=red, norm_first=first, name=f"{npath}.bias",
                        stage=si)
                val[last] = ("s", ns, "nhwc")
                continue
            if n.target is torch.nn.functional.pad:
                refuse(n, "pads the stream with zeros at this image size, and the padded map is no window partition "
                          "of a branch or 2×2 patch merging (supported: zero widths; a padded convolution needs the "
                          "padding folded into Graph.conv)")
        if n.op in ("call_method", "call_function") and _name(n) in _LAYOUT:
            shp = shapes.get(n)
            if v[0] == "p":
                val[n] = v
                continue
            lay = _relayout(n, v[2], v[1], shp)
            if lay is None:
                refuse(n, f"reshapes the {v[1].C}×{v[1].h}×{v[1].w} stream ({v[2]}) to {shp}, not one of its layouts "
                          "(a reshape that mixes positions and channels, or an unknown permutation)")
            val[n] = ("s", v[1], lay)
            continue
        if n.op == "call_module":
            path = n.target[len("model."):]
            mod = model.get_submodule(path)
            arg = next(i for i, a in enumerate(n.args) if a is key) if key in n.args else None
            if arg is None:
                refuse(n, "reads the stream by keyword")
            if _identity(mod):
                val[n] = v
                continue
            if v[0] == "p":  # the pooled row: norms, flattens
                if supported_norm(mod):
                    g.norm(v[1], mod, name=path, nchw=len(shapes.get(key, ())) == 4)
                    val[n] = v
                    continue
                if isinstance(mod, torch.nn.Flatten):
                    val[n] = v
                    continue
                refuse(n, f"({type(mod).__name__}) is not a norm, flatten or identity on the pooled row")
            gs, lay = v[1], v[2]
            if not embedded:
                g.embed(gs.stream, mod, entry_arg=arg, nchw=lay == "nchw")
                embedded = True
            if path in stuck:  # raises the derivation's reason (no add chain, and not traceable through)
                _block_writes(mod, path + ".", relayout=True)
                refuse(n, "is a block the auto adapter can neither derive nor trace through")
            if path in writes:  # a residual block
                si = len(streams) - 1
                if lay == "ncl":
                    refuse(n, "reads the stream as [B, C, N]")
                with g.block(nb, path, gs.stream, entry=mod, entry_arg=arg, stage=si, nchw=lay == "nchw"):
                    for sub, wm, gamma in writes[path]:
                        oshape = outs.get(f"{path}.{sub}")
                        wl = None if oshape is None else gs.layout(oshape, lay)
                        w_nchw = wl == "nchw"
                        if wl not in ("nchw", "nhwc", "nlc"):
                            refuse(n, f"writes {path}.{sub} of shape {oshape}, not a map of the stream")
                        # heads at the rows they write (their token detail: query rows of the stage's grid)
                        proj = _proj_of_conv_heads(wm) if w_nchw else \
                            wm.proj if _split_heads(wm) else \
                            _proj_of_heads(wm, loose=True) or _proj_of_grouped_heads(wm, gs.h, gs.w)
                        if proj is None and oshape is not None and leaf_heads(wm, oshape):  # read on its own
                            proj = wm.proj  # trace at its output's shape (CoAtNet's Attention2d keeps it)
                        if proj is not None:
                            src = (_ConvQueryHeads if w_nchw else _QueryHeads)(proj, wm.num_heads)
                            g.heads(gs.stream, src, proj.weight.flatten(1), proj.bias, gamma=gamma, name=sub)
                        else:
                            g.branch(gs.stream, wm, name=sub, kind="attn" if "attn" in sub else "mlp", gamma=gamma,
                                     nchw=w_nchw)
                nb += 1
                shp = shapes.get(n)
                lay2 = gs.layout(shp, lay) if shp is not None else None
                if lay2 is None:
                    refuse(n, f"returns {shp}, not a layout of the stream it reads")
                val[n] = ("s", gs, lay2)
                continue
            if isinstance(mod, torch.nn.Conv2d):
                if lay != "nchw":
                    refuse(n, "is a convolution reading the stream in a layout other than [B, C, H, W]")
                shp = shapes[n]
                si = len(streams)
                ns = new_stream(shp[1], shp[2], shp[3], si)
                g.conv(gs.stream, ns.stream, mod, name=f"{path}.bias", stage=si)
                val[n] = ("s", ns, "nchw")
                continue
            # eval BatchNorm is a fixed affine map only with running statistics (without them it normalises by
            # the batch's, which is refused below like any other step it cannot follow)
            if supported_norm(mod) or (_bn(mod) and not mod.training and isinstance(mod, torch.nn.BatchNorm2d)
                                       and mod.running_var is not None):
                if _bn(mod) and lay != "nchw":
                    refuse(n, "is a BatchNorm2d reading the stream in a layout other than [B, C, H, W]")
                two_d = type(mod).__name__.startswith("LayerNorm2d")  # LayerNorm2d, LayerNorm2dNoBias (MetaFormer)
                if two_d and lay != "nchw" or (isinstance(mod, torch.nn.LayerNorm) and not two_d and lay == "nchw"):
                    refuse(n, f"normalises an axis other than the channels ({type(mod).__name__} on {lay})")
                g.norm(gs.stream, mod, name=path, nchw=lay == "nchw")
                val[n] = v
                continue
            if isinstance(mod, torch.nn.AvgPool2d) and lay == "nchw" and _patch_pool(mod, shapes[key]):
                # a patch pool: a patch conv of 1/s² taps
                conv = _pool_conv(mod, gs.C, shapes[key], n, refuse).to(images.device, images.dtype)
                shp = shapes[n]
                ns = new_stream(shp[1], shp[2], shp[3], len(streams))
                g.conv(gs.stream, ns.stream, conv, name=path, stage=len(streams) - 1)
                val[n] = ("s", ns, "nchw")
                continue
            if isinstance(mod, (torch.nn.AvgPool2d, torch.nn.MaxPool2d)) and lay == "nchw":
                # any other average pool, a max pool at the forward's indices: a fixed map carried forward
                shp = shapes[n]
                if isinstance(mod, torch.nn.MaxPool2d) and mod.return_indices:
                    refuse(n, "is a max pool returning its indices (the stream would be a tuple)")
                ns = new_stream(shp[1], shp[2], shp[3], len(streams))
                add_map(g, gs.stream, ns.stream, pool_map(mod, (gs.h, gs.w)), channels=shp[1], name=path,
                        stage=len(streams) - 1)
                val[n] = ("s", ns, "nchw")
                continue
            if isinstance(mod, torch.nn.Linear) and lay in ("nlc", "nhwc"):  # a linear layer on the channels:
                ns = new_stream(mod.out_features, gs.h, gs.w, len(streams))  # a 1×1 conv into a new stream
                g.conv(gs.stream, ns.stream, linear_conv(mod), name=f"{path}.bias", stage=len(streams) - 1)
                val[n] = ("s", ns, lay)
                continue
            if isinstance(mod, (torch.nn.AdaptiveAvgPool2d,)) and lay == "nchw" and _pair1(mod.output_size):
                val[n] = ("p", g.pool(gs.stream, range(gs.stream.rows), [1.0 / gs.stream.rows] * gs.stream.rows))
                continue
            if type(mod).__name__ == "SelectAdaptivePool2d":
                refuse(n, "is a pooling module the trace did not open")
            if isinstance(mod, torch.nn.GroupNorm):
                # frozen at the forward's per-image, per-group statistics: linear, but its centring averages each
                # group over all positions (it mixes rows), so it is a fixed map carried forward; β a constant
                if lay != "nchw" or len(shapes[key]) != 4:
                    refuse(n, f"is a GroupNorm reading the stream in a layout other than [B, C, H, W] ({lay})")
                ns = new_stream(gs.C, gs.h, gs.w, len(streams))
                add_map(g, gs.stream, ns.stream, GroupNormMap(mod), channels=gs.C, name=path,
                        stage=len(streams) - 1)
                if mod.bias is not None:
                    beta = mod.bias.detach().reshape(1, 1, -1).expand(1, gs.h * gs.w, gs.C)
                    g.param(ns.stream, beta, name=f"{path}.bias", kind="const")
                val[n] = ("s", ns, "nchw")
                continue
            refuse(n, f"({type(mod).__name__}) is not a block, convolution, linear layer, norm or average / max pool")
        if n.op == "call_function" and n.target is operator.getitem and v[0] == "s" and _whole(n.args[1], shapes[key]):
            val[n] = v  # x[:, 0:] with no prefix tokens (MViTv2's head): every row, a no-op
            continue
        if (n.op == "call_method" and n.target == "mean") or (n.op == "call_function" and n.target is torch.mean):
            if v[0] != "s":
                refuse(n, "averages a pooled row")
            gs, lay = v[1], v[2]
            dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
            dims = tuple(sorted(d % 4 if lay in ("nchw", "nhwc") else d % 3
                                for d in (dim if isinstance(dim, (tuple, list)) else (dim,))))
            want = {"nchw": (2, 3), "nhwc": (1, 2), "nlc": (1,), "ncl": (2,)}[lay]
            if dims != want:
                refuse(n, f"averages dims {dim!r} of the {lay} stream (supported: the mean over all positions)")
            val[n] = ("p", g.pool(gs.stream, range(gs.stream.rows), [1.0 / gs.stream.rows] * gs.stream.rows))
            continue
        if n.op == "call_function" and n.target in (operator.add, operator.iadd, torch.add) and v[0] == "s" \
                and len(n.args) == 2 and not n.kwargs and any(getattr(a, "op", None) == "get_attr" for a in n.args):
            p = next(a for a in n.args if getattr(a, "op", None) == "get_attr")
            gs, lay = v[1], v[2]
            pname = p.target[len("model."):]
            param = model.get_parameter(pname) if pname in dict(model.named_parameters()) else None
            if param is None or param.dim() != len(shapes[key]) or param.shape[0] != 1:
                refuse(n, "adds a tensor that is not a parameter of the stream's shape")
            value = param.flatten(2).transpose(1, 2) if lay == "nchw" else param.reshape(1, -1, param.shape[-1])
            if lay not in ("nchw", "nhwc", "nlc") or tuple(value.shape[1:]) != (gs.stream.rows, gs.C):
                refuse(n, f"adds {pname} of shape {tuple(param.shape)} to the {lay} stream")
            g.param(gs.stream, value, name=rel(pname))
            val[n] = v
            continue
        refuse(n)
    if cur[1] is not None:
        cur[1].__exit__(None, None, None)
    if z is None:
        raise UnsupportedModelError(f"auto adapter: z of {type(model).__name__} is not one pooled row of the stream")
    if nb == 0:
        raise UnsupportedModelError(f"auto adapter: the stream of {type(model).__name__} passes through no block")
    g.output(z)
    mapped = next((op for op in g.ops if op.kind == "merge" and op.extra.get("map") is not None), None)
    if tokens and mapped is not None:
        raise UnsupportedModelError(f"auto adapter: token detail (tokens='source') through {mapped.name} of "
                                    f"{type(model).__name__} ({type(mapped.extra['map'].module).__name__}, carried "
                                    "forward as a fixed map) is not supported; decompose without token detail")
    if tokens and any(op.kind == "merge" and op.extra.get("conv") is not None and not op.extra["patch"]
                      for op in g.ops):
        bad = next(op.name[:-len(".bias")] for op in g.ops if op.kind == "merge" and op.extra.get("conv") is not None
                   and not op.extra["patch"])
        raise UnsupportedModelError(f"auto adapter: token detail (tokens='source') through {bad} of "
                                    f"{type(model).__name__} (an overlapping or padded convolution) is not supported; "
                                    "decompose without token detail")
    return g


_AXES = {"nchw": "bchw", "nhwc": "bhwc", "nlc": "blc", "ncl": "bcl"}
_FAMILY = {"nchw": ("nchw", "ncl"), "ncl": ("nchw", "ncl"), "nhwc": ("nhwc", "nlc"), "nlc": ("nhwc", "nlc")}


def _relayout(n, lay, gs, shp):
    """The layout after a layout step ``n`` on a value of layout ``lay``, or None: a reshape keeps the memory
    order (NCHW ↔ [B, C, N], NHWC ↔ [B, N, C]); a permute / transpose moves the axes."""
    if shp is None:
        return None
    name = _name(n)
    if name == "contiguous":
        return lay if gs.layout(shp, lay) == lay else None
    if name in ("permute", "transpose"):
        axes = _AXES[lay]
        args = [a for a in n.args[1:]] or list(n.kwargs.values())
        if name == "permute":
            dims = list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else list(args)
        else:
            a, b = (d % len(axes) for d in args[:2])
            dims = list(range(len(axes)))
            dims[a], dims[b] = dims[b], dims[a]
        if not all(isinstance(d, int) for d in dims) or sorted(d % len(axes) for d in dims) != list(range(len(axes))):
            return None
        new = "".join(axes[d % len(axes)] for d in dims)
        out = next((k for k, v in _AXES.items() if v == new), None)
        return out if out is not None and gs.layout(shp, out) == out else None
    out = [k for k in _FAMILY[lay] if gs.layout(shp, k) == k]
    return out[0] if out else None


class _QueryHeads(ProjInput):
    """Head outputs at the input of ``proj`` (rows: the stream's positions in grid order), placed at the rows they
    write; no split by the position each head reads."""

    detail = "query"

    def install(self, hooks, rec, rows, tokens, reduce):
        super().install(hooks, rec, rows, False, reduce)


class _ConvQueryHeads(ProjInput):
    """As :class:`_QueryHeads` for a 1×1-conv output projection on ``[B, H·dh, h, w]`` (Visformer): heads are
    contiguous channel groups of proj's input, positions its flattened grid."""

    detail = "query"

    def install(self, hooks, rec, rows, tokens, reduce):
        H = self.num_heads

        def on_proj_in(x):
            B = x.shape[0]
            o = x.flatten(2).transpose(1, 2).index_select(1, rows)
            o = o.reshape(B, -1, H, o.shape[-1] // H).permute(0, 2, 1, 3)
            rec.o = reduce(o) if reduce is not None else o

        hooks.pre(self.proj, on_proj_in)


def _proj_of_conv_heads(mod):
    """The 1×1-conv output projection of an attention on ``[B, C, h, w]`` whose output is ``proj(o)`` (through
    identities) with ``o = permute(attn_out, 0, 1, 3, 2).reshape(B, H·dh, h, w)`` and ``attn_out`` ``[B, H, N, dh]``
    from ``scaled_dot_product_attention`` or a ``matmul`` (timm's Visformer ``Attention``): heads are contiguous
    channel groups of proj's input, so the conv's columns split them. None if the trace does not show exactly
    that (the module is then one block-level write)."""
    from .auto import _proj_after

    H, proj = getattr(mod, "num_heads", None), getattr(mod, "proj", None)
    if not isinstance(H, int) or not isinstance(proj, torch.nn.Conv2d) or proj.groups != 1 or \
            tuple(proj.kernel_size) != (1, 1) or tuple(proj.stride) != (1, 1) or _pair(proj.padding) != (0, 0) or \
            proj.in_channels % H:
        return None
    return _proj_after(mod, ("permute", (0, 1, 3, 2)), False, "conv-heads", reshape_dims=4)


def _proj_of_grouped_heads(mod, h, w):
    """The Linear output projection of an attention on ``[B, N, C]`` with a required ``size`` argument (Twins'
    locally-grouped attention: windows, attention per window, the window reverse, then ``proj``), traced at the
    stage's grid ``(h, w)`` and its shapes propagated on one zero input: from proj's input back to the attention
    product every step must keep proj's channel axis last and whole (reshape / view, transpose / permute,
    contiguous, a crop), down to the reshape that merges ``[.., H, dh]`` and the transpose / permute that brings
    the head and value axes of the product ``[.., H, n, dh]`` last. Then heads are contiguous channel groups of
    proj's input, and proj, applied row by row, writes each row where the block adds it: the rows need no map.
    None if the trace does not show exactly that."""
    from torch.fx.passes.shape_prop import ShapeProp

    from .auto import _LeafTracer, _cached, _identity

    H, proj = getattr(mod, "num_heads", None), getattr(mod, "proj", None)
    if not isinstance(H, int) or not isinstance(proj, torch.nn.Linear) or proj.in_features % H:
        return None
    params = list(inspect.signature(mod.forward).parameters.values())[1:]
    required = [p.name for p in params if p.default is inspect.Parameter.empty]
    if len(required) != 1:
        return None
    C = proj.in_features
    attn_fns = (torch.nn.functional.scaled_dot_product_attention, operator.matmul, torch.matmul)

    def derive():
        try:
            graph = _LeafTracer().trace(mod, concrete_args={required[0]: (int(h), int(w))})
            gm = torch.fx.GraphModule(mod, graph)
            x = torch.zeros(1, int(h) * int(w), C, dtype=proj.weight.dtype, device=proj.weight.device)
            with torch.no_grad():
                extra = [n for n in gm.graph.nodes if n.op == "placeholder"][1:]  # the size, pytree-flattened
                ShapeProp(gm).propagate(x, *((int(h), int(w)) if len(extra) == 2 else ((int(h), int(w)),) * len(extra)))
        except Exception:  # noqa: BLE001 - not traceable at this size: no head split
            return None

        def shape(n):
            tm = n.meta.get("tensor_meta") if isinstance(n, torch.fx.Node) else None
            return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None

        def peel(n):
            while isinstance(n, torch.fx.Node) and n.op == "call_module" and _identity(mod.get_submodule(n.target)):
                n = n.args[0]
            return n

        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        node = peel(out[0] if isinstance(out, (list, tuple)) and len(out) == 1 else out)
        if not (isinstance(node, torch.fx.Node) and node.op == "call_module" and node.target == "proj"):
            return None
        node = peel(node.args[0])
        if shape(node) != (1, int(h) * int(w), C):  # rows of proj's input are the stream's rows, [B, N, C]
            return None
        for _ in range(64):
            so = shape(node)
            crop = isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is operator.getitem
            if not isinstance(node, torch.fx.Node) or not (node.op == "call_method" or crop) or so is None or \
                    so[-1] != C:
                return None
            src = node.args[0]
            si = shape(src)
            if si is None:
                return None
            if crop:  # x[:, :H, :W, :]: slices only, the channel axis whole
                idx = node.args[1]
                if not (isinstance(idx, tuple) and len(idx) == len(si) and all(isinstance(i, slice) for i in idx)
                        and idx[-1] == slice(None) and si[-1] == C):
                    return None
            elif node.target == "contiguous":
                pass
            elif node.target in ("reshape", "view"):
                if si[-1] != C:  # the merge of [.., H, dh] from the product, brought last by a transpose / permute
                    if si[-2:] != (H, C // H) or not isinstance(src, torch.fx.Node) or src.op != "call_method" or \
                            src.target not in ("transpose", "permute"):
                        return None
                    a = src.args[0]
                    if not (isinstance(a, torch.fx.Node) and ((a.op == "call_function" and a.target in attn_fns)
                                                              or (a.op == "call_method" and a.target == "matmul"))):
                        return None
                    sa, nd = shape(a), len(si)
                    if sa is None or len(sa) != nd or sa[-3] != H or sa[-1] != C // H:
                        return None
                    if src.target == "transpose":
                        dims = list(range(nd))
                        i, j = (d % nd for d in src.args[1:3])
                        dims[i], dims[j] = dims[j], dims[i]
                    else:
                        dims = [d % nd for d in (src.args[1] if len(src.args) == 2 else src.args[1:])]
                    return proj if dims[-2:] == [nd - 3, nd - 1] else None
            elif node.target in ("transpose", "permute"):
                nd = len(si)
                if node.target == "transpose":
                    if nd - 1 in [d % nd for d in node.args[1:3]]:
                        return None
                else:
                    dims = node.args[1] if len(node.args) == 2 else node.args[1:]
                    if dims[-1] % nd != nd - 1:
                        return None
            else:
                return None
            node = src
        return None

    return _cached(mod, ("grouped-heads", int(h), int(w)), derive)


def _pool_conv(mod, C, shape, n, refuse):
    """``AvgPool2d`` with kernel == stride and no padding as a bias-free patch conv (tap weights 1/(kh·kw))."""
    k = _pair(mod.kernel_size)
    st = _pair(mod.stride if mod.stride is not None else mod.kernel_size)
    ragged = shape[2] % k[0] or shape[3] % k[1]  # ceil mode changes nothing when the pool tiles the map
    if k != st or _pair(mod.padding) != (0, 0) or (getattr(mod, "ceil_mode", False) and ragged) or \
            getattr(mod, "divisor_override", None) is not None:
        refuse(n, f"is an average pool with kernel {k}, stride {st}, padding {mod.padding} (supported: kernel == "
                  "stride, no padding, no ceil mode)")
    conv = torch.nn.Conv2d(C, C, k, stride=k, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[torch.arange(C), torch.arange(C)] = 1.0 / (k[0] * k[1])
    conv.requires_grad_(False)
    return conv


def _channel_cat(n, val, g, new_stream, streams, refuse):
    """``torch.cat([a, b, ...], dim=channels)`` of values of grid streams on one grid in one layout: a new stream
    whose channel slices are the parts (:func:`._shortcut.add_select`)."""
    parts = n.args[0] if n.args else n.kwargs.get("tensors")
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    vals = [val.get(p) if isinstance(p, torch.fx.Node) else None for p in (parts or ())]
    if not vals or any(v is None or v[0] != "s" for v in vals):
        refuse(n, "concatenates the stream with a value that is not on it")
    lays = {v[2] for v in vals}
    grids = {(v[1].h, v[1].w) for v in vals}
    lay = next(iter(lays))
    nd = 4 if lay in ("nchw", "nhwc") else 3
    cdim = {"nchw": 1, "nhwc": 3, "nlc": 2, "ncl": 1}[lay]
    if len(lays) != 1 or len(grids) != 1 or not isinstance(dim, int) or dim % nd != cdim:
        refuse(n, f"concatenates values of the stream along dim {dim!r} (layouts {sorted(lays)}, grids "
                  f"{sorted(grids)}; supported: the channel axis of one layout on one grid)")
    total = sum(v[1].C for v in vals)
    h, w = next(iter(grids))
    ns = new_stream(total, h, w, len(streams))
    off = 0
    for i, v in enumerate(vals):
        add_select(g, v[1].stream, ns.stream, off, v[1].C, total, name=f"{n.name}.{i}")
        off += v[1].C
    return ("s", ns, lay)


def _whole(idx, shape) -> bool:
    """An index that takes every element: slices ``[:]`` / ``[0:]`` / ``[:n]`` of the whole axis, or ``...``."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if len(idx) > len(shape):
        return False
    for i, d in zip(idx, shape):
        if not (isinstance(i, slice) and i.step in (None, 1) and (i.start or 0) == 0
                and (i.stop is None or (isinstance(i.stop, int) and i.stop >= d))):
            return False
    return True


def _patch_pool(mod, shape) -> bool:
    """An ``AvgPool2d`` that tiles the map it reads: kernel == stride, no padding, no override, whole tiles."""
    k = _pair(mod.kernel_size)
    st = _pair(mod.stride if mod.stride is not None else mod.kernel_size)
    return k == st and _pair(mod.padding) == (0, 0) and getattr(mod, "divisor_override", None) is None and \
        not (shape[2] % k[0] or shape[3] % k[1])


def _stem_convs(model, nodes):
    """``{path: Conv2d}`` inside the leaf stem modules the trace calls (whose output shapes place the tokens a
    stem returns on a grid)."""
    out = {}
    for n in nodes:
        if n.op == "call_module" and _STEM.match(n.target):
            path = n.target[len("model."):]
            for sub, m in model.get_submodule(path).named_modules():
                if isinstance(m, torch.nn.Conv2d):
                    out[f"{path}.{sub}" if sub else path] = m
    return out


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _member(n, opened):
    """The opened member of a blocks list that node ``n`` runs in, or None."""
    if not opened:
        return None
    paths = []
    for k, v in (n.meta.get("nn_module_stack") or {}).items():
        paths += [k] if isinstance(k, str) else []
        if isinstance(v, tuple) and v and isinstance(v[0], str):
            paths.append(v[0])
    if n.op == "call_module":
        paths.append(n.target)
    for p in paths[::-1]:
        q = p[len("model."):] if p.startswith("model.") else p
        while q:
            if q in opened:
                return q
            q = q.rpartition(".")[0]
    return None


def _paths(n):
    """The module paths (without ``model.``) node ``n`` runs in, outermost first."""
    out = []
    for k, v in (n.meta.get("nn_module_stack") or {}).items():
        p = v[0] if isinstance(v, tuple) and v and isinstance(v[0], str) else k if isinstance(k, str) else None
        if p:
            out.append(p[len("model."):] if p.startswith("model.") else p)
    if n.op == "call_module":
        out.append(n.target[len("model."):])
    return out


def _common_module(readers):
    """The innermost module every reader runs in (below the stages and blocks lists), or None."""
    if len(readers) < 2:
        return None
    common = None
    for r in readers:
        ps = set(_paths(r))
        common = ps if common is None else common & ps
    deep = [p for p in (common or ()) if re.search(r"\.(downsample|blocks\.\d+)\.", p + ".")
            and not re.fullmatch(r".*blocks\.\d+", p)]
    return max(deep, key=len) if deep else None


def _readers(n):
    return [u for u in n.users if not _meta_use(u)]


def _residual_add(key, nodes, model, sizes=()):
    """``(add node, branch node, nodes computing the branch)`` for ``s' + b`` where ``s'`` is ``key`` through
    layout steps (or else through freezable linear steps: :func:`._shortcut.freezable_step`) and ``b`` is computed
    from ``key`` (a residual outside the blocks: Twins' position conv, ``x = proj(x) + x``; a pooled shortcut),
    or None. ``sizes``: nodes whose values are sizes, which may be read outside the branch."""
    from .auto import _identity

    at = nodes.index(key)
    desc = {key}
    for nd in nodes[at + 1:]:
        if any(a in desc for a in nd.all_input_nodes) and not _meta_use(nd):
            desc.add(nd)
    for nd in nodes[at + 1:]:
        if nd not in desc or not (nd.op == "call_function" and nd.target in (operator.add, operator.iadd, torch.add)) \
                or len(nd.args) != 2 or not all(isinstance(a, torch.fx.Node) for a in nd.args):
            continue
        # the stream operand through layout steps and identities (ConvNeXt's ``shortcut``) first, so that Twins'
        # ``proj(x) + x`` stays a branch on the stream; else through freezable linear steps (CoAtNet's pool +
        # 1×1 conv shortcut: mixers on the stream, see _shortcut) with a branch that is not the stream itself
        for sa, ba, loose in (*nd.args, False), (*nd.args[::-1], False), (*nd.args, True), (*nd.args[::-1], True):
            chain, cur = [], sa
            while cur is not key and ((cur.op in ("call_method", "call_function") and _name(cur) in _LAYOUT)
                                      or (cur.op == "call_module" and (freezable_step if loose else _identity)(
                                          model.get_submodule(cur.target[6:])))):
                chain.append(cur)
                cur = cur.args[0]
            if cur is key and ba in desc and not (loose and (ba is key or ba in chain)):
                inside, todo = set(), [ba]
                while todo:
                    x = todo.pop()
                    if x in inside or x is key or x in chain or x not in desc:
                        continue
                    inside.add(x)
                    todo.extend(x.all_input_nodes)
                if any(u not in inside and u is not nd and u not in sizes for x in inside if x not in sizes
                       for u in _readers(x)):
                    return None  # the branch's values are read elsewhere too (sizes it computes may leave it)
                return nd, ba, inside
    return None


def _branch_module(model, node):
    """(module path, module, its output node) whose output ``node`` is, through identities and layout steps
    (the caller checks that the module's output is a layout of the stream), or (None, None, None)."""
    from .auto import _identity

    while True:
        if node.op in ("call_method", "call_function") and _name(node) in _LAYOUT and node.args:
            node = node.args[0]
            continue
        src = node.args[0] if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2 \
            and node.args[1] == 0 else None
        if isinstance(src, torch.fx.Node) and src.op == "call_module":  # ``attn(x, size)[0]``: a module returning
            mod = model.get_submodule(src.target[len("model."):])  # (output, size), MViTv2's attention
            if not _identity(mod) and not isinstance(mod, torch.nn.Sequential):
                return src.target[len("model."):], mod, node
        if node.op != "call_module":
            return None, None, None
        mod = model.get_submodule(node.target[len("model."):])
        if _identity(mod) and node.args:
            node = node.args[0]
            continue
        if isinstance(mod, torch.nn.Sequential):
            return None, None, None
        return node.target[len("model."):], mod, node


def _pair1(s):
    return s == 1 or s == (1, 1) or s == [1, 1]


def _static(n) -> bool:
    return not isinstance(n, torch.fx.Node) or n.op == "get_attr"


def _name(n) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")


def _start_layout(model, nodes, start, shapes, cands):
    """NCHW or NHWC for the stream where the first stage reads it: the one whose channel count the first
    module reading it (through layout steps and identities) expects."""
    from .auto import _identity

    if len({c[1:] for c in cands}) == 1:
        return "nchw"
    cur = start
    for n in nodes:
        if cur not in n.all_input_nodes:
            continue
        if n.op == "call_module":
            mod = model.get_submodule(n.target[len("model."):])
            if _identity(mod):  # a stage's Identity downsample (Swin's first stage)
                cur = n
                continue
            ch = getattr(mod, "in_channels", None) or getattr(mod, "num_features", None) or getattr(mod, "dim", None)
            ns = getattr(mod, "normalized_shape", None)  # a LayerNorm over the channels (Swin's norm1)
            if ch is None and isinstance(ns, (tuple, list)) and len(ns) == 1:
                ch = ns[0]
            shp = shapes.get(cur)
            if isinstance(ch, int) and shp is not None and len(shp) == 4:
                if shp[1] == ch and shp[3] != ch:
                    return "nchw"
                if shp[3] == ch and shp[1] != ch:
                    return "nhwc"
            break
        if n.op in ("call_method", "call_function") and _name(n) in _LAYOUT:
            shp0, shp1 = shapes.get(start), shapes.get(n)
            if shp0 is not None and shp1 is not None and len(shp1) == 3:  # reshape(B, -1, C): C is the last axis
                return "nhwc" if shp1[-1] == shp0[-1] else "nchw"
            cur = n
            continue
        if _name(n) in ("getattr", "size"):
            continue
        break
    return "nchw"
