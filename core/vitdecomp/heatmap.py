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

**Display size and the original photo.** A map is first placed on the model's input (``input_size``, default the
area the grid covers) and then scaled as a whole to the display ``image_size``, so it lands on the same part of
the picture at any display size. :func:`preprocess_geometry` reads the model's own preprocessing (torchvision
``Resize`` / ``CenterCrop`` as timm and open_clip build them) and :func:`map_to_photo` carries a map from the model
input back through it onto the original photograph: heat lands on the object in the photo, and the parts of the
photo the crop removed get no value (NaN), because the model never saw them.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import attrs
import torch

from ._records import TokenGrid
from .errors import InputError, MismatchError

__all__ = ["Heatmap", "token_heatmap", "resample_to_image", "heatmap_components", "image_size_of",
           "PreprocessGeometry", "preprocess_geometry", "map_to_photo", "scale_to", "pool_to_grid"]

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


def scale_to(maps: torch.Tensor, size: Tuple[int, int], *, mode: str = "bilinear") -> torch.Tensor:
    """Scale maps ``[..., h, w]`` as a whole to ``[..., H, W]`` (the same picture at another display size)."""
    if mode not in _MODES:
        raise InputError(f"mode must be one of {_MODES}, got {mode!r}")
    H, W = (int(v) for v in size)
    if tuple(maps.shape[-2:]) == (H, W):
        return maps
    lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
    x = maps.reshape(-1, 1, h, w)
    x = x.to(torch.float32) if x.dtype not in (torch.float32, torch.float64) else x
    x = torch.nn.functional.interpolate(x, size=(H, W), mode=mode,
                                        **({} if mode == "nearest" else {"align_corners": False}))
    return x.reshape(*lead, H, W)


@attrs.frozen
class PreprocessGeometry:
    """Where the model's input lies on the original photo: input pixel coordinate u = scale·x + offset per axis
    (x in photo pixels, continuous, pixel edges at integers), for a photo of ``photo_size`` = (H, W) and an input
    of ``input_size``. ``steps`` names the transforms it was read from."""

    photo_size: Tuple[int, int]
    input_size: Tuple[int, int]
    scale: Tuple[float, float]
    offset: Tuple[float, float]
    steps: Tuple[str, ...] = ()

    def box(self) -> Tuple[float, float, float, float]:
        """(top, left, height, width) of the model's input in photo pixels."""
        (sy, sx), (oy, ox) = self.scale, self.offset
        return (-oy / sy, -ox / sx, self.input_size[0] / sy, self.input_size[1] / sx)


_IGNORED = {"ToTensor", "PILToTensor", "MaybeToTensor", "MaybePILToTensor", "Normalize", "ConvertImageDtype",
            "MaybeConvertMode", "ToDtype", "ToImage", "ToPILImage", "_convert_to_rgb", "convert_to_rgb"}


def _resized(size, max_size, h: int, w: int) -> Tuple[int, int]:
    """torchvision's Resize output size for an (h, w) image."""
    if isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 1):
        s = int(size if isinstance(size, int) else size[0])
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = s, int(s * long / short)
        if max_size is not None and new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), int(max_size)
        return (new_long, new_short) if w <= h else (new_short, new_long)
    return int(size[0]), int(size[1])


