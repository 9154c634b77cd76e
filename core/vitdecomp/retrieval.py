"""Image retrieval with respect to a property (METHOD.md §6; Balasubramanian et al., NeurIPS 2024, §5
"property-based image retrieval", Figs. 4–5).

**By text.** Rank the components for a property P by their CompAttribute score (``mean_correlation``), keep the
top k as the set S, and score every image by the projection of its summed aligned contributions on a probe text
embedding t ("a beach", "striped pattern"):

    score(x) = ⟨Σ_{i∈S} a_i(x), t⟩ = Σ_{i∈S} c_i(x) · (W_i t) + |S| ⟨b, t⟩ / C

computed as one dot product per component (c_i · W_i t), never materialising the aligned ``[N, C, d]`` tensor.
The baseline is retrieval by the whole aligned representation, ⟨Σ_i a_i(x), t⟩ = ⟨f(x), t⟩.

**By reference image.** Keep the top k components by *specificity* for P (score for P minus the best score for any
other property) and rank candidates by the cosine between the sums of their contributions in the model's own space,
cos(Σ_{i∈S} c_i(ref), Σ_{i∈S} c_i(x)); the baseline is the cosine of the whole representations z.

The paper shows that the property-restricted rankings retrieve images that share the property (colour, pattern,
location, ...) with the query, where the whole representation retrieves images of the same object class.

**Which components may be chosen.** Constants (biases and norm offsets: component kind ``const``, names ending in
``.bias``) and every component whose contribution does not vary over the images (tr Cov(c_i) at round-off level)
are never chosen by score unless ``include_constant=True``: a constant carries no information about any image, and
its score of exactly 0 would otherwise beat every negative score or specificity. The result records the chosen
components' scores and the share of the component variance they carry, Σ_{i∈S} tr Cov(c_i) / Σ_i tr Cov(c_i); when
that share is below :data:`LOW_VARIANCE_SHARE` the result's ``notes`` say so (and a :class:`RetrievalWarning` is
issued), since a ranking made from components that barely vary says little about the property.

Inputs are contribution tensors ``[N, C, D]``, :class:`~vitdecomp.Decomposition` s or
:class:`~vitdecomp.ExtractionCache` s (streamed shard by shard), plus the CompAlign :class:`~vitdecomp.Aligner`;
a tensor of already aligned contributions ``[N, C, d]`` works with ``aligner=None``.
"""

from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple

import attrs
import torch

from .ablation import _resolve_indices, iter_source, source_len, source_names
from .errors import InputError, MismatchError

__all__ = [
    "RetrievalResult", "retrieve_by_text", "retrieve_by_image", "property_scores", "component_projections",
    "top_components", "component_variance", "constant_components", "RetrievalWarning", "LOW_VARIANCE_SHARE",
]

#: A chosen set of components whose share of the component variance Σ_{i∈S} tr Cov(c_i) / Σ_i tr Cov(c_i) is
#: below this is reported as carrying almost no variance.
LOW_VARIANCE_SHARE = 0.01


class RetrievalWarning(UserWarning):
    """The components chosen for a retrieval carry almost no variance over the images."""


@attrs.define(eq=False)
class RetrievalResult:
    """Scores of every image for a query, restricted to ``components`` (``scores``) and with the whole
    representation (``baseline_scores``); ``ids`` name the images (paths or indices)."""

    scores: torch.Tensor  # [N] float64
    baseline_scores: torch.Tensor  # [N] float64
    components: tuple
    query: str
    ids: Optional[list] = None
    excluded: Optional[int] = None  # index of the reference image, left out of the rankings
    component_scores: Optional[tuple] = None  # the score of each chosen component (when chosen by score)
    variance_share: Optional[float] = None  # Σ_{i∈S} tr Cov(c_i) / Σ_i tr Cov(c_i) (when chosen by score)
    skipped: tuple = ()  # constant / zero-variance components that were not eligible
    notes: tuple = ()  # warnings about the selection, in words

    def _order(self, s: torch.Tensor) -> List[int]:
        order = torch.argsort(s, descending=True, stable=True).tolist()
        return [i for i in order if i != self.excluded]

    @property
    def order(self) -> List[int]:
        """Image indices, best first (by the component-restricted score)."""
        return self._order(self.scores)

    @property
    def baseline_order(self) -> List[int]:
        """Image indices, best first, by the whole representation."""
        return self._order(self.baseline_scores)

    def ranked(self, top: Optional[int] = 10, *, baseline: bool = False) -> List[Tuple[object, float]]:
        """``[(id, score), ...]`` best first (ids from ``ids``, else indices)."""
        order = self.baseline_order if baseline else self.order
        s = self.baseline_scores if baseline else self.scores
        order = order if top is None else order[:top]
        return [((self.ids[i] if self.ids is not None else i), float(s[i])) for i in order]

    def selection(self) -> List[Tuple[str, Optional[float]]]:
        """``[(component, its score or None), ...]`` in the order chosen."""
        sc = self.component_scores or (None,) * len(self.components)
        return list(zip(self.components, sc))

    def as_dict(self, top: Optional[int] = 10) -> dict:
        return {"query": self.query, "components": list(self.components),
                "component_scores": None if self.component_scores is None else list(self.component_scores),
                "variance_share": self.variance_share, "skipped": list(self.skipped), "notes": list(self.notes),
                "ranked": [[str(i), s] for i, s in self.ranked(top)],
                "baseline": [[str(i), s] for i, s in self.ranked(top, baseline=True)]}


