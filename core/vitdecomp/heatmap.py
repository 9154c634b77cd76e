"""Token heat maps: where in the image the top components write what a text describes (METHOD.md §6;
Balasubramanian et al., NeurIPS 2024, §5 "visualising token contributions"; Gandelsman et al., ICLR 2024, §6).

For a text embedding t (CLIP space, unit norm) and a set S of components — by default the top k attention heads by
variance explained VE_i(span{t}) or VE_i(P) for a property P — the heat at image location p is

    heat(p) = Σ_{i∈S} ⟨c_i(p) W_i, t⟩ = Σ_{i∈S} c_i(p) · (W_i t),

where c_i(p) is component i's contribution split over the positions of its token grid (``dec.spatial_map``) and
W_i its CompAlign map. For a property without a single text the heat is the norm of the summed aligned
contributions inside the property's subspace, ‖B_P Σ_{i∈S} c_i(p) W_i‖ (B_P an orthonormal basis of its texts).
The aligner's bias is constant over positions and left out.

Only the generic accessors ``dec.spatial_map(name)`` and ``dec.grid_of(name)`` are used, so each family's adapter
decides where a contribution sits (Swin's cyclic shift undone, MaxViT's block windows and grid cells
un-partitioned, DINOv2 registers and CLS left out as prefix tokens). Maps on grids of different resolution
(Swin stages, MaxViT stem/stages) are resampled to the image: grid cell (r, c) of a ``TokenGrid`` with patch size
(ph, pw) covers pixels [r·ph, (r+1)·ph) × [c·pw, (c+1)·pw). ``mode="nearest"`` keeps the cells as blocks (exact
placement), ``"bilinear"`` interpolates between cell centres (smoother pictures).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import attrs
import torch

from ._records import TokenGrid
from .errors import InputError, MismatchError

__all__ = ["Heatmap", "token_heatmap", "resample_to_image", "heatmap_components", "image_size_of"]

_MODES = ("nearest", "bilinear")


def image_size_of(dec) -> Tuple[int, int]:
    """The input image size covered by the decomposition's grid: (h·ph, w·pw)."""
    g = dec.grid
    if g is None:
        raise InputError("the decomposition has no token grid; decompose with tokens='source'")
    return (g.h * g.patch_size[0], g.w * g.patch_size[1])


def resample_to_image(maps: torch.Tensor, grid: TokenGrid, image_size: Tuple[int, int], *,
                      mode: str = "bilinear") -> torch.Tensor:
    """Place maps ``[..., h, w]`` living on ``grid`` onto an image of ``image_size`` = (H, W): ``[..., H, W]``.

    Cell (r, c) covers pixels [r·ph, (r+1)·ph) × [c·pw, (c+1)·pw); what lies beyond the image is cropped, image
    pixels no cell covers are 0.
    """
    if mode not in _MODES:
        raise InputError(f"mode must be one of {_MODES}, got {mode!r}")
    h, w = maps.shape[-2:]
    if (h, w) != (grid.h, grid.w):
        raise MismatchError(f"maps are {h}×{w} but the grid is {grid.h}×{grid.w}")
    ph, pw = (int(p) for p in grid.patch_size)
    lead = maps.shape[:-2]
    x = maps.reshape(-1, 1, h, w)
    if mode == "nearest":
        x = x.repeat_interleave(ph, -2).repeat_interleave(pw, -1)
    else:
        x = torch.nn.functional.interpolate(x.to(torch.float32 if x.dtype not in (torch.float32, torch.float64) else x.dtype),
                                            size=(h * ph, w * pw), mode="bilinear", align_corners=False)
    H, W = (int(s) for s in image_size)
    out = x.new_zeros(x.shape[0], 1, H, W)
    hh, ww = min(H, x.shape[-2]), min(W, x.shape[-1])
    out[..., :hh, :ww] = x[..., :hh, :ww]
    return out.reshape(*lead, H, W)


def heatmap_components(dec, scores: Optional[torch.Tensor] = None, *, k: Optional[int] = 5,
                       kinds: Optional[Sequence[str]] = ("head",)) -> Tuple[str, ...]:
    """Components eligible for a heat map (those with token detail, of ``kinds`` — all kinds with None),
    the ``k`` highest by ``scores`` ``[C]`` (aligned with ``dec.names``) when given."""
    if not dec.has_tokens:
        raise InputError("this decomposition has no token detail; decompose(..., tokens='source')")
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    cand = [i for i, c in enumerate(dec.components)
            if c.name in dec.token_details and (kinds is None or c.kind in kinds)]
    if not cand:
        present = sorted({c.kind for c in dec.components if c.name in dec.token_details})
        raise InputError(f"no component of kind {list(kinds)} has token detail; kinds with detail: {present} "
                         "(pass kinds=None for all)")
    if scores is not None:
        if scores.ndim != 1 or scores.shape[0] != len(dec):
            raise MismatchError(f"scores must be [C] = [{len(dec)}] (one per component of dec), got {tuple(scores.shape)}")
        sc = scores.detach().to(torch.float64).cpu()[cand]
        order = torch.argsort(sc, descending=True, stable=True).tolist()
        cand = [cand[j] for j in order]
    if k is not None:
        cand = cand[:k]
    return tuple(dec.names[i] for i in cand)


