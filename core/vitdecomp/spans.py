"""TextSpan: describe one component's output space with texts (Gandelsman et al., ICLR 2024, Alg. 1; METHOD.md §5).

Inputs: X ∈ R^{N×d}, one component's aligned outputs over N images; a pool of P text embeddings T ∈ R^{P×d};
m iterations; rank r.

1. Keep the top-r right singular vectors V_r of X and project every text onto their span: t ← V_r V_rᵀ t.
2. Centre X.
3. m times: pick the text t* whose projections ⟨X, t⟩ have the largest standard deviation over images; record it
   with the share of the (centred) variance its direction explains, ‖X t̂*‖² / ‖X₀‖²_F with t̂* = t*/‖t*‖ and X₀ the
   centred data before any removal; then remove that direction from X and from every text:
   X ← X − (X t̂*) t̂*ᵀ,  T ← T − (T t̂*) t̂*ᵀ.

As in the authors' code the projected texts are not re-normalised before the standard deviation is taken, so a
text that lies mostly outside the component's span is down-weighted. The shares of successive picks add up to the
variance the chosen texts explain together (≤ 1), because every removed direction is orthogonal to the earlier
ones.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

from .errors import EmptyDatasetError, InputError, MismatchError

__all__ = ["SpanText", "textspan", "textspan_all"]


class SpanText(NamedTuple):
    """One TextSpan pick: the text's label and the share of the component's variance its direction explains."""

    text: str
    variance_explained: float


def textspan(X: torch.Tensor, texts: torch.Tensor, labels: Sequence[str], iters: int = 10, rank: int = 80, *,
             device=None) -> List[SpanText]:
    """Run TextSpan on one component; returns ``iters`` :class:`SpanText` picks in order.

    ``X`` ``[N, d]``; ``texts`` ``[P, d]`` (e.g. :meth:`TextEncoder.encode` of a text pool) with ``labels`` the P
    strings. ``rank`` is clipped to min(N, d); ``iters`` to P. Computed in float64.
    """
    if X.ndim != 2:
        raise InputError(f"textspan: X must be [N, d], got shape {tuple(X.shape)}")
    if texts.ndim != 2:
        raise InputError(f"textspan: texts must be [P, d], got shape {tuple(texts.shape)}")
    if X.shape[1] != texts.shape[1]:
        raise MismatchError(
            f"textspan: component outputs have d = {X.shape[1]} but text embeddings d = {texts.shape[1]}; "
            "align the component into the text model's space first"
        )
    if len(labels) != texts.shape[0]:
        raise MismatchError(f"textspan: {texts.shape[0]} text embeddings but {len(labels)} labels")
    if X.shape[0] < 2:
        raise EmptyDatasetError(f"textspan needs at least 2 images, got {X.shape[0]}")
    if texts.shape[0] == 0:
        raise EmptyDatasetError("textspan: the text pool is empty")
    if iters < 1 or rank < 1:
        raise InputError(f"textspan: iters and rank must be ≥ 1, got iters={iters}, rank={rank}")
    dev = torch.device(device) if device is not None else X.device
    x = X.detach().to(dev, torch.float64)
    t = texts.detach().to(dev, torch.float64)
    r = min(rank, *x.shape)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    v = vh[:r]  # [r, d], orthonormal rows
    t = (t @ v.T) @ v  # project texts onto the span of the top-r right singular vectors
    x = x - x.mean(0, keepdim=True)
    total = float(x.pow(2).sum())
    out: List[SpanText] = []
    for _ in range(min(iters, t.shape[0])):
        std = (x @ t.T).std(0)
        j = int(torch.argmax(std))
        norm = t[j].norm()
        if total == 0 or float(norm) == 0.0 or float(std[j]) == 0.0:
            break  # nothing left to explain
        u = t[j] / norm
        coef = x @ u
        out.append(SpanText(labels[j], float(coef.pow(2).sum()) / total))
        x = x - coef[:, None] * u[None, :]
        t = t - (t @ u)[:, None] * u[None, :]
    return out


def textspan_all(aligned: torch.Tensor, names: Sequence[str], texts: torch.Tensor, labels: Sequence[str],
                 iters: int = 10, rank: int = 80, *, components: Optional[Sequence[str]] = None, device=None,
                 progress: bool = True) -> Dict[str, List[SpanText]]:
    """:func:`textspan` for every component (or the named ``components``): ``{name: [SpanText, ...]}``.

    ``aligned`` ``[N, C, d]`` with ``names`` the C component names.
    """
    if aligned.ndim != 3:
        raise InputError(f"textspan_all: aligned must be [N, C, d], got shape {tuple(aligned.shape)}")
    if aligned.shape[1] != len(names):
        raise MismatchError(f"textspan_all: {aligned.shape[1]} components but {len(names)} names")
    names = list(names)
    wanted = names if components is None else list(components)
    unknown = [c for c in wanted if c not in names]
    if unknown:
        raise MismatchError(f"textspan_all: unknown component names {unknown[:5]}; available e.g. {names[:5]}")
    from tqdm.auto import tqdm

    out = {}
    for name in tqdm(wanted, desc="TextSpan", unit="component", disable=not progress):
        out[name] = textspan(aligned[:, names.index(name)], texts, labels, iters=iters, rank=rank, device=device)
    return out