def constant_components(names: Sequence[str], kinds: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Boolean mask ``[C]`` of the constant components: kind ``const`` when ``kinds`` are known (a
    Decomposition), else by name (``*.bias``, the library's naming of biases and norm offsets)."""
    if kinds is not None:
        return torch.tensor([k == "const" for k in kinds], dtype=torch.bool)
    return torch.tensor([n == "bias" or n.endswith(".bias") for n in names], dtype=torch.bool)


def top_components(scores: torch.Tensor, names: Sequence[str], k: int, *,
                   eligible: Optional[torch.Tensor] = None) -> Tuple[str, ...]:
    """The ``k`` component names with the highest ``scores`` ``[C]``, among the ``eligible`` ones (a boolean
    mask ``[C]``; default: all)."""
    if scores.ndim != 1 or scores.shape[0] != len(names):
        raise MismatchError(f"{tuple(scores.shape)} component scores for {len(names)} components")
    if k < 1:
        raise InputError(f"k must be ≥ 1, got {k}")
    sc = scores.detach().to(torch.float64).cpu()
    order = torch.argsort(sc, descending=True, stable=True)
    if eligible is not None:
        ok = eligible.detach().cpu().to(torch.bool)
        if ok.shape != sc.shape:
            raise MismatchError(f"eligible mask has shape {tuple(ok.shape)}, the scores {tuple(sc.shape)}")
        if not bool(ok.any()):
            raise InputError("no component is eligible: every one is a constant or has no variance over the images "
                             "(pass include_constant=True to allow them)")
        order = order[ok[order]]
    return tuple(names[i] for i in order[:k].tolist())


def _moments_update(state, c: torch.Tensor):
    """Chan et al.'s pairwise merge of per-component (n, mean [C, D], M2 [C], Σ‖c‖² [C]) with one batch."""
    c = c.to(torch.float64)
    nb = c.shape[0]
    mb = c.mean(0)
    m2b = (c - mb).pow(2).sum((0, 2))
    ssb = c.pow(2).sum((0, 2))
    if state is None:
        return nb, mb, m2b, ssb
    n, m, m2, ss = state
    tot = n + nb
    delta = mb - m
    return tot, m + delta * (nb / tot), m2 + m2b + delta.pow(2).sum(1) * (n * nb / tot), ss + ssb


def _variance_from(state, dtype) -> torch.Tensor:
    """tr Cov(c_i) ``[C]`` from the merged moments, 0 where it is round-off of ``dtype`` (see scores._rel_zero)."""
    from .scores import _rel_zero

    n, _, m2, ss = state
    var = m2 / max(n - 1, 1)
    return torch.where(m2 > _rel_zero(dtype) * ss, var, torch.zeros_like(var))


def component_variance(source, *, batch_size: int = 256, device=None) -> torch.Tensor:
    """tr Cov_x(c_i(x)) for every component, ``[C]`` (float64, host), streamed over ``source`` (contributions
    ``[N, C, D]``, a Decomposition or an ExtractionCache); values at the round-off level of the stored dtype are 0.
    """
    state, dtype = None, torch.float32
    for _, c, _ in iter_source(source, batch_size, device=device):
        dtype = c.dtype
        state = _moments_update(state, c)
    if state is None:
        raise InputError("no images to compute component variances over")
    return _variance_from(state, dtype).cpu()


def _kinds(source):
    from .decomposition import Decomposition

    return tuple(c.kind for c in source.components) if isinstance(source, Decomposition) else None


def _eligible(source, names, variance, include_constant: bool) -> Tuple[Optional[torch.Tensor], tuple]:
    """(eligible mask or None, names skipped): constants and zero-variance components are not eligible."""
    if include_constant:
        return None, ()
    bad = constant_components(names, _kinds(source)) | (variance.cpu() <= 0)
    return ~bad, tuple(n for n, b in zip(names, bad.tolist()) if b)


def _notes(chosen_idx, variance, what: str) -> Tuple[float, tuple]:
    total = float(variance.sum())
    share = float(variance[chosen_idx].sum()) / total if total > 0 else 0.0
    notes = ()
    if share < LOW_VARIANCE_SHARE:
        notes = (f"the {len(chosen_idx)} components chosen for {what} carry {100 * share:.2g}% of the components' "
                 f"variance over these images (below {100 * LOW_VARIANCE_SHARE:g}%): the ranking says little about "
                 "the property",)
        warnings.warn(notes[0], RetrievalWarning, stacklevel=3)
    return share, notes


def _names(source, aligner, names) -> tuple:
    got = source_names(source)
    if got is None and names is not None:
        got = tuple(names)
    if got is None and aligner is not None:
        got = tuple(aligner.names)
    if aligner is not None and got is not None and tuple(aligner.names) != tuple(got):
        from .compalign import _first_difference

        raise MismatchError(f"the contributions' components differ from the aligner's ({_first_difference(got, aligner.names)})")
    return got


def component_projections(source, direction: torch.Tensor, *, aligner=None, batch_size: int = 256,
                          device=None) -> torch.Tensor:
    """⟨a_i(x), t⟩ for every image and component, ``[N, C]`` (float64, on the host).

    With an aligner, ⟨c_i W_i + b/C, t⟩ = c_i · (W_i t) + ⟨b, t⟩/C; without one ``source`` holds aligned
    contributions ``[N, C, d]`` (or the model is CLIP and t lives in its space). ``device``: where the products
    run (batches are copied there; default: where the source is); the host reads the result once, at the end.
    """
    return _projections(source, direction, aligner, batch_size, device, False)[0]


def _projections(source, direction, aligner, batch_size, device, with_variance: bool):
    """(projections [N, C], component variance [C] or None): one pass, one read-back to the host."""
    from .engine import to_device

    if aligner is not None:
        aligner.check_source(source)  # a cache or decomposition of other weights: MismatchError
    t = direction.detach().reshape(-1).to(torch.float64).cpu()
    out = []
    U = None
    state, dtype = None, torch.float32
    for _, c, _ in iter_source(source, batch_size, device=device):
        if with_variance:
            state, dtype = _moments_update(state, c), c.dtype
        C, D = c.shape[1], c.shape[2]
        if U is None:
            if aligner is None:
                if D != t.shape[0]:
                    raise MismatchError(
                        f"the text embedding has d = {t.shape[0]} but the contributions have D = {D}; pass the "
                        "model's aligner= (CompAlign) to map them into CLIP space"
                    )
                U, off = t.expand(C, -1), 0.0
            else:
                if aligner.out_dim != t.shape[0]:
                    raise MismatchError(
                        f"the text embedding has d = {t.shape[0]}; the aligner maps into d = {aligner.out_dim} "
                        f"(CLIP model {aligner.clip_model!r}); encode the text with that model"
                    )
                if len(aligner.names) != C or aligner.in_dim != D:
                    raise MismatchError(f"contributions are [N, {C}, {D}]; the aligner expects C = {len(aligner.names)}, "
                                        f"D = {aligner.in_dim}")
                if aligner.weight is None:
                    U = t.expand(C, -1)
                else:
                    U = torch.einsum("cDd,d->cD", aligner.weight.detach().cpu().to(torch.float64), t)
                off = float(aligner.bias.detach().cpu().to(torch.float64) @ t) / C
            U = to_device(U.contiguous(), c.device)
        out.append(torch.einsum("ncD,cD->nc", c.to(torch.float64), U) + off)
    if not with_variance:
        return torch.cat(out).cpu(), None
    both = torch.cat(out + [_variance_from(state, dtype).unsqueeze(0)]).cpu()  # one read-back
    return both[:-1], both[-1]


def property_scores(source, bases, *, aligner=None, batch_size: int = 256, progress: bool = False, device=None):
    """CompAttribute scores streamed over ``source``: a :class:`~vitdecomp.StreamingScores` fed with the aligned
    contributions (read ``.mean_correlation(prop)``, ``.variance_explained(prop)``, ``.scores()``).

    ``bases``: one ``[k, d]`` tensor of text embeddings or ``{property: [k, d]}``. ``device``: where alignment
    and statistics run (batches and a copy of the aligner go there; default: the aligner's device). The
    statistics stay on the device; the host reads them when you ask for scores.
    """
    from tqdm.auto import tqdm

    from .scores import StreamingScores

    if aligner is not None:
        aligner.check_source(source)  # a cache or decomposition of other weights: MismatchError
    if device is not None and aligner is not None:
        aligner = aligner.to(device)
    acc = StreamingScores(bases)
    bar = tqdm(total=source_len(source), desc="scoring components", unit="img", disable=not progress)
    for _, c, _ in iter_source(source, batch_size, device=device):
        a = c.to(torch.float32) if aligner is None else aligner(c)
        acc.update(a)
        bar.update(c.shape[0])
    bar.close()
    return acc


def _ids(source, ids, n):
    if ids is None and hasattr(source, "paths"):
        try:
            ids = source.paths()
        except Exception:  # noqa: BLE001 - a cache built from a dataset object has no paths
            ids = None
    if ids is not None and len(ids) != n:
        raise MismatchError(f"{len(ids)} ids for {n} images")
    return list(ids) if ids is not None else None


def _choose(components, component_scores, all_names, C: int, k: int, hint: str, eligible=None):
    """(chosen names, their indices): the given ``components``, else the top ``k`` eligible by ``component_scores``."""
    if components is not None:
        chosen = tuple(all_names[i] for i in _resolve_indices(list(components), all_names, C))
    elif component_scores is not None:
        chosen = top_components(component_scores, all_names, k, eligible=eligible)
    else:
        raise InputError(f"give component_scores= (e.g. {hint}) or components=")
    return chosen, torch.as_tensor(_resolve_indices(list(chosen), all_names, C))


def _selection_record(component_scores, components, idx, variance, skipped, what):
    """Fields of RetrievalResult describing a selection by score (empty when components were given)."""
    if components is not None or component_scores is None:
        return {}
    sc = component_scores.detach().to(torch.float64).cpu()
    share, notes = _notes(idx, variance, what)
    return {"component_scores": tuple(float(sc[i]) for i in idx.tolist()), "variance_share": share,
            "skipped": skipped, "notes": notes}


def retrieve_by_text(source, text: torch.Tensor, *, aligner=None, component_scores: Optional[torch.Tensor] = None,
                     components: Optional[Sequence[str]] = None, k: int = 10, names: Optional[Sequence[str]] = None,
                     ids: Optional[Sequence] = None, query: str = "", batch_size: int = 256,
                     include_constant: bool = False, device=None) -> RetrievalResult:
    """Rank images by ⟨Σ_{i∈S} a_i(x), t⟩, S the top ``k`` components by ``component_scores`` (e.g. the
    CompAttribute scores for a property: ``property_scores(...).mean_correlation(prop)``) or the given
    ``components``; the baseline ranks by ⟨Σ_i a_i(x), t⟩.

    :param source: contributions ``[N, C, D]``, a Decomposition or an ExtractionCache (with ``aligner``), or aligned
        contributions ``[N, C, d]`` (``aligner=None``).
    :param text: the probe text embedding ``[d]`` (:meth:`vitdecomp.TextEncoder.encode`).
    :param include_constant: let constants and zero-variance components be chosen by score (see the module
        docstring); components named in ``components`` are always used as given.
    :param device: where the projections run (see :func:`component_projections`).
    """
    all_names = _names(source, aligner, names)
    by_score = components is None and component_scores is not None
    P, var = _projections(source, text, aligner, batch_size, device, by_score)
    C = P.shape[1]
    if all_names is None:
        all_names = tuple(str(i) for i in range(C))
    eligible, skipped = _eligible(source, all_names, var, include_constant) if by_score else (None, ())
    chosen, idx = _choose(components, component_scores, all_names, C, k, "CompAttribute scores for the property",
                          eligible)
    sel = _selection_record(component_scores, components, idx, var, skipped, query or "the text")
    return RetrievalResult(scores=P[:, idx].sum(1), baseline_scores=P.sum(1), components=chosen, query=query,
                           ids=_ids(source, ids, P.shape[0]), **sel)


def _reference(source, reference, batch_size):
    """(contributions [C, D] float64, index in source or None)."""
    from .decomposition import Decomposition

    if isinstance(reference, Decomposition):
        if reference.contributions.shape[0] != 1:
            raise InputError(f"the reference Decomposition holds {reference.contributions.shape[0]} images; give one")
        return reference.contributions[0].to(torch.float64).cpu(), None
    if isinstance(reference, torch.Tensor):
        r = reference[0] if reference.ndim == 3 and reference.shape[0] == 1 else reference
        if r.ndim != 2:
            raise InputError(f"a reference given as a tensor must be contributions [C, D], got {tuple(reference.shape)}")
        return r.to(torch.float64).cpu(), None
    if isinstance(reference, int):
        n = source_len(source)
        if not -n <= reference < n:
            raise InputError(f"reference index {reference} is out of range for {n} images")
        reference %= n
        if hasattr(source, "contributions") and callable(getattr(source, "contributions")):  # ExtractionCache
            return source.contributions([reference])[0].to(torch.float64), reference
        for ind, c, _ in iter_source(source, batch_size):
            hit = (ind == reference).nonzero()
            if hit.numel():
                return c[int(hit[0, 0])].to(torch.float64).cpu(), reference
    raise InputError(f"reference must be an image index, contributions [C, D] or a one-image Decomposition; got "
                     f"{type(reference).__name__}")


def retrieve_by_image(source, reference, *, component_scores: Optional[torch.Tensor] = None,
                      components: Optional[Sequence[str]] = None, k: int = 10, names: Optional[Sequence[str]] = None,
                      ids: Optional[Sequence] = None, exclude_reference: bool = True, query: str = "",
                      batch_size: int = 256, include_constant: bool = False, device=None) -> RetrievalResult:
    """Rank images by cos(Σ_{i∈S} c_i(ref), Σ_{i∈S} c_i(x)), S the top ``k`` components by ``component_scores``
    (the paper: specificity for the property, :func:`vitdecomp.specificity`) or the given ``components``; the
    baseline uses the whole representation.

    :param reference: an index into ``source`` (left out of the ranking with ``exclude_reference``), contributions
        ``[C, D]`` of an outside image, or a one-image Decomposition.
    :param include_constant: let constants and zero-variance components be chosen by score (see the module
        docstring; selecting by score costs one more pass over ``source`` for the variances).
    :param device: where the similarities run (batches are copied there; scores come back to the host once).
    """
    all_names = source_names(source) or (tuple(names) if names is not None else None)
    ref, ref_index = _reference(source, reference, batch_size)
    C = ref.shape[0]
    if all_names is None:
        all_names = tuple(str(i) for i in range(C))
    if len(all_names) != C:
        raise MismatchError(f"the reference has {C} components, the candidates {len(all_names)}")
    by_score = components is None and component_scores is not None
    var = component_variance(source, batch_size=batch_size, device=device) if by_score else None
    eligible, skipped = _eligible(source, all_names, var, include_constant) if by_score else (None, ())
    chosen, idx = _choose(components, component_scores, all_names, C, k, "specificity for the property", eligible)
    record = _selection_record(component_scores, components, idx, var, skipped, query or "the reference")
    r_sel, r_all = ref[idx].sum(0), ref.sum(0)
    sel, base = [], []
    idx_dev = None
    for _, c, z in iter_source(source, batch_size, device=device):
        if c.shape[1] != C:
            raise MismatchError(f"candidates have {c.shape[1]} components, the reference {C}")
        if idx_dev is None:  # once: the reference and the chosen indices on the batches' device
            from .engine import to_device

            idx_dev, r_sel, r_all = (to_device(t, c.device) for t in (idx, r_sel, r_all))
        c = c.to(torch.float64)
        sel.append(torch.nn.functional.cosine_similarity(c.index_select(1, idx_dev).sum(1), r_sel.unsqueeze(0), dim=-1))
        base.append(torch.nn.functional.cosine_similarity(c.sum(1), r_all.unsqueeze(0), dim=-1))
    scores = torch.cat(sel).cpu()
    return RetrievalResult(scores=scores, baseline_scores=torch.cat(base).cpu(), components=chosen, query=query,
                           ids=_ids(source, ids, scores.shape[0]),
                           excluded=ref_index if exclude_reference else None, **record)
