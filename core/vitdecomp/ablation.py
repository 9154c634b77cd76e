"""Mean ablation (direct effects) and spurious-correlation repair (METHOD.md §6; Balasubramanian et al., NeurIPS
2024, §5).

**Mean ablation.** With an exact decomposition z(x) = Σ_i c_i(x), replacing the contributions of a set A of
components by their mean over held-out images gives

    z_A(x) = z(x) − Σ_{i∈A} (c_i(x) − μ_i),        μ_i = mean_{x' ∈ held-out} c_i(x'),

and re-reading the model's prediction head on z_A measures the *direct effect* of A (nothing downstream of a
component is recomputed). ``z(x)`` is the model's own representation when it is available (a
:class:`~vitdecomp.Decomposition` carries it), so with nothing ablated the logits are the model's own, exactly
(:func:`mean_ablate` returns ``z`` itself); an extraction cache stores z in float32 next to the contributions,
so the identity holds from caches too (older caches without z fall back to Σ_i c_i).

The head is the model's linear classifier (``adapter.readout(model)``: timm ViT ``head``, Swin ``head.fc``). A head
that is not linear in z — MaxViT's ``NormMlpClassifierHead`` (Linear+tanh, then fc) — is used as the callable
``adapter.head_function(model)``: ablation simply re-reads it on z_A, which is exact (no linearisation is needed).

:func:`ablation_curve` ablates components cumulatively in a given order (execution order, or by a score) and
records accuracy after each step; :func:`plot_curves <vitdecomp.plotting.plot_curves>` draws it.

**Spurious-correlation repair (Waterbirds).** Rank components by score_i(spurious) − score_i(core) (CompAttribute
scores of the ``waterbirds_spurious`` and ``waterbirds_core`` properties), mean-ablate the top k (the paper: 10)
with means estimated on *held-out* images — the paper's code estimates them on the test images themselves — and
report the four (label, place) group accuracies, the worst group and the group average before and after. The
paper's worst-group accuracies before → after: DeiT .733→.815, CLIP .507→.744, DINO .800→.911, DINOv2 .967→.978,
Swin .834→.871, MaxViT .777→.814.

Data layouts read by :func:`read_waterbirds` / :func:`read_group_folders`:

* Waterbirds: ``root/metadata.csv`` with columns ``img_filename, y, place, split`` (split 0 train, 1 val, 2 test),
  image paths relative to ``root``;
* folder per group: ``root/<split>/<class>_<place>/*.jpg`` with split ``train``/``val``/``test``, e.g.
  ``test/waterbird_land/x.jpg``. Class and place indices are the sorted positions of the names (``landbird`` 0,
  ``waterbird`` 1; ``land`` 0, ``water`` 1), or the numbers themselves when the names are integers.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import attrs
import torch

from .errors import EmptyDatasetError, InputError, MismatchError, UnsupportedModelError

__all__ = [
    "prediction_head", "component_means", "mean_ablate", "predict", "AblationCurve", "ablation_curve",
    "direct_effects", "execution_order", "score_order", "GroupAccuracy", "group_accuracies", "spurious_ranking",
    "SpuriousRepair", "repair_spurious", "GroupedImages", "read_waterbirds", "read_group_folders",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# ---------------------------------------------------------------------------------------------------- data access


def _is_cache(source) -> bool:
    return hasattr(source, "batches") and hasattr(source, "shard_ranges") and hasattr(source, "names")


def source_names(source) -> Optional[tuple]:
    """Component names of a Decomposition or ExtractionCache (None for a bare tensor)."""
    from .decomposition import Decomposition

    if isinstance(source, Decomposition) or _is_cache(source):
        return tuple(source.names)
    return None


def source_len(source) -> int:
    from .decomposition import Decomposition

    if isinstance(source, Decomposition):
        return source.contributions.shape[0]
    if _is_cache(source):
        return len(source)
    return _check_tensor(source).shape[0]


def _check_tensor(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(
            f"expected contributions [N, C, D] (a tensor), a Decomposition or an ExtractionCache; got {type(x).__name__}"
        )
    if x.ndim != 3:
        raise InputError(f"contributions must be [N, C, D], got shape {tuple(x.shape)}")
    return x


def iter_source(source, batch_size: int = 256, *, representation: Optional[torch.Tensor] = None, device=None,
                local: bool = False) -> Iterator[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
    """``(indices [b], contributions [b, C, D], representation [b, D] or None)`` over a contributions tensor, a
    :class:`~vitdecomp.Decomposition` (its representation comes along) or an :class:`~vitdecomp.ExtractionCache`.
    With ``device``, contributions and representation are copied there batch by batch (host data staged through
    pinned memory, so the copies do not make the host wait for the GPU); the indices stay on the host.
    ``local``: of an ExtractionCache, only this rank's shards (under torch.distributed)."""
    if device is None:
        yield from _iter_source(source, batch_size, representation, local)
        return
    from .engine import to_device

    for ind, c, z in _iter_source(source, batch_size, representation, local):
        yield ind, to_device(c, device), (None if z is None else to_device(z, device))


