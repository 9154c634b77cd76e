"""Zero-shot segmentation from the spatial decomposition of a class logit (METHOD.md §6; Balasubramanian et al.,
NeurIPS 2024, §5; Gandelsman et al., ICLR 2024, §5.2).

With a linear head, logit_k(x) = w_k · z(x) + b_k and z = Σ_i Σ_p c_i(p), so the class logit splits over image
locations p:

    saliency_k(p) = w_k · Σ_i c_i(p)            (c_i(p): ``dec.spatial_map(name)``, on each component's grid)

For a head that is not linear in z (MaxViT's ``NormMlpClassifierHead``: Linear+tanh, then fc) vitdecomp uses the
first-order treatment: w_k is replaced by the head's gradient ∇_z logit_k at the image's own z (computed with
autograd), i.e. saliency_k(p) = ∇_z logit_k(z) · Σ_i c_i(p); the saliencies then sum to the first-order term
∇logit_k · z rather than to the logit. Prefix tokens (CLS, registers) are not image locations and are left out.
Maps of every grid are resampled to the image (:func:`vitdecomp.heatmap.resample_to_image`) and summed.

The mask is ``saliency > mean(saliency)`` per image. Metrics, accumulated over a dataset as in Chefer et al.
(CVPR 2021) whose evaluation the paper follows:

* pixel accuracy: correct pixels / all pixels;
* mIoU, foreground-only (the paper's "mIoU"): Σ intersection_fg / Σ union_fg;
* mIoU, two-class (Chefer et al.): the mean over background and foreground of Σ intersection / Σ union;
* mAP: the mean over images of the average precision of the saliency ranking of the ground-truth foreground
  pixels (``mean_ap``); ``mean_ap_two_class`` averages it with the AP of −saliency for the background.

The paper's numbers (pixAcc / mIoU / mAP) on ImageNet-segmentation: DeiT .772/.529/.831, DINO .758/.486/.811,
MaxViT .716/.424/.724, Swin .714/.434/.762; GradCAM is far lower (e.g. MaxViT .473/.171/.424).

Folder layout read by :func:`evaluate_segmentation`::

    root/images/<name>.{jpg,jpeg,png}     the photographs
    root/masks/<name>.png                 ground truth: any non-zero pixel is foreground
    root/labels.csv                       optional: "<name>,<class index>" per line (a header line is allowed);
                                          without it the model's predicted class is segmented
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import attrs
import torch

from .errors import EmptyDatasetError, InputError, MismatchError

__all__ = [
    "class_directions", "saliency_maps", "binarize", "Segmentation", "segment", "average_precision",
    "SegmentationMetrics", "SegmentationMeter", "evaluate_segmentation", "SegmentationEvaluation",
    "read_segmentation_folder",
]


def class_directions(head: Callable, z: torch.Tensor, classes) -> torch.Tensor:
    """The direction in z-space whose dot product with a contribution gives its share of the class logit: ``[B, D]``.

    A ``torch.nn.Linear`` head gives its rows w_k; any other head (a module or function z → logits) gives the
    gradient ∇_z logit_k(z) at each image's own z (first order; exact for a linear head). Class indices given on
    the host are checked against the head's classes; indices already on the device (an ``argmax``, say) are not
    read back.
    """
    from .engine import to_device

    cls = torch.as_tensor(classes).long().flatten()
    if cls.shape[0] != z.shape[0]:
        raise MismatchError(f"{cls.shape[0]} classes for {z.shape[0]} images")

    def check(K: int) -> None:
        if cls.device.type == "cpu" and (int(cls.min()) < 0 or int(cls.max()) >= K):
            raise InputError(f"class index out of range: the head has {K} classes, got {cls.tolist()[:8]}")

    if isinstance(head, torch.nn.Linear):
        check(head.out_features)
        return head.weight.detach().index_select(0, to_device(cls, head.weight.device)).to(z.device, z.dtype)
    zz = z.detach().clone().requires_grad_(True)
    p = next(iter(head.parameters()), None) if isinstance(head, torch.nn.Module) else None
    inp = zz if p is None else zz.to(p.device, p.dtype)
    with torch.enable_grad():
        logits = head(inp)
        check(logits.shape[-1])
        sel = logits.gather(1, to_device(cls, logits.device).view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(sel, zz)
    return grad.detach()


def saliency_maps(dec, directions: torch.Tensor, *, image_size: Optional[Tuple[int, int]] = None,
                  mode: str = "bilinear", components: Optional[Sequence[str]] = None) -> torch.Tensor:
    """saliency(p) = direction · Σ_i c_i(p) at image resolution, ``[B, H, W]``.

    ``directions`` ``[B, D]`` (or ``[D]``), e.g. :func:`class_directions`. Sums every component with token detail
    (or ``components``) grid by grid before resampling each grid once.
    """
    from .heatmap import image_size_of, resample_to_image

    if not dec.has_tokens:
        raise InputError("saliency needs token detail: decompose(..., tokens='source')")
    B, _, D = dec.contributions.shape
    u = directions.reshape(1, -1).expand(B, -1) if directions.ndim == 1 else directions
    if tuple(u.shape) != (B, D):
        raise MismatchError(f"directions must be [B, D] = {(B, D)}, got {tuple(directions.shape)}")
    names = [n for n in dec.names if n in dec.token_details] if components is None else list(components)
    if not names:
        raise InputError("no component has token detail")
    size = tuple(image_size) if image_size is not None else image_size_of(dec)
    per_grid: Dict = {}
    for name in names:
        g = dec.grid_of(name)
        sm = dec.spatial_map(name)  # [B, h, w, D]
        s = torch.einsum("bhwd,bd->bhw", sm.to(torch.float64), u.to(sm.device, torch.float64))
        per_grid[g] = per_grid[g] + s if g in per_grid else s
    out = None
    for g, s in per_grid.items():
        img = resample_to_image(s, g, size, mode=mode)
        out = img if out is None else out + img
    return out


def binarize(saliency: torch.Tensor) -> torch.Tensor:
    """The mask ``saliency > mean(saliency)`` of each image (``[B, H, W]`` or ``[H, W]``), boolean."""
    flat = saliency.flatten(-2)
    return saliency > flat.mean(-1)[..., None, None]


@attrs.define(eq=False)
class Segmentation:
    """Result of :func:`segment`: ``saliency`` ``[B, H, W]``, ``masks`` (saliency above its mean), the segmented
    ``classes`` ``[B]`` and the model's ``logits`` ``[B, K]``."""

    saliency: torch.Tensor
    masks: torch.Tensor
    classes: torch.Tensor
    logits: torch.Tensor