def preprocess_geometry(preprocess, photo_size: Tuple[int, int]) -> PreprocessGeometry:
    """The geometry of ``preprocess`` (a torchvision ``Compose``, e.g. ``LoadedModel.preprocess``) applied to a
    photo of ``photo_size`` = (H, W): which part of the photo the model's input covers, at what scale.

    Understands ``Resize`` (to a size or shorter side, with ``max_size``), ``CenterCrop`` (padding when the crop
    is larger, as torchvision does) and ignores non-geometric steps (to-tensor, normalisation, RGB conversion).
    Any other transform raises :class:`InputError` naming it: the mapping is exact or refused, never guessed.
    """
    transforms = getattr(preprocess, "transforms", None)
    if transforms is None:
        transforms = [preprocess]
    h, w = (int(v) for v in photo_size)
    sy, sx, oy, ox = 1.0, 1.0, 0.0, 0.0
    steps = []
    for t in transforms:
        name = getattr(t, "__name__", None) or type(t).__name__
        if name in _IGNORED:
            continue
        if name == "Resize":
            nh, nw = _resized(t.size, getattr(t, "max_size", None), h, w)
            fy, fx = nh / h, nw / w
            sy, oy, sx, ox = sy * fy, oy * fy, sx * fx, ox * fx
            h, w = nh, nw
            steps.append(f"Resize→{nh}×{nw}")
        elif name == "CenterCrop":
            sz = t.size if isinstance(t.size, (list, tuple)) else (t.size,)
            ch, cw = int(sz[0]), int(sz[-1])
            if ch > h or cw > w:  # torchvision pads (left/top by the floor of half the excess), then crops
                pt, pl = (ch - h) // 2 if ch > h else 0, (cw - w) // 2 if cw > w else 0
                pb, pr = (ch - h + 1) // 2 if ch > h else 0, (cw - w + 1) // 2 if cw > w else 0
                oy, ox, h, w = oy + pt, ox + pl, h + pt + pb, w + pl + pr
            top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
            oy, ox, h, w = oy - top, ox - left, ch, cw
            steps.append(f"CenterCrop→{ch}×{cw}")
        else:
            raise InputError(
                f"cannot map heat maps back through the preprocessing step {name} ({t!r}); supported: Resize, "
                f"CenterCrop and non-geometric steps ({', '.join(sorted(_IGNORED))}). Draw on the model's input "
                "instead (vitdecomp.plotting.overlay of the preprocessed tensor)."
            )
    return PreprocessGeometry(photo_size=(int(photo_size[0]), int(photo_size[1])), input_size=(h, w),
                              scale=(sy, sx), offset=(oy, ox), steps=tuple(steps))


def map_to_photo(maps: torch.Tensor, geometry: PreprocessGeometry, *, mode: str = "bilinear") -> torch.Tensor:
    """Carry maps ``[..., h, w]`` on the model's input (h, w = ``geometry.input_size``, or any size: they are
    scaled to it first) back onto the original photo: ``[..., H, W]`` at ``geometry.photo_size``, float64 with NaN
    where the photo lies outside the model's input (cropped away)."""
    if mode not in _MODES:
        raise InputError(f"mode must be one of {_MODES}, got {mode!r}")
    hi, wi = geometry.input_size
    m = scale_to(maps.to(torch.float64), (hi, wi), mode=mode)
    H, W = geometry.photo_size
    (sy, sx), (oy, ox) = geometry.scale, geometry.offset
    dt = torch.float64
    uy = (torch.arange(H, dtype=dt) + 0.5) * sy + oy  # input coordinate of each photo pixel centre
    ux = (torch.arange(W, dtype=dt) + 0.5) * sx + ox
    gy, gx = 2 * uy / hi - 1, 2 * ux / wi - 1  # grid_sample's normalised coordinates (align_corners=False)
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)  # [H, W, 2] as (x, y)
    lead = m.shape[:-2]
    x = m.reshape(-1, 1, hi, wi)
    grid = grid.to(x.device).unsqueeze(0).expand(x.shape[0], -1, -1, -1)
    out = torch.nn.functional.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    inside = ((uy >= 0) & (uy < hi))[:, None] & ((ux >= 0) & (ux < wi))[None, :]
    out = torch.where(inside.to(out.device), out[:, 0], torch.full_like(out[:, 0], math.nan))
    return out.reshape(*lead, H, W)


