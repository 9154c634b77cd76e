"""The one engine that executes a :class:`~vitdecomp.graph.Graph` (see the package docstring).

Algebra. Once norms and attention weights are frozen at the forward's values, z is linear in every write. The
map from a stream at one point of the tape to z is kept as a list of *terms* ``(w, M)``: per-image row weights
``w [B, R]`` over the stream's rows (pooling weights, 1/σ of frozen norms, attention weights of class-attention
value paths: every batch-dependent factor is a scalar per row) and one batch-independent matrix ``M [D, d]``
(centring and γ of norms, value/output projections, projections; None for the identity). A write ``u`` then
contributes ``Σ_t (Σ_r w_t[b, r] u[b, r]) @ M_t``: rows are pooled before any D×D product, and heads are pooled
in their own ``dh`` before their output projection. The engine walks the tape backwards from z once, turning
each mixer into a transformation of the terms and each write into a contribution.

When a stream's weights are known before the forward (mean pooling without a per-token norm) and no token
detail is asked for, captures are reduced over rows as the hooks fire (memory of one row per write).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

from .._records import Component
from ..decomposition import Decomposition, FactorTokens, RowTokens, TokenDetail, _Summed
from ..engine import HookSet, freeze_norm, index_tensor, is_identity, to_device
from . import GraphError, Stream, _Op

__all__ = ["run_graph"]


class _Rec:
    """What the hooks of one node captured."""

    def __init__(self):
        self.val = self.o = self.attn = self.v = self.q = self.k = self.post = None


class _Term:
    __slots__ = ("w", "ws", "f", "M")

    def __init__(self, w, M, ws=None, f=None):
        self.w, self.M, self.ws, self.f = w, M, ws, f  # ws/f: static row weights × per-image factor (w = f·ws)


class _Placed(TokenDetail):
    """A token detail over a stream's rows placed on the model's grid from token index ``offset``."""

    def __init__(self, base: TokenDetail, offset: int, count: int):
        self.base, self.offset, self.count = base, offset, count

    def materialize(self, num_tokens: int) -> torch.Tensor:
        part = self.base.materialize(self.count)
        out = part.new_zeros(part.shape[0], num_tokens, part.shape[-1])
        out[:, self.offset:self.offset + self.count] = part
        return out


def _mm(A: Optional[torch.Tensor], M: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if A is None:
        return M
    return A if M is None else A @ M


def _apply(u: torch.Tensor, M: Optional[torch.Tensor]) -> torch.Tensor:
    return u if M is None else u @ M


def _norm_matrix(fn, D: int, device, dtype, center: bool = True) -> torch.Tensor:
    """The frozen norm's linear part (centring, γ) as a matrix acting on row vectors (``center=False``: γ only,
    the paper's convention, where the stream's mean is a constant split over the leaves)."""
    A = torch.eye(D, device=device, dtype=dtype)
    if fn.center and center:
        A = A - 1.0 / D
    if fn.weight is not None:
        A = A * fn.weight
    return A


def _where(graph, op) -> str:
    return f"pack {graph.pack!r}, node {op.name or op.kind!r} ({op.kind} on stream {op.stream.name!r})"


# ---------------------------------------------------------------------------------------------- static passes
def _cut(graph, start) -> List[_Op]:
    """The tape with ``start`` applied: the stream block ``start`` reads becomes one ``init`` write there."""
    ops = list(graph.ops)
    if not start:
        return ops
    at = next((i for i, op in enumerate(ops) if op.kind == "block" and op.block == start), None)
    if at is None:
        raise GraphError(f"pack {graph.pack!r}: no block {start} in the graph (start={start})")
    s = ops[at].stream
    dead = {id(s)}  # s and the grid streams merged into it (their writes are inside init)
    for op in reversed(ops[:at]):
        if op.kind == "merge" and id(op.stream) in dead:
            dead.add(id(op.extra["src"]))
    out = []
    for op in ops[:at]:
        touches = id(op.stream) in dead and op.kind in ("entry", "branch", "param", "heads", "norm", "nres", "cattn",
                                                        "merge")
        reads = (op.kind == "pool" and op.stream is s) or (op.kind == "concat" and s in op.extra["reads"]) or (op.kind in ("cattn", "apool") and op.stream is not s
                                                                 and s in op.extra["reads"])
        if reads:
            raise GraphError(f"{_where(graph, op)}: start={start} cuts stream {s.name!r} after this mixer reads it; "
                             "start must be a block after every mixer that reads its stream")
        if not touches:
            out.append(op)
    b = ops[at]
    out.append(_Op("entry", s, name="init", block=b.block, comp_kind="residual", module=b.module, extra=dict(b.extra)))
    return out + ops[at + 1:]


def _analyse(graph, ops):
    """Rows each stream needs, and per write whether its row weights are static (known before the forward)."""
    if graph.out is None:
        raise GraphError(f"pack {graph.pack!r}: the graph has no output; call Graph.output(stream) with the "
                         "one-row stream that is z")
    if graph.out.rows != 1:
        raise GraphError(f"pack {graph.pack!r}: the output stream {graph.out.name!r} has {graph.out.rows} rows; "
                         "expected one row (pool the stream first: Graph.pool)")
    need: Dict[int, set] = {id(graph.out): {0}}
    state: Dict[int, object] = {id(graph.out): ("pool", {0: 1.0})}  # static row weights (known before the forward)
    op_state = {}
    for i in range(len(ops) - 1, -1, -1):
        op = ops[i]
        s = op.stream
        if op.kind == "block":
            continue
        live = id(s) in need
        if op.kind == "pool":
            dst, rows = op.extra["out"], op.extra["rows"]
            bad = [r for r in rows if not 0 <= r < s.rows]
            if bad or len(rows) != len(op.extra["weights"]):
                raise GraphError(f"{_where(graph, op)}: pools rows {bad or rows} with {len(op.extra['weights'])} "
                                 f"weights; expected one weight per row and rows in 0..{s.rows - 1}")
            if id(dst) not in need:
                raise GraphError(f"{_where(graph, op)}: its output stream {dst.name!r} never reaches the readout; "
                                 f"expected it to be the output or read by a later mixer")
            prev = state.get(id(s))
            need.setdefault(id(s), set()).update(rows)
            st = state[id(dst)]
            if prev is None and st != "dynamic":
                w = {}
                for r, wt in zip(rows, op.extra["weights"]):
                    w[r] = w.get(r, 0.0) + wt * st[1][0]
                state[id(s)] = ("pool", w)
            else:
                state[id(s)] = "dynamic"
            continue
        if op.kind == "concat":
            if not live:
                raise GraphError(f"{_where(graph, op)}: its output never reaches the readout")
            st = state[id(s)]
            for r in op.extra["reads"]:
                need.setdefault(id(r), set()).add(0)
                state[id(r)] = ("pool", {0: st[1][0]}) if st != "dynamic" and id(r) not in state else "dynamic"
            continue
        if op.kind == "merge":
            src = op.extra["src"]
            if not live:
                raise GraphError(f"{_where(graph, op)}: stream {s.name!r} never reaches the readout after this merge")
            need[id(src)] = set(range(src.rows))
            state[id(src)] = "dynamic"
            op_state[i] = "dynamic"
            continue
        if op.kind == "apool":
            if not live:
                raise GraphError(f"{_where(graph, op)}: stream {s.name!r} never reaches the readout after this mixer")
            (r,) = op.extra["reads"]
            bad = [m for m in op.extra["rows"] if not 0 <= m < r.rows]
            if bad:
                raise GraphError(f"{_where(graph, op)}: reads rows {bad} of stream {r.name!r}, which has {r.rows}")
            need.setdefault(id(r), set()).update(op.extra["rows"])
            state[id(r)] = "dynamic"
            continue
        if op.kind == "cattn":
            if s.rows != 1:
                raise GraphError(f"{_where(graph, op)}: class attention writes one query row; stream {s.name!r} "
                                 f"has {s.rows}")
            if not live:
                raise GraphError(f"{_where(graph, op)}: stream {s.name!r} never reaches the readout after this mixer")
            for r in op.extra["reads"]:
                need.setdefault(id(r), set()).update(range(r.rows))
                state[id(r)] = "dynamic"
            state[id(s)] = "dynamic"
            continue
        if not live:
            raise GraphError(f"{_where(graph, op)}: stream {s.name!r} never reaches the readout at this point; expected "
                             f"a later mixer (pool, class_attention) connecting it to the output stream {graph.out.name!r}")
        if (op.kind == "norm" and len(need[id(s)]) > 1) or op.kind == "nres":
            state[id(s)] = "dynamic"
        op_state[i] = state.get(id(s))
    rows = {k: sorted(v) for k, v in need.items()}
    return rows, op_state


def _leaves_at(graph, ops) -> Dict[int, list]:
    """``bias="paper"``: per constant-entry node (norm, class attention, merge), the leaves present there — the keys
    ``(op index, head or None)`` of the writes whose value flows through it (its stream's writes so far and those
    of the streams pooled, concatenated or attended into it)."""
    have: Dict[int, dict] = {}
    at: Dict[int, list] = {}
    for i, op in enumerate(ops):
        s = op.stream
        if op.kind in ("entry", "branch", "param"):
            have.setdefault(id(s), {})[(i, None)] = None
        elif op.kind == "heads":
            d = have.setdefault(id(s), {})
            for h in range(op.module.num_heads):
                d[(i, h)] = None
        elif op.kind == "pool":
            have[id(op.extra["out"])] = dict(have.get(id(s), {}))
        elif op.kind == "merge":  # a merge / downsample: its constant enters with the leaves of the stream it reads
            d = dict(have.get(id(op.extra["src"]), {}))
            if not d:
                raise GraphError(f"{_where(graph, op)}: bias='paper' splits its constant over the writes that reach "
                                 "it, and none does")
            have.setdefault(id(s), {}).update(d)
            at[i] = list(d)
        elif op.kind == "concat":
            d = have.setdefault(id(s), {})
            for r in op.extra["reads"]:
                d.update(have.get(id(r), {}))
        elif op.kind in ("norm", "nres", "cattn", "apool"):
            d = have.setdefault(id(s), {})
            if op.kind in ("cattn", "apool"):
                for r in op.extra["reads"]:
                    d.update(have.get(id(r), {}))
            if not d:
                raise GraphError(f"{_where(graph, op)}: bias='paper' splits its constant over the writes that reach "
                                 "it, and none does")
            at[i] = list(d)
        elif op.kind not in ("block", "project"):  # any other linear mixer: its writes flow through it
            if isinstance(op.extra.get("out"), Stream):  # into a new stream
                have[id(op.extra["out"])] = dict(have.get(id(s), {}))
            for r in op.extra.get("reads", ()):  # from other streams into this one
                have.setdefault(id(s), {}).update(have.get(id(r), {}))
    return at


class _Scaled(TokenDetail):
    """A token detail times a number (a constant's even share)."""

    def __init__(self, base: TokenDetail, factor: float):
        self.base, self.factor = base, factor

    def materialize(self, num_tokens: int) -> torch.Tensor:
        return self.base.materialize(num_tokens) * self.factor


# ---------------------------------------------------------------------------------------------- the engine
def run_graph(graph, images: torch.Tensor, *, start=None, tokens: bool = False, bias: str = "explicit") -> Decomposition:
    device, dtype = images.device, images.dtype
    B = images.shape[0]
    ops = _cut(graph, start)
    rows, op_state = _analyse(graph, ops)
    paper = bias == "paper"
    leaves_at = _leaves_at(graph, ops) if paper else {}
    shares: Dict[tuple, list] = {}  # paper: leaf key → [(value [B, d], detail or None)] of constants' even shares

    def share(i, total, detail):
        """Split a constant entering at node ``i`` evenly over the leaves present there (its token detail on
        the grid stream it is added to: ``where``)."""
        keys = leaves_at[i]
        s = ops[i].stream
        where = s if s.grid is not None else (s.spread[0] if s.spread is not None and s.spread[0].grid is not None
                                              else None)
        part = (total / len(keys), None if detail is None else _Scaled(detail, 1.0 / len(keys)), where)
        for key in keys:
            shares.setdefault(key, []).append(part)
    idx = {k: index_tensor(v, device) for k, v in rows.items()}  # no host→device wait
    pos = {k: {r: i for i, r in enumerate(v)} for k, v in rows.items()}

    def static_w(k, st):
        w = torch.zeros(len(rows[k]), dtype=torch.float64)
        for r, wt in st[1].items():
            w[pos[k][r]] += wt
        return to_device(w, device, dtype)

    recs = [_Rec() for _ in ops]
    reducers = {}
    with HookSet() as hooks:
        for i, op in enumerate(ops):
            _install(graph, hooks, op, recs[i], i, rows, idx, op_state, tokens, static_w, reducers)
        z = graph.run(images)
    for op, rec in zip(ops, recs):
        _check_fired(graph, op, rec, tokens)
        if op.kind == "param":
            rec.val = rec.param.to(dtype).expand(B, -1, -1)

    # --------------------------------------------------------------------- backward over the tape
    out = graph.out
    one = torch.ones(B, 1, device=device, dtype=dtype)
    terms: Dict[int, List[_Term]] = {id(out): [_Term(one, None, ws=torch.ones(1, device=device, dtype=dtype),
                                                     f=torch.ones(B, device=device, dtype=dtype))]}
    emitted: List[list] = [[] for _ in ops]

    def grid_rows(s: Stream):
        return index_tensor([s.tokens + r for r in rows[id(s)]], device) if s.tokens is not None else None

    def row_detail(s: Stream, per_row: torch.Tensor) -> Optional[TokenDetail]:
        """Token detail of a write at the stream's rows (``per_row`` [B, R, d])."""
        if s.tokens is not None:
            return RowTokens(rows=grid_rows(s), values=per_row)
        if s.spread is not None and s.spread[0].tokens is not None:
            src, srows = s.spread
            val = per_row.sum(1, keepdim=True) / len(srows)
            return RowTokens(rows=index_tensor([src.tokens + r for r in srows], device),
                             values=val.expand(-1, len(srows), -1))
        return None

    stacks: Dict[int, tuple] = {}  # stream → (W [B, T, R], M [T, D, d]) while its terms do not change

    def stacked(k):
        """A stream's terms stacked, so a write costs a few batched products however many routes reach z."""
        if k not in stacks:
            lst = terms[k]
            W = torch.stack([t.w for t in lst], 1)
            D = next((t.M.shape[0] for t in lst if t.M is not None), None)
            eye = torch.eye(D, device=device, dtype=dtype) if D is not None else None
            stacks[k] = (W, torch.stack([eye if t.M is None else t.M for t in lst], 0))
        return stacks[k]

    def multi(k) -> bool:
        return len(terms[k]) > 1 and any(t.M is not None for t in terms[k])

    def contribute(s: Stream, u: torch.Tensor, reduced: bool):
        """Σ_t (Σ_r w u) @ M for a write ``u`` [B, R, D] (or [B, 1, D] pre-reduced over rows)."""
        total, per_row = None, None
        if multi(id(s)) and not reduced:
            W, Ms = stacked(id(s))
            total = torch.einsum("btd,tde->be", torch.einsum("btr,brd->btd", W, u), Ms)
            if tokens:
                per_row = torch.einsum("btrd,tde->bre", W.unsqueeze(-1) * u.unsqueeze(1), Ms)
            return total, (row_detail(s, per_row) if tokens else None)
        for t in terms[id(s)]:
            pooled = (u[:, 0] * t.f[:, None]) if reduced else torch.einsum("br,brd->bd", t.w, u)
            c = _apply(pooled, t.M)
            total = c if total is None else total + c
            if tokens:
                pr = _apply(t.w.unsqueeze(-1) * u, t.M)
                per_row = pr if per_row is None else per_row + pr
        return total, (row_detail(s, per_row) if tokens else None)

    for i in range(len(ops) - 1, -1, -1):
        op, rec = ops[i], recs[i]
        s = op.stream
        k = id(s)
        if op.kind == "block":
            continue
        if op.kind not in ("entry", "branch", "param", "heads"):
            stacks.clear()  # a mixer changes the terms
        if s.grid is not None and op.kind in ("entry", "branch", "param", "heads", "merge"):
            _grid_op(op, rec, terms, emitted[i], tokens, device, dtype,
                     (lambda total, detail, i=i: share(i, total, detail)) if paper else None)
            continue
        if op.kind == "norm" and s.grid is not None and (
                any(not isinstance(t, _Term) for t in terms.get(k, ()))
                or isinstance(op.module, torch.nn.modules.batchnorm._BatchNorm)):
            from . import _conv  # a norm on a grid stream between its writes and a stage transition

            entry, terms[k] = _conv.norm(op, rec, terms[k], device, dtype, tokens, paper)
            if entry is not None and paper:
                share(i, *entry)
            elif entry is not None:
                emitted[i].append((Component(f"{op.name}.bias", "const"), *entry))
            continue
        if op.kind == "project":
            P = op.value.detach().to(device=device, dtype=dtype)
            for t in terms[k]:
                t.M = _mm(P, t.M)
        elif op.kind == "pool":
            dst = op.extra["out"]
            wp = torch.zeros(len(rows[k]), dtype=torch.float64)
            for r, wt in zip(op.extra["rows"], op.extra["weights"]):
                wp[pos[k][r]] += wt
            wp = to_device(wp, device, dtype)
            lst = terms.setdefault(k, [])
            for t in terms[id(dst)]:
                lst.append(_Term(t.w[:, :1] * wp, t.M, ws=None if t.ws is None else wp * t.ws[0], f=t.f))
        elif op.kind == "concat":
            off = 0
            for r, width in zip(op.extra["reads"], op.extra["widths"]):
                lst = terms.setdefault(id(r), [])
                for t in terms[k]:
                    if t.M is None:
                        E = torch.zeros(width, sum(op.extra["widths"]), device=device, dtype=dtype)
                        E[:, off:off + width] = torch.eye(width, device=device, dtype=dtype)
                    else:
                        E = t.M[off:off + width]
                    lst.append(_Term(t.w, E, ws=t.ws, f=t.f))
                off += width
        elif op.kind == "norm":
            fn = freeze_norm(op.module, rec.val)
            D = rec.val.shape[-1]
            if fn.bias is not None or (paper and fn.center):
                vec = _norm_offsets(fn, rec.val, paper, device, dtype)
                total, per_row = _offset_through(terms[k], vec, tokens)
                detail = row_detail(s, per_row) if tokens else None
                if paper:
                    share(i, total, detail)
                else:
                    emitted[i].append((Component(f"{op.name}.bias", "const"), total, detail))
            A = _norm_matrix(fn, D, device, dtype, center=not paper)
            for t in terms[k]:
                t.w = t.w * fn.inv_scale
                if t.ws is not None:
                    if len(rows[k]) == 1:
                        t.f = t.f * fn.inv_scale[:, 0]
                    else:
                        t.ws = t.f = None
                t.M = _mm(A, t.M)
        elif op.kind == "nres":
            _norm_residual(op, rec, terms[k], emitted[i], tokens, paper, device, dtype, row_detail, s,
                           (lambda total, detail, i=i: share(i, total, detail)) if paper else None)
        elif op.kind == "cattn":
            _class_attention(graph, op, rec, terms, rows, emitted[i], tokens, device, dtype, row_detail,
                             (lambda total, detail, i=i: share(i, total, detail)) if paper else None)
        elif op.kind == "apool":
            from . import _apool

            _apool.backward(op, rec, terms, rows, pos, emitted[i], tokens, device, dtype, row_detail,
                            (lambda total, detail, i=i: share(i, total, detail)) if paper else None)
        elif op.kind in ("entry", "branch", "param"):
            reduced = i in reducers
            total, detail = contribute(s, rec.val, reduced)
            emitted[i].append((Component(op.name, op.comp_kind, block=op.block, **op.extra.get("cargs", {})), total,
                               detail))
        elif op.kind == "heads":
            _heads(graph, op, rec, s, terms[k], emitted[i], tokens, i in reducers, contribute, device, dtype,
                   stacked(k) if multi(k) and i not in reducers else None, paper)

    comps, values, details, grids = [], [], {}, {}
    consts: Dict[str, int] = {}  # constants emitted under one name are one component (Graph.norm_residual)
    for i, (op, lst) in enumerate(zip(ops, emitted)):
        for comp, val, det in lst:
            for sv, sd, where in shares.get((i, comp.head if comp.kind == "head" else None), ()):
                val = sv + val if not isinstance(val, _hier_lazy()) and isinstance(sv, _hier_lazy()) else val + sv
                if sd is not None and where is not None and op.stream.grid is not None and where is not op.stream:
                    sd = _spread_back(graph, ops, op.stream, where, sd, device)
                det = None if det is None or sd is None else _Summed([det, sd])
            if comp.kind == "const" and comp.name in consts and op.stream.grid is None:
                j = consts[comp.name]
                values[j] = values[j] + val
                prev = details.pop(comp.name, None)
                if prev is not None and det is not None:
                    details[comp.name] = _Summed([prev, det])
                continue
            if comp.kind == "const" and op.stream.grid is None:
                consts[comp.name] = len(comps)
            comps.append(comp)
            values.append(val)
            if det is not None:
                details[comp.name] = det
                if op.stream.grid is not None:
                    grids[comp.name] = op.stream.grid
    if any(op.stream.grid is not None for op in ops):
        from ._hier import resolve

        values = resolve(values)  # grid streams queue their writes and carry them to z together
    first = next((op.stream for op in ops if op.kind == "entry"), None)
    grid = first.grid if graph.entry_grid and first is not None and first.grid is not None else graph.grid
    meta = dict(graph.meta)
    sources = {k: v for rec in recs for k, v in (getattr(rec, "sources", None) or {}).items()}
    if sources:
        from ._hier import SourceTokens

        meta["source_tokens"] = SourceTokens(sources)
    if paper:
        left = [c.name for c in comps if c.kind == "const"]
        if left:  # a mixer that adds a constant without splitting it: no silent mix of conventions
            raise GraphError(f"pack {graph.pack!r}: bias='paper' left constants {left}: the nodes writing them do "
                             "not implement the paper's split (see graph._engine: share())")
        meta["bias"] = "paper"
    return Decomposition(contributions=torch.stack(values, 1), components=tuple(comps), representation=z,
                         grid=grid, token_details=details, token_grids=grids, meta=meta)


class _SpreadBack(TokenDetail):
    """A token detail on a coarser grid stream put on a finer one it was merged from: each coarse position's
    value split evenly over the fine positions that merge into it (``parent[p]``: the coarse position of p)."""

    def __init__(self, base: TokenDetail, parent: torch.Tensor, share: torch.Tensor, coarse: int):
        self.base, self.parent, self.share, self.coarse = base, parent, share, coarse

    def materialize(self, num_tokens: int) -> torch.Tensor:
        x = self.base.materialize(self.coarse)
        return x.index_select(1, self.parent) * self.share.to(x.dtype)[None, :, None]


def _spread_back(graph, ops, fine: Stream, coarse: Stream, detail: TokenDetail, device) -> TokenDetail:
    """``bias="paper"`` with token detail: a constant's share written on stream ``coarse`` for a leaf on the
    earlier grid stream ``fine``, placed on the leaf's grid through the merges between them."""
    import numpy as np

    down = {}  # a stream may feed several (a channel concatenation reads it beside a conv of it: NextViT)
    for op in ops:
        if op.kind == "merge" and op.extra.get("geometry") is not None:
            down.setdefault(id(op.extra["src"]), []).append((op.stream, op.extra["geometry"][0]))

    def route(cur, seen):  # the parent maps along one chain of merges from cur to coarse, or None
        if cur is coarse:
            return []
        for nxt, parent in down.get(id(cur), ()):
            if id(nxt) not in seen:
                rest = route(nxt, seen | {id(nxt)})
                if rest is not None:
                    return [parent] + rest
        return None

    chain = route(fine, {id(fine)})
    if chain is None:
        raise GraphError(f"pack {graph.pack!r}: stream {coarse.name!r} is not merged from {fine.name!r}; a "
                         "constant's share cannot be placed on its leaf's grid")
    p = np.arange(fine.rows)
    for parent in chain:
        p = np.where(p >= 0, parent[np.maximum(p, 0)], -1)  # −1: a position the merge never reads (Graph.conv)
    read = p >= 0
    counts = np.bincount(p[read], minlength=coarse.rows)
    share = np.where(read, 1.0 / np.maximum(counts[np.maximum(p, 0)], 1), 0.0)
    return _SpreadBack(detail, to_device(torch.from_numpy(np.maximum(p, 0)), device),
                       to_device(torch.from_numpy(share), device), coarse.rows)


def _hier_lazy():
    from ._hier import Lazy

    return Lazy


def _grid_op(op, rec, terms, emitted, tokens, device, dtype, share=None):
    """A write or a merge on a stream with its own grid (see :mod:`._hier`). ``share`` (``bias="paper"``): takes a
    merge's constant instead of emitting it."""
    from . import _hier

    s = op.stream
    if op.kind == "merge":
        if op.extra.get("map") is not None:  # a fixed linear map recorded in the forward (see _shortcut)
            from . import _shortcut

            entry, new = _shortcut.backward(op, rec, terms[id(s)], device, dtype, tokens)
        elif op.extra.get("select") is not None:  # a channel slice of a concatenation (see _shortcut)
            from . import _shortcut

            entry, new = _shortcut.select_backward(op, rec, terms[id(s)], device, dtype, tokens)
        elif op.extra.get("conv") is not None:
            from . import _conv

            entry, new = _conv.conv(op, rec, terms[id(s)], device, dtype, tokens)
        elif op.extra.get("pool"):
            entry, new = _hier.downsample(op, rec, terms[id(s)], device, dtype, tokens)
        else:
            entry, new = _hier.merge(op, rec, terms[id(s)], device, dtype, tokens, paper=share is not None)
        if entry is not None and share is not None:
            share(entry[1], entry[2])
        elif entry is not None:
            emitted.append(entry)
        terms.setdefault(id(op.extra["src"]), []).extend(new)
        return
    if op.kind == "heads":
        terms[id(s)] = _hier.gterms(terms[id(s)], s, device, op.extra["weight"].shape[0])
        post = rec.post if op.extra.get("post") is not None else None
        _hier.heads(op, rec, terms[id(s)], emitted, tokens, device, dtype, post, paper=share is not None)
        return
    u = rec.val
    tl = _hier.gterms(terms[id(s)], s, device, u.shape[-1])
    terms[id(s)] = tl
    total, detail = _hier.contribute(tl, u, tokens)
    emitted.append((Component(op.name, op.comp_kind, block=op.block, **op.extra.get("cargs", {})), total, detail))


class _StackedFactors(TokenDetail):
    """A head split by source token when several routes reach z: ``Σ_t weight[b, t, n] · (values[b, n] @ M_t.T)``
    with ``weight`` [B, T, N], ``values`` [B, N, k] and ``matrices`` [T, d, k]."""

    def __init__(self, weight, values, matrices):
        self.weight, self.values, self.matrices = weight, values, matrices

    def materialize(self, num_tokens: int) -> torch.Tensor:
        return torch.einsum("btn,bnk,tek->bne", self.weight, self.values, self.matrices)


def _heads(graph, op, rec, s, tlist, emitted, tokens, reduced, contribute, device, dtype, stack=None, paper=False):
    from ._hier import head_weights

    H, Wo, Wg, gamma = head_weights(op, dtype)
    o = rec.o  # [B, H, R, dh]
    heads = None
    if stack is not None:  # several routes: batched over them
        W, Ms = stack
        hd = torch.einsum("bthk,dhk->bthd", torch.einsum("bhrk,btr->bthk", o, W), Wg)
        heads = torch.einsum("bthd,tde->bhe", hd, Ms)
        att = torch.einsum("bhrn,btr->bhtn", rec.attn, W) if tokens else None
    else:
        for t in tlist:
            so = o[:, :, 0] * t.f[:, None, None] if reduced else torch.einsum("bhrk,br->bhk", o, t.w)
            hd = _apply(torch.einsum("bhk,dhk->bhd", so, Wg), t.M)
            heads = hd if heads is None else heads + hd
    for h in range(H):
        detail = None
        if tokens and stack is not None:
            detail = _StackedFactors(att[:, h], rec.v[:, h], torch.einsum("dk,tde->tek", Wg[:, h, :], stack[1]))
        elif tokens:
            parts = []
            for t in tlist:
                att = torch.einsum("bhrn,br->bhn", rec.attn[:, h:h + 1], t.w)[:, 0]
                M = Wg[:, h, :] if t.M is None else (Wg[:, h, :].T @ t.M).T  # [d, dh]
                parts.append(FactorTokens(weight=att, values=rec.v[:, h], matrix=M))
            detail = parts[0] if len(parts) == 1 else _Summed(parts)
        if tokens:
            n = rec.v.shape[2]
            if s.tokens != 0 or n != graph.grid.num_tokens:
                detail = _Placed(detail, s.tokens or 0, n)
        emitted.append((Component(f"{op.name}.head.{h}", "head", block=op.block, head=h), heads[:, h], detail))
    b = op.extra["bias"]
    if b is not None:
        b = b.detach().to(dtype)
        if gamma is not None:
            b = b * gamma
        if reduced:  # Σ_r ws[r] · b, with the static weights folded into the pre-reduced row
            u = (b * rec.wsum).expand(o.shape[0], 1, -1)
        else:
            u = b.expand(o.shape[0], o.shape[2], -1)
        total, detail = contribute(s, u, reduced)
        if paper:  # the paper's convention: b_O stays in its layer, b_O / H to each head
            sd = None if detail is None else _Scaled(detail, 1.0 / H)
            emitted[:] = [(c, v + total / H, None if d is None or sd is None else _Summed([d, sd]))
                          for c, v, d in emitted]
        else:
            emitted.append((Component(f"{op.name}.bias", "const", block=op.block), total, detail))


def _norm_offsets(fn, val, paper: bool, device, dtype) -> list:
    """The constants at a frozen norm's output, as ``(row factor [B, R] or None, vector [1, D])`` pairs: β, and in
    the paper's convention the stream's centring −γ·μ/σ (a per-row factor times γ)."""
    vec = [] if fn.bias is None else [(None, fn.bias.unsqueeze(0))]
    if paper and fn.center:
        D = val.shape[-1]
        g = fn.weight if fn.weight is not None else torch.ones(D, device=device, dtype=dtype)
        vec.append((-val.mean(-1) * fn.inv_scale, g.unsqueeze(0)))
    return vec


def _offset_through(tlist, vec, tokens: bool, scale=None):
    """The constants ``vec`` (:func:`_norm_offsets`, each times ``scale`` when given) carried to z by the terms of
    the stream they enter: the total ``[B, d]`` and, with ``tokens``, its share per row ``[B, R, d]`` (or None)."""
    total, per_row = None, None
    for t in tlist:
        for f, v in vec:
            bm = _apply(v if scale is None else v * scale, t.M)  # [1, d]
            w = t.w if f is None else t.w * f
            c = w.sum(1, keepdim=True) * bm
            total = c if total is None else total + c
            if tokens:
                pr = w.unsqueeze(-1) * bm.unsqueeze(0)
                per_row = pr if per_row is None else per_row + pr
    return total, per_row


def _norm_residual(op, rec, tlist, emitted, tokens, paper, device, dtype, row_detail, s, share=None):
    """``x + γ ⊙ norm(x)`` (:meth:`Graph.norm_residual`): every term gains a twin through the frozen norm's linear
    part times γ; the offset γ ⊙ β (and in the paper's convention the stream's centring) is the constant."""
    fn = freeze_norm(op.module, rec.val)
    D = rec.val.shape[-1]
    g = None if op.gamma is None else op.gamma.detach().to(device=device, dtype=dtype).reshape(-1)
    total, per_row = _offset_through(tlist, _norm_offsets(fn, rec.val, paper, device, dtype), tokens, scale=g)
    A = _norm_matrix(fn, D, device, dtype, center=not paper)
    if g is not None:
        A = A * g
    tlist.extend([_Term(t.w * fn.inv_scale, _mm(A, t.M)) for t in list(tlist)])
    if total is None:  # no offset (a norm without β): nothing to emit
        return
    detail = row_detail(s, per_row) if tokens else None
    if share is not None:
        share(total, detail)
    else:
        emitted.append((Component(f"{op.name}.bias", "const", block=op.block), total, detail))


def _class_attention(graph, op, rec, terms, rows, emitted, tokens, device, dtype, row_detail, share=None):
    """Class attention as a mixer: the query row's update is linear in every read row at frozen σ and A.
    ``share`` (``bias="paper"``): called with the branch's constant instead of emitting it; its norm then does not
    centre each read row, the stream's mean −γ·μ/σ through the value paths joins the constant."""
    s = op.stream
    x = op.extra
    H = x["H"]
    fn = freeze_norm(op.module, rec.val)  # stats of every concatenated row
    D = rec.val.shape[-1]
    q = rec.q.reshape(rec.q.shape[0], H, -1)  # [B, H, dh]
    kk = rec.k.reshape(rec.k.shape[0], rec.k.shape[1], H, -1)  # [B, M, H, dh]
    A = torch.softmax(torch.einsum("bhk,bmhk->bhm", q, kk) * x["scale"], dim=-1)  # [B, H, M]
    Wv = x["v"].weight.detach().to(dtype).view(H, -1, D)  # [H, dh, D]
    Wo = x["proj"].weight.detach().to(dtype).view(D, H, -1)  # [D, H, dh]
    g = None if op.gamma is None else op.gamma.detach().to(dtype)
    An = _norm_matrix(fn, D, device, dtype, center=share is None)
    K = []
    for h in range(H):
        WoT = Wo[:, h, :].T  # [dh, D]
        if g is not None:
            WoT = WoT * g
        K.append(An @ Wv[h].T @ WoT)  # [D, D]: normed row → this head's share of the update
    # constants: Σ_h W_O^h (W_V^h β + b_V^h) + b_O (the attention weights of each head sum to one), then γ
    c = torch.zeros(D, device=device, dtype=dtype)
    bv = x["v"].bias
    for h in range(H):
        vh = torch.zeros(Wv.shape[1], device=device, dtype=dtype)
        if fn.bias is not None:
            vh = vh + Wv[h] @ fn.bias
        if bv is not None:
            vh = vh + bv.detach().to(dtype).view(H, -1)[h]
        c = c + Wo[:, h, :] @ vh
    if x["proj"].bias is not None:
        c = c + x["proj"].bias.detach().to(dtype)
    if g is not None:
        c = c * g
    cen = None
    if share is not None and fn.center:  # Σ_h (Σ_m A_hm μ_m / σ_m) · W_O^h W_V^h γ, subtracted
        gam = fn.weight if fn.weight is not None else torch.ones(D, device=device, dtype=dtype)
        coef = torch.einsum("bhm,bm->bh", A, rec.val.mean(-1) * fn.inv_scale)  # [B, H]
        vecs = torch.stack([(gam @ Wv[h].T) @ Wo[:, h, :].T for h in range(H)], 0)  # [H, D]
        if g is not None:
            vecs = vecs * g
        cen = -coef @ vecs  # [B, D]
    offsets, o = [], 0
    for r in x["reads"]:
        offsets.append(o)
        o += r.rows
    new: Dict[int, list] = {}
    total = None
    for t in terms[id(s)]:
        cm = t.w[:, :1] * _apply(c.unsqueeze(0), t.M)
        if cen is not None:
            cm = cm + t.w[:, :1] * _apply(cen, t.M)
        total = cm if total is None else total + cm
        for h in range(H):
            Mh = _mm(K[h], t.M)
            for r, off in zip(x["reads"], offsets):
                w = t.w[:, :1] * A[:, h, off:off + r.rows] * fn.inv_scale[:, off:off + r.rows]
                new.setdefault(id(r), []).append(_Term(w, Mh))
    for k, lst in new.items():
        terms.setdefault(k, []).extend(lst)
    detail = row_detail(s, total.unsqueeze(1)) if tokens else None
    if share is not None:
        share(total, detail)
    else:
        emitted.append((Component(f"{op.name}.bias", "const", block=op.block), total, detail))


# ---------------------------------------------------------------------------------------------- hooks
def _check_fired(graph, op, rec, tokens):
    if op.kind in ("entry", "branch", "norm", "nres", "cattn"):
        missing = rec.val is None or (op.kind == "cattn" and (rec.q is None or rec.k is None))
    elif op.kind == "heads":
        missing = rec.o is None or (tokens and getattr(op.module, "detail", "source") == "source"
                                    and (rec.attn is None or rec.v is None))
        missing = missing or (op.extra.get("post") is not None and rec.post is None)
    elif op.kind == "merge":
        missing = rec.val is None and not is_identity(op.extra["norm"])
        missing = missing or (op.extra.get("map") is not None and not op.extra["map"].fired(rec))
    elif op.kind == "apool":
        missing = rec.q is None or rec.k is None
    else:
        return
    if missing:
        raise GraphError(f"{_where(graph, op)}: its hooks did not fire during the model's forward; the forward does "
                         "not call the described modules (a different block type or attention implementation?)")


def _take(graph, op, x, s, rows_idx, seq_first):
    if isinstance(x, tuple):
        x = x[0]
    if op.extra.get("nchw") and isinstance(x, torch.Tensor) and x.ndim == 4:  # [B, C, h, w] map
        x = x.flatten(2).transpose(1, 2)
    if s.grid is not None and isinstance(x, torch.Tensor) and x.ndim == 4:  # [B, h, w, D] on the stream's grid
        x = x.flatten(1, 2)
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        raise GraphError(f"{_where(graph, op)}: expected a [B, N, D] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if seq_first:
        x = x.transpose(0, 1)
    if x.shape[1] != s.rows:
        raise GraphError(f"{_where(graph, op)}: the module sees {x.shape[1]} rows; the stream declares {s.rows}")
    if s.grid is not None and rows_idx.numel() == s.rows:  # a grid stream needs every row, in order: no copy
        return x
    return x.index_select(1, rows_idx)


def _install(graph, hooks, op, rec, i, rows, idx, op_state, tokens, static_w, reducers):
    s = op.stream
    if op.kind in ("block", "pool", "concat", "project"):
        return
    k = id(s)
    ri = idx.get(k)
    st = op_state.get(i)
    reduce = None
    if op.kind in ("entry", "branch", "heads") and not tokens and isinstance(st, tuple) and len(rows[k]) > 1 \
            and s.grid is None:
        ws = static_w(k, st)  # pool weights known up front: reduce every capture over rows at once
        reducers[i] = ws
        rec.wsum = ws.sum()

        def reduce(t, ws=ws):  # rows on dim -2
            return (t * ws.view(*([1] * (t.ndim - 2)), -1, 1)).sum(-2, keepdim=True)

    if op.kind == "entry":
        arg = op.extra.get("arg", 0)

        def on_entry(args, kwargs):
            x = args[arg] if len(args) > arg else kwargs.get("hidden_states", kwargs.get("x"))
            v = _take(graph, op, x, s, ri, s.seq_first)
            rec.val = reduce(v) if reduce is not None else v

        hooks.pre_kw(op.module, on_entry)
    elif op.kind == "branch":
        g = op.gamma
        order = None
        if op.extra.get("rows") is not None:  # partition order: the output row each stream position holds
            win = op.extra["rows"]
            inv = np.empty(s.rows, dtype=np.int64)
            inv[win[win >= 0]] = np.nonzero(win >= 0)[0]
            order = (win.size, to_device(torch.from_numpy(inv), ri.device))

        def on_out(out, copy=op.extra.get("copy", False)):
            if order is not None:
                t = out[0] if isinstance(out, tuple) else out
                out = t.reshape(-1, order[0], t.shape[-1]).index_select(1, order[1])
                copy = False  # a new tensor already
            v = _take(graph, op, out, s, ri, s.seq_first)
            if g is not None:
                v = v * g.detach().to(v.dtype)
            elif copy:  # the forward adds into the module's output in place (``x = proj(x); x += s``)
                v = v.clone()
            rec.val = reduce(v) if reduce is not None else v

        hooks.post(op.module, on_out)
    elif op.kind == "param":
        val = op.value.detach()
        val = val.reshape(1, -1, val.shape[-1])
        if val.shape[1] != s.rows:
            raise GraphError(f"{_where(graph, op)}: the parameter has {val.shape[1]} rows; the stream declares {s.rows}")
        rec.param = val.index_select(1, ri)
    elif op.kind == "heads":
        op.module.install(hooks, rec, ri, tokens, reduce)
        if op.extra.get("post") is not None:  # a norm inside the branch, frozen at its input (grid order)
            def on_post(x, m=op.extra["post"]):
                x = x.flatten(1, 2) if x.ndim == 4 else x
                rec.post, rec.post_mu = freeze_norm(m, x), x.mean(-1)

            hooks.pre(op.extra["post"], on_post)
    elif op.kind == "merge":
        def on_merge_norm(x):
            rec.val = x.flatten(1, 2) if x.ndim == 4 else x

        if op.extra["norm"] is not None:
            hooks.pre(op.extra["norm"], on_merge_norm)
        if op.extra.get("map") is not None:  # records what the map needs from the forward (max-pool indices)
            op.extra["map"].install(hooks, rec)
    elif op.kind in ("norm", "nres"):
        at = op.extra["at"]
        sel = index_tensor([at + r for r in rows[k]], ri.device)

        nchw = op.extra.get("nchw", False)

        def on_norm(x):
            if nchw and x.ndim == 4:  # LayerNorm2d: over channels at every position
                x = x.flatten(2).transpose(1, 2)
            if x.ndim == 2:
                x = x.unsqueeze(1)
            elif x.ndim == 4 and s.grid is not None:
                x = x.flatten(1, 2)
            if x.shape[1] < at + s.rows:
                raise GraphError(f"{_where(graph, op)}: the norm sees {x.shape[1]} rows; the stream declares {s.rows} "
                                 f"from row {at}")
            rec.val = x.index_select(1, sel)

        hooks.pre(op.module, on_norm)
    elif op.kind == "apool":
        from . import _apool

        _apool.install(graph, hooks, op, rec, _where(graph, op))
    elif op.kind == "cattn":
        x = op.extra
        n = sum(r.rows for r in x["reads"])

        def on_norm_in(u):
            if u.ndim != 3 or u.shape[1] != n:
                raise GraphError(f"{_where(graph, op)}: its norm sees {tuple(u.shape)}; the streams it reads "
                                 f"({', '.join(r.name for r in x['reads'])}) declare {n} rows")
            rec.val = u

        def on_q(out):
            rec.q = out if out.ndim == 2 else out[:, 0]

        def on_k(out):
            rec.k = out

        hooks.pre(op.module, on_norm_in)
        hooks.post(x["q"], on_q)
        hooks.post(x["k"], on_k)