def _iter_source(source, batch_size, representation, local=False):
    from .decomposition import Decomposition

    if isinstance(source, Decomposition):
        if source.partial:
            raise InputError("this Decomposition was narrowed by select(); ablation and retrieval need every component")
        representation = source.representation if representation is None else representation
        source = source.contributions
    if _is_cache(source):
        if representation is not None:
            raise InputError("representation= is not used with an ExtractionCache (the cache stores its own z)")
        for b in source.batches(batch_size, targets=False, local=local):
            yield b.indices, b.contributions, b.representation
        return
    x = _check_tensor(source)
    n = x.shape[0]
    if n == 0:
        raise EmptyDatasetError("contributions hold no images (N = 0)")
    if representation is not None and tuple(representation.shape) != (n, x.shape[2]):
        raise MismatchError(f"representation must be [N, D] = {(n, x.shape[2])}, got {tuple(representation.shape)}")
    for i in range(0, n, batch_size):
        j = min(i + batch_size, n)
        yield torch.arange(i, j), x[i:j], (None if representation is None else representation[i:j])


def _resolve_indices(selection, names: Optional[Sequence[str]], C: int) -> List[int]:
    """Component indices from names, indices or a boolean mask."""
    if selection is None:
        return []
    if isinstance(selection, torch.Tensor):
        if selection.dtype == torch.bool:
            if selection.shape != (C,):
                raise MismatchError(f"boolean component mask has shape {tuple(selection.shape)}, expected ({C},)")
            return torch.nonzero(selection).flatten().tolist()
        selection = selection.flatten().tolist()
    if isinstance(selection, str):
        selection = [selection]
    out = []
    for s in selection:
        if isinstance(s, str):
            if names is None:
                raise InputError(f"component {s!r} given by name, but the contributions carry no names; pass names=")
            try:
                out.append(list(names).index(s))
            except ValueError:
                raise InputError(
                    f"no component named {s!r}; there are {len(names)}, e.g. {list(names[:5])}"
                ) from None
        else:
            i = int(s)
            if not -C <= i < C:
                raise InputError(f"component index {i} is out of range for {C} components")
            out.append(i % C)
    return out


# ---------------------------------------------------------------------------------------------------- heads


def _adapter(model, adapter):
    from .api import find_adapter

    return find_adapter(model, adapter)


def prediction_head(model, adapter=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's prediction head as a function of the representation z: ``head(z [B, D]) -> logits [B, K]``.

    A ``torch.nn.Linear`` when the family's head is linear in z (``adapter.readout(model)``), otherwise the
    adapter's ``head_function(model)`` (MaxViT's Linear+tanh, then fc). Raises :class:`UnsupportedModelError`
    when neither exists, and for distilled DeiT, whose logits average two heads on two tokens (not a function of
    the averaged z).
    """
    from .api import unwrap_loaded

    model = unwrap_loaded(model)
    ad = _adapter(model, adapter)
    m = ad.unwrap(model)
    if isinstance(getattr(m, "head_dist", None), torch.nn.Linear):
        raise UnsupportedModelError(
            f"{type(m).__name__} is distilled: its logits are (head(cls) + head_dist(dist)) / 2, which is not a function "
            "of its representation z = (cls + dist) / 2; ablation and segmentation need a head on z"
        )
    head = ad.readout(m)
    if head is not None:
        return head
    fn = getattr(ad, "head_function", None)
    if fn is not None:
        return fn(m)
    raise UnsupportedModelError(
        f"adapter {ad.name!r} exposes no prediction head for {type(m).__name__} (readout() returned None and it has no "
        "head_function()); does the model have a classifier (num_classes > 0)?"
    )


def _head_param(head):
    if isinstance(head, torch.nn.Module):
        for p in head.parameters():
            return p
    return None


def predict(head, z: torch.Tensor) -> torch.Tensor:
    """Logits ``head(z)`` without gradients, z cast to the head's dtype and device."""
    p = _head_param(head)
    if p is not None:
        z = z.to(p.device, p.dtype)
    with torch.no_grad():
        return head(z)


