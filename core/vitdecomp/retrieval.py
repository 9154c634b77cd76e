"""Image retrieval with respect to a property (METHOD.md §6; Balasubramanian et al., NeurIPS 2024, §5
"property-based image retrieval", Figs. 4–5).

**By text.** Rank the components for a property P by their CompAttribute score (``variance_attributed``), keep the
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

Inputs are contribution tensors ``[N, C, D]``, :class:`~vitdecomp.Decomposition` s or
:class:`~vitdecomp.ExtractionCache` s (streamed shard by shard), plus the CompAlign :class:`~vitdecomp.Aligner`;
a tensor of already aligned contributions ``[N, C, d]`` works with ``aligner=None``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import attrs
import torch

from .ablation import _resolve_indices, iter_source, source_len, source_names
from .errors import InputError, MismatchError

__all__ = [
    "RetrievalResult", "retrieve_by_text", "retrieve_by_image", "property_scores", "component_projections",
    "top_components",
]


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

    def as_dict(self, top: Optional[int] = 10) -> dict:
        return {"query": self.query, "components": list(self.components),
                "ranked": [[str(i), s] for i, s in self.ranked(top)],
                "baseline": [[str(i), s] for i, s in self.ranked(top, baseline=True)]}


def top_components(scores: torch.Tensor, names: Sequence[str], k: int) -> Tuple[str, ...]:
    """The ``k`` component names with the highest ``scores`` ``[C]``."""
    if scores.ndim != 1 or scores.shape[0] != len(names):
        raise MismatchError(f"{tuple(scores.shape)} component scores for {len(names)} components")
    if k < 1:
        raise InputError(f"k must be ≥ 1, got {k}")
    order = torch.argsort(scores.detach().to(torch.float64).cpu(), descending=True, stable=True)[:k]
    return tuple(names[i] for i in order.tolist())


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
    from .engine import to_device

    t = direction.detach().reshape(-1).to(torch.float64).cpu()
    out = []
    U = None
    for _, c, _ in iter_source(source, batch_size, device=device):
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
    return torch.cat(out).cpu()


def property_scores(source, bases, *, aligner=None, batch_size: int = 256, progress: bool = False, device=None):
    """CompAttribute scores streamed over ``source``: a :class:`~vitdecomp.StreamingScores` fed with the aligned
    contributions (read ``.variance_attributed(prop)``, ``.variance_explained(prop)``, ``.scores()``).

    ``bases``: one ``[k, d]`` tensor of text embeddings or ``{property: [k, d]}``. ``device``: where alignment
    and statistics run (batches and a copy of the aligner go there; default: the aligner's device). The
    statistics stay on the device; the host reads them when you ask for scores.
    """
    from tqdm.auto import tqdm

    from .scores import StreamingScores

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


def _choose(components, component_scores, all_names, C: int, k: int, hint: str):
    """(chosen names, their indices): the given ``components``, else the top ``k`` by ``component_scores``."""
    if components is not None:
        chosen = tuple(all_names[i] for i in _resolve_indices(list(components), all_names, C))
    elif component_scores is not None:
        chosen = top_components(component_scores, all_names, k)
    else:
        raise InputError(f"give component_scores= (e.g. {hint}) or components=")
    return chosen, torch.as_tensor(_resolve_indices(list(chosen), all_names, C))


def retrieve_by_text(source, text: torch.Tensor, *, aligner=None, component_scores: Optional[torch.Tensor] = None,
                     components: Optional[Sequence[str]] = None, k: int = 10, names: Optional[Sequence[str]] = None,
                     ids: Optional[Sequence] = None, query: str = "", batch_size: int = 256,
                     device=None) -> RetrievalResult:
    """Rank images by ⟨Σ_{i∈S} a_i(x), t⟩, S the top ``k`` components by ``component_scores`` (e.g. the
    CompAttribute scores for a property: ``property_scores(...).variance_attributed(prop)``) or the given
    ``components``; the baseline ranks by ⟨Σ_i a_i(x), t⟩.

    :param source: contributions ``[N, C, D]``, a Decomposition or an ExtractionCache (with ``aligner``), or aligned
        contributions ``[N, C, d]`` (``aligner=None``).
    :param text: the probe text embedding ``[d]`` (:meth:`vitdecomp.TextEncoder.encode`).
    :param device: where the projections run (see :func:`component_projections`).
    """
    all_names = _names(source, aligner, names)
    P = component_projections(source, text, aligner=aligner, batch_size=batch_size, device=device)
    C = P.shape[1]
    if all_names is None:
        all_names = tuple(str(i) for i in range(C))
    chosen, idx = _choose(components, component_scores, all_names, C, k, "CompAttribute scores for the property")
    return RetrievalResult(scores=P[:, idx].sum(1), baseline_scores=P.sum(1), components=chosen, query=query,
                           ids=_ids(source, ids, P.shape[0]))


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
                      batch_size: int = 256, device=None) -> RetrievalResult:
    """Rank images by cos(Σ_{i∈S} c_i(ref), Σ_{i∈S} c_i(x)), S the top ``k`` components by ``component_scores``
    (the paper: specificity for the property, :func:`vitdecomp.specificity`) or the given ``components``; the
    baseline uses the whole representation.

    :param reference: an index into ``source`` (left out of the ranking with ``exclude_reference``), contributions
        ``[C, D]`` of an outside image, or a one-image Decomposition.
    :param device: where the similarities run (batches are copied there; scores come back to the host once).
    """
    all_names = source_names(source) or (tuple(names) if names is not None else None)
    ref, ref_index = _reference(source, reference, batch_size)
    C = ref.shape[0]
    if all_names is None:
        all_names = tuple(str(i) for i in range(C))
    if len(all_names) != C:
        raise MismatchError(f"the reference has {C} components, the candidates {len(all_names)}")
    chosen, idx = _choose(components, component_scores, all_names, C, k, "specificity for the property")
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
                           excluded=ref_index if exclude_reference else None)
