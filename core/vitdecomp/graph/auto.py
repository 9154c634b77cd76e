"""The ``auto`` adapter: a contribution graph derived from a ``torch.fx`` symbolic trace.

Used as ``adapter="auto"``, and by dispatch when no family adapter claims a model (it is a *fallback* adapter).
Scope (this version): timm models with a ``blocks`` list of residual blocks on a ``[B, N, D]`` token stream and
the timm head interface (CLS / mean / attention-pool readouts); z is
``model.forward_head(model.forward_features(x), pre_logits=True)``. Staged (hierarchical) models — a list of
stages with ``blocks`` lists on an image-shaped stream, with convolutions or patch mergings between stages — are
derived by :mod:`._autostage` (one trace through the stages; the blocks are derived as below, and windowed
attention that reaches the stream through rolls, pads, window partitions / reverses and crops — Swin, SwinV2,
SwinV2-Cr, DaViT, GCViT — by :mod:`._autowindow`).

How the graph is derived (nothing is executed symbolically beyond tracing; the engine runs the model's own
forward):

1. **Blocks.** Each ``blocks.i`` is traced with :mod:`torch.fx`, every child module a leaf. Walking back from
   the block's output, every step must be an ``add`` of the stream and a *branch*; anything else on the stream's
   path (a norm after the add, a concatenation, a reshape) is refused, naming the operation, its module path and
   source line (the stream may pass an identity module, MetaFormer's Identity ``res_scale``). A branch is peeled
   down to the module that computes it through identities (eval ``Dropout``, ``DropPath``, ``Identity``) and
   LayerScale (a ``LayerScale`` module, MetaFormer's ``Scale``, or a multiplication by a parameter, as in
   BEiT's ``gamma_1``), giving a write named by the model's own module path (``blocks.3.mlp``,
   ``blocks.3.attn``). Attention is split into heads (``blocks.3.attn.head.5`` + ``blocks.3.attn.bias``) by its
   output projection when it is timm's fused-qkv ``Attention`` (token detail through :class:`FusedQKV`), or
   when its own trace ends ``proj(transpose(attn_out, 1, 2).reshape(B, N, C))`` with ``attn_out`` from
   ``scaled_dot_product_attention`` or a ``matmul`` (heads contiguous in proj's input: BEiT, EVA-02, relpos
   ViT); their token detail comes from :class:`~vitdecomp.graph.sources.TracedAttention`, which records the
   attention product (fused, or softmax then weights @ values) while the module runs. Attention over channels
   whose trace ends ``proj(permute(attn_out, 0, 3, 1, 2).reshape(B, N, C))`` (XCiT's XCA: ``[dh, dh]`` weights
   per head) splits the same way, each head's token detail at its own tokens
   (:class:`~vitdecomp.graph.sources.TokenwiseHeads`; listed in ``meta["channel_heads"]``). Any other attention
   module is one block-level write.
   **Pooling blocks.** A block whose last add's stream operand is the block's input through a norm, a ``Linear``
   and ``x.view(B, s, -1, C).amax(dim=1)`` (Hiera's stage transition ``x = do_pool(proj(norm1(x)))``, then
   ``x + attn(norm1(x))``) puts those steps on the stream (:mod:`._shortcut`): the norm frozen
   (``blocks.1.norm1.bias``), the Linear as a 1×1 conv into a new stream (``blocks.1.proj.bias``), the max as a
   fixed map at the forward's maxima (ties split evenly, as ``amax``'s gradient does; tied values are equal, so
   exact) into a stream of ``N / s`` rows; the model's streams are then grid streams on its token grid (Hiera:
   ``tokens_spatial_shape``), and token detail is refused (the rows are in Hiera's unrolled order and the max is
   carried forward as a map). An attention counting its heads in ``heads`` (Hiera) splits like one with
   ``num_heads``.
2. **Readout.** ``forward_head(forward_features(x), pre_logits=True)`` is traced with every module a leaf, and
   the steps after the last block are followed (timm's channels-last ``ClNormMlpClassifierHead``, Hiera's, is
   traced through): norms (frozen at the forward's statistics), identities, and
   linear combinations of rows — ``x[:, i]``, the mean of ``x[:, a:b]`` over tokens, sums and scalar multiples
   of those (distilled DeiT's ``(x[:, 0] + x[:, 1]) / 2``) — which become one pool; and timm's
   ``AttentionPoolLatent`` (MAP heads), which becomes :meth:`Graph.attention_pool` over the rows it reads, its
   MLP residual the write ``attn_pool.mlp`` (z is read after it) and its own pooling of the latent rows; and
   class-attention blocks ``blk(x, x_cls)`` (CaiT; traced: an add chain on ``x_cls`` whose attention branch
   reads ``norm(cat((x_cls, x), 1))`` with q/k/v/proj), which become a class stream (the expanded parameter
   ``cls_token``) reading the patch stream through :meth:`Graph.class_attention`, then ``cat`` + norm + one
   row; and XCiT's tail: ``cat((cls_token.expand(B, -1, -1), x), 1)`` (a class stream), then timm's
   ``xcit.ClassAttentionBlock`` on the concatenation (recognised by class, as its forward slices rows: class
   attention for the class row, :meth:`Graph.norm_residual` for the patch rows, ``norm2``, the class row's MLP,
   the patch rows doubled by its last add), ``norm`` and ``x[:, 0]`` or the patch rows' mean; steps of streams
   that no longer reach z are dropped. Any other step is refused the same way.
3. **Cache.** Traces are cached per module while its structure (which module and parameter objects sit where)
   is unchanged; only the first call pays for tracing, and one extra forward of one image per image size finds
   the stream's row count.
4. **Check.** The decomposition is always checked: relative reconstruction error ≤ 1e-5 (float32) or ≤ 1e-10
   (float64), else :class:`~vitdecomp.errors.UnsupportedModelError`. A graph that traces but is not exact is
   never returned. (On a GPU, reading the error waits for the device once per call.)
"""

from __future__ import annotations

import inspect
import operator
import sys
import weakref
from typing import List, Optional

import torch

from .._records import TokenGrid
from ..errors import InputError, UnsupportedModelError
from . import FusedQKV, Graph, GraphAdapter, ProjInput, TokenwiseHeads, TracedAttention, execute
from ._autowindow import layer_scale

__all__ = ["AutoAdapter"]

_ADD = (operator.add, operator.iadd, torch.add)
_MUL = (operator.mul, operator.imul, torch.mul)


def _is_timm_model(model) -> bool:
    if "timm" not in sys.modules:
        return False
    blocks = getattr(model, "blocks", None)
    return (callable(getattr(model, "forward_head", None)) and callable(getattr(model, "forward_features", None))
            and isinstance(blocks, (torch.nn.Sequential, torch.nn.ModuleList)) and len(blocks) > 0)