# ---------------------------------------------------------------------------------------------------- ablation


def component_means(source, *, batch_size: int = 256, device=None) -> torch.Tensor:
    """μ_i = mean over images of c_i(x), shape ``[C, D]`` (accumulated in float64, returned on the host in float32
    or float64 as the input). ``source``: held-out contributions (tensor, Decomposition or ExtractionCache);
    ``device``: where the sums run (batches are copied there; default: where the source is).

    Under a torch.distributed process group the work is split and the sums are all-reduced, so every rank gets
    the mean over all images: an ExtractionCache is read by shard (each rank its own shards); a tensor or
    Decomposition is taken as this rank's own part of the data."""
    from . import distributed as dist

    # a cache is read by shard under a process group (each rank its own); other sources are this rank's part
    batches = iter_source(source, batch_size, device=device, local=_is_cache(source) and dist.info().active)
    total, n, dtype = None, 0, torch.float32
    for _, c, _ in batches:
        dtype = torch.float64 if c.dtype == torch.float64 else torch.float32
        s = c.to(torch.float64).sum(0)
        total = s if total is None else total + s
        n += c.shape[0]
    if dist.info().active:
        shape = dist.all_gather_objects(None if total is None else tuple(total.shape))
        shape = next((s for s in shape if s is not None), None)
        if shape is not None:
            total = dist.all_reduce_sum(total if total is not None else torch.zeros(shape, dtype=torch.float64))
        n = int(dist.all_reduce_sum(torch.tensor([n], dtype=torch.float64)).item())
    if not n:
        raise EmptyDatasetError("component_means: the held-out source holds no images")
    return (total / n).to(dtype).cpu()


