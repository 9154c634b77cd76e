"""Contribution graphs: the way to add a model family to vitdecomp.

A family *describes* its model; the core's one engine (:func:`execute`) does the rest. A description is a
:class:`Graph`, built in forward order, of

* **streams** of token rows (:meth:`Graph.stream`): a plain ViT has one, CaiT a patch and a class stream, and a
  pooled vector is a one-row stream;
* **writes** into a stream: the embedding (:meth:`Graph.embed`, the stream as it enters the first block), a
  branch module's output (:meth:`Graph.branch`, optionally times a LayerScale vector), a parameter
  (:meth:`Graph.param`, e.g. a class token) and **head writes** (:meth:`Graph.heads`: an attention branch split
  by its output projection, with a :mod:`head source <vitdecomp.graph.sources>` saying where the per-head
  outputs, and for token detail the attention rows and values, are read);
* **frozen linear mixers**: a norm at the statistics the forward used, with the module's own eps
  (:meth:`Graph.norm`), a stream plus its own frozen norm (:meth:`Graph.norm_residual`: ``x + γ ⊙ norm(x)``,
  XCiT's patch rows in its class-attention blocks), pooling into a new stream (:meth:`Graph.pool`), a projection
  (:meth:`Graph.project`),
  pooled groups side by side (:meth:`Graph.concat`),
  a class-attention value path (:meth:`Graph.class_attention`: attention from one query row over rows of
  several streams, at the forward's attention weights), attention pooling with learned queries
  (:meth:`Graph.attention_pool`: a MAP head's value path at the forward's weights), a 2×2 patch merging from one
  grid stream into the next (:meth:`Graph.merge`: gather + norm + reduction, four routes per merge) and a stride-2
  shortcut (:meth:`Graph.downsample`: 2×2 average pool + 1×1 conv, MaxViT) and a convolution between grid
  streams (:meth:`Graph.conv`: a patch convolution as an s×s merge, any other carried forward);
* a **readout** (:meth:`Graph.output`): the one-row stream that is z, with ``run(images) -> z`` the model
  library's own forward.

Hierarchical models (Swin) put each stage on a stream with its own grid (``Graph.stream(..., grid=TokenGrid)``;
rows are the grid's positions, row-major, and modules may see them as ``[B, h, w, C]``). A component written there
has its token detail on that grid (``dec.grid_of(name)``); window attention is the head source
:class:`~vitdecomp.graph.sources.WindowHeads` (cyclic shift and window partition as a row map; heads placed at
their query rows, ``meta["head_tokens"] = "query"``), any partitioned attention given by its row map is
:class:`~vitdecomp.graph.sources.PartitionHeads` (MaxViT's block windows and grid cells: :func:`window_rows`,
:func:`grid_rows`; the auto adapter reads the row map off the model's own steps), a branch module whose output is
in partition order (an attention not split into heads, before its window reverse) is
``Graph.branch(..., rows=row_map)``, and a norm inside the branch after the attention (SwinV2's res-post-norm) is
``Graph.heads(..., post_norm=module)``. Modules that see or write ``[B, C, h, w]`` maps are declared with
``nchw=True`` (``embed``, ``branch``, ``block``, ``norm``: a LayerNorm2d normalises over C).

Blocks (:meth:`Graph.block`) group writes under a name prefix and mark where ``start`` may cut: with
``start=k`` the stream entering block ``k`` becomes the component ``init`` (kind ``residual``).

The engine hooks the model's own forward (and checks every hook fired), freezes norms and attention weights,
composes the linear maps from each write to z (pooling before the per-head products, so component level costs
about one forward), emits the components in forward order with explicit constants (biases, norm offsets; or the
paper's even shares with ``bias="paper"``, see :func:`execute`) and heads split, and the token detail for ``tokens="source"`` on the model's grid. A component is a *write*: its
contribution is everything that reaches z from it along linear paths. When z is not read from the stream a
block writes (CaiT's class stream, attention pooling), the writes of that stream reach z through the
class-attention value path at the forward's attention weights; the class-attention branch itself then
contributes only its constant (``<name>.bias``: value and output biases and its norm's offset through the
attention weights, which sum to one).

Use :class:`GraphAdapter`: subclass it, implement :meth:`GraphAdapter.describe`, and ``decompose`` is done.
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence

import attrs
import torch

from ..adapter import Adapter
from ..errors import InputError, VitDecompError
from .sources import (FusedQKV, HeadSource, InProj, PartitionHeads, ProjInput, SeparateQKV, TalkingHeads,
                      TokenwiseHeads, TracedAttention, WindowHeads)

__all__ = ["Graph", "Stream", "GraphAdapter", "GraphError", "execute", "HeadSource", "ProjInput", "FusedQKV",
           "TalkingHeads", "TracedAttention", "SeparateQKV", "InProj", "WindowHeads", "PartitionHeads",
           "TokenwiseHeads", "window_rows", "grid_rows"]


def window_rows(H: int, W: int, window, shift=(0, 0), pad_first: bool = False):
    """Row map of a (shifted-)window partition of an ``H × W`` grid: the grid position each partitioned row holds
    (−1: padding), for :class:`PartitionHeads` (MaxViT's block attention: no shift)."""
    from ._hier import window_rows as rows

    return rows(H, W, tuple(window), tuple(shift), pad_first)


def grid_rows(H: int, W: int, grid):
    """Row map of MaxViT's grid partition (``grid`` cells per partition, strided over the ``H × W`` grid), for
    :class:`PartitionHeads`."""
    from ._hier import grid_rows as rows

    return rows(H, W, tuple(grid))


class GraphError(VitDecompError, ValueError):
    """A contribution-graph description that cannot be executed (names the pack, the node and what was expected)."""


@attrs.define(eq=False)
class Stream:
    """A stream of ``rows`` token rows. ``tokens``: the grid token index of row 0 (rows are consecutive grid
    tokens), or None for a stream that is not on the grid (a pooled vector: its writes' token detail is spread
    evenly over the rows that were pooled into it). ``seq_first``: block entries and branch outputs see it as
    ``[N, B, D]`` (norms and head sources handle their own layout). ``grid``: a hierarchical stream on its own
    :class:`vitdecomp.TokenGrid` (rows = its positions, row-major; ``[B, h, w, D]`` inputs are flattened)."""

    name: str
    rows: int
    tokens: Optional[int] = 0
    seq_first: bool = False
    spread: Optional[tuple] = None  # (source stream, rows) for a pooled stream
    grid: object = None


@attrs.define(eq=False)
class _Op:
    kind: str  # entry | branch | param | heads | norm | nres | pool | concat | project | cattn | apool | block
    stream: Optional[Stream]
    name: str = ""
    block: Optional[int] = None
    comp_kind: str = ""
    module: object = None
    gamma: Optional[torch.Tensor] = None
    value: Optional[torch.Tensor] = None
    extra: dict = attrs.field(factory=dict)


class Graph:
    """A model's contribution graph, built in forward order (see the module docstring).

    :param pack: the pack's (adapter's) name, used in error messages.
    :param run: ``run(images) -> z``, the model library's own forward; the engine's hooks watch it.
    :param grid: the :class:`vitdecomp.TokenGrid` token detail lives on.
    :param meta: copied into :attr:`Decomposition.meta`.
    :param entry_grid: ``dec.grid`` is the grid of the stream the first write enters when it has one (the
        first decomposed stage of a hierarchical model); False: always ``grid``.
    """

    def __init__(self, pack: str, *, run: Callable[[torch.Tensor], torch.Tensor], grid, meta: Optional[dict] = None,
                 entry_grid: bool = True):
        self.pack, self.run, self.grid, self.meta = pack, run, grid, dict(meta or {})
        self.entry_grid = bool(entry_grid)
        self.streams: List[Stream] = []
        self.ops: List[_Op] = []
        self.out: Optional[Stream] = None
        self._block: Optional[tuple] = None  # (index, prefix)

    # ------------------------------------------------------------------ streams and blocks
    def stream(self, name: str, rows: int, *, tokens: Optional[int] = 0, seq_first: bool = False,
               grid=None) -> Stream:
        """A stream of ``rows`` token rows (``tokens``: grid index of its row 0, None if not on the grid;
        ``grid``: a :class:`vitdecomp.TokenGrid` of its own, ``rows`` positions, for a hierarchical stage)."""
        if grid is not None and grid.num_tokens != int(rows):
            raise GraphError(f"pack {self.pack!r}, stream {name!r}: its grid has {grid.num_tokens} positions; "
                             f"the stream declares {rows} rows")
        s = Stream(name=name, rows=int(rows), tokens=tokens, seq_first=seq_first, grid=grid)
        self.streams.append(s)
        return s

    @contextlib.contextmanager
    def block(self, index: int, prefix: str, stream: Stream, entry: torch.nn.Module, *, entry_arg: int = 0,
              stage: Optional[int] = None, nchw: bool = False):
        """Writes made inside belong to block ``index`` (and ``stage``, for hierarchical models) and are named
        ``<prefix>.<name>``. ``entry`` is the module whose positional input ``entry_arg`` is ``stream`` as the
        block reads it (where ``start=index`` takes ``init``; ``nchw``: as a ``[B, C, h, w]`` map)."""
        self.ops.append(_Op("block", stream, name=prefix, block=int(index), module=entry,
                            extra={"arg": int(entry_arg), "nchw": bool(nchw),
                                   "cargs": {} if stage is None else {"stage": int(stage)}}))
        self._block = (int(index), prefix, stage)
        try:
            yield self
        finally:
            self._block = None

    def _name(self, name: str) -> str:
        return f"{self._block[1]}.{name}" if self._block is not None else name

    def _blk(self) -> Optional[int]:
        return self._block[0] if self._block is not None else None

    def _cargs(self, branch: Optional[str] = None) -> dict:
        out = {"stage": self._block[2]} if self._block is not None and self._block[2] is not None else {}
        if branch is not None:
            out["branch"] = branch
        return out

    # ------------------------------------------------------------------ writes
    def embed(self, stream: Stream, entry: torch.nn.Module, *, name: str = "embed", entry_arg: int = 0,
              nchw: bool = False) -> None:
        """The embedding: everything in ``stream`` as it enters ``entry`` (its positional input ``entry_arg``;
        ``nchw``: a ``[B, C, h, w]`` map, e.g. a conv stem's output): patch + position embedding, prefix tokens;
        one component of kind ``embed``."""
        self.ops.append(_Op("entry", stream, name=name, comp_kind="embed", module=entry,
                            extra={"arg": int(entry_arg), "nchw": bool(nchw)}))

    def branch(self, stream: Stream, module: torch.nn.Module, *, name: str = "mlp", kind: str = "mlp",
               gamma: Optional[torch.Tensor] = None, nchw: bool = False, branch: Optional[str] = None,
               copy: bool = False, rows=None) -> None:
        """``module``'s output (times the LayerScale vector ``gamma`` if given) is added to ``stream``
        (``nchw``: the output is a ``[B, C, h, w]`` map, e.g. MaxViT's MBConv ``conv3_1x1``; ``branch``: the
        component's :attr:`Component.branch` label; ``copy``: the forward later changes the output in place,
        e.g. ``x = proj(s); x += s``, so it is copied when captured; ``rows``: the output is in partition order,
        any shape whose leading axes flatten to ``len(rows)`` rows per image, and ``rows[i]`` is the stream
        position row ``i`` is added at (−1: a row the forward cuts off, e.g. window padding), as for
        :class:`PartitionHeads` — a windowed attention module's output before the window reverse)."""
        import numpy as np

        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
            valid = rows[rows >= 0]
            if valid.size != stream.rows or np.unique(valid).size != stream.rows or valid.max() >= stream.rows:
                raise GraphError(f"pack {self.pack!r}, node {self._name(name)!r}: rows must place one output row at "
                                 f"each of the stream's {stream.rows} positions")
        self.ops.append(_Op("branch", stream, name=self._name(name), block=self._blk(), comp_kind=kind, module=module,
                            gamma=gamma, extra={"cargs": self._cargs(branch), "nchw": bool(nchw), "copy": bool(copy),
                                                "rows": rows}))

    def param(self, stream: Stream, value: torch.Tensor, *, name: str, kind: str = "embed") -> None:
        """A parameter ``value`` (``[rows, D]`` or ``[1, rows, D]``) is added to ``stream``."""
        self.ops.append(_Op("param", stream, name=self._name(name), block=self._blk(), comp_kind=kind, value=value,
                            extra={"cargs": self._cargs()}))

    def heads(self, stream: Stream, source: HeadSource, out_weight: torch.Tensor, out_bias: Optional[torch.Tensor] = None,
              *, gamma: Optional[torch.Tensor] = None, name: str = "attn",
              post_norm: Optional[torch.nn.Module] = None, branch: Optional[str] = None) -> None:
        """An attention branch added to ``stream``: ``γ ⊙ (Σ_h W_O^(h) o_h + b_O)``, split into components
        ``<name>.head.<h>`` and ``<name>.bias``. ``out_weight`` is the output projection ``[D, H·dh]``.
        ``post_norm`` (hierarchical streams): a norm inside the branch, ``x + norm(attn(x))`` (SwinV2), frozen at
        its input's statistics; the heads pass through its linear part and ``<name>.bias`` holds the output bias
        through it plus its β. ``branch``: the components' :attr:`Component.branch` label."""
        if post_norm is not None and stream.grid is None:
            raise GraphError(f"pack {self.pack!r}, node {self._name(name)!r}: post_norm is supported on streams with "
                             "their own grid (Graph.stream(..., grid=...))")
        self.ops.append(_Op("heads", stream, name=self._name(name), block=self._blk(), module=source, gamma=gamma,
                            extra={"weight": out_weight, "bias": out_bias, "post": post_norm,
                                   "cargs": self._cargs(branch)}))

    # ------------------------------------------------------------------ mixers
    def norm(self, stream: Stream, module: torch.nn.Module, *, name: str, at: int = 0, nchw: bool = False) -> None:
        """``stream`` passes through the norm ``module`` (frozen at the statistics of its input in the forward);
        its offset β is the component ``<name>.bias``. ``at``: index of the stream's row 0 in the norm's input
        (a norm applied to several streams concatenated); ``nchw``: the norm sees ``[B, C, h, w]`` and normalises
        over C (LayerNorm2d); an eval-mode BatchNorm is its fixed affine map at the running statistics. Identity /
        None is skipped."""
        from ..engine import is_identity

        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and (module.training
                                                                           or module.running_var is None):
            raise GraphError(f"pack {self.pack!r}, node {self._name(name)!r}: a BatchNorm on the stream's path must be "
                             "in eval mode with running statistics (otherwise it normalises by the batch's, which "
                             "is not a fixed linear map)")
        if not is_identity(module):
            self.ops.append(_Op("norm", stream, name=name, module=module, extra={"at": int(at), "nchw": bool(nchw)}))

    def norm_residual(self, stream: Stream, module: torch.nn.Module, *, gamma: Optional[torch.Tensor] = None,
                      name: str, at: int = 0) -> None:
        """``stream ← stream + γ ⊙ norm(stream)``, the norm ``module`` frozen at the statistics of its input in the
        forward (rows from ``at``, as in :meth:`norm`): a linear step on the stream's own path, not a write (XCiT's
        class-attention blocks add ``γ1 ⊙ norm1(x)`` to the patch rows). Every write reaching it passes through
        ``I + diag(1/σ) · centre · diag(γ_norm · γ)``; the norm's offset, ``γ ⊙ β``, is the constant
        ``<name>.bias`` (kind ``const``, in the current block). Constants emitted under one name are one component
        (their sum), so the offset can join the constant of the branch it belongs to (XCiT: ``<block>.attn.bias``,
        with the class row's attention constants)."""
        from ..engine import is_identity

        if is_identity(module):
            raise GraphError(f"pack {self.pack!r}, node {self._name(name)!r}: norm_residual needs a norm (got "
                             f"{type(module).__name__}); an identity would double the stream")
        self.ops.append(_Op("nres", stream, name=self._name(name), block=self._blk(), module=module, gamma=gamma,
                            extra={"at": int(at), "nchw": False}))

    def pool(self, stream: Stream, rows: Sequence[int], weights, *, name: str = "pool") -> Stream:
        """A new one-row stream ``Σ_r weights[r] · stream[rows[r]]`` (CLS selection, mean pooling); ``weights`` a
        sequence of numbers, known before the forward."""
        out = Stream(name=f"{stream.name}.{name}", rows=1, tokens=None, spread=(stream, [int(r) for r in rows]))
        self.streams.append(out)
        w = [float(v) for v in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
        self.ops.append(_Op("pool", stream, name=name, extra={"out": out, "rows": [int(r) for r in rows], "weights": w}))
        return out

    def concat(self, streams: Sequence[Stream], widths: Sequence[int], *, name: str = "concat") -> Stream:
        """A new one-row stream: the one-row ``streams`` (of feature widths ``widths``) side by side (a readout
        that concatenates pooled groups, e.g. DINOv2's class token and mean patch)."""
        if any(s.rows != 1 for s in streams) or len(widths) != len(streams):
            raise GraphError(f"pack {self.pack!r}, node {name!r}: concat takes one-row streams with one width each; "
                             f"got rows {[s.rows for s in streams]} and widths {list(widths)}")
        out = Stream(name=name, rows=1, tokens=None, spread=streams[0].spread)
        self.streams.append(out)
        self.ops.append(_Op("concat", out, name=name, extra={"reads": list(streams), "widths": [int(w) for w in widths]}))
        return out

    def project(self, stream: Stream, matrix: Optional[torch.Tensor], *, name: str = "proj") -> None:
        """Every row of ``stream`` is multiplied by ``matrix`` ``[D, d]`` (``row @ matrix``); None is skipped."""
        if matrix is not None:
            self.ops.append(_Op("project", stream, name=name, value=matrix))

    def class_attention(self, reads: Sequence[Stream], writes: Stream, *, norm: torch.nn.Module, q: torch.nn.Linear,
                        k: torch.nn.Linear, v: torch.nn.Linear, proj: torch.nn.Linear, num_heads: int, scale: float,
                        gamma: Optional[torch.Tensor] = None, name: str = "attn") -> None:
        """Class attention: ``writes`` (one row) gets ``γ ⊙ proj(attn(norm(cat(reads))))`` where the query is
        row 0 of the concatenation and keys/values are all its rows. Linear in every read stream once the norm
        statistics and the attention weights are frozen; the branch's constants form ``<name>.bias``."""
        self.ops.append(_Op("cattn", writes, name=self._name(name), block=self._blk(), module=norm, gamma=gamma,
                            extra={"reads": list(reads), "q": q, "k": k, "v": v, "proj": proj, "H": int(num_heads),
                                   "scale": float(scale)}))

    def attention_pool(self, reads: Stream, rows: Sequence[int], *, queries: int, q: torch.nn.Module,
                       k: torch.nn.Module, v_weight: torch.Tensor, v_bias: Optional[torch.Tensor],
                       proj: Optional[torch.nn.Linear], num_heads: int, scale: float,
                       pos_embed: Optional[torch.Tensor] = None, name: str = "attn_pool") -> Stream:
        """Attention pooling with learned queries (timm's ``AttentionPoolLatent``, SigLIP's MAP head): a new stream
        of ``queries`` rows, ``proj(Σ_h A_h (x W_V^(h)ᵀ + b_V^(h)))`` over rows ``rows`` of ``reads``, at the
        forward's attention weights ``A_h = softmax(scale · q_h k_hᵀ)``. ``q``/``k``: the modules whose outputs
        are the queries ``[B, H, queries, dh]`` and keys ``[B, H, len(rows), dh]`` the attention used (timm: its
        ``q_norm``/``k_norm``, Identity modules included); ``v_weight`` ``[H·dh, D]`` / ``v_bias``: the value
        projection; ``proj``: the output projection (None: identity); ``pos_embed`` ``[len(rows), D]``: added to
        the rows before the value projection. Linear in every read row once A is frozen; the constants (value and
        output biases, ``pos_embed`` through the value path) form the component ``<name>.bias``. Writes into the
        returned stream (the pool's own MLP residual) are branches on it. The latent queries are no image
        position: with token detail, the read stream's writes are split by position through the pool, while the
        pool's own writes and ``<name>.bias`` are spread evenly over the rows it reads (a convention, like any
        write to a pooled row; a pack lists them in ``meta["spread_tokens"]`` so the conformance kit's oracle
        does not look for a position)."""
        out = Stream(name=name, rows=int(queries), tokens=None, spread=(reads, [int(r) for r in rows]))
        self.streams.append(out)
        self.ops.append(_Op("apool", out, name=name, extra={
            "reads": [reads], "rows": [int(r) for r in rows], "q": q, "k": k, "v_weight": v_weight,
            "v_bias": v_bias, "proj": proj, "H": int(num_heads), "scale": float(scale), "pos": pos_embed}))
        return out

    def merge(self, src: Stream, dst: Stream, *, norm: torch.nn.Module, reduction: torch.nn.Linear,
              norm_first: bool = True, name: str, stage: Optional[int] = None) -> None:
        """A 2×2 patch merging from grid stream ``src`` into grid stream ``dst``: each ``dst`` position gathers
        its four ``src`` children (odd sides zero-padded) in channel order ``(dw, dh)``, then ``norm`` and the
        bias-free ``reduction`` (``norm_first``: Swin V1 gather → norm → reduction; False: SwinV2 gather →
        reduction → norm). The norm is frozen at the statistics of its input in the forward; its offset β is the
        component ``name`` (kind ``const``, ``stage``), written to ``dst``."""
        from ._hier import merge_slots

        if src.grid is None or dst.grid is None:
            raise GraphError(f"pack {self.pack!r}, node {name!r}: merge joins two streams with their own grids")
        if getattr(reduction, "bias", None) is not None:
            raise GraphError(f"pack {self.pack!r}, node {name!r}: the reduction has a bias; expected a bias-free "
                             "Linear (as in Swin's patch merging)")
        parent, slot, out_hw = merge_slots(src.grid.h, src.grid.w)
        if tuple(out_hw) != (dst.grid.h, dst.grid.w):
            raise GraphError(f"pack {self.pack!r}, node {name!r}: merging the {src.grid.h}×{src.grid.w} grid of "
                             f"{src.name!r} gives {out_hw[0]}×{out_hw[1]}; stream {dst.name!r} declares "
                             f"{dst.grid.h}×{dst.grid.w}")
        self.ops.append(_Op("merge", dst, name=name, module=norm,
                            extra={"src": src, "norm": norm, "reduction": reduction, "norm_first": bool(norm_first),
                                   "geometry": (parent, slot, out_hw),
                                   "cargs": {} if stage is None else {"stage": int(stage)}}))

    def downsample(self, src: Stream, dst: Stream, *, weight: Optional[torch.Tensor], channels: int,
                   bias: Optional[torch.Tensor] = None, name: str) -> None:
        """A stride-2 shortcut from grid stream ``src`` into grid stream ``dst`` (MaxViT): a 2×2 average pool,
        then the same linear map at every position (a 1×1 conv: ``weight`` ``[C', C]``, or None for the
        identity), into ``dst`` of ``channels`` features. Its ``bias`` is the component ``<name>`` (kind
        ``const``, in the current block)."""
        from ._hier import merge_slots

        if src.grid is None or dst.grid is None:
            raise GraphError(f"pack {self.pack!r}, node {self._name(name)!r}: downsample joins two streams with their "
                             "own grids")
        if src.grid.h % 2 or src.grid.w % 2 or (dst.grid.h, dst.grid.w) != (src.grid.h // 2, src.grid.w // 2):
            raise GraphError(f"pack {self.pack!r}, node {self._name(name)!r}: a 2×2 pool of the {src.grid.h}×"
                             f"{src.grid.w} grid of {src.name!r} into the {dst.grid.h}×{dst.grid.w} grid of "
                             f"{dst.name!r}; expected even sides halved")
        if weight is not None and tuple(weight.reshape(weight.shape[0], -1).shape) != (int(channels), weight.shape[1]):
            raise GraphError(f"pack {self.pack!r}, node {self._name(name)!r}: weight of shape {tuple(weight.shape)}; "
                             f"expected [{channels}, C] (or [{channels}, C, 1, 1])")
        geo = merge_slots(src.grid.h, src.grid.w)
        self.ops.append(_Op("merge", dst, name=self._name(name), block=self._blk(), module=None,
                            extra={"src": src, "norm": None, "pool": True, "channels": int(channels),
                                   "weight": None if weight is None else weight.reshape(weight.shape[0], -1),
                                   "bias": bias, "geometry": geo,
                                   "cargs": dict(self._cargs(), **({} if self._blk() is None
                                                                   else {"block": self._blk()}))}))

    def conv(self, src: Stream, dst: Stream, conv: torch.nn.Conv2d, *, name: str,
             stage: Optional[int] = None) -> None:
        """A ``Conv2d`` from grid stream ``src`` into grid stream ``dst`` (a stage transition: a strided patch
        embedding, a downsampling conv). Kernel == stride without padding is a patch merging with ``sh·sw``
        slots (token detail as for Swin); any other convolution carries the writes of ``src`` forward through
        its weights (exact, one convolution per live write; no token detail). Its bias is the component
        ``name`` (kind ``const``, ``stage``). A norm before or after it is :meth:`norm` on ``src`` / ``dst``."""
        from ._conv import is_patch_conv, patch_geometry

        if src.grid is None or dst.grid is None:
            raise GraphError(f"pack {self.pack!r}, node {name!r}: conv joins two streams with their own grids")
        patch = is_patch_conv(conv)
        geo = None
        if patch:
            geo = patch_geometry(src.grid.h, src.grid.w, *conv.stride)
            out_hw = geo[2]
        else:
            pad = conv.padding if not isinstance(conv.padding, str) else (
                (0, 0) if conv.padding == "valid" else tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation,
                                                                                             conv.kernel_size)))
            out_hw = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in zip(
                (src.grid.h, src.grid.w), pad, conv.dilation, conv.kernel_size, conv.stride))
        if tuple(out_hw) != (dst.grid.h, dst.grid.w):
            raise GraphError(f"pack {self.pack!r}, node {name!r}: the convolution maps the {src.grid.h}×{src.grid.w} "
                             f"grid of {src.name!r} to {out_hw[0]}×{out_hw[1]}; stream {dst.name!r} declares "
                             f"{dst.grid.h}×{dst.grid.w}")
        self.ops.append(_Op("merge", dst, name=name, module=None,
                            extra={"src": src, "norm": None, "conv": conv, "patch": patch, "geometry": geo,
                                   "cargs": {} if stage is None else {"stage": int(stage)}}))

    def output(self, stream: Stream) -> None:
        """z is the one row of ``stream``."""
        self.out = stream

    # ------------------------------------------------------------------ introspection
    @property
    def num_blocks(self) -> int:
        return sum(1 for op in self.ops if op.kind == "block")