def _is_staged_timm_model(model) -> bool:
    """A timm model with a list of stages, each with a ``blocks`` list (see :mod:`._autostage`)."""
    from ._autostage import stage_list

    if "timm" not in sys.modules or stage_list(model) is None:
        return False
    return not _is_timm_model(model) or isinstance(model.blocks[0], (torch.nn.Sequential, torch.nn.ModuleList))


def _where(node, prefix: str = "") -> str:
    """``op target`` of an fx node, its module path and the last source line of its stack trace."""
    what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    desc = f"{node.op} {what!s}"
    if node.op == "call_module":
        desc = f"module {prefix}{node.target}"
    line = ""
    if node.stack_trace:  # the last frame outside torch: the model's own source line
        lines = node.stack_trace.rstrip().splitlines()
        for k in range(len(lines) - 1, -1, -1):
            ln = lines[k].strip()
            if ln.startswith("File ") and "/torch/" not in ln:
                code = lines[k + 1].strip() if k + 1 < len(lines) else ""
                line = f" ({ln[5:]}: {code})" if code else f" ({ln[5:]})"
                break
    return desc + line


class _LeafTracer(torch.fx.Tracer):
    """Every submodule is a leaf: the trace shows how modules are wired, not what they compute."""

    def __init__(self):
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m, qualname):
        return True


class _HeadTracer(_LeafTracer):
    """As :class:`_LeafTracer`, but timm's channels-last pooling head (``ClNormMlpClassifierHead``: pool over the
    token axis, norm, ``pre_logits``, Hiera's head) is traced through, so its steps are followed one by one."""

    def is_leaf_module(self, m, qualname):
        return not (qualname == "model.head" and type(m).__name__ == "ClNormMlpClassifierHead")


def _trace(root: torch.nn.Module, fn_module: torch.nn.Module, what: str, concrete: Optional[dict] = None,
           tracer=None):
    tracer = tracer or _LeafTracer()
    try:
        graph = tracer.trace(fn_module, concrete_args=concrete)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is a refusal naming it
        raise UnsupportedModelError(
            f"auto adapter: {what} of {type(root).__name__} cannot be traced with torch.fx "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); write a model pack for it "
            f"(CONTRIBUTING.md, 'Writing a model pack')") from exc
    return graph


def _identity(mod) -> bool:
    from ..engine import is_identity

    if is_identity(mod) or isinstance(mod, torch.nn.Dropout):
        return True
    return type(mod).__name__ in ("DropPath",)  # stochastic depth: identity in eval mode