def mean_ablate(contributions: torch.Tensor, means: torch.Tensor, ablate=None, *,
                representation: Optional[torch.Tensor] = None, names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """z_A = z − Σ_{i∈A} (c_i − μ_i), shape ``[N, D]``.

    ``contributions`` ``[N, C, D]`` or a :class:`~vitdecomp.Decomposition` (which brings its names and its
    representation); ``means`` ``[C, D]`` (from :func:`component_means` on held-out images); ``ablate``: component
    names, indices or a boolean mask ``[C]``; ``representation``: the model's own z (default: the
    Decomposition's, else Σ_i c_i). With nothing ablated the result *is* ``representation``.
    """
    from .decomposition import Decomposition

    if isinstance(contributions, Decomposition):
        if contributions.partial:
            raise InputError("this Decomposition was narrowed by select(); mean ablation needs every component")
        names = contributions.names if names is None else names
        representation = contributions.representation if representation is None else representation
        contributions = contributions.contributions
    c = _check_tensor(contributions)
    if c.dtype not in (torch.float32, torch.float64):  # float16 / bfloat16 caches: sum in float32
        c = c.float()
    N, C, D = c.shape
    if tuple(means.shape) != (C, D):
        raise MismatchError(f"means must be [C, D] = {(C, D)} like the contributions, got {tuple(means.shape)}")
    idx = _resolve_indices(ablate, names, C)
    z = c.sum(1) if representation is None else representation
    if tuple(z.shape) != (N, D):
        raise MismatchError(f"representation must be [N, D] = {(N, D)}, got {tuple(z.shape)}")
    if not idx:
        return z
    from .engine import index_tensor, to_device

    idx_t = index_tensor(idx, c.device)
    mu = to_device(means, c.device).index_select(0, idx_t)
    delta = (c.index_select(1, idx_t).to(torch.float64) - mu.to(torch.float64)).sum(1)
    return (z.to(torch.float64) - delta).to(z.dtype)


def execution_order(names: Sequence[str], *, reverse: bool = False) -> List[str]:
    """Component names in forward (execution) order, or last-first with ``reverse``."""
    out = list(names)
    return out[::-1] if reverse else out


def score_order(scores: torch.Tensor, names: Sequence[str], *, descending: bool = False) -> List[str]:
    """Component names sorted by ``scores`` (lowest first by default: ablating the least important first, the
    accuracy stays up until the components that matter go)."""
    if scores.ndim != 1 or scores.shape[0] != len(names):
        raise MismatchError(f"{tuple(scores.shape)} scores for {len(names)} component names")
    order = torch.argsort(scores.detach().to(torch.float64).cpu(), descending=descending, stable=True)
    return [names[i] for i in order.tolist()]


@attrs.define(eq=False)
class AblationCurve:
    """Accuracy after mean-ablating the first ``num_ablated[j]`` components of ``order``.

    ``accuracy[0]`` is the un-ablated accuracy (the model's own when the representation was available).
    """

    label: str
    order: tuple
    num_ablated: torch.Tensor  # [S] ints
    accuracy: torch.Tensor  # [S] float64
    num_images: int

    def as_dict(self) -> dict:
        return {"label": self.label, "order": list(self.order), "num_ablated": self.num_ablated.tolist(),
                "accuracy": self.accuracy.tolist(), "num_images": self.num_images}


def _labels_tensor(labels, n: int) -> torch.Tensor:
    y = torch.as_tensor(labels).long().flatten()
    if y.shape[0] != n:
        raise MismatchError(f"{y.shape[0]} labels for {n} images")
    return y


def ablation_curve(source, labels, head, means: torch.Tensor, order: Sequence, *, steps: Optional[Sequence[int]] = None,
                   label: str = "", names: Optional[Sequence[str]] = None,
                   representation: Optional[torch.Tensor] = None, batch_size: int = 256,
                   progress: bool = False, device=None) -> AblationCurve:
    """Accuracy versus the number of components mean-ablated, ablating cumulatively in ``order``.

    :param source: contributions ``[N, C, D]``, a Decomposition (exact baseline) or an ExtractionCache.
    :param labels: ``[N]`` class indices.
    :param head: z → logits (:func:`prediction_head`).
    :param means: ``[C, D]`` held-out means (:func:`component_means`).
    :param order: component names or indices, the first ablated first (:func:`execution_order`,
        :func:`score_order`).
    :param steps: numbers of ablated components to evaluate (default every 0..len(order)).
    :param device: where the ablation runs (batches are copied there; the head runs where its parameters are).
        Correct counts accumulate on the device: the host reads them once, at the end.
    """
    names = source_names(source) or (tuple(names) if names is not None else None)
    N = source_len(source)
    y = _labels_tensor(labels, N)
    C = means.shape[0]
    idx = _resolve_indices(list(order), names, C)
    K = len(idx)
    steps = list(range(K + 1)) if steps is None else sorted({int(s) for s in steps})
    if not steps or steps[0] < 0 or steps[-1] > K:
        raise InputError(f"steps must lie in 0..{K} (the length of order), got {steps[:3]}...{steps[-3:]}")
    from tqdm.auto import tqdm

    from .engine import index_tensor, to_device

    correct, mu, chunks = None, None, {}
    bar = tqdm(total=N, desc=f"ablating {label}".strip(), unit="img", disable=not progress)
    for ind, c, z0 in iter_source(source, batch_size, representation=representation, device=device):
        if c.shape[1] != C:
            raise MismatchError(f"contributions have {c.shape[1]} components, means {C}")
        if mu is None:  # once: means, counts and the index chunks of every step live on the batches' device
            mu = to_device(means, c.device, torch.float64)
            correct = torch.zeros(len(steps), dtype=torch.long, device=c.device)
            bounds = [0] + [s for s in steps if s > 0]
            chunks = {b: index_tensor(idx[a:b], c.device) for a, b in zip(bounds, bounds[1:]) if b > a}
        work = c.dtype if c.dtype in (torch.float32, torch.float64) else torch.float32
        z64 = c.to(torch.float64).sum(1) if z0 is None else z0.to(torch.float64)
        diffs = c.to(torch.float64) - mu  # [b, C, D]
        cum = torch.zeros_like(z64)
        done = 0
        yb = to_device(y[ind], c.device)
        for si, s in enumerate(steps):
            if s == 0:  # nothing ablated: the model's own representation (or Σ_i c_i), untouched
                zz = z0 if z0 is not None else c.to(work).sum(1)
            else:
                if s > done:
                    cum = cum + diffs.index_select(1, chunks[s]).sum(1)
                    done = s
                zz = (z64 - cum).to(z0.dtype if z0 is not None else work)
            logits = predict(head, zz)
            correct[si] += (logits.argmax(-1).to(yb.device) == yb).sum()
        bar.update(len(ind))
    bar.close()
    if correct is None:
        raise EmptyDatasetError("ablation_curve: the source holds no images")
    return AblationCurve(label=label, order=tuple(names[i] if names is not None else str(i) for i in idx),
                         num_ablated=torch.as_tensor(steps), accuracy=correct.cpu().to(torch.float64) / N,
                         num_images=N)


def direct_effects(source, labels, head, means: torch.Tensor, *, batch_size: int = 256, device=None) -> torch.Tensor:
    """Direct effect of each component alone: mean over images of logit_y(z) − logit_y(z − (c_i − μ_i)), ``[C]``
    (float64, on the host). A score for :func:`score_order` that needs no text. ``device``: where it runs
    (batches are copied there; the head runs where its parameters are); sums stay there until the end."""
    from .engine import to_device

    N = source_len(source)
    y = _labels_tensor(labels, N)
    C = means.shape[0]
    total, mu = None, None
    for ind, c, z in iter_source(source, batch_size, device=device):
        if c.dtype not in (torch.float32, torch.float64):
            c = c.float()
        if mu is None:
            mu = to_device(means, c.device, c.dtype)
            total = torch.zeros(C, dtype=torch.float64, device=c.device)
        z = c.sum(1) if z is None else z
        yb = to_device(y[ind], c.device)
        diffs = c - mu
        if isinstance(head, torch.nn.Linear):  # linear: the effect is w_y · (c_i − μ_i)
            w = head.weight[yb.to(head.weight.device)].to(torch.float64)  # [b, D]
            total += torch.einsum("bcd,bd->c", diffs.to(torch.float64), w.to(diffs.device))
        else:
            logit = lambda v: predict(head, v).gather(1, yb.view(-1, 1).to(v.device)).to(torch.float64).squeeze(1)  # noqa: E731
            base = logit(z)
            for i in range(C):
                total[i] += (base - logit(z - diffs[:, i])).sum().to(total.device)
    if total is None:
        raise EmptyDatasetError("direct_effects: the source holds no images")
    return total.cpu() / N


# ---------------------------------------------------------------------------------------------------- spurious


@attrs.define(eq=False)
class GroupAccuracy:
    """Accuracy per (label, place) group; ``worst`` group, ``average`` (mean over groups) and ``overall``."""

    groups: Dict[Tuple[int, int], float]
    counts: Dict[Tuple[int, int], int]
    worst: float
    average: float
    overall: float

    def as_dict(self) -> dict:
        return {"groups": {f"y={y},place={p}": a for (y, p), a in self.groups.items()},
                "counts": {f"y={y},place={p}": n for (y, p), n in self.counts.items()},
                "worst": self.worst, "average": self.average, "overall": self.overall}


def group_accuracies(predictions, labels, places) -> GroupAccuracy:
    """Group accuracies of predicted classes ``[N]`` against ``labels`` ``[N]`` within ``places`` ``[N]``."""
    pred = torch.as_tensor(predictions).long().flatten().cpu()
    y = torch.as_tensor(labels).long().flatten().cpu()
    g = torch.as_tensor(places).long().flatten().cpu()
    if not (pred.shape == y.shape == g.shape):
        raise MismatchError(f"predictions {tuple(pred.shape)}, labels {tuple(y.shape)} and places {tuple(g.shape)} differ")
    if pred.numel() == 0:
        raise EmptyDatasetError("group_accuracies: no images")
    groups, counts = {}, {}
    for yy in sorted(set(y.tolist())):
        for pp in sorted(set(g.tolist())):
            m = (y == yy) & (g == pp)
            if m.any():
                groups[(yy, pp)] = float((pred[m] == y[m]).double().mean())
                counts[(yy, pp)] = int(m.sum())
    return GroupAccuracy(groups=groups, counts=counts, worst=min(groups.values()),
                         average=sum(groups.values()) / len(groups), overall=float((pred == y).double().mean()))


def spurious_ranking(score_spurious: torch.Tensor, score_core: torch.Tensor, names: Sequence[str],
                     k: Optional[int] = 10) -> List[Tuple[str, float]]:
    """``[(name, score_spurious − score_core), ...]``, highest difference first, the top ``k``."""
    if score_spurious.shape != score_core.shape or score_spurious.ndim != 1 or score_spurious.shape[0] != len(names):
        raise MismatchError(
            f"score_spurious {tuple(score_spurious.shape)}, score_core {tuple(score_core.shape)} and "
            f"{len(names)} names must all be [C]"
        )
    diff = score_spurious.to(torch.float64).cpu() - score_core.to(torch.float64).cpu()
    order = torch.argsort(diff, descending=True, stable=True)
    if k is not None:
        order = order[:k]
    return [(names[i], float(diff[i])) for i in order.tolist()]


@attrs.define(eq=False)
class SpuriousRepair:
    """Result of :func:`repair_spurious`: the ablated ``components`` with their score differences, group
    accuracies ``before`` and ``after``, and the predictions."""

    components: tuple
    differences: tuple
    before: GroupAccuracy
    after: GroupAccuracy
    predictions_before: torch.Tensor
    predictions_after: torch.Tensor

    def as_dict(self) -> dict:
        return {"components": list(self.components), "differences": list(self.differences),
                "before": self.before.as_dict(), "after": self.after.as_dict()}

    def summary(self) -> str:
        lines = [f"ablated {len(self.components)} components: {', '.join(self.components)}",
                 f"{'group':22} {'n':>6} {'before':>8} {'after':>8}"]
        for key, acc in self.before.groups.items():
            lines.append(f"y={key[0]}, place={key[1]:<12} {self.before.counts[key]:>6} {acc:8.3f} {self.after.groups[key]:8.3f}")
        lines.append(f"{'worst group':22} {'':>6} {self.before.worst:8.3f} {self.after.worst:8.3f}")
        lines.append(f"{'average group':22} {'':>6} {self.before.average:8.3f} {self.after.average:8.3f}")
        lines.append(f"{'overall':22} {'':>6} {self.before.overall:8.3f} {self.after.overall:8.3f}")
        return "\n".join(lines)


def _predictions(source, head, means, ablate, names, representation, batch_size, device=None) -> torch.Tensor:
    from .engine import to_device

    out = []
    idx = _resolve_indices(ablate, names, means.shape[0])
    mu = None
    for ind, c, z in iter_source(source, batch_size, representation=representation, device=device):
        mu = to_device(means, c.device) if mu is None else mu
        zz = mean_ablate(c, mu, idx, representation=z)
        out.append(predict(head, zz).argmax(-1))
    return torch.cat(out).cpu()


def repair_spurious(test_source, labels, places, heldout_source, head, score_spurious: torch.Tensor,
                    score_core: torch.Tensor, *, k: int = 10, names: Optional[Sequence[str]] = None,
                    means: Optional[torch.Tensor] = None, representation: Optional[torch.Tensor] = None,
                    batch_size: int = 256, device=None) -> SpuriousRepair:
    """Mean-ablate the top-``k`` components by score(spurious) − score(core) and compare group accuracies.

    :param test_source: contributions of the evaluation images (tensor, Decomposition or ExtractionCache).
    :param labels, places: ``[N]`` class and place (background) indices of the evaluation images.
    :param heldout_source: contributions of held-out images (e.g. the Waterbirds validation split) from which the
        ablation means are estimated — never the test images (``means=`` overrides).
    :param head: z → logits (:func:`prediction_head`).
    :param score_spurious, score_core: ``[C]`` CompAttribute scores (e.g. :func:`vitdecomp.mean_correlation`
        for the ``waterbirds_spurious`` and ``waterbirds_core`` properties).
    :param device: where means and ablated predictions are computed (the head runs where its parameters are).
    """
    if heldout_source is test_source and means is None:
        raise InputError("the ablation means must come from held-out images, not the test images themselves")
    names = source_names(test_source) or (tuple(names) if names is not None else None)
    hn = source_names(heldout_source) if heldout_source is not None else None
    if names is not None and hn is not None and tuple(hn) != tuple(names):
        raise MismatchError("the held-out and test contributions have different components")
    C = score_spurious.shape[0]
    if names is None:
        names = tuple(str(i) for i in range(C))
    if means is None:
        if heldout_source is None:
            raise InputError("pass heldout_source (held-out images) or means=")
        means = component_means(heldout_source, batch_size=batch_size, device=device)
    ranked = spurious_ranking(score_spurious, score_core, names, k)
    chosen = [n for n, _ in ranked]
    N = source_len(test_source)
    y = _labels_tensor(labels, N)
    g = _labels_tensor(places, N)
    before = _predictions(test_source, head, means, [], names, representation, batch_size, device)
    after = _predictions(test_source, head, means, chosen, names, representation, batch_size, device)
    return SpuriousRepair(components=tuple(chosen), differences=tuple(d for _, d in ranked),
                          before=group_accuracies(before, y, g), after=group_accuracies(after, y, g),
                          predictions_before=before, predictions_after=after)


# ---------------------------------------------------------------------------------------------------- datasets


@attrs.define(eq=False)
class GroupedImages:
    """Image files with class label, place and split (``"train"``, ``"val"``, ``"test"``)."""

    root: Path
    files: List[str]
    labels: List[int]
    places: List[int]
    splits: List[str]
    class_names: Optional[List[str]] = None
    place_names: Optional[List[str]] = None

    def subset(self, split: str) -> "GroupedImages":
        keep = [i for i, s in enumerate(self.splits) if s == split]
        if not keep:
            raise EmptyDatasetError(f"no images in split {split!r} under {self.root} (splits: {sorted(set(self.splits))})")
        return GroupedImages(self.root, [self.files[i] for i in keep], [self.labels[i] for i in keep],
                             [self.places[i] for i in keep], [self.splits[i] for i in keep], self.class_names,
                             self.place_names)

    def head(self, n: int) -> "GroupedImages":
        """The first ``n`` images."""
        return GroupedImages(self.root, self.files[:n], self.labels[:n], self.places[:n], self.splits[:n],
                             self.class_names, self.place_names)

    def __len__(self) -> int:
        return len(self.files)

    def paths(self) -> List[Path]:
        return [self.root / f for f in self.files]


_SPLITS = {"0": "train", "1": "val", "2": "test"}


def read_waterbirds(root) -> GroupedImages:
    """Read Waterbirds' ``metadata.csv`` (columns ``img_filename, y, place, split``; split 0/1/2 = train/val/test)."""
    root = Path(root)
    meta = root / "metadata.csv"
    if not meta.is_file():
        raise InputError(f"{root} has no metadata.csv (Waterbirds layout: img_filename, y, place, split)")
    files, ys, ps, ss = [], [], [], []
    with open(meta, newline="") as f:
        reader = csv.DictReader(f)
        need = {"img_filename", "y", "place", "split"}
        missing = need - set(reader.fieldnames or ())
        if missing:
            raise InputError(f"{meta} lacks the column(s) {sorted(missing)}; it has {reader.fieldnames}")
        for row in reader:
            files.append(row["img_filename"])
            ys.append(int(float(row["y"])))
            ps.append(int(float(row["place"])))
            ss.append(_SPLITS.get(str(row["split"]).strip(), str(row["split"]).strip()))
    if not files:
        raise EmptyDatasetError(f"{meta} lists no images")
    return GroupedImages(root, files, ys, ps, ss, ["landbird", "waterbird"], ["land", "water"])


def _index_names(names: Sequence[str]) -> Dict[str, int]:
    uniq = sorted(set(names))
    if all(n.lstrip("-").isdigit() for n in uniq):
        return {n: int(n) for n in uniq}
    return {n: i for i, n in enumerate(uniq)}


def read_group_folders(root, *, class_names: Optional[Sequence[str]] = None) -> GroupedImages:
    """Read ``root/<split>/<class>_<place>/*.{jpg,png}`` (split folders ``train``, ``val``, ``test``).

    Class indices follow ``class_names`` when given, else the sorted class names (integers stand for themselves).
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root} is not a directory")
    files, cls, plc, ss = [], [], [], []
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for group_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            if "_" not in group_dir.name:
                raise InputError(f"group folder {group_dir} is not named <class>_<place> (e.g. waterbird_land)")
            c, p = group_dir.name.rsplit("_", 1)
            for f in sorted(group_dir.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(f.relative_to(root).as_posix())
                    cls.append(c)
                    plc.append(p)
                    ss.append(split_dir.name)
    if not files:
        raise EmptyDatasetError(f"no images under {root}/<split>/<class>_<place>/")
    if class_names is not None:
        cmap = {n: i for i, n in enumerate(class_names)}
        unknown = sorted(set(cls) - set(cmap))
        if unknown:
            raise InputError(f"class folder names {unknown} are not in class_names {list(class_names)}")
    else:
        cmap = _index_names(cls)
    pmap = _index_names(plc)
    return GroupedImages(root, files, [cmap[c] for c in cls], [pmap[p] for p in plc], ss,
                         sorted(cmap, key=cmap.get), sorted(pmap, key=pmap.get))