def segment(model, images: torch.Tensor, classes=None, *, adapter=None, mode: str = "bilinear",
            head=None, device=None) -> Segmentation:
    """Zero-shot segmentation of ``images`` ``[B, 3, H, W]`` for ``classes`` ``[B]`` (default: the predicted class).

    Decomposes with ``tokens="source"``, takes each class's direction through the prediction head
    (:func:`class_directions`) and returns saliency at image resolution and the mean-threshold masks (on the
    device the decomposition ran on; ``device`` as in :func:`vitdecomp.decompose`).
    """
    from .ablation import predict, prediction_head
    from .api import decompose, unwrap_loaded

    model = unwrap_loaded(model)
    dec = decompose(model, images, tokens="source", adapter=adapter, device=device, fingerprint=False)  # no aligner
    head = prediction_head(model, adapter) if head is None else head
    logits = predict(head, dec.representation)
    cls = logits.argmax(-1) if classes is None else torch.as_tensor(classes).long().flatten()
    dirs = class_directions(head, dec.representation, cls)
    sal = saliency_maps(dec, dirs, image_size=tuple(images.shape[-2:]), mode=mode)
    return Segmentation(saliency=sal.to(torch.float32), masks=binarize(sal), classes=cls.cpu(), logits=logits)


# ---------------------------------------------------------------------------------------------------- metrics


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """AP = Σ_n (R_n − R_{n−1}) P_n over the distinct score thresholds, highest first (as
    ``sklearn.metrics.average_precision_score``). NaN when there are no positives."""
    s = scores.detach().flatten().to(torch.float64).cpu()
    t = targets.detach().flatten().bool().cpu()
    if s.shape != t.shape:
        raise MismatchError(f"scores {tuple(s.shape)} and targets {tuple(t.shape)} differ in size")
    P = int(t.sum())
    if P == 0:
        return float("nan")
    order = torch.argsort(s, descending=True, stable=True)
    s, t = s[order], t[order].to(torch.float64)
    tps = torch.cumsum(t, 0)
    fps = torch.cumsum(1 - t, 0)
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]  # last index of every run of equal scores
    tps, fps = tps[last], fps[last]
    precision = tps / (tps + fps)
    recall = tps / P
    prev = torch.cat([torch.zeros(1, dtype=torch.float64), recall[:-1]])
    return float(((recall - prev) * precision).sum())