class _Readout(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def _peel(node, block, prefix, relayout=False):
    """Peel a branch node down to the module computing it: (module path, module, gamma). ``relayout``: also
    through layout steps (permute / reshape of a grid map, for staged models: the engine reads each write in the
    layout its module returns)."""
    gamma = None
    while True:
        if relayout and node.op == "call_method" and node.target in ("permute", "reshape", "view", "contiguous",
                                                                     "flatten", "transpose"):
            node = node.args[0]
            continue
        if node.op == "call_module":
            mod = block.get_submodule(node.target)
            if _identity(mod):
                node = node.args[0]
                continue
            ls = layer_scale(mod)  # LayerScale(2d), MetaFormer's Scale: x * vector
            if ls is not None and gamma is None:
                gamma = ls
                node = node.args[0]
                continue
            return node.target, mod, gamma, node
        if node.op == "call_function" and node.target in _MUL and gamma is None and len(node.args) == 2:
            a, b = node.args
            p, other = (a, b) if getattr(a, "op", None) == "get_attr" else (b, a)
            if getattr(p, "op", None) == "get_attr" and isinstance(other, torch.fx.Node):
                gamma = block.get_parameter(p.target) if p.target in dict(block.named_parameters()) else None
                if gamma is not None and gamma.dim() <= 1:
                    node = other
                    continue
        raise UnsupportedModelError(
            f"auto adapter: the branch written into the residual stream of {prefix[:-1]} ends in "
            f"{_where(node, prefix)}, which is not a module output (optionally × LayerScale); only module outputs "
            f"can be components")


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _signature(module) -> tuple:
    """Identity of a module's structure: which module and parameter objects sit where (a cached trace is reused
    only while nothing was replaced; traces depend on structure and attributes, never on parameter values)."""
    return (tuple((n, id(m), type(m)) for n, m in module.named_modules())
            + tuple((n, id(p)) for n, p in module.named_parameters()))


def _cached(module, key, make):
    """``make()`` cached per (module, key) while :func:`_signature` of the module is unchanged."""
    sig = _signature(module)
    entry = _CACHE.get(module)
    if entry is None or entry[0] != sig:
        entry = (sig, {})
        _CACHE[module] = entry
    if key not in entry[1]:
        entry[1][key] = make()
    return entry[1][key]


def _block_writes(block, prefix: str, relayout: bool = False):
    """[(module path within block, module, gamma)] in forward order, or UnsupportedModelError (cached per block)."""
    return _cached(block, ("writes", prefix, relayout), lambda: _derive_block_writes(block, prefix, relayout))


def _derive_block_writes(block, prefix: str, relayout: bool = False):
    sig = inspect.signature(block.forward)
    params = list(sig.parameters.values())
    concrete = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is not inspect.Parameter.empty:
            concrete[p.name] = p.default
        # a required argument besides the stream (XCiT's H, W) stays a placeholder: the walk below follows the
        # stream alone, and a branch that reads such an argument is still a module output
    graph = _trace(block, block, prefix[:-1], concrete or None)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    x = placeholders[0]
    out = next(n for n in graph.nodes if n.op == "output")
    cur = out.args[0]
    writes = []
    while cur is not x:
        if not isinstance(cur, torch.fx.Node):
            raise UnsupportedModelError(f"auto adapter: {prefix[:-1]} does not return a tensor built from its input")
        is_add = (cur.op == "call_function" and cur.target in _ADD) or (cur.op == "call_method" and cur.target in ("add", "add_"))
        if not is_add or len(cur.args) != 2 or cur.kwargs:
            raise UnsupportedModelError(
                f"auto adapter: in {prefix[:-1]} ({type(block).__name__}) the residual stream passes through "
                f"{_where(cur, prefix)}, which is not the add of a branch; a step on the stream's own path must be "
                f"'stream + branch' (post-norm, concatenation, reshaping or scaling of the stream is not supported)")
        a, b = cur.args
        chain = lambda n: n is x or (isinstance(n, torch.fx.Node) and n.op in ("call_function", "call_method")  # noqa: E731
                                     and n.target in _ADD + ("add", "add_"))
        # the stream may pass an identity module on its way (MetaFormer's ``res_scale1(x) + ...``, Identity)
        sa, sb = _through_identities(a, block), _through_identities(b, block)
        stream, branch = (sa, b) if chain(sa) else (sb, a)
        if not chain(stream):
            raise UnsupportedModelError(f"auto adapter: in {prefix[:-1]} neither operand of {_where(cur, prefix)} "
                                        f"is the residual stream")
        writes.append(_peel(branch, block, prefix, relayout)[:3])
        cur = stream
    return writes[::-1]


def _through_identities(n, block):
    """``n`` peeled through calls of identity modules (eval Dropout, DropPath, Identity) of ``block``."""
    while isinstance(n, torch.fx.Node) and n.op == "call_module" and n.args and \
            _identity(block.get_submodule(n.target)):
        n = n.args[0]
    return n


def _class_block(mod) -> bool:
    """A module whose forward is ``forward(x, x_cls)`` (CaiT's class-attention block), by its signature."""
    try:
        names = list(inspect.signature(mod.forward).parameters)
    except (TypeError, ValueError):
        return False
    return len(names) == 2 and names[1] == "x_cls"


def _class_attention_module(mod) -> bool:
    return all(isinstance(getattr(mod, a, None), torch.nn.Linear) for a in ("q", "k", "v", "proj")) \
        and isinstance(getattr(mod, "num_heads", None), int) and isinstance(getattr(mod, "scale", None), float)


def _derive_class_block(blk, prefix: str, xi: int):
    """[(name, module, gamma, norm or None)] of a class-attention block: its forward must be an add chain on
    ``x_cls`` whose branches are module outputs (× LayerScale); a branch reading ``norm(cat((x_cls, x), 1))``
    with a q/k/v/proj attention is the class attention (norm returned), any other a plain write."""
    from ..engine import supported_norm

    graph = _trace(blk, blk, prefix[:-1])
    ph = [nd for nd in graph.nodes if nd.op == "placeholder"]
    px, pc = ph[xi], ph[1 - xi]
    cur = next(nd for nd in graph.nodes if nd.op == "output").args[0]
    writes = []
    while cur is not pc:
        is_add = isinstance(cur, torch.fx.Node) and cur.op == "call_function" and cur.target in _ADD
        if not is_add or len(cur.args) != 2:
            raise UnsupportedModelError(
                f"auto adapter: in {prefix[:-1]} ({type(blk).__name__}) the class token passes through "
                f"{_where(cur, prefix) if isinstance(cur, torch.fx.Node) else cur!r}, which is not the add of a branch")
        a, b = cur.args
        on = lambda nd: nd is pc or (isinstance(nd, torch.fx.Node) and nd.op == "call_function"  # noqa: E731
                                     and nd.target in _ADD)
        stream, branch = (a, b) if on(a) else (b, a)
        path, mod, gamma, node = _peel(branch, blk, prefix)
        norm = None
        inp = node.args[0] if node.args else None
        if _class_attention_module(mod) and isinstance(inp, torch.fx.Node) and inp.op == "call_module":
            nmod = blk.get_submodule(inp.target)
            cat = inp.args[0]
            if (supported_norm(nmod) and isinstance(cat, torch.fx.Node) and cat.target is torch.cat
                    and list(cat.args[0]) == [pc, px] and (cat.args[1:] == (1,) or cat.kwargs.get("dim") == 1)):
                norm = nmod
        if norm is None and px in _ancestors(node, on):
            raise UnsupportedModelError(
                f"auto adapter: in {prefix[:-1]} the branch {_where(node, prefix)} reads the patch tokens other than "
                f"as class attention over norm(cat((x_cls, x), dim=1)) with q/k/v/proj projections")
        writes.append((path, mod, gamma, norm))
        cur = stream
    return writes[::-1]


def _ancestors(node, stop):
    """Nodes ``node`` is computed from, not looking past nodes where ``stop(node)`` (the class token's chain)."""
    seen, todo = set(), [node]
    while todo:
        nd = todo.pop()
        if nd in seen:
            continue
        seen.add(nd)
        if not stop(nd):
            todo.extend(nd.all_input_nodes)
    return seen


def _expanded_param(nd):
    """The parameter path of ``param.expand(B, -1, -1)`` (a class token joined to the stream), else None."""
    if (isinstance(nd, torch.fx.Node) and nd.op == "call_method" and nd.target == "expand"
            and getattr(nd.args[0], "op", None) == "get_attr"):
        return nd.args[0].target
    return None


def _cat_value(n, val, refuse, param_stream=None):
    """``torch.cat((s1, s2, ...), dim=1)`` of followed streams: ("cat", [(stream, row offset)], pending norms).
    ``param_stream(path)``: the stream for a part that is a parameter expanded over the batch (XCiT's class token
    joined after the blocks), else such a part is refused."""
    parts = n.args[0] if n.args else n.kwargs.get("tensors")
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    ok = lambda p: (isinstance(p, torch.fx.Node) and p in val and val[p][0] == "stream") or (  # noqa: E731
        param_stream is not None and _expanded_param(p) is not None)
    if dim not in (1, -2) or not all(ok(p) for p in parts) or not any(p in val for p in parts):
        refuse(n, "concatenates something other than whole streams (or a parameter expanded over the batch) "
                  "along the token axis")
    out, at = [], 0
    for p in parts:
        st = val[p][1] if p in val else param_stream(_expanded_param(p))
        out.append((st, at))
        at += st.rows
    return ("cat", out, [])


def _split_heads(mod) -> bool:
    """A timm fused-qkv Attention the engine's FusedQKV source reads exactly (else a block-level write)."""
    if "timm" not in sys.modules:
        return False
    from timm.layers import Attention

    from ..engine import is_identity

    return (type(mod) is Attention and is_identity(getattr(mod, "norm", None))
            and all(hasattr(mod, n) for n in ("qkv", "proj", "num_heads", "q_norm", "k_norm")))


def _attention_pool(mod) -> bool:
    """timm's ``AttentionPoolLatent`` (the MAP head of ``global_pool="map"`` / SigLIP), as the derivation reads it."""
    if "timm" not in sys.modules:
        return False
    from timm.layers import AttentionPoolLatent

    return (type(mod) is AttentionPoolLatent and isinstance(getattr(mod, "kv", None), torch.nn.Linear)
            and all(hasattr(mod, a) for a in ("latent", "q_norm", "k_norm", "proj", "num_heads", "scale", "pool")))


def _pair(v):
    """``(a, b)`` from an int or a pair, else None."""
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(t, int) for t in v):
        return tuple(v)
    return None


