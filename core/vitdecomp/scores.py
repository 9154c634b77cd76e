"""CompAttribute: score components for a property (Balasubramanian et al., NeurIPS 2024, §3.3; METHOD.md §4).

With aligned contributions a_i(x) = c_i(x) W_i ∈ R^d, their sum s(x) = Σ_i a_i(x), and an orthonormal basis
b_1..b_k of the span of a property's text embeddings (QR of the embeddings, done here):

- **variance attributed** (the paper's score)::

      score_i(P) = (1/k) Σ_j corr_x( ⟨a_i(x), b_j⟩ , ⟨s(x), b_j⟩ )          (Pearson correlation over images)

- **variance explained**::

      VE_i(P) = tr Cov(B_P a_i) / tr Cov(a_i)      (share of the component's variance inside span(T_P))

- **specificity**::

      spec_i(P) = score_i(P) − max(0, max_{P' ≠ P} score_i(P'))

A component with no variance along b_j contributes a correlation of 0 for that direction (the correlation is
undefined there); a component with no variance has VE 0. "No variance" means below the round-off of the input
dtype: a sum of squared deviations under (8·eps)² times the component's Σ_x ‖a_i(x)‖² (eps of float32 for
float32 inputs). Without this, round-off projections of a component orthogonal to the property would get
arbitrary correlations.

:class:`StreamingScores` accumulates the same statistics batch by batch in float64 (memory independent of the
number of images, Chan et al.'s pairwise update so that it is as accurate as the two-pass batch functions) and can
:meth:`~StreamingScores.merge` accumulators computed by separate processes.
"""

from __future__ import annotations

import json
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import attrs
import torch

from .errors import EmptyDatasetError, InputError, MismatchError, UnknownPropertyError

__all__ = [
    "orthonormal_basis",
    "variance_attributed",
    "variance_explained",
    "score_properties",
    "specificity",
    "rank_components",
    "StreamingScores",
]


def orthonormal_basis(texts: torch.Tensor, *, tol: float = 1e-8) -> torch.Tensor:
    """An orthonormal basis ``[k', d]`` (float64) of the row span of ``texts`` ``[k, d]`` (QR).

    Directions that are linearly dependent on earlier rows (|R_jj| ≤ tol·max|R|) are dropped, so k' ≤ k.
    """
    if texts.ndim != 2:
        raise InputError(f"basis must be a [k, d] matrix of text embeddings, got shape {tuple(texts.shape)}")
    k, d = texts.shape
    if k == 0:
        raise InputError("basis is empty (k = 0 text embeddings)")
    if k > d:
        raise InputError(f"basis has {k} directions in d = {d} dimensions; at most d are independent")
    finite = torch.isfinite(texts.detach().cpu()).all(1)
    if not bool(finite.all()):
        raise InputError(f"basis row {int(torch.nonzero(~finite)[0])} (a text embedding) has NaN or Inf")
    q, r = torch.linalg.qr(texts.detach().cpu().to(torch.float64).T)  # q [d, k]
    sign = torch.where(r.diagonal() < 0, -1.0, 1.0).to(q.dtype)
    q = q * sign  # the unique QR with a positive diagonal: orthonormal_basis(orthonormal_basis(x)) == it
    diag = r.diagonal().abs()
    keep = diag > tol * diag.max().clamp_min(torch.finfo(torch.float64).tiny)
    return q[:, keep].T.contiguous()


def _prepare(aligned: torch.Tensor, basis: torch.Tensor, fn: str):
    """(orthonormal basis ``[k, d]``, aligned contributions in float64) after the checks both batch scores share."""
    q = orthonormal_basis(basis)
    _check_aligned(aligned, q.shape[1])
    n = aligned.shape[0]
    if n < 2:
        raise EmptyDatasetError(f"{fn} needs at least 2 images, got {n}")
    if aligned.device.type == "cpu":  # elsewhere the check would make the host wait
        bad = ~torch.isfinite(aligned).flatten(1).all(1)
        if bool(bad.any()):
            raise InputError(f"{fn}: image {int(torch.nonzero(bad)[0])} has NaN or Inf in its aligned contributions")
    return q, aligned.to(torch.float64)


def _check_aligned(aligned: torch.Tensor, basis_dim: Optional[int] = None) -> None:
    if aligned.ndim != 3:
        raise InputError(f"aligned contributions must be [N, C, d], got shape {tuple(aligned.shape)}")
    if basis_dim is not None and aligned.shape[-1] != basis_dim:
        raise MismatchError(
            f"aligned contributions have d = {aligned.shape[-1]} but the text basis has d = {basis_dim}; "
            "align the components into the CLIP space the texts were encoded in (fit_aligner)"
        )