@attrs.frozen
class SegmentationMetrics:
    """Dataset-level segmentation metrics (see the module docstring for the definitions)."""

    pixel_accuracy: float
    miou_foreground: float
    miou_two_class: float
    mean_ap: float
    mean_ap_two_class: float
    num_images: int

    def as_dict(self) -> dict:
        return attrs.asdict(self)


@attrs.define
class SegmentationMeter:
    """Accumulate segmentation metrics over batches: :meth:`update` then :meth:`compute`."""

    correct: int = 0
    pixels: int = 0
    inter: List[int] = attrs.field(factory=lambda: [0, 0])
    union: List[int] = attrs.field(factory=lambda: [0, 0])
    ap: List[float] = attrs.field(factory=list)
    ap2: List[float] = attrs.field(factory=list)
    num_images: int = 0

    def update(self, saliency: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Add images: ``saliency`` ``[B, H, W]`` (or ``[H, W]``), ground truth ``target`` (non-zero =
        foreground) of the same shape, ``mask`` the predicted mask (default :func:`binarize`)."""
        if saliency.ndim == 2:
            saliency, target = saliency[None], target[None]
            mask = None if mask is None else mask[None]
        if saliency.shape != target.shape:
            raise MismatchError(f"saliency {tuple(saliency.shape)} and ground truth {tuple(target.shape)} differ in shape")
        gt = target.bool().cpu()
        pred = (binarize(saliency) if mask is None else mask.bool()).cpu()
        self.correct += int((pred == gt).sum())
        self.pixels += gt.numel()
        for c, (p, g) in enumerate(((~pred, ~gt), (pred, gt))):
            self.inter[c] += int((p & g).sum())
            self.union[c] += int((p | g).sum())
        for b in range(saliency.shape[0]):
            a = average_precision(saliency[b], gt[b])
            if a == a:  # images without foreground have no AP
                self.ap.append(a)
                abg = average_precision(-saliency[b], ~gt[b])
                self.ap2.append((a + abg) / 2 if abg == abg else a)
        self.num_images += saliency.shape[0]

    def compute(self) -> SegmentationMetrics:
        if not self.pixels:
            raise EmptyDatasetError("no images were added to the segmentation meter")
        iou = [self.inter[c] / self.union[c] if self.union[c] else 1.0 for c in (0, 1)]
        nan = float("nan")
        return SegmentationMetrics(
            pixel_accuracy=self.correct / self.pixels, miou_foreground=iou[1], miou_two_class=(iou[0] + iou[1]) / 2,
            mean_ap=sum(self.ap) / len(self.ap) if self.ap else nan,
            mean_ap_two_class=sum(self.ap2) / len(self.ap2) if self.ap2 else nan, num_images=self.num_images,
        )


# ---------------------------------------------------------------------------------------------------- folders


def read_segmentation_folder(root) -> Tuple[List[Path], List[Path], Dict[str, int]]:
    """(image paths, mask paths, {name: class}) of a folder in the layout of the module docstring."""
    root = Path(root)
    idir, mdir = root / "images", root / "masks"
    if not idir.is_dir():
        raise InputError(f"{root} has no images/ folder (layout: images/<name>.jpg, masks/<name>.png, labels.csv)")
    images = sorted(p for p in idir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not images:
        raise EmptyDatasetError(f"no images (.jpg/.jpeg/.png) in {idir}")
    masks = []
    if mdir.is_dir():
        missing = [p.name for p in images if not (mdir / (p.stem + ".png")).is_file()]
        if missing:
            raise InputError(f"{len(missing)} image(s) have no mask masks/<name>.png, e.g. {missing[:3]}")
        masks = [mdir / (p.stem + ".png") for p in images]
    labels: Dict[str, int] = {}
    lf = root / "labels.csv"
    if lf.is_file():
        with open(lf, newline="") as f:
            for row in csv.reader(f):
                if len(row) < 2 or not row[1].strip().lstrip("-").isdigit():
                    continue  # header or blank
                labels[Path(row[0].strip()).stem] = int(row[1])
    return images, masks, labels


def _norm_stats(model, preprocess=None):
    if preprocess is not None:
        for t in getattr(preprocess, "transforms", []):
            if type(t).__name__ == "Normalize":
                return tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if "mean" in cfg and "std" in cfg:
        return tuple(cfg["mean"]), tuple(cfg["std"])
    return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def input_size(model, adapter=None) -> Tuple[int, int]:
    """The (H, W) a model takes (timm ``patch_embed.img_size`` / ``img_size``, open_clip ``image_size``)."""
    from .api import find_adapter, unwrap_loaded

    model = unwrap_loaded(model)
    m = find_adapter(model, adapter).unwrap(model)
    for get in (lambda: m.patch_embed.img_size, lambda: m.img_size, lambda: m.image_size,
                lambda: m.pretrained_cfg["input_size"][1:]):
        try:
            v = get()
        except (AttributeError, KeyError, TypeError):
            continue
        if v is not None:
            v = (v, v) if isinstance(v, int) else tuple(v)
            return (int(v[0]), int(v[1]))
    return (224, 224)


def load_image(path, size: Tuple[int, int], mean, std) -> Tuple[torch.Tensor, "object"]:
    """(normalised tensor ``[3, H, W]``, resized RGB uint8 array) of an image file, resized to ``size``."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR))
    x = torch.as_tensor(rgb.copy()).permute(2, 0, 1).float() / 255.0
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x, rgb


def load_mask(path, size: Tuple[int, int]) -> torch.Tensor:
    """A ground-truth mask file resized (nearest) to ``size``: boolean ``[H, W]``, non-zero = foreground."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("L").resize((size[1], size[0]), Image.NEAREST))
    return torch.as_tensor(a.copy()) > 0


@attrs.define(eq=False)
class SegmentationEvaluation:
    """Metrics over a folder (None without masks), the image ``names``, segmented ``classes``, and the first
    ``keep`` examples as ``(name, rgb uint8 [H, W, 3], saliency [H, W], mask [H, W], ground truth or None)``."""

    metrics: Optional[SegmentationMetrics]
    names: List[str]
    classes: List[int]
    examples: list


def evaluate_segmentation(model, root, *, adapter=None, preprocess=None, image_size=None, batch_size: int = 8,
                          limit: Optional[int] = None, mode: str = "bilinear", keep: int = 0,
                          progress: bool = True, device=None) -> SegmentationEvaluation:
    """Segment every image of a folder (layout in the module docstring) and score it against its mask.

    Images and masks are resized to the model's input size (``image_size`` overrides) and normalised with the
    mean/std of ``preprocess`` or the model's config. The class is ``labels.csv``'s when listed, else the
    predicted one. ``device``: run the model there (moved in place; default: where it is).
    """
    from tqdm.auto import tqdm

    from .ablation import predict, prediction_head
    from .api import LoadedModel, decompose
    from .engine import to_device

    if isinstance(model, LoadedModel):  # its own preprocessing's mean/std unless preprocess= says otherwise
        preprocess = preprocess if preprocess is not None else model.preprocess
        model = model.model
    images, masks, labels = read_segmentation_folder(root)
    if limit is not None:
        images, masks = images[:limit], masks[:limit]
    size = tuple(image_size) if image_size is not None else input_size(model, adapter)
    mean, std = _norm_stats(model, preprocess)
    if device is not None:
        model = model.to(device)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    head = prediction_head(model, adapter)
    meter = SegmentationMeter() if masks else None
    names, classes, examples = [], [], []
    bar = tqdm(total=len(images), desc="segmenting", unit="img", disable=not progress)
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size]
        loaded = [load_image(p, size, mean, std) for p in batch]
        x = to_device(torch.stack([t for t, _ in loaded]), device, dtype)
        dec = decompose(model, x, tokens="source", adapter=adapter, fingerprint=False)  # no aligner applied
        logits = predict(head, dec.representation)
        pred = logits.argmax(-1).cpu()
        cls = torch.tensor([labels.get(p.stem, int(pred[j])) for j, p in enumerate(batch)])
        sal = saliency_maps(dec, class_directions(head, dec.representation, cls), image_size=size, mode=mode).cpu()
        gt = torch.stack([load_mask(m, size) for m in masks[i:i + batch_size]]) if masks else None
        if meter is not None:
            meter.update(sal, gt)
        for j, p in enumerate(batch):
            names.append(p.stem)
            classes.append(int(cls[j]))
            if len(examples) < keep:
                examples.append((p.stem, loaded[j][1], sal[j].float(), binarize(sal[j]), None if gt is None else gt[j]))
        bar.update(len(batch))
    bar.close()
    return SegmentationEvaluation(metrics=meter.compute() if meter is not None else None, names=names,
                                  classes=classes, examples=examples)