def _proj_of_heads(mod, loose: bool = False):
    """The output projection of an attention module whose output is ``proj(o)`` (through identities) with
    ``o = transpose(attn_out, 1, 2).reshape(B, N, H·dh)`` and ``attn_out`` ``[B, H, N, dh]`` from
    ``scaled_dot_product_attention`` or a ``matmul``: heads contiguous in proj's input, so proj's columns split
    them. None if the trace does not show exactly that (the module is then one block-level write). ``loose``
    (staged models): required arguments besides the input (a feature size) are traced as placeholders, or else
    as ``(2, 2)`` — only the structure of the output end is read; exactness is checked on the forward."""
    H = _num_heads(mod)
    if not isinstance(H, int) or not isinstance(getattr(mod, "proj", None), torch.nn.Linear):
        return None
    return _proj_after(mod, ("transpose", (1, 2)), loose, ("heads", loose))


def _num_heads(mod):
    """The head count of an attention module: ``num_heads``, or ``heads`` (Hiera's ``MaskUnitAttention``)."""
    H = getattr(mod, "num_heads", None)
    H = getattr(mod, "heads", None) if H is None else H
    return H if isinstance(H, int) and not isinstance(H, bool) else None


def _proj_of_channel_heads(mod):
    """The output projection of an attention that mixes channels within each token (XCiT's ``XCA``): its trace
    ends ``proj(permute(attn_out, 0, 3, 1, 2).reshape(B, N, H·dh))`` with ``attn_out`` ``[B, H, dh, N]`` from a
    ``matmul`` or ``scaled_dot_product_attention`` (tokens on the last axis: the weights are ``[dh, dh]`` per
    head). Heads are contiguous in proj's input, so proj's columns split them; token detail is
    :class:`~vitdecomp.graph.sources.TokenwiseHeads`. None if the trace does not show exactly that."""
    H = getattr(mod, "num_heads", None)
    if not isinstance(H, int) or not isinstance(getattr(mod, "proj", None), torch.nn.Linear):
        return None
    return _proj_after(mod, ("permute", (0, 3, 1, 2)), False, "channel-heads")


def _proj_after(mod, layout, loose: bool, key, reshape_dims: int = 3):
    """``mod.proj`` when ``mod``'s trace ends ``proj(<layout>(attn_out).reshape(...))`` (``layout``: the method and
    its axes; the reshape to ``reshape_dims`` dimensions) with ``attn_out`` from ``scaled_dot_product_attention``
    or a ``matmul``; else None. Cached per module under ``key``; ``loose`` as in :func:`_proj_of_heads`."""

    def derive():
        params = list(inspect.signature(mod.forward).parameters.values())[1:]
        required = [p for p in params if p.default is inspect.Parameter.empty]
        if required and not loose:
            return None
        defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        graph = None
        for fill in ((lambda p: None), (lambda p: (2, 2))) if required else ((lambda p: None),):
            concrete = dict(defaults, **{p.name: fill(p) for p in required if fill(p) is not None})
            try:
                graph = _LeafTracer().trace(mod, concrete_args=concrete or None)
                break
            except Exception:  # noqa: BLE001 - not traceable: no head split
                graph = None
        if graph is None:
            return None
        out = next(n for n in graph.nodes if n.op == "output").args[0]
        if loose and isinstance(out, (list, tuple)) and len(out) == 1:  # pytree-flattened concrete arguments
            out = out[0]
        node = out

        def peel(n):
            while isinstance(n, torch.fx.Node) and n.op == "call_module" and _identity(mod.get_submodule(n.target)):
                n = n.args[0]
            return n

        node = peel(node)
        if not (isinstance(node, torch.fx.Node) and node.op == "call_module" and node.target == "proj"):
            return None
        node = peel(node.args[0])
        if not (isinstance(node, torch.fx.Node) and node.op == "call_method" and node.target in ("reshape", "view")
                and len(node.args) == reshape_dims + 1):
            return None
        t = node.args[0]
        if not (isinstance(t, torch.fx.Node) and t.op == "call_method" and t.target == layout[0]
                and tuple(t.args[1:]) == layout[1]):
            return None
        a = t.args[0]
        attn_fns = (torch.nn.functional.scaled_dot_product_attention, operator.matmul, torch.matmul)
        if not (isinstance(a, torch.fx.Node) and ((a.op == "call_function" and a.target in attn_fns)
                                                   or (a.op == "call_method" and a.target == "matmul"))):
            return None
        return mod.proj

    return _cached(mod, key, derive)




def _xcit_class_block(mod) -> bool:
    """timm's XCiT ``ClassAttentionBlock`` (``timm.models.xcit``), recognised by its class: its forward slices the
    concatenated rows (class row: ``x + γ1 ⊙ attn(norm1(x))``, then ``norm2`` and ``+ γ2 ⊙ mlp``; patch rows:
    ``x + γ1 ⊙ norm1(x)``, ``norm2`` too when ``tokens_norm``), which the row-level trace walk does not follow."""
    from ..engine import supported_norm

    if type(mod).__name__ != "ClassAttentionBlock" or type(mod).__module__ != "timm.models.xcit":
        return False
    return (all(hasattr(mod, a) for a in ("norm1", "attn", "norm2", "mlp", "gamma1", "gamma2", "tokens_norm"))
            and _class_attention_module(mod.attn) and supported_norm(mod.norm1) and supported_norm(mod.norm2)
            and _identity(getattr(mod, "drop_path1", torch.nn.Identity()))
            and _identity(getattr(mod, "drop_path2", torch.nn.Identity())))


def _prune_dead(g) -> None:
    """Drop the steps of streams that no longer reach z (XCiT's class-attention blocks update the class row and
    the patch rows; after the last one only the rows the readout takes matter: a token readout never reads the
    patch rows again, a mean of the patches never reads the class row, whose writes then contribute nothing)."""
    live, keep = {id(g.out)}, []
    for op in reversed(g.ops):
        s = op.stream
        if op.kind == "block":
            keep.append(op)
            continue
        if op.kind == "pool":
            out = op.extra["out"]
            if id(out) in live:
                live.add(id(s))
                keep.append(op)
            continue
        if id(s) not in live:
            continue
        if op.kind in ("cattn", "concat", "apool"):
            live.update(id(r) for r in op.extra["reads"])
        keep.append(op)
    g.ops[:] = keep[::-1]