def _rel_zero(dtype: torch.dtype) -> float:
    """A projection whose sum of squared deviations is below this fraction of Σ_x ‖v(x)‖² (the raw second moment
    of the vector it was projected from) is round-off of the input dtype, i.e. no variance: (8 eps)²."""
    return (8 * torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps) ** 2


def _corr(cov, var_x, var_y, ss_x, ss_y, rel):
    """cov / sqrt(var_x var_y), 0 where either side has no variance (``ss_*``: Σ_x ‖v(x)‖², the round-off scale)."""
    ok = (var_x > rel * ss_x) & (var_x > 0) & (var_y > rel * ss_y) & (var_y > 0)
    den = (var_x * var_y).sqrt().clamp_min(torch.finfo(var_x.dtype).tiny)
    return torch.where(ok, cov / den, torch.zeros_like(cov))


def variance_attributed(aligned: torch.Tensor, basis: torch.Tensor, *, total: Optional[torch.Tensor] = None) -> torch.Tensor:
    """score_i(P) = (1/k) Σ_j corr_x(⟨a_i, b_j⟩, ⟨s, b_j⟩) for every component i, shape ``[C]`` (float64).

    ``aligned`` ``[N, C, d]``; ``basis`` ``[k, d]`` text embeddings of the property (orthonormalised here by QR);
    ``total`` ``[N, d]`` is s(x), by default Σ_i a_i over the given components (pass the full sum when ``aligned``
    holds only some components).
    """
    q, a = _prepare(aligned, basis, "variance_attributed")
    s = a.sum(1) if total is None else total.to(torch.float64)
    p = torch.einsum("ncd,kd->nck", a, q)
    ps = s @ q.T  # [N, k]
    ss_a, ss_s = a.pow(2).sum((0, 2)).unsqueeze(1), s.pow(2).sum()
    p = p - p.mean(0)
    ps = ps - ps.mean(0)
    cov = torch.einsum("nck,nk->ck", p, ps)
    rel = _rel_zero(aligned.dtype)
    return _corr(cov, (p * p).sum(0), (ps * ps).sum(0).unsqueeze(0), ss_a, ss_s, rel).mean(1)