def pool_to_grid(maps: torch.Tensor, grid: TokenGrid, target: TokenGrid) -> torch.Tensor:
    """Sum maps ``[..., h, w]`` on ``grid`` into the cells of the coarser ``target`` grid: ``[..., H', W']``.

    Exact (each target cell holds the total of the cells it covers), for grids covering the same area with
    patch sizes that divide (Swin's and MaxViT's stages: 2×2 merge slots per coarser cell).
    """
    (ph, pw), (PH, PW) = grid.patch_size, target.patch_size
    if PH % ph or PW % pw or grid.h * ph != target.h * PH or grid.w * pw != target.w * PW:
        raise MismatchError(f"cannot pool a {grid.h}×{grid.w} grid of {ph}×{pw} px into a {target.h}×{target.w} "
                            f"grid of {PH}×{PW} px (different coverage or patch sizes that do not divide)")
    fy, fx = PH // ph, PW // pw
    lead = maps.shape[:-2]
    x = maps.reshape(*lead, target.h, fy, target.w, fx)
    return x.sum((-3, -1))


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
    display_grid: Optional[TokenGrid] = None  # with grid="coarsest": the one grid every map was summed into

    def grid_description(self) -> str:
        """Which grid(s) the picture shows, in words."""
        gs = [self.display_grid] if self.display_grid is not None else list(dict.fromkeys(self.grids.values()))
        what = "; ".join(f"{g.h}×{g.w} cells of {g.patch_size[0]}×{g.patch_size[1]} px" for g in gs)
        return what + (" (every component summed into the model's coarsest grid)" if self.display_grid else "")

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
                  input_size: Optional[Tuple[int, int]] = None, mode: str = "bilinear", query: str = "",
                  grid: str = "native") -> Heatmap:
    """Heat maps of the contributions of the top components onto a text (or into a property's subspace).

    :param dec: a decomposition made with ``tokens="source"``.
    :param aligner: the CompAlign :class:`~vitdecomp.Aligner` of the model (None: ``text`` is in model space).
    :param text: one text embedding ``[d]`` (or ``[1, d]``): heat(p) = Σ_{i∈S} ⟨c_i(p) W_i, t⟩.
    :param basis: instead of ``text``, a property's text embeddings ``[k, d]``: heat(p) = ‖B_P Σ_{i∈S} c_i(p) W_i‖.
    :param components: the set S by name; otherwise the top ``k`` of ``kinds`` by ``scores`` ``[C]`` (e.g.
        variance explained, :func:`vitdecomp.variance_explained`), or every eligible one without scores.
    :param image_size: (H, W) of the output maps, the display size (default: ``input_size``). The map on the
        model's input is scaled as a whole to it, so it covers the same part of the picture at any size.
    :param input_size: (H, W) of the model's input the decomposition was made from (default: the area the grid
        covers); input pixels no grid cell covers get 0.
    :param mode: ``"bilinear"`` or ``"nearest"`` (see :func:`resample_to_image`).
    :param grid: ``"native"`` (each component on its own grid) or ``"coarsest"``: every component's map summed
        (exactly, :func:`pool_to_grid`) into the coarsest grid among them before display. For hierarchical models
        (Swin, MaxViT) a component of an early stage reaches z through merges whose weights differ by merge slot,
        so its map alternates within each 2×2 slot; on the coarser grid the picture shows what each cell of the
        model's own later grid receives, without that checkerboard. ``Heatmap.grid_description()`` says which.
    """
    if grid not in ("native", "coarsest"):
        raise InputError(f"grid must be 'native' or 'coarsest', got {grid!r}")
    if aligner is not None:
        aligner.check_source(dec)  # fitted on other weights than the decomposition's: MismatchError
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
    in_size = tuple(input_size) if input_size is not None else image_size_of(dec)
    size = tuple(image_size) if image_size is not None else in_size
    D = dec.contributions.shape[-1]
    B = dec.contributions.shape[0]
    total = None
    per, grids = {}, {}
    target = None
    if grid == "coarsest":
        target = max((dec.grid_of(n) for n in names), key=lambda g: g.patch_size[0] * g.patch_size[1])
    for name in names:
        sm = dec.spatial_map(name)  # [B, h, w, D]
        g = dec.grid_of(name)
        U = to_device(_map_matrix(aligner, name, directions, D), sm.device)  # [D, k], staged: no stream sync
        proj = torch.einsum("bhwD,Dk->bkhw", sm.to(torch.float64), U)  # [B, k, h, w]
        per[name] = proj[:, 0] if text is not None else proj.norm(dim=1)
        grids[name] = g
        if target is not None and g != target:
            proj, g = pool_to_grid(proj, g, target), target
        img = resample_to_image(proj, g, in_size, mode=mode)  # [B, k, H_in, W_in]
        total = img if total is None else total + img
    maps = scale_to(total[:, 0] if text is not None else total.norm(dim=1), size, mode=mode)
    return Heatmap(maps=maps.to(torch.float32).reshape(B, *size), components=names, per_component=per, grids=grids,
                   query=query, mode=mode, display_grid=target)