class AutoAdapter(GraphAdapter):
    """Derives the contribution graph of a timm residual-block model from a torch.fx trace (module docstring)."""

    name = "auto"
    families = ("auto (traced timm residual-block models)",)
    fallback = True

    def supports(self, model) -> bool:
        return _is_timm_model(model) or _is_staged_timm_model(model)

    def explain(self, model) -> str:
        if _is_staged_timm_model(model):
            return ("a staged timm model (stages with blocks lists): graph derived from a torch.fx trace through its "
                    "stages and checked for exactness")
        if not _is_timm_model(model):
            return "not a timm model with a blocks list (or stages with blocks lists) and forward_head"
        return "a timm model with a blocks list: graph derived from a torch.fx trace and checked for exactness"

    def validate(self, model, images):
        """Image size against a fixed-size patch embedding (the rest: describe() refuses what it cannot follow
        and decompose() checks exactness)."""
        if _is_staged_timm_model(model):  # the staged derivation follows whatever grids the stages produce
            return
        pe = getattr(model, "patch_embed", None)
        H, W = images.shape[-2:]
        size = _pair(getattr(pe, "img_size", None))
        if (size is not None and getattr(pe, "strict_img_size", False) and not getattr(model, "dynamic_img_size", False)
                and (H, W) != tuple(size)):
            raise InputError(f"Image size {H}×{W} does not match the fixed input size {size[0]}×{size[1]} of "
                             f"{type(model).__name__}; resize the images or build the model for that size")
        ps = _pair(getattr(pe, "patch_size", None))
        if ps is not None and (H % ps[0] or W % ps[1]):
            raise InputError(f"Image size {H}×{W} is not divisible by the patch size {ps[0]}×{ps[1]} of "
                             f"{type(model).__name__}; use a multiple of the patch size")

    def representation(self, model, images):
        return model.forward_head(model.forward_features(images), pre_logits=True)

    def readout(self, model):
        head = getattr(model, "head", None)
        if getattr(model, "dist_token", None) is not None:
            return None
        return head if isinstance(head, torch.nn.Linear) else None

    def oracle_writes(self, model) -> dict:
        """For the conformance kit's attribution oracle: the parameters of each attention pool's constant (value
        and output biases, and its positional table, which has no bias-like name)."""
        params = dict(model.named_parameters())
        out = {}
        # constants the staged derivation placed (a post-norm's β in its attention's .bias: SwinV2)
        out.update({k: list(v) for k, v in _cached(model, "oracle-writes", dict).items()})
        for path, mod in model.named_modules():
            if _attention_pool(mod):
                names = [f"{path}.{n}" for n in ("kv.bias", "proj.bias", "pos_embed")]
                out[f"{path}.bias"] = [n for n in names if n in params]
            elif _xcit_class_block(mod):  # the class row's attention constants and the patch rows' γ1 ⊙ β of norm1
                names = [f"{path}.norm1.bias"] + [f"{path}.attn.{n}.bias" for n in ("q", "k", "v", "proj")]
                out[f"{path}.attn.bias"] = [n for n in names if n in params]
            elif _class_block(mod):  # class attention: its norm's β and the value/output biases
                for sub, att in mod.named_children():
                    if _class_attention_module(att):
                        names = [f"{path}.{n}" for n in ("norm1.bias",)] + [
                            f"{path}.{sub}.{n}.bias" for n in ("q", "k", "v", "proj")]
                        out[f"{path}.{sub}.bias"] = [n for n in names if n in params]
        return out

    # ---------------------------------------------------------------- derivation
    def _probe(self, model, images):
        """Rows N of the token stream entering blocks.0 for this image size (one forward of one image, cached)."""
        return _cached(model, ("rows", tuple(images.shape[-2:])), lambda: self._probe_rows(model, images))

    def _probe_rows(self, model, images):
        seen = {}

        def hook(mod, args):
            seen["x"] = args[0]

        h = model.blocks[0].register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                self.representation(model, images[:1])
        finally:
            h.remove()
        x = seen.get("x")
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            shape = (tuple(x.shape) if isinstance(x, torch.Tensor) else
                     "nothing (it is never called: a list of stages, not of blocks)" if x is None else type(x).__name__)
            raise UnsupportedModelError(
                f"auto adapter: blocks.0 of {type(model).__name__} receives {shape}; only a [B, N, D] token stream "
                f"is supported (windowed / NHWC / multi-scale stages need a model pack)")
        return int(x.shape[1])

    def _grid(self, model, images, N) -> TokenGrid:
        pe = getattr(model, "patch_embed", None)
        H, W = images.shape[-2:]
        ph, pw = _pair(getattr(pe, "patch_size", None)) or (1, 1)
        for get in (lambda: pe.dynamic_feat_size((H, W)), lambda: pe.grid_size, lambda: (H // ph, W // pw)):
            try:
                gh, gw = (int(v) for v in get())
            except Exception:  # noqa: BLE001 - try the next convention
                continue
            npre = N - gh * gw
            if npre >= 0 and npre == getattr(model, "num_prefix_tokens", npre):
                return TokenGrid(num_prefix=npre, h=gh, w=gw, patch_size=(ph, pw))
        return TokenGrid(num_prefix=N, h=0, w=0, patch_size=(ph, pw))  # rows not on a patch grid

    def _tail(self, model, g, x, N):
        """Follow forward_head(forward_features(.)) after the last block: norms and identities on a stream, and
        linear combinations of its rows (``x[:, i]``, ``x[:, a:b].mean(1)``, sums and scalings of those, e.g.
        distilled DeiT's ``(x[:, 0] + x[:, 1]) / 2``), which become a pool; norms of the pooled row after it."""
        from ..engine import supported_norm

        graph = _cached(model, "readout", lambda: _trace(model, _Readout(model), "forward_features/forward_head",
                                                         tracer=_HeadTracer()))
        nb = len(model.blocks)
        last = None
        for n in graph.nodes:
            if n.op == "call_module" and n.target in ("model.blocks", f"model.blocks.{nb - 1}"):
                last = n
        if last is None:
            raise UnsupportedModelError(f"auto adapter: the trace of {type(model).__name__} never calls its blocks")
        # value of each followed node: ("stream", Stream) | ("rows", Stream, {row: weight}) | ("range", Stream, rows)
        val = {last: ("stream", x)}
        reads = {}  # stream node -> number of module reads (a stream may be read by one module only)

        def refuse(n, why="is not a step the auto adapter follows (norms, identities, x[:, i], x[:, a:b], mean "
                          "over tokens, sums and scalar multiples of rows)"):
            raise UnsupportedModelError(f"auto adapter: between the last block and z of {type(model).__name__}, "
                                        f"{_where(n, '')} {why}")

        def pooled(v, n):
            if v[0] == "stream":
                return v[1]
            if v[0] != "rows":
                refuse(n, "reads a row range that is not averaged")
            rows = sorted(v[2])
            return g.pool(v[1], rows, [v[2][r] for r in rows])

        z = None
        for n in graph.nodes:
            followed = [a for a in n.all_input_nodes if a in val]
            if not followed:
                continue
            if n.op == "output":
                z = pooled(val[followed[0]], n)
                break
            if n.op == "call_function" and n.target is getattr and n.args[1] in ("shape", "dtype", "device"):
                continue  # metadata only
            if n.op == "call_module" and _class_block(model.get_submodule(n.target[len("model."):])):
                val[n] = ("stream", self._class_block(model, g, n, val, refuse, nb))
                continue
            if n.op == "call_function" and n.target is torch.cat:
                val[n] = _cat_value(n, val, refuse, lambda path: self._class_stream(model, g, x, path))
                continue
            if len(followed) != len(n.all_input_nodes) and not (n.op == "call_function" and n.target in _MUL):
                refuse(n, "mixes the stream with values computed elsewhere")
            v = val[followed[0]]
            if v[0] == "cat":  # streams side by side (CaiT: class token and patches): norms wait for a row pick
                if n.op == "call_module" and _xcit_class_block(model.get_submodule(n.target[len("model."):])):
                    val[n] = self._xcit_block(model, g, n, v, refuse, nb)
                    continue
                if n.op == "call_module" and type(model.get_submodule(n.target[len("model."):])).__name__ \
                        == "ClassAttentionBlock":
                    refuse(n, "is a class-attention block whose parts the derivation does not know (expected timm's "
                              "xcit.ClassAttentionBlock: norms norm1/norm2, a q/k/v/proj class attention, identity "
                              "drop paths)")
                if n.op == "call_module" and supported_norm(model.get_submodule(n.target[len("model."):])):
                    val[n] = ("cat", v[1], v[2] + [(model.get_submodule(n.target[len("model."):]),
                                                    n.target[len("model."):])])
                    continue
                idx = n.args[1] if n.op == "call_function" and n.target is operator.getitem else None
                if (isinstance(idx, tuple) and len(idx) == 2 and idx[0] == slice(None) and isinstance(idx[1], slice)
                        and idx[1].step in (None, 1)):  # x[:, a:b] inside one of the streams (XCiT's 'avg')
                    rows = list(range(sum(st.rows for st, _ in v[1])))[idx[1]]
                    part = next(((st, at) for st, at in v[1] if rows and at <= rows[0] and rows[-1] < at + st.rows),
                                None)
                    if part is None:
                        refuse(n, f"reads rows {idx[1]} across the concatenated streams (supported: a row range "
                                  f"inside one of them)")
                    st, at = part
                    for mod, name in v[2]:
                        g.norm(st, mod, name=name, at=at)
                    val[n] = ("range", st, [r - at for r in rows])
                    continue
                if not (isinstance(idx, tuple) and len(idx) == 2 and idx[0] == slice(None) and isinstance(idx[1], int)
                        and idx[1] >= 0):
                    refuse(n, "reads concatenated streams other than by one row x[:, i] or a row range x[:, a:b]")
                part = next(((st, at) for st, at in v[1] if at <= idx[1] < at + st.rows), None)
                if part is None:
                    refuse(n, f"reads row {idx[1]} beyond the concatenated streams")
                st, at = part
                for mod, name in v[2]:
                    g.norm(st, mod, name=name, at=at)
                val[n] = ("rows", st, {idx[1] - at: 1.0})
                continue
            if n.op == "call_module":
                mod = model.get_submodule(n.target[len("model."):])
                if _identity(mod):
                    val[n] = v
                    continue
                if _attention_pool(mod):
                    reads[followed[0]] = reads.get(followed[0], 0) + 1
                    if reads[followed[0]] > 1 or v[0] == "rows" or len(n.args) != 1 or n.kwargs:
                        refuse(n, "is an attention pool called on something other than the token stream "
                                  "(or with a mask)")
                    val[n] = ("stream", self._attention_pool(g, mod, n.target[len("model."):], v[1],
                                                             v[2] if v[0] == "range" else list(range(N)), n, refuse))
                    continue
                if not supported_norm(mod):
                    refuse(n, f"({type(mod).__name__}) is not a norm or identity the auto adapter can freeze")
                st = pooled(v, n) if v[0] != "stream" else v[1]
                reads[followed[0]] = reads.get(followed[0], 0) + 1
                if reads[followed[0]] > 1:
                    refuse(n, "is a second module reading the same stream")
                g.norm(st, mod, name=n.target[len("model."):])
                val[n] = ("stream", st)
            elif n.op == "call_function" and n.target is operator.getitem and v[0] == "stream" and v[1].rows > 1:
                idx = n.args[1]
                if isinstance(idx, tuple) and len(idx) == 2 and idx[0] == slice(None) and isinstance(idx[1], int):
                    val[n] = ("rows", v[1], {idx[1] % N: 1.0})
                elif (isinstance(idx, tuple) and len(idx) == 2 and idx[0] == slice(None)
                      and isinstance(idx[1], slice) and idx[1].step in (None, 1)):
                    val[n] = ("range", v[1], list(range(N))[idx[1]])
                else:
                    refuse(n, f"indexes the token stream with {idx!r} (supported: x[:, i], x[:, a:b])")
            elif (n.op == "call_method" and n.target == "mean") or (n.op == "call_function" and n.target is torch.mean):
                dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
                if dim not in (1, (1,), [1]) or n.kwargs.get("keepdim", False) or v[0] == "rows" \
                        or (v[0] == "stream" and v[1].rows == 1):
                    refuse(n, f"with dim={dim!r} (supported: the mean over tokens, dim=1)")
                rows = v[2] if v[0] == "range" else list(range(N))
                val[n] = ("rows", v[1], {r: 1.0 / len(rows) for r in rows})
            elif n.op == "call_function" and n.target in _ADD and len(followed) == 2 and len(n.args) == 2:
                a, b = (val[t] for t in n.args)
                if a[0] != "rows" or b[0] != "rows" or a[1] is not b[1]:
                    refuse(n, "adds values that are not rows of one stream")
                rows = dict(a[2])
                for r, w in b[2].items():
                    rows[r] = rows.get(r, 0.0) + w
                val[n] = ("rows", a[1], rows)
            elif (n.op == "call_function" and n.target in _MUL + (operator.truediv,) and len(n.args) == 2
                  and isinstance(n.args[1 if n.args[0] in val else 0], (int, float)) and v[0] == "rows"
                  and (n.target is not operator.truediv or n.args[0] in val)):
                c = float(n.args[1 if n.args[0] in val else 0])
                c = 1.0 / c if n.target is operator.truediv else c
                val[n] = ("rows", v[1], {r: w * c for r, w in v[2].items()})
            else:
                refuse(n)
        if z is None or z.rows != 1:
            raise UnsupportedModelError(f"auto adapter: z of {type(model).__name__} is not one pooled row of the "
                                        f"token stream")
        return z

    def _class_block(self, model, g, n, val, refuse, nb):
        """A class-attention block ``blk(x, x_cls)`` (CaiT) after the blocks: the class stream (a parameter
        ``expand``-ed at the first one) reads the patch stream through :meth:`Graph.class_attention`."""
        path = n.target[len("model."):]
        blk = model.get_submodule(path)
        args = list(n.args)
        followed = [i for i, a in enumerate(args) if a in val]
        if len(args) != 2 or len(followed) < 1 or n.kwargs:
            refuse(n, "is a class-attention block not called as blk(x, x_cls) with the token stream")
        xi = followed[0] if len(followed) == 1 else next(i for i in followed if val[args[i]][1].rows > 1)
        ci = 1 - xi
        x = val[args[xi]][1]
        c = args[ci]
        if c in val:
            cls = val[c][1]
        else:  # the first class block: x_cls = param.expand(B, -1, -1)
            if not (isinstance(c, torch.fx.Node) and c.op == "call_method" and c.target == "expand"
                    and getattr(c.args[0], "op", None) == "get_attr"):
                refuse(n, "receives a class token that is not a parameter expanded over the batch")
            name = c.args[0].target[len("model."):]
            param = model.get_parameter(name)
            cls = g.stream(name, param.shape[-2] if param.dim() == 3 else 1, tokens=0)
            g.param(cls, param, name=name)
            x.tokens = cls.rows  # the class rows come first on the grid (set by _describe)
            g.meta["class_rows"] = cls.rows
        order = ("x", "x_cls") if xi == 0 else ("x_cls", "x")
        writes = _cached(blk, ("class-block", order), lambda: _derive_class_block(blk, path + ".", xi))
        index = nb + sum(1 for op in g.ops if op.kind == "block" and op.block >= nb)
        with g.block(index, path, cls, entry=blk, entry_arg=ci):
            for sub, mod, gamma, norm in writes:
                if norm is not None:
                    g.class_attention([cls, x], cls, norm=norm, q=mod.q, k=mod.k, v=mod.v, proj=mod.proj,
                                      num_heads=mod.num_heads, scale=mod.scale, gamma=gamma, name=sub)
                else:
                    g.branch(cls, mod, name=sub, kind="attn" if "attn" in sub else "mlp", gamma=gamma)
        return cls

    @staticmethod
    def _class_stream(model, g, x, path):
        """A class stream for the parameter ``path`` expanded over the batch and joined to the patch stream ``x``
        after the blocks (XCiT): its rows come first on the grid."""
        name = path[len("model."):] if path.startswith("model.") else path
        param = model.get_parameter(name)
        cls = g.stream(name, param.shape[-2] if param.dim() == 3 else 1, tokens=0)
        g.param(cls, param, name=name)
        x.tokens = cls.rows
        g.meta["class_rows"] = cls.rows
        return cls

    def _xcit_block(self, model, g, n, v, refuse, nb):
        """XCiT's class-attention block on ``cat((cls, x), 1)``: the class row gets the class attention over both
        streams (:meth:`Graph.class_attention`, frozen weights), the patch rows ``x + γ1 ⊙ norm1(x)``
        (:meth:`Graph.norm_residual`, whose offset joins ``<block>.attn.bias``: both are the branch
        ``γ1 ⊙ cat(attn(norm1(x)), norm1(x)[:, 1:])``), then ``norm2`` on the class row (on both streams with
        ``tokens_norm``) and the class row's MLP; the forward's last add (``x_res + cat((γ2 ⊙ mlp(cls), x[:, 1:]))``)
        doubles the patch rows, a frozen ×2 (if a timm version changes that, the exactness check refuses)."""
        path = n.target[len("model."):]
        blk = model.get_submodule(path)
        parts = v[1]
        if v[2] or len(n.args) != 1 or n.kwargs or len(parts) != 2 or parts[0][0].rows != 1 \
                or parts[1][0].rows < 1:
            refuse(n, "is an XCiT class-attention block not called on cat((class token, patches), dim=1) alone")
        (cls, _), (x, at) = parts
        gamma1 = blk.gamma1 if isinstance(blk.gamma1, torch.Tensor) else None
        gamma2 = blk.gamma2 if isinstance(blk.gamma2, torch.Tensor) else None
        if (gamma1 is None and blk.gamma1 != 1.0) or (gamma2 is None and blk.gamma2 != 1.0):
            refuse(n, "has a LayerScale that is neither a parameter nor 1")
        at_ = blk.attn
        index = nb + sum(1 for op in g.ops if op.kind == "block" and op.block >= nb)
        g.meta.setdefault("first_class_block", index)
        with g.block(index, path, cls, entry=blk):
            g.class_attention([cls, x], cls, norm=blk.norm1, q=at_.q, k=at_.k, v=at_.v, proj=at_.proj,
                              num_heads=at_.num_heads, scale=at_.scale, gamma=gamma1, name="attn")
            g.norm_residual(x, blk.norm1, gamma=gamma1, name="attn", at=at)
            g.norm(cls, blk.norm2, name=f"{path}.norm2")
            if blk.tokens_norm:
                g.norm(x, blk.norm2, name=f"{path}.norm2", at=at)
            g.branch(cls, blk.mlp, name="mlp", kind="mlp", gamma=gamma2)
            # timm's forward ends x_res + cat((γ2 ⊙ mlp(cls), x[:, 1:])) with x_res = x: the patch rows leave doubled
            w = at_.proj.weight
            g.project(x, 2.0 * torch.eye(w.shape[0], dtype=w.dtype, device=w.device), name=f"{path}.patch_rows")
        return ("cat", parts, [])

    @staticmethod
    def _attention_pool(g, mod, path, x, rows, n, refuse):
        """timm's ``AttentionPoolLatent`` (MAP head) on ``rows`` of stream ``x``: the value path at the forward's
        attention weights into a stream of its latent queries, the pool's MLP residual ``p + mlp(norm(p))`` a
        write into it (``<path>.mlp``), then its own pooling (first latent or their mean)."""
        E = mod.kv.out_features // 2
        pos = getattr(mod, "pos_embed", None)
        if pos is not None and (pos.dim() != 2 or pos.shape[0] != len(rows)):
            refuse(n, f"has a positional table of shape {tuple(pos.shape)} for {len(rows)} rows")
        L = int(mod.latent_len)
        if mod.pool not in ("token", "avg"):
            refuse(n, f"returns all {L} latent rows (pool_type={mod.pool!r}); z must be one row "
                      "(supported: pool_type 'token' or 'avg')")
        p = g.attention_pool(x, rows, queries=L, q=mod.q_norm, k=mod.k_norm, v_weight=mod.kv.weight[E:],
                             v_bias=None if mod.kv.bias is None else mod.kv.bias[E:],
                             proj=mod.proj if isinstance(mod.proj, torch.nn.Linear) else None,
                             num_heads=mod.num_heads, scale=mod.scale, pos_embed=pos, name=path)
        spread = g.meta.setdefault("spread_tokens", [])
        spread.append(f"{path}.bias")
        if getattr(mod, "mlp", None) is not None:
            g.branch(p, mod.mlp, name=f"{path}.mlp", kind="mlp")
            spread.append(f"{path}.mlp")
        if mod.pool == "token":
            return g.pool(p, [0], [1.0])
        return g.pool(p, list(range(L)), [1.0 / L] * L)

    def describe(self, model, images, tokens: bool = False) -> Graph:
        try:
            return self._describe(model, images, tokens)
        except (UnsupportedModelError, InputError):
            raise
        except Exception as exc:  # noqa: BLE001 - a structure the derivation does not know: refused, named
            import traceback

            where = traceback.extract_tb(exc.__traceback__)[-1]
            raise UnsupportedModelError(
                f"auto adapter: cannot derive a graph for {type(model).__name__}: {type(exc).__name__}: {exc} "
                f"(at {where.filename.rsplit('/', 1)[-1]}:{where.lineno}: {where.line}); write a model pack for it"
            ) from exc

    def _describe(self, model, images, tokens) -> Graph:
        if _is_staged_timm_model(model):
            from ._autostage import describe_staged

            return describe_staged(self, model, images, tokens)
        if not _is_timm_model(model):
            raise UnsupportedModelError(
                f"auto adapter: {type(model).__name__} is not a timm model with a non-empty `blocks` list "
                f"(nn.Sequential / nn.ModuleList), or with `stages`/`layers` whose stages have `blocks` lists, and "
                f"forward_features/forward_head; this version derives graphs only for those")
        N = self._probe(model, images)
        grid = self._grid(model, images, N)
        arch = getattr(model, "default_cfg", {}).get("architecture", type(model).__name__) \
            if isinstance(getattr(model, "default_cfg", None), dict) else type(model).__name__
        g = Graph(self.name, run=lambda im: self.representation(model, im), grid=grid,
                  meta={"adapter": self.name, "model": arch, "derived": "torch.fx"})
        from ._shortcut import enter_transition, token_grid, transitions

        trans = transitions(model)  # blocks whose stream passes through freezable steps (Hiera's pooling)
        if trans:
            first = min(trans)
            if tokens:
                raise UnsupportedModelError(
                    f"auto adapter: token detail (tokens='source') through blocks.{first} of {type(model).__name__}, "
                    "whose stream is pooled by a max over groups of rows (carried forward as a fixed map), is not "
                    "supported; decompose without token detail")
            grid = token_grid(model, images, N, grid)
            if grid.num_prefix or grid.h * grid.w != N:
                raise UnsupportedModelError(
                    f"auto adapter: blocks.{first} of {type(model).__name__} pools the stream, whose {N} rows are not "
                    f"the {grid.h}×{grid.w} patch grid without prefix tokens; the derivation needs that grid")
        x = g.stream("tokens", N, grid=grid if trans else None)
        g.embed(x, model.blocks[0])
        for i, blk in enumerate(model.blocks):
            prefix = f"blocks.{i}."
            writes = trans[i].writes if i in trans else _block_writes(blk, prefix)
            with g.block(i, f"blocks.{i}", x, entry=blk):
                if i in trans:
                    x = enter_transition(g, x, blk, f"blocks.{i}", trans[i])
                for path, mod, gamma in writes:
                    proj = None if _split_heads(mod) else _proj_of_heads(mod)
                    cproj = None if _split_heads(mod) or proj is not None else _proj_of_channel_heads(mod)
                    if cproj is not None:  # channel attention (XCiT's XCA): heads by proj's columns, tokenwise
                        g.heads(x, ProjInput(cproj, mod.num_heads, TokenwiseHeads(cproj)), cproj.weight, cproj.bias,
                                gamma=gamma, name=path)
                        g.meta.setdefault("channel_heads", []).append(f"blocks.{i}.{path}")
                    elif _split_heads(mod):
                        att = FusedQKV(mod.qkv, mod.q_norm, mod.k_norm, getattr(mod, "scale", mod.head_dim ** -0.5))
                        g.heads(x, ProjInput(mod.proj, mod.num_heads, att), mod.proj.weight, mod.proj.bias,
                                gamma=gamma, name=path)
                    elif proj is not None:  # heads split by proj's columns; token detail recorded as it runs
                        g.heads(x, ProjInput(proj, _num_heads(mod), TracedAttention(mod)), proj.weight, proj.bias,
                                gamma=gamma, name=path)
                    else:
                        kind = "attn" if "attn" in path else "mlp"
                        g.branch(x, mod, name=path, kind=kind, gamma=gamma)
        z = self._tail(model, g, x, x.rows)  # the rows of the last stream (fewer after a pooling block)
        if "class_rows" in g.meta:  # a class stream joined after the blocks: the grid has its rows first
            g.grid = self._grid(model, images, N + g.meta.pop("class_rows"))
        g.output(z)
        if "first_class_block" in g.meta:
            _prune_dead(g)
        return g

    def decompose(self, model, images, options):
        from ..decomposition import tolerance_for

        from torch._subclasses.fake_tensor import is_fake

        tokens = options.tokens == "source"
        graph = self.describe(model, images, tokens=tokens)
        start = options.start
        if start is not None and (isinstance(start, bool) or not isinstance(start, int)
                                  or not 0 <= start < graph.num_blocks):
            raise InputError(f"start={start!r} is out of range: {type(model).__name__} ({self.name}) has blocks "
                             f"0..{graph.num_blocks - 1}")
        first_cls = graph.meta.get("first_class_block")
        if start is not None and first_cls is not None and start >= first_cls:
            raise InputError(f"start={start!r}: blocks {first_cls}..{graph.num_blocks - 1} of {type(model).__name__} "
                             f"are class-attention blocks reading the class and patch streams together; start must "
                             f"be a block 0..{first_cls - 1}")
        dec = execute(graph, images, start=start, tokens=tokens,
                      bias="paper" if options.bias == "paper" else "explicit")

        if is_fake(dec.contributions):  # simulated CUDA (placement checks): there are no values to check
            return dec
        err, tol = float(dec.error), tolerance_for(images.dtype)
        if not err <= tol:
            raise UnsupportedModelError(
                f"auto adapter: the graph derived for {type(model).__name__} reconstructs z with relative error "
                f"{err:.2e} > {tol:.0e}; a step between the writes and z is not linear as traced "
                f"(components {', '.join(dec.names[:6])}, ...). Write a model pack for it.")
        return dec


def derived_writes(model) -> List[str]:
    """The write names the auto adapter derives for ``model``'s blocks (for inspection)."""
    out = []
    for i, blk in enumerate(model.blocks):
        out += [f"blocks.{i}.{p}" for p, _, _ in _block_writes(blk, f"blocks.{i}.")]
    return out
