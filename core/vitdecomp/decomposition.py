"""The result of a decomposition: leaf contributions with their component records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import attrs
import torch

from ._records import Component, TokenGrid, group_key as _group_key
from .errors import InputError, ReconstructionError

__all__ = ["Decomposition", "TokenDetail", "FactorTokens", "RowTokens", "DenseTokens", "tolerance_for", "relative_error"]

#: Relative reconstruction tolerance by dtype (METHOD.md §1).
_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def tolerance_for(dtype: torch.dtype) -> float:
    """The relative-error tolerance ``check=True`` applies for ``dtype``."""
    return _TOLERANCE.get(dtype, 1e-5)


def _take(x: torch.Tensor, idx: List[int]) -> torch.Tensor:
    """``x[:, idx]`` for a list of component indices, without a blocking host→device copy of the index."""
    from .engine import as_range, index_tensor

    r = as_range(idx)
    if r is not None:  # a view, no index at all
        return x[:, r.start:r.stop]
    return x.index_select(1, index_tensor(idx, x.device))


def relative_error(total: torch.Tensor, reference: torch.Tensor) -> float:
    """max over the batch of ‖total − reference‖ / ‖reference‖ (norms over the feature axis)."""
    num = (total - reference).norm(dim=-1)
    den = reference.norm(dim=-1).clamp_min(torch.finfo(reference.dtype).tiny)
    return float((num / den).max()) if num.numel() else 0.0


class TokenDetail:
    """A lazily materialised token split of one component: ``materialize()`` → ``[B, T, D]``."""

    def materialize(self, num_tokens: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


@attrs.define(eq=False)
class FactorTokens(TokenDetail):
    """``out[b, t] = weight[b, t] · (values[b, t] @ matrix.T)``: an attention head split by source token.

    ``weight`` [B, T] are the attention weights of the readout rows (already scaled by the frozen norm
    factors), ``values`` [B, T, k] the head's values and ``matrix`` [D, k] the head's output projection
    composed with every linear step up to the representation.
    """

    weight: torch.Tensor
    values: torch.Tensor
    matrix: torch.Tensor

    def materialize(self, num_tokens: int) -> torch.Tensor:
        return self.weight.unsqueeze(-1) * (self.values @ self.matrix.T)


@attrs.define(eq=False)
class RowTokens(TokenDetail):
    """A component that writes at a few token positions: ``values`` [B, R, D] at token indices ``rows``."""

    rows: torch.Tensor
    values: torch.Tensor

    def materialize(self, num_tokens: int) -> torch.Tensor:
        B, _, D = self.values.shape
        out = self.values.new_zeros(B, num_tokens, D)
        out.index_add_(1, self.rows.to(self.values.device), self.values)
        return out


@attrs.define(eq=False)
class DenseTokens(TokenDetail):
    """An explicit ``[B, T, D]`` tensor."""

    tokens: torch.Tensor

    def materialize(self, num_tokens: int) -> torch.Tensor:
        return self.tokens


@attrs.define(eq=False)
class _Shifted(TokenDetail):
    """A detail plus a constant share spread evenly over its tokens (the papers' even bias split)."""

    base: Optional[TokenDetail]
    share: torch.Tensor  # [B, D]

    def materialize(self, num_tokens: int) -> torch.Tensor:
        spread = (self.share / num_tokens).unsqueeze(1)
        if self.base is None:
            return spread.expand(-1, num_tokens, -1).clone()
        return self.base.materialize(num_tokens) + spread


@attrs.define(eq=False)
class Decomposition:
    """Leaf contributions of one batch of images.

    ``contributions`` [B, C, D] (batch first) sum over C to ``representation`` [B, D], the model's own
    representation computed in the same pass, up to ``error`` (the maximum relative reconstruction error over
    the batch). ``components`` holds the C :class:`Component` records in forward order.
    """

    contributions: torch.Tensor
    components: tuple
    representation: torch.Tensor
    grid: Optional[TokenGrid] = None
    token_details: Mapping[str, TokenDetail] = attrs.field(factory=dict)
    token_grids: Mapping[str, TokenGrid] = attrs.field(factory=dict)
    meta: dict = attrs.field(factory=dict)
    partial: bool = False
    _error: Optional[float] = attrs.field(init=False, default=None, repr=False)
    _positions: Optional[tuple] = attrs.field(init=False, default=None, repr=False)  # (components, {name: i})

    def __attrs_post_init__(self):
        if self.contributions.ndim != 3:
            raise InputError(f"contributions must be [B, C, D], got shape {tuple(self.contributions.shape)}")
        if self.contributions.shape[1] != len(self.components):
            raise InputError(
                f"{self.contributions.shape[1]} contribution rows but {len(self.components)} component records"
            )

    @property
    def error(self) -> float:
        """max over the batch of ‖Σ_i c_i − z‖ / ‖z‖ (NaN for a partial decomposition). Computed on first access,
        so a GPU pipeline that never asks pays no host synchronisation."""
        if self._error is None:
            self._error = float("nan") if self.partial else relative_error(self.contributions.sum(1), self.representation)
        return self._error

    def error_tensor(self) -> torch.Tensor:
        """The per-image relative errors ``[B]`` as a tensor on the contributions' device (no synchronisation)."""
        num = (self.contributions.sum(1) - self.representation).norm(dim=-1)
        return num / self.representation.norm(dim=-1).clamp_min(torch.finfo(self.representation.dtype).tiny)

    # ------------------------------------------------------------------ basic views
    @property
    def names(self) -> tuple:
        """Component names in forward order."""
        return tuple(c.name for c in self.components)

    @property
    def dtype(self) -> torch.dtype:
        return self.contributions.dtype

    def __len__(self) -> int:
        return len(self.components)

    def index(self, name: str) -> int:
        """Position of component ``name`` along the C axis."""
        pos = self._positions
        if pos is None or pos[0] is not self.components:  # built once per components tuple (was O(C) per call)
            table = {}
            for i, c in enumerate(self.components):
                table.setdefault(c.name, i)
            pos = self._positions = (self.components, table)
        try:
            return pos[1][name]
        except (KeyError, TypeError):  # TypeError: an unhashable name
            raise KeyError(
                f"No component named {name!r}; there are {len(self.components)}, e.g. {list(self.names[:5])}"
            ) from None

    def __getitem__(self, name: str) -> torch.Tensor:
        """The contribution ``[B, D]`` of component ``name``."""
        return self.contributions[:, self.index(name)]

    def total(self) -> torch.Tensor:
        """Σ_i c_i, shape [B, D]."""
        return self.contributions.sum(1)

    def check(self, tol: Optional[float] = None) -> "Decomposition":
        """Raise :class:`ReconstructionError` when ``error`` exceeds ``tol`` (default: by dtype)."""
        tol = tolerance_for(self.dtype) if tol is None else tol
        if self.partial:
            raise ReconstructionError("check() needs a full decomposition; this one was narrowed by select()")
        if not (self.error <= tol):
            raise ReconstructionError(
                f"Reconstruction error {self.error:.3e} exceeds the tolerance {tol:.0e} for {self.dtype} "
                f"(model {self.meta.get('model', '?')}, adapter {self.meta.get('adapter', '?')})"
            )
        return self

    # ------------------------------------------------------------------ tokens
    @property
    def has_tokens(self) -> bool:
        return bool(self.token_details)

    def grid_of(self, name: str) -> TokenGrid:
        """The token grid component ``name``'s token split lives on (``self.grid`` unless the family places
        components on grids of their own, e.g. a hierarchical model's stage resolutions)."""
        return self.token_grids.get(name, self.grid)

    def token_contributions(self, name: str) -> torch.Tensor:
        """Component ``name`` split over tokens: ``[B, T, D]`` summing over T to ``self[name]``.

        Attention heads are split by the token they read from; other components sit at the positions they write.
        A family that places heads at the rows they write instead says so with ``meta["head_tokens"] = "query"``
        (Swin, MaxViT; the conformance kit checks whichever is declared).
        Token order follows ``self.grid``: prefix tokens first, then the h × w patches row-major.
        """
        if not self.token_details:
            raise InputError("This decomposition has no token detail; call decompose(..., tokens='source')")
        self.index(name)
        detail = self.token_details.get(name)
        if detail is None:
            raise KeyError(f"Component {name!r} has no token detail (available for {len(self.token_details)} components)")
        return detail.materialize(self.grid_of(name).num_tokens)

    def spatial_map(self, name: str) -> torch.Tensor:
        """Patch-token part of :meth:`token_contributions` as an image-shaped map ``[B, h, w, D]``.

        The prefix tokens' share (CLS, registers) is left out; ``self.grid`` gives the patch size so the map
        can be drawn over the image.
        """
        tok = self.token_contributions(name)
        g = self.grid_of(name)
        return tok[:, g.num_prefix:].reshape(tok.shape[0], g.h, g.w, tok.shape[-1])

    # ------------------------------------------------------------------ coarsening
    def group(self, level: str = "branch") -> "Decomposition":
        """Sum leaves into coarser components without recomputation.

        ``level``: ``"branch"`` (heads and the attention bias into ``blocks.i.attn``), ``"block"``
        (everything of a block into ``blocks.i``), ``"stage"`` (hierarchical models), ``"kind"``.
        """
        keys = [_group_key(c, level) for c in self.components]
        order: Dict[str, list] = {}
        for i, k in enumerate(keys):
            order.setdefault(k, []).append(i)
        comps, rows, details, grids = [], [], {}, {}
        for key, idx in order.items():
            first = self.components[idx[0]]
            if len(idx) == 1 and key == first.name:
                comp = first
            else:
                kinds = {self.components[i].kind for i in idx}
                if kinds == {"head"} and level != "kind":
                    kind = "attn"  # heads summed into their branch (an attention without an output bias)
                elif len(kinds) == 1:
                    kind = first.kind
                else:
                    kind = {"branch": "attn", "attn": "attn", "block": "block", "stage": "stage"}.get(level, "attn")
                comp = Component(name=key, kind=kind,
                                 block=first.block if level != "stage" else None, stage=first.stage,
                                 branch=first.branch if level == "branch" else None)
            comps.append(comp)
            rows.append(_take(self.contributions, idx).sum(1))
            member_grids = {self.grid_of(self.components[i].name) for i in idx}
            if self.token_details and len(member_grids) == 1 and all(self.components[i].name in self.token_details for i in idx):
                members = [self.token_details[self.components[i].name] for i in idx]
                details[key] = members[0] if len(members) == 1 else _Summed(members)
                if self.grid_of(first.name) != self.grid:
                    grids[key] = self.grid_of(first.name)
        return Decomposition(
            contributions=torch.stack(rows, 1), components=tuple(comps), representation=self.representation,
            grid=self.grid, token_details=details, token_grids=grids, meta={**self.meta, "grouped": level},
            partial=self.partial,
        )

    def select(self, kind=None, names: Optional[Iterable[str]] = None, where: Optional[Callable] = None) -> "Decomposition":
        """Keep only some components (by ``kind`` — a string or tuple — by ``names``, or by a predicate).

        The result is *partial*: its contributions no longer sum to the representation.
        """
        kinds = (kind,) if isinstance(kind, str) else tuple(kind) if kind is not None else None
        wanted = set(names) if names is not None else None
        if wanted is not None:
            missing = wanted - set(self.names)
            if missing:
                raise KeyError(f"Unknown component names: {sorted(missing)[:5]}")
        idx = [
            i for i, c in enumerate(self.components)
            if (kinds is None or c.kind in kinds) and (wanted is None or c.name in wanted) and (where is None or where(c))
        ]
        comps = tuple(self.components[i] for i in idx)
        return Decomposition(
            contributions=_take(self.contributions, idx), components=comps, representation=self.representation,
            grid=self.grid, token_details={c.name: self.token_details[c.name] for c in comps if c.name in self.token_details},
            token_grids={c.name: self.token_grids[c.name] for c in comps if c.name in self.token_grids},
            meta=dict(self.meta), partial=len(idx) != len(self.components) or self.partial,
        )

    # ------------------------------------------------------------------ persistence
    def save(self, path, *, tokens: bool = False) -> None:
        """Write contributions, representation and metadata (safetensors + JSON in the header)."""
        from safetensors.torch import save_file

        tensors = {
            "contributions": self.contributions.detach().cpu().contiguous(),
            "representation": self.representation.detach().cpu().contiguous(),
        }
        if tokens and self.token_details:
            for name in self.token_details:
                tensors[f"tokens/{name}"] = self.token_contributions(name).detach().cpu().contiguous()
        meta = {
            "format": "vitdecomp.decomposition/1",
            "names": list(self.names),
            "components": [attrs.asdict(c) for c in self.components],
            "error": self.error,
            "grid": attrs.asdict(self.grid) if self.grid is not None else None,
            "token_grids": {k: attrs.asdict(v) for k, v in self.token_grids.items()},
            "meta": {k: (v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)) for k, v in self.meta.items()},
        }
        save_file(tensors, str(path), metadata={"vitdecomp": json.dumps(meta)})

    @classmethod
    def load(cls, path) -> "Decomposition":
        """Read a file written by :meth:`save`. A missing, truncated or foreign file (another safetensors file, one
        without vitdecomp metadata) raises :class:`InputError` naming it."""
        from safetensors import safe_open

        from .errors import InputError

        what = "a safetensors file written by Decomposition.save (vitdecomp decompose --out)"
        if not Path(path).is_file():
            raise InputError(f"{path} is not a file; Decomposition.load reads {what}")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("vitdecomp")
                keys = set(f.keys())
                if raw is None or not {"contributions", "representation"} <= keys:
                    raise InputError(f"{path} has no vitdecomp metadata or tensors (it holds {sorted(keys)[:5]}); "
                                     f"Decomposition.load reads {what}")
                meta = json.loads(raw)
                contributions = f.get_tensor("contributions")
                representation = f.get_tensor("representation")
                tokens = {k[len("tokens/"):]: DenseTokens(f.get_tensor(k)) for k in keys if k.startswith("tokens/")}
            grid = TokenGrid(**meta["grid"]) if meta.get("grid") else None
            comps = tuple(Component(**c) for c in meta["components"])
            grids = {k: TokenGrid(**v) for k, v in meta.get("token_grids", {}).items()}
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors, json and attrs raise their own types
            raise InputError(f"{path}: cannot read it ({type(exc).__name__}: {exc}); Decomposition.load reads "
                             f"{what}") from exc
        return cls(contributions=contributions, components=comps, representation=representation, grid=grid,
                   token_details=tokens, token_grids=grids, meta=meta.get("meta", {}))


@attrs.define(eq=False)
class _Summed(TokenDetail):
    parts: Sequence[TokenDetail]

    def materialize(self, num_tokens: int) -> torch.Tensor:
        out = None
        for p in self.parts:
            t = p.materialize(num_tokens)
            out = t if out is None else out + t
        return out