def variance_explained(aligned: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """VE_i(P) = tr Cov(B_P a_i) / tr Cov(a_i) for every component i, shape ``[C]`` (float64, in [0, 1])."""
    q, a = _prepare(aligned, basis, "variance_explained")
    ss = a.pow(2).sum((0, 2))
    a = a - a.mean(0)
    inside = torch.einsum("ncd,kd->nck", a, q).pow(2).sum((0, 2))
    whole = a.pow(2).sum((0, 2))
    return _ratio(inside, whole, ss, _rel_zero(aligned.dtype))


def _ratio(inside, whole, ss, rel):
    ok = (whole > rel * ss) & (whole > 0)
    return torch.where(ok, inside / whole.clamp_min(torch.finfo(whole.dtype).tiny), torch.zeros_like(whole))


def score_properties(aligned: torch.Tensor, bases: Mapping[str, torch.Tensor], *,
                     total: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """:func:`variance_attributed` for several properties: ``{name: [C]}``."""
    return {name: variance_attributed(aligned, b, total=total) for name, b in bases.items()}


def specificity(scores_by_property: Mapping[str, torch.Tensor], prop: str) -> torch.Tensor:
    """spec_i(P) = score_i(P) − max(0, max_{P'≠P} score_i(P')), shape ``[C]``.

    With a single property the second term is 0 and the specificity equals the score.
    """
    if prop not in scores_by_property:
        raise UnknownPropertyError(
            f"specificity: no scores for property {prop!r}; scores were given for {sorted(scores_by_property)}"
        )
    own = scores_by_property[prop]
    others = []
    for name, sc in scores_by_property.items():
        if sc.shape != own.shape:
            raise MismatchError(
                f"specificity: scores of {name!r} have shape {tuple(sc.shape)}, those of {prop!r} {tuple(own.shape)}"
            )
        if name != prop:
            others.append(sc.to(own.dtype))
    if not others:
        return own.clone()
    return own - torch.stack(others).amax(0).clamp_min(0)


def rank_components(scores: torch.Tensor, names: Sequence[str], *, top: Optional[int] = None,
                    descending: bool = True) -> List[Tuple[str, float]]:
    """``[(name, score), ...]`` sorted by score (highest first by default), the ``top`` first if given."""
    if scores.ndim != 1 or scores.shape[0] != len(names):
        raise MismatchError(f"rank_components: {tuple(scores.shape)} scores for {len(names)} component names")
    order = torch.argsort(scores.detach().to(torch.float64).cpu(), descending=descending, stable=True)
    if top is not None:
        order = order[:top]
    return [(names[i], float(scores[i])) for i in order.tolist()]


# ---------------------------------------------------------------------------------------------------- streaming


def _merge_moments(n_a, n_b, mean_a, mean_b):
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), delta, n_a * n_b / n


def _to_bases(bases) -> Dict[str, torch.Tensor]:
    if isinstance(bases, torch.Tensor):
        bases = {"property": bases}
    if not isinstance(bases, Mapping) or not bases:
        raise InputError("StreamingScores needs a [k, d] basis or a non-empty mapping {property: [k, d] basis}")
    ortho = {str(name): orthonormal_basis(b) for name, b in bases.items()}
    dims = {b.shape[1] for b in ortho.values()}
    if len(dims) != 1:
        raise MismatchError(f"property bases live in different dimensions: { {n: b.shape[1] for n, b in ortho.items()} }")
    return ortho


@attrs.define(eq=False)
class StreamingScores:
    """Accumulate CompAttribute statistics over batches; memory O(C·(d + K)), independent of N.

    ``StreamingScores(basis)`` for one ``[k, d]`` basis (stored under the name ``"property"``) or
    ``StreamingScores({property: [k, d], ...})``. Feed batches of aligned contributions with :meth:`update`; read
    :meth:`variance_attributed`, :meth:`variance_explained` or :meth:`scores` at any time. Results equal the batch
    functions on the concatenated data up to float64 round-off. Accumulators built with the same bases (in
    different processes, say) combine with :meth:`merge`, and persist with :meth:`save` / :meth:`load`.
    """

    bases: Dict[str, torch.Tensor] = attrs.field(converter=_to_bases)  # orthonormal, float64, [k, d]
    n: int = attrs.field(init=False, default=0)
    _C: Optional[int] = attrs.field(init=False, default=None)
    _q: torch.Tensor = attrs.field(init=False)  # [d, K]: all bases side by side
    _slices: Dict[str, slice] = attrs.field(init=False, factory=dict)
    _stats: Dict[str, torch.Tensor] = attrs.field(init=False, factory=dict)
    _updates: int = attrs.field(init=False, default=0)  # batches fed so far (for naming a bad one)
    _bad: Optional[torch.Tensor] = attrs.field(init=False, default=None)  # device-side: first non-finite batch/row

    def __attrs_post_init__(self):
        self._q = torch.cat(list(self.bases.values()), 0).T.contiguous()
        start = 0
        for name, b in self.bases.items():
            self._slices[name] = slice(start, start + b.shape[0])
            start += b.shape[0]

    @property
    def dim(self) -> int:
        return self._q.shape[0]

    def _batch_stats(self, aligned: torch.Tensor, total: Optional[torch.Tensor]):
        a = aligned.to(torch.float64)
        s = a.sum(1) if total is None else total.to(torch.float64)
        if self._q.device != a.device:  # once: the bases move to the batches' device (staged, no stream sync)
            from .engine import to_device

            self._q = to_device(self._q, a.device)
        p = torch.einsum("ncd,dk->nck", a, self._q)
        ps = s @ self._q
        mean_p, mean_ps, mean_a = p.mean(0), ps.mean(0), a.mean(0)
        pc, psc = p - mean_p, ps - mean_ps
        return {
            "mean_p": mean_p, "mean_ps": mean_ps, "mean_a": mean_a,
            "m2_p": (pc * pc).sum(0), "m2_ps": (psc * psc).sum(0),
            "c_p_ps": torch.einsum("nck,nk->ck", pc, psc),
            "m2_a": (a - mean_a).pow(2).sum((0, 2)),
            "ss_a": a.pow(2).sum((0, 2)), "ss_s": s.pow(2).sum().reshape(1),
            "rel": torch.full((1,), _rel_zero(aligned.dtype), dtype=torch.float64, device=a.device),
        }

    def _combine(self, n_b: int, b: Dict[str, torch.Tensor]) -> None:
        # statistics stay on the device of the first batch (no per-batch copies to the host); results are read
        # back to the host by the accessors
        if self.n == 0:
            self.n, self._stats = n_b, dict(b)
            return
        a = self._stats
        dev = a["rel"].device
        b = {k: v.to(dev, non_blocking=True) for k, v in b.items()}
        n, mean_p, dp, w = _merge_moments(self.n, n_b, a["mean_p"], b["mean_p"])
        _, mean_ps, dps, _ = _merge_moments(self.n, n_b, a["mean_ps"], b["mean_ps"])
        _, mean_a, da, _ = _merge_moments(self.n, n_b, a["mean_a"], b["mean_a"])
        self._stats = {
            "mean_p": mean_p, "mean_ps": mean_ps, "mean_a": mean_a,
            "m2_p": a["m2_p"] + b["m2_p"] + dp * dp * w,
            "m2_ps": a["m2_ps"] + b["m2_ps"] + dps * dps * w,
            "c_p_ps": a["c_p_ps"] + b["c_p_ps"] + dp * dps.unsqueeze(0) * w,
            "m2_a": a["m2_a"] + b["m2_a"] + da.pow(2).sum(1) * w,
            "ss_a": a["ss_a"] + b["ss_a"], "ss_s": a["ss_s"] + b["ss_s"],
            "rel": torch.maximum(a["rel"], b["rel"]),
        }
        self.n = n

    def update(self, aligned: torch.Tensor, *, total: Optional[torch.Tensor] = None) -> "StreamingScores":
        """Add a batch ``[B, C, d]`` of aligned contributions (``total`` ``[B, d]``: s(x), default Σ_i a_i)."""
        _check_aligned(aligned, self.dim)
        if self._C is None:
            self._C = aligned.shape[1]
        elif aligned.shape[1] != self._C:
            raise MismatchError(f"batch has {aligned.shape[1]} components; earlier batches had {self._C}")
        if total is not None and tuple(total.shape) != (aligned.shape[0], aligned.shape[2]):
            raise InputError(f"total must be [B, d] = {(aligned.shape[0], aligned.shape[2])}, got {tuple(total.shape)}")
        if aligned.shape[0] == 0:
            return self
        self._check_finite(aligned, total)
        self._combine(aligned.shape[0], self._batch_stats(aligned, total))
        self._updates += 1
        return self

    _NO_BAD = 2 ** 62

    def _check_finite(self, aligned: torch.Tensor, total: Optional[torch.Tensor]) -> None:
        """NaN or Inf in a batch would turn every score into nonsense: on the CPU raise now, naming the batch and
        the image; on an accelerator record the first bad one on the device (no synchronisation) and raise when
        results are read."""
        bad = ~torch.isfinite(aligned).flatten(1).all(1)
        if total is not None:
            bad = bad | ~torch.isfinite(total).flatten(1).all(1)
        if aligned.device.type == "cpu":
            if bool(bad.any()):
                self._raise_bad(self._updates, int(torch.nonzero(bad)[0]), self.n)
            return
        row = torch.argmax(bad.to(torch.int64))
        code = torch.where(bad.any(), self._updates * 2 ** 31 + row, torch.full_like(row, self._NO_BAD))
        first_image = torch.full_like(row, self.n) + row
        packed = torch.stack([code, first_image])
        self._bad = packed if self._bad is None else torch.where(self._bad[0] <= code, self._bad, packed)

    @staticmethod
    def _raise_bad(batch: int, row: int, before: int) -> None:
        raise InputError(
            f"StreamingScores.update: batch {batch} (counting from 0), image {row} of that batch (image {before + row} "
            "overall) has NaN or Inf in its aligned contributions (or total); every value must be finite. Check the "
            "cache (ExtractionCache.verify) and the aligner"
        )

    def _raise_if_bad(self) -> None:
        if self._bad is not None:
            code, image = (int(v) for v in self._bad.cpu())
            if code != self._NO_BAD:
                batch, row = divmod(code, 2 ** 31)
                self._raise_bad(batch, row, image - row)

    def merge(self, other: "StreamingScores") -> "StreamingScores":
        """Fold ``other`` (built with the same bases) into this accumulator; returns self."""
        if list(other.bases) != list(self.bases) or not all(
            other.bases[k].shape == self.bases[k].shape
            and torch.allclose(other.bases[k], self.bases[k], rtol=0, atol=1e-12) for k in self.bases
        ):
            raise MismatchError(
                f"cannot merge accumulators built on different property bases ({list(self.bases)} vs {list(other.bases)})"
            )
        other._raise_if_bad()
        if other.n == 0:
            return self
        if self._C is not None and other._C != self._C:
            raise MismatchError(f"cannot merge accumulators over {self._C} and {other._C} components")
        self._C = other._C
        self._combine(other.n, other._stats)
        return self

    def all_reduce(self) -> "StreamingScores":
        """Combine the accumulators of every rank of the torch.distributed process group (each rank having
        updated with its own images), so every rank holds the statistics of all images; a no-op without a
        group. Ranks are merged in rank order, so the result is the same on every rank."""
        from . import distributed as dist

        if not dist.info().active:
            return self
        bad = None if self._bad is None else self._bad.cpu().tolist()
        parts = dist.all_gather_objects(
            (self.n, self._C, {k: v.cpu() for k, v in self._stats.items()} if self.n else None, bad)
        )
        for rank, (*_, b) in enumerate(parts):  # every rank raises together, naming the rank
            if b is not None and b[0] != self._NO_BAD:
                batch, row = divmod(b[0], 2 ** 31)
                raise InputError(f"rank {rank}: batch {batch}, image {row} of that batch (image {b[1]} of that "
                                 "rank) has NaN or Inf in its aligned contributions; every value must be finite")
        parts = [p[:3] for p in parts]
        self.n, self._stats = 0, None
        for n, C, stats in parts:
            if not n:
                continue
            if self._C is not None and C != self._C:
                raise MismatchError(f"ranks accumulated different numbers of components ({self._C} vs {C})")
            self._C = C
            self._combine(n, stats)
        return self

    def _need(self) -> None:
        self._raise_if_bad()
        if self.n < 2:
            raise EmptyDatasetError(f"StreamingScores has seen {self.n} images; at least 2 are needed")

    def _name(self, prop: Optional[str]) -> str:
        if prop is None:
            if len(self.bases) != 1:
                raise InputError(f"several properties accumulated ({list(self.bases)}); name one")
            return next(iter(self.bases))
        if prop not in self.bases:
            raise UnknownPropertyError(f"no basis for property {prop!r}; accumulated: {list(self.bases)}")
        return prop

    def variance_attributed(self, prop: Optional[str] = None) -> torch.Tensor:
        """Same as :func:`variance_attributed` over every image seen, shape ``[C]``."""
        self._need()
        sl = self._slices[self._name(prop)]
        st = self._host_stats()
        return _corr(st["c_p_ps"][:, sl], st["m2_p"][:, sl], st["m2_ps"][sl].unsqueeze(0), st["ss_a"].unsqueeze(1),
                     st["ss_s"], st["rel"]).mean(1)

    def variance_explained(self, prop: Optional[str] = None) -> torch.Tensor:
        """Same as :func:`variance_explained` over every image seen, shape ``[C]``."""
        self._need()
        sl = self._slices[self._name(prop)]
        st = self._host_stats()
        inside, whole = st["m2_p"][:, sl].sum(1), st["m2_a"]
        return _ratio(inside, whole, st["ss_a"], st["rel"])

    def _host_stats(self) -> Dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self._stats.items()}

    def scores(self) -> Dict[str, torch.Tensor]:
        """``{property: variance attributed [C]}`` for every accumulated property."""
        return {name: self.variance_attributed(name) for name in self.bases}

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Write the accumulator (safetensors; bases and statistics) so another process can :meth:`merge` it."""
        from safetensors.torch import save_file

        self._raise_if_bad()
        tensors = {f"basis/{k}": v.contiguous() for k, v in self.bases.items()}
        tensors.update({f"stat/{k}": v.contiguous() for k, v in self._host_stats().items()})
        meta = {"format": "vitdecomp.streaming_scores/1", "n": self.n, "C": self._C, "order": list(self.bases)}
        save_file(tensors, str(path), metadata={"vitdecomp": json.dumps(meta)})

    @classmethod
    def load(cls, path) -> "StreamingScores":
        """Read an accumulator written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("vitdecomp", "{}"))
            if meta.get("format") != "vitdecomp.streaming_scores/1":
                raise MismatchError(f"{path} is not a vitdecomp StreamingScores file (format {meta.get('format')!r})")
            bases = {k: f.get_tensor(f"basis/{k}") for k in meta["order"]}
            stats = {k[len("stat/"):]: f.get_tensor(k) for k in f.keys() if k.startswith("stat/")}
        self = cls(bases)
        self.n, self._C, self._stats = meta["n"], meta["C"], stats
        return self