def execute(graph: Graph, images: torch.Tensor, *, start=None, tokens: bool = False, bias: str = "explicit"):
    """Run ``graph.run(images)`` once with hooks and return the exact :class:`vitdecomp.Decomposition` (heads
    split; the core applies ``bias="even"`` and ``heads=False`` afterwards).

    :param bias: ``"explicit"``: constants are components of their own and a norm centres each write by its own
        mean. ``"paper"``: the paper's RepDecompose convention (METHOD.md §1): an attention's output bias goes
        b_O / H to each of its heads; a norm does not centre each write but subtracts the stream's mean, and
        that −γ·μ/σ and its β are split evenly over the leaves present at the norm (the writes flowing through
        it); a class-attention branch's constants (and its norm's centring through the value paths) likewise.
        On grid streams a merge's or downsample's constant (and a merge norm's centring) is split over the leaves
        of the stream it reads, and a post-norm inside a branch over that branch's heads. No ``const``
        components remain. Leaves are counted at head level, also with ``tokens`` (whose parts then put each
        constant's share on the rows where it is written; on a grid stream merged from the leaf's, spread
        evenly over the leaf's positions that merge into each of those rows)."""
    from ._engine import run_graph

    return run_graph(graph, images, start=start, tokens=tokens, bias=bias)


class GraphAdapter(Adapter):
    """An adapter whose family is a description: implement :meth:`describe`; ``decompose`` runs the engine
    (which implements every ``bias`` policy, ``"paper"`` included)."""

    paper_bias = True

    def describe(self, model, images: torch.Tensor) -> Graph:
        """The contribution graph of ``model`` for ``images`` (shapes only; nothing runs yet)."""
        raise NotImplementedError

    def decompose(self, model, images, options):
        graph = self.describe(model, images)
        start = options.start
        if start is not None and (isinstance(start, bool) or not isinstance(start, int)
                                  or not 0 <= start < graph.num_blocks):
            raise InputError(f"start={start!r} is out of range: {type(model).__name__} ({self.name}) has blocks "
                             f"0..{graph.num_blocks - 1}")
        return execute(graph, images, start=start, tokens=options.tokens == "source",
                       bias="paper" if options.bias == "paper" else "explicit")