@attrs.define(eq=False)
class Heatmap:
    """Heat maps of a batch: ``maps`` ``[B, H, W]`` at image resolution; ``per_component`` the raw projections
    ``{name: [B, h, w]}`` on each component's own grid (``grids``); ``components`` the set S; ``query`` what was
    asked (a text or a property)."""

    maps: torch.Tensor
    components: tuple
    per_component: Dict[str, torch.Tensor]
    grids: Dict[str, TokenGrid]
    query: str = ""
    mode: str = "bilinear"

    def numpy(self):
        """``maps`` as a float numpy array ``[B, H, W]``."""
        return self.maps.detach().cpu().to(torch.float64).numpy()


def _map_matrix(aligner, name: str, directions: torch.Tensor, D: int) -> torch.Tensor:
    """U_i = W_i Bᵀ ``[D, k]`` for text directions B ``[k, d]`` (identity aligner: Bᵀ itself)."""
    if aligner is None:
        if directions.shape[1] != D:
            raise MismatchError(
                f"without an aligner the directions must live in the model's space (D = {D}); got d = {directions.shape[1]}"
            )
        return directions.T
    W = aligner.map(name)  # [D, d]
    if W.shape[0] != D:
        raise MismatchError(f"aligner map of {name!r} is {tuple(W.shape)}; the decomposition has D = {D}")
    if W.shape[1] != directions.shape[1]:
        raise MismatchError(
            f"text embeddings have d = {directions.shape[1]} but the aligner maps into d = {W.shape[1]} "
            f"(CLIP model {getattr(aligner, 'clip_model', None)!r}); encode the texts with the aligner's CLIP model"
        )
    from .engine import to_device

    return W.to(torch.float64) @ to_device(directions.T.contiguous(), W.device, torch.float64)


def token_heatmap(dec, aligner=None, text: Optional[torch.Tensor] = None, *, basis: Optional[torch.Tensor] = None,
                  components: Optional[Sequence[str]] = None, scores: Optional[torch.Tensor] = None, k: int = 5,
                  kinds: Optional[Sequence[str]] = ("head",), image_size: Optional[Tuple[int, int]] = None,
                  mode: str = "bilinear", query: str = "") -> Heatmap:
    """Heat maps of the contributions of the top components onto a text (or into a property's subspace).

    :param dec: a decomposition made with ``tokens="source"``.
    :param aligner: the CompAlign :class:`~vitdecomp.Aligner` of the model (None: ``text`` is in model space).
    :param text: one text embedding ``[d]`` (or ``[1, d]``): heat(p) = Σ_{i∈S} ⟨c_i(p) W_i, t⟩.
    :param basis: instead of ``text``, a property's text embeddings ``[k, d]``: heat(p) = ‖B_P Σ_{i∈S} c_i(p) W_i‖.
    :param components: the set S by name; otherwise the top ``k`` of ``kinds`` by ``scores`` ``[C]`` (e.g.
        variance explained, :func:`vitdecomp.variance_explained`), or every eligible one without scores.
    :param image_size: (H, W) of the output maps (default: the area the grid covers).
    :param mode: ``"bilinear"`` or ``"nearest"`` (see :func:`resample_to_image`).
    """
    if (text is None) == (basis is None):
        raise InputError("give exactly one of text= (an embedding [d]) or basis= (a property's embeddings [k, d])")
    if text is not None:
        directions = text.reshape(1, -1) if text.ndim == 1 or text.shape[0] == 1 else None
        if directions is None:
            raise InputError(f"text must be one embedding [d] or [1, d], got {tuple(text.shape)}; use basis= for several")
    else:
        from .scores import orthonormal_basis

        if basis.ndim != 2:
            raise InputError(f"basis must be [k, d] text embeddings, got shape {tuple(basis.shape)}")
        directions = orthonormal_basis(basis).to(torch.float32)
    from .engine import to_device

    directions = directions.detach().cpu().to(torch.float64)
    if components is None:
        names = heatmap_components(dec, scores, k=k, kinds=kinds)
    else:
        names = tuple(components)
        for n in names:
            dec.index(n)
        if not names:
            raise InputError("components is empty")
    size = tuple(image_size) if image_size is not None else image_size_of(dec)
    D = dec.contributions.shape[-1]
    B = dec.contributions.shape[0]
    total = None
    per, grids = {}, {}
    for name in names:
        sm = dec.spatial_map(name)  # [B, h, w, D]
        g = dec.grid_of(name)
        U = to_device(_map_matrix(aligner, name, directions, D), sm.device)  # [D, k], staged: no stream sync
        proj = torch.einsum("bhwD,Dk->bkhw", sm.to(torch.float64), U)  # [B, k, h, w]
        per[name] = proj[:, 0] if text is not None else proj.norm(dim=1)
        grids[name] = g
        img = resample_to_image(proj, g, size, mode=mode)  # [B, k, H, W]
        total = img if total is None else total + img
    maps = total[:, 0] if text is not None else total.norm(dim=1)
    return Heatmap(maps=maps.to(torch.float32).reshape(B, *size), components=names, per_component=per, grids=grids,
                   query=query, mode=mode)
