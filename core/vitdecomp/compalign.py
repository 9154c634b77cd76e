"""CompAlign: map every component into CLIP's image-embedding space (Balasubramanian et al., NeurIPS 2024, §3.2;
METHOD.md §2).

One linear map per component, W_i ∈ R^{D×d}, and a shared bias b ∈ R^d:

    f(x) = Σ_i c_i(x) W_i + b,        aligned component i:  a_i(x) = c_i(x) W_i + b / C

trained on the L2-normalised CLIP image embeddings t(x) of the same images with

    L = mean_x [1 − cos(f(x), t(x))]  +  λ · 1/(C·d) · Σ_i ‖W_iᵀ W_i − I_d‖²_F          (D ≥ d)

The penalty pushes each map towards an isometry so that norms and angles, and with them the relative importance of
components, survive the mapping. W_iᵀW_i = I_d is only achievable when D ≥ d; when D < d the penalty is taken on
the achievable side, ‖W_i W_iᵀ − I_D‖²_F (W_i then has orthonormal rows), still divided by C·d. λ = 1 as in the
paper.

Training differs from the paper's script in ways that make the defaults converge without tuning:

- it runs on cached contributions (a tensor or an :class:`vitdecomp.ExtractionCache`), never materialising
  ``[N, C, d]``;
- every W_i starts from the closed-form ridge least-squares map of s(x) = Σ_i c_i(x) to t(x) (so training starts
  at the best shared linear map, whose held-out cosine is reported as the baseline ``init_cosine``), rescaled to
  the isometry scale that minimises the penalty (the cosine loss is scale invariant);
- ``method="dual"`` (what the default ``"auto"`` takes with fewer than C·D/2 training images, the regime of the
  paper's size, where its n × n kernel fits ``memory_gb``, e.g. up to ~11,000 training images with the default
  2 GiB; see :func:`fit_aligner`): the joint ridge regression of the
  unit targets on all C·D contribution coordinates at once, solved in its dual form W = Xᵀ(K + αI)⁻¹T with the
  kernel K = X Xᵀ of the centred training contributions (one pass of n²·C·D/2 multiply-adds, streamed in
  component groups), the ridge strength α picked on the held-out split, refitted to targets scaled to the
  predictions' norms; every map then replaced by its nearest isometry (polar factor, penalty 0) with the bias
  refitted, and that start refined by the joint L-BFGS below with λ at full strength. No penalty ramp is needed:
  the polar factor takes each map's det ±1 side from the data, not from a shared start. On planted data it
  has the highest held-out cosine of the four methods at every ratio measured (n = 0.078–3.5·C·D), with exact
  isometries; at the paper's size (N = 10,000, C = 150, D = d = 768) in under 5 minutes on 2 CPU cores
  (``benchmarks/RESULTS.md``);
- ``method="bcd"`` (what ``"auto"`` takes with at least 2·C·D training images; see :func:`fit_aligner`):
  block-coordinate sweeps. f(x) is held for every training image ([n, d]); a sweep
  visits each map W_i in turn with the others fixed. The block's problem is small (D·d unknowns) and its
  statistics come from c_i and f alone: a Gauss–Newton step of the reweighted least-squares form of the cosine
  (weights 1/‖f(x)‖², the shared bias eliminated) with the penalty's Gauss–Newton term, solved by a few
  conjugate-gradient steps preconditioned with the Cholesky factor of the block's weighted Gram matrix; the
  orthogonal-Procrustes map (polar factor of the block's least-squares map) as a second candidate, which can
  cross the singular matrices between the det ±1 sets of isometries that gradient steps under the penalty cannot
  cross (D = d); an exact line search on the true objective (the data term from five per-image scalars, the
  penalty a quartic in the step), so every block step decreases the objective. (The block step can also
  minimise the objective plus a proximal term (κ_k·ā/2)·‖ΔW_i‖², ā the mean block curvature, κ_k scheduled from
  large to small over the sweeps; off by default, see ``_PROX_START``: measured, it does not make bcd win where
  the maps are underdetermined.) A sweep costs about three [n, D] × [D, d] products per component, i.e. about
  one pass of gradients over the data; components are read from the source in groups of at most ``memory_gb``
  (one pass over the cache per group and sweep);
- ``method="joint"`` (what ``"auto"`` takes with fewer than C·D/2 training images where the dual kernel does not
  fit ``memory_gb``, and under ``torch.distributed``): L-BFGS on all maps and the
  bias at once, from the same shared start. f(x) is held for every training and held-out image; an iteration is
  one pass computing c·P for the quasi-Newton direction P (all C maps as one [B, C·D] × [C·D, d] product), an
  exact line search along it (the data term from five per-image scalars, the penalty a quartic: no further pass)
  and one pass for the gradient, i.e. the multiply-adds of one forward and backward pass over the data (an Adam epoch without
  its per-batch penalty), streamed chunk by chunk. Where the maps are underdetermined (fewer images than C·D),
  early-stopped joint descent regularises where every block solve overfits, and beats Adam's held-out cosine
  with fewer than C·D/2 images, with D = d its isometry deviation too (C = 16 and C = 150; not from 0.63·C·D at
  D ≥ 64: see :func:`fit_aligner`). λ ramps up over ``penalty_warmup`` iterations (default 60; the curvature pairs are kept
  across its steps): with D = d the weak penalty early on lets maps cross between the
  det ±1 sets of isometries, which is most of what a longer ramp gains. With D = d and the maps determined
  (≥ 2·C·D images), a map trapped among the isometries of the wrong determinant is found by the data term's
  gradient and reflected where descent stops (see ``_fit_joint``). After descent, the best iterate's maps
  replaced by their nearest isometries (polar factors, penalty 0, bias refitted) are a last candidate, kept when
  the held-out objective says so;
- ``method="adam"`` (what ``"auto"`` takes from C·D/2 to 2·C·D training images): the stochastic-gradient
  reference. Each batch
  computes Σ_i c_i W_i as one [B, C·D] × [C·D, d] matrix product; λ ramps up from 0 over ``penalty_warmup``
  epochs (a continuation that lets every map reach the right basin before the isometry penalty pins it down; see
  :class:`AlignConfig`); the step is halved every second epoch without improvement;
- a held-out split (``val_fraction``) decides early stopping (``patience`` sweeps/epochs in which the held-out
  objective fell by less than ``tol``) and the best state is kept; the held-out cosine is reported and saved.
  Fewer than 50 held-out images are warned about: their mean cosine says little;
- ``isometric=True`` makes every returned map an exact isometry (the constrained problem the penalty relaxes):
  the best isometric candidate the fitter saw, or the polar factors of its result with the bias refitted.

The result is an :class:`Aligner`; :meth:`Aligner.save` writes safetensors plus JSON metadata (analysed model,
component names, CLIP model, configuration, held-out cosine), :meth:`Aligner.load` reads it back. When the analysed
model *is* the CLIP model, use :meth:`Aligner.identity`.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from typing import Iterator, List, Optional, Sequence, Tuple

import attrs
import torch

from .engine import to_device
from .errors import EmptyDatasetError, InputError, MismatchError

__all__ = ["AlignConfig", "Aligner", "fit_aligner"]

_FORMAT = "vitdecomp.aligner/1"
_METHODS = ("bcd", "adam", "joint", "dual")
_DEFAULTS = {"bcd": (50, 2, 1), "adam": (200, 5, 20), "joint": (500, 10, 60), "dual": (500, 5, 0)}  # (max_epochs, patience, penalty_warmup) per method
_UNIT = {"bcd": "sweep", "adam": "epoch", "joint": "iteration", "dual": "iteration"}  # what max_epochs and history count
_BCD_MIN_RATIO = 2  # method="auto" takes bcd when training images ≥ this × C·D (see fit_aligner)
_DUAL_MAX_RATIO = 0.5  # ... dual below this × C·D (joint where its kernel does not fit), Adam in between
_SMALL_VAL = 50  # fewer held-out images than this: the held-out cosine says little (warned)


def _positive(instance, attribute, value):
    if not value > 0:
        raise InputError(f"{attribute.name} must be > 0, got {value!r}")


def _non_negative(instance, attribute, value):
    if not value >= 0:
        raise InputError(f"{attribute.name} must be ≥ 0, got {value!r}")


def _fraction(instance, attribute, value):
    if not 0 <= value < 1:
        raise InputError(f"{attribute.name} must be in [0, 1), got {value!r}")


def _boolean(instance, attribute, value):
    if not isinstance(value, bool):
        raise InputError(f"{attribute.name} must be True or False, got {value!r}")


def _method(instance, attribute, value):
    if value not in _METHODS:
        raise InputError(f"method must be one of {_METHODS}, got {value!r}")


def _optional_positive_int(instance, attribute, value):
    if value is not None and (not isinstance(value, int) or value < 1):
        raise InputError(f"{attribute.name} must be None or a positive int, got {value!r}")


@attrs.frozen
class AlignConfig:
    """Training settings of :func:`fit_aligner` (saved with the aligner).

    ``lam``: weight λ of the isometry penalty. ``lr``, ``weight_decay``: Adam; ``lr=None`` picks
    0.05/√max(D, d), a step proportional to the entries of an isometric map (Adam's steps are scale free).
    ``batch_size``: images per step.
    ``max_epochs``, ``patience``: early stopping on the held-out objective. ``val_fraction``: share of images held
    out (0: none, then training runs ``max_epochs`` and no held-out cosine is reported). ``ridge``: the ridge of
    the closed-form initialisation, relative to the mean eigenvalue of Cov(s). ``penalty_probes``: None computes
    the penalty exactly (C·D·d² work per step); an int m uses the unbiased Hutchinson estimate
    ‖G − I‖²_F ≈ (1/m) Σ_z ‖(G − I) z‖², z ~ N(0, I), which costs C·D·d·m (useful for large D = d).
    ``penalty_warmup``: λ ramps linearly from 0 to ``lam`` over this many epochs (early stopping waits for the
    ramp to end). Without it, a map that starts in the wrong connected component of the orthogonal group
    (det −1 instead of +1, only possible when D = d) cannot cross to the right one by Adam's small steps without
    passing through singular matrices, which the penalty forbids. On planted data with N=2000, C=16, D=d=16 the
    held-out cosine stalls at 0.969 without the ramp, reaches 0.999 with 20 epochs of ramp and 1.000 with 40;
    with D > d (a connected set of isometries) the ramp makes no difference. ``bcd`` needs no ramp (default 1:
    none): its Procrustes candidate jumps across.

    ``method``: ``"dual"`` (joint ridge in its dual form, polar factors, then joint L-BFGS), ``"bcd"``
    (block-coordinate sweeps), ``"joint"`` (L-BFGS on all maps) or ``"adam"``, the one used
    (:func:`fit_aligner`'s default ``"auto"`` picks by memory and the number of training images); ``max_epochs``,
    ``patience`` and ``penalty_warmup`` count sweeps for ``bcd`` (defaults 50, 2, 1), iterations for ``joint``
    (500, 10, 60) and for ``dual``'s refinement (500, 5, 0; its dual stage is iteration 1) and epochs for
    ``adam`` (200, 5, 20).
    ``lr``, ``weight_decay``, ``batch_size`` and ``penalty_probes`` are Adam's (``bcd`` uses ``batch_size`` only
    for its evaluation passes). ``tol``: a sweep/iteration/epoch counts as an improvement when the held-out
    objective falls by more than this (absolute; without a held-out split, ``bcd`` stops when a sweep's training
    decrease is below it, ``joint`` after ``patience`` such iterations). ``memory_gb``: ``bcd``'s budget for the
    contributions it holds at once; ``joint``'s for its L-BFGS history (up to 5 correction pairs, two map-sized
    vectors each: 3 at C = 150, D = d = 768 with the default 2 GiB); ``dual``'s for its float64 kernel and
    Cholesky factor (2·8·n² bytes plus the held-out rows; ``"auto"`` takes ``dual`` only where they fit, an
    explicit ``method="dual"`` that does not fit is an error); besides them it holds the float32 contributions
    of one component group of at most half of ``memory_gb``, and its refinement the L-BFGS history as ``joint``.
    ``isometric``: False (default) returns the best state of the penalised objective, which can lie slightly off
    the isometries where that buys held-out cosine (the penalty is a soft constraint); True returns exact
    isometries (penalty ~1e-12): ``dual`` and ``joint`` the better, by the held-out objective, of their isometric
    finish (the polar factors of the best iterate, bias refitted) and an isometric start (``dual``'s polar stage),
    taken whatever the penalised iterates reached; ``adam`` and ``bcd`` the polar factors of their result with the
    bias refitted (one more pass, one more ``history`` entry, ``stage: "isometric"``).
    """

    lam: float = attrs.field(default=1.0, validator=_non_negative)
    method: str = attrs.field(default="bcd", validator=_method)
    lr: Optional[float] = attrs.field(default=None, validator=attrs.validators.optional(_positive))
    weight_decay: float = attrs.field(default=0.0, validator=_non_negative)
    batch_size: int = attrs.field(default=256, validator=_positive)
    max_epochs: int = attrs.field(default=200, validator=_positive)
    patience: int = attrs.field(default=5, validator=_positive)
    val_fraction: float = attrs.field(default=0.1, validator=_fraction)
    ridge: float = attrs.field(default=1e-3, validator=_positive)
    seed: int = 0
    penalty_probes: Optional[int] = attrs.field(default=None, validator=_optional_positive_int)
    penalty_warmup: int = attrs.field(default=20, validator=_non_negative)
    tol: float = attrs.field(default=1e-5, validator=_non_negative)
    memory_gb: float = attrs.field(default=2.0, validator=_positive)
    isometric: bool = attrs.field(default=False, validator=_boolean)


def _first_difference(got: Sequence[str], expected: Sequence[str]) -> str:
    for i, (g, e) in enumerate(zip(got, expected)):
        if g != e:
            return f"first difference at position {i}: given {g!r}, aligner expects {e!r}"
    return f"given {len(got)} components, aligner expects {len(expected)} (common prefix of {min(len(got), len(expected))})"


@attrs.define(eq=False)
class Aligner:
    """Per-component linear maps into CLIP space: ``aligner(contributions [N, C, D]) -> [N, C, d]``.

    ``weight`` ``[C, D, d]`` (None for the identity), ``bias`` ``[d]`` (apportioned b/C per component),
    ``names`` the C component names, ``model_name`` the analysed model, ``clip_model`` the target CLIP model,
    ``held_out_cosine`` the mean cos(f(x), t(x)) on held-out images, ``init_cosine`` the same for the
    closed-form initialisation (one shared linear map of Σ_i c_i: the baseline to compare with), ``config`` the
    training settings (``config["method"]``: ``"bcd"``, ``"joint"`` or ``"adam"``) and ``history`` one dict per
    sweep/iteration/epoch (``seconds``: since training began, after the shared start).
    """

    weight: Optional[torch.Tensor]
    bias: torch.Tensor
    names: tuple = attrs.field(converter=tuple)
    model_name: Optional[str] = None
    clip_model: Optional[str] = None
    config: dict = attrs.field(factory=dict)
    held_out_cosine: Optional[float] = None
    init_cosine: Optional[float] = None
    history: list = attrs.field(factory=list)
    #: the full weight fingerprint of the model the aligner was fitted on (None: unknown, not checked)
    model_fingerprint: Optional[str] = None
    #: ``False`` accepts caches and decompositions of other weights (same component names and sizes): an explicit
    #: override for, say, a fine-tuned copy
    check_model: bool = True

    def __attrs_post_init__(self):
        if self.weight is not None:
            if self.weight.ndim != 3 or self.weight.shape[0] != len(self.names):
                raise InputError(
                    f"weight must be [C, D, d] with C = {len(self.names)} names, got {tuple(self.weight.shape)}"
                )
            if self.bias.shape != (self.weight.shape[2],):
                raise InputError(f"bias must be [d] = [{self.weight.shape[2]}], got {tuple(self.bias.shape)}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def identity(cls, names: Sequence[str], dim: int, model_name: Optional[str] = None) -> "Aligner":
        """The aligner of a model analysed in its own (CLIP) space: a_i = c_i."""
        return cls(None, torch.zeros(dim), names, model_name=model_name, clip_model=model_name,
                   config={"identity": True}, held_out_cosine=None)

    @property
    def is_identity(self) -> bool:
        return self.weight is None

    @property
    def in_dim(self) -> int:
        """D, the analysed model's representation size."""
        return self.bias.shape[0] if self.weight is None else self.weight.shape[1]

    @property
    def out_dim(self) -> int:
        """d, the CLIP embedding size."""
        return self.bias.shape[0]

    @property
    def penalty_side(self) -> str:
        """``"WtW"`` (W_iᵀW_i ≈ I_d, D ≥ d) or ``"WWt"`` (W_i W_iᵀ ≈ I_D, D < d)."""
        return "WtW" if self.in_dim >= self.out_dim else "WWt"

    def to(self, device) -> "Aligner":
        """A copy on ``device``."""
        new = copy.copy(self)
        new.weight = None if self.weight is None else self.weight.to(device)
        new.bias = self.bias.to(device)
        return new

    def map(self, name: str) -> torch.Tensor:
        """W_i ``[D, d]`` of component ``name``."""
        if name not in self.names:
            raise MismatchError(f"aligner has no component {name!r}; it has {len(self.names)}, e.g. {list(self.names[:5])}")
        i = self.names.index(name)
        return torch.eye(self.in_dim) if self.weight is None else self.weight[i]

    # ------------------------------------------------------------------ application
    def check_source(self, source, *, where: Optional[str] = None) -> None:
        """Raise :class:`MismatchError` when ``source`` (an :class:`ExtractionCache`, a :class:`Decomposition` or
        their ``meta`` dict) records a model fingerprint other than the one this aligner was fitted on: the same
        component names and sizes with other weights. Every application to a cache or a Decomposition checks
        (``aligner(dec)``, ``total``, ``iter_aligned``, ``align_components``, and the functions taking an
        ``aligner=``); :func:`vitdecomp.decompose` records the fingerprint (its ``fingerprint=``), caches and
        saved decompositions carry it. ``check_model=False`` (``Aligner.load(..., check_model=False)``, the CLI's
        ``--no-model-check``) turns the check off; sources or aligners without a fingerprint (a bare tensor,
        ``decompose(..., fingerprint=False)``, files of older versions) are not checked. ``where`` names the
        source in the message."""
        meta = source if isinstance(source, dict) else getattr(source, "meta", None)
        theirs = meta.get("model_fingerprint") if isinstance(meta, dict) else None
        if self.check_model and self.model_fingerprint and theirs and theirs != self.model_fingerprint:
            where = where or getattr(source, "path", None) or ("the decomposition" if type(source).__name__ ==
                                                                "Decomposition" else type(source).__name__)
            raise MismatchError(
                f"the aligner was fitted on model {self.model_name!r} with weights {self.model_fingerprint}, but "
                f"{where} comes from weights {theirs} (same component names and sizes, other weights). Fit an aligner "
                "for this model, or set aligner.check_model = False (Aligner.load(..., check_model=False), "
                "--no-model-check on the command line) to apply "
                "it anyway"
            )

    def _contributions(self, x) -> torch.Tensor:
        from .decomposition import Decomposition

        if isinstance(x, Decomposition):
            self.check_source(x)
            if tuple(x.names) != self.names:
                raise MismatchError(
                    f"Decomposition components do not match the aligner's ({_first_difference(x.names, self.names)}). "
                    f"The aligner was fit for model {self.model_name!r}; decompose with the same model and settings."
                )
            x = x.contributions
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"aligner input must be contributions [N, C, D] or a Decomposition, got {shape}")
        if x.shape[1] != len(self.names) or x.shape[2] != self.in_dim:
            raise MismatchError(
                f"contributions have shape [N, C, D] = {tuple(x.shape)}; the aligner expects "
                f"C = {len(self.names)}, D = {self.in_dim} (model {self.model_name!r})"
            )
        return x

    def __call__(self, x) -> torch.Tensor:
        """Aligned contributions a_i = c_i W_i + b/C, shape ``[N, C, d]`` (float32)."""
        c = to_device(self._contributions(x), self.bias.device, torch.float32)
        if self.weight is None:
            return c + self.bias / len(self.names)
        return torch.einsum("ncD,cDd->ncd", c, self.weight) + self.bias / len(self.names)

    def total(self, x) -> torch.Tensor:
        """f(x) = Σ_i c_i W_i + b, shape ``[N, d]``, without building ``[N, C, d]``."""
        c = to_device(self._contributions(x), self.bias.device, torch.float32)
        if self.weight is None:
            return c.sum(1) + self.bias
        return _combine(c, self.weight) + self.bias

    def cosine(self, x, targets: torch.Tensor) -> torch.Tensor:
        """cos(f(x), t(x)) per image, shape ``[N]``."""
        f = self.total(x)
        return torch.nn.functional.cosine_similarity(f, targets.to(f.device, torch.float32), dim=-1)

    def iter_aligned(self, source, *, batch_size: int = 256) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """``(indices, aligned [B, C, d])`` over a contributions tensor or an :class:`ExtractionCache`."""
        data = _Data.of(source)
        self.check_source(data.meta)
        if data.names is not None and tuple(data.names) != self.names:
            raise MismatchError(f"cache components do not match the aligner's ({_first_difference(data.names, self.names)})")
        for k in range(data.num_chunks):
            start, stop = data.chunks[k]
            chunk = data.load(k)
            for i in range(0, stop - start, batch_size):
                idx = torch.arange(start + i, min(start + i + batch_size, stop))
                yield idx, self(chunk[i:i + batch_size])

    def align_components(self, source, components: Optional[Sequence[str]] = None, *,
                         batch_size: int = 256) -> torch.Tensor:
        """Aligned outputs ``[N, k, d]`` of the ``components`` (names; default all) over a contributions tensor or an
        :class:`ExtractionCache`, read chunk by chunk: memory N·k·d, never N·C·d. Input for :func:`textspan`."""
        data = _Data.of(source)
        self.check_source(data.meta)
        if data.names is not None and tuple(data.names) != self.names:
            raise MismatchError(f"source components do not match the aligner's ({_first_difference(data.names, self.names)})")
        if data.C != len(self.names) or data.D != self.in_dim:
            raise MismatchError(f"source has C = {data.C}, D = {data.D}; the aligner expects C = {len(self.names)}, "
                                f"D = {self.in_dim}")
        names = list(self.names) if components is None else list(components)
        missing = [n for n in names if n not in self.names]
        if missing:
            raise MismatchError(f"unknown components {missing[:5]}; the aligner has e.g. {list(self.names[:5])}")
        idx = [self.names.index(n) for n in names]
        w = None if self.weight is None else self.weight[idx]
        share = self.bias / len(self.names)
        out = []
        for k in range(data.num_chunks):
            chunk = data.load(k)
            for i in range(0, chunk.shape[0], batch_size):
                c = chunk[i:i + batch_size][:, idx].to(self.bias.device, torch.float32)
                out.append((c if w is None else torch.einsum("ncD,cDd->ncd", c, w)) + share)
        return torch.cat(out)

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Write weights (safetensors) with metadata: model, component names, CLIP model, config, held-out cosine."""
        from safetensors.torch import save_file

        tensors = {"bias": self.bias.detach().cpu().contiguous()}
        if self.weight is not None:
            tensors["weight"] = self.weight.detach().cpu().contiguous()
        meta = {
            "format": _FORMAT, "names": list(self.names), "model_name": self.model_name,
            "clip_model": self.clip_model, "config": self.config, "held_out_cosine": self.held_out_cosine,
            "init_cosine": self.init_cosine, "history": self.history, "identity": self.weight is None,
            "in_dim": self.in_dim, "out_dim": self.out_dim, "penalty_side": self.penalty_side,
            "model_fingerprint": self.model_fingerprint,
        }
        try:
            save_file(tensors, str(path), metadata={"vitdecomp": json.dumps(meta)})
        except Exception as exc:  # noqa: BLE001 - safetensors wraps OS errors in its own type
            from .errors import OutputError

            raise OutputError(f"cannot write the aligner to {path}: {type(exc).__name__}: {exc}") from exc

    @classmethod
    def load(cls, path, *, device="cpu", check_model: bool = True) -> "Aligner":
        """Read an aligner written by :meth:`save` (``check_model``: see :meth:`check_source`)."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = json.loads((f.metadata() or {}).get("vitdecomp", "{}"))
                if meta.get("format") != _FORMAT:
                    raise MismatchError(f"{path} is not a vitdecomp aligner (format {meta.get('format')!r}, expected {_FORMAT!r})")
                weight = None if meta.get("identity") else f.get_tensor("weight")
                bias = f.get_tensor("bias")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for foreign files
            if isinstance(exc, MismatchError):
                raise
            raise InputError(f"Could not read aligner file {path}: {exc}") from exc
        return cls(weight, bias, meta["names"], model_name=meta.get("model_name"), clip_model=meta.get("clip_model"),
                   config=meta.get("config", {}), held_out_cosine=meta.get("held_out_cosine"),
                   init_cosine=meta.get("init_cosine"), history=meta.get("history", []),
                   model_fingerprint=meta.get("model_fingerprint"), check_model=check_model)


# ---------------------------------------------------------------------------------------------------- data access


class _Data:
    """Uniform chunked access to contributions held in a tensor or an ExtractionCache."""

    def __init__(self, chunks, loader, N, C, D, names=None, meta=None, targets=None, dtype=torch.float32,
                 tensor=None):
        self.chunks, self._loader = chunks, loader
        self.N, self.C, self.D, self.names, self.meta, self.targets = N, C, D, names, meta or {}, targets
        self._checked = set()
        self.dtype, self.tensor = dtype, tensor  # tensor: the [N, C, D] tensor of an in-memory source

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    def load(self, k: int) -> torch.Tensor:
        x = self._loader(k)
        if k not in self._checked:  # once per chunk: NaN or Inf never pass silently (on the CPU, without a sync)
            if x.device.type == "cpu":
                bad = ~torch.isfinite(x).flatten(1).all(1)
                if bool(bad.any()):
                    i = self.chunks[k][0] + int(torch.nonzero(bad)[0])
                    raise InputError(f"image {i} has NaN or Inf in its contributions; every value must be finite")
            self._checked.add(k)
        return x

    @classmethod
    def of(cls, source) -> "_Data":
        from .decomposition import Decomposition

        if isinstance(source, Decomposition):
            return cls._of_tensor(source.contributions, names=source.names, meta=dict(source.meta))
        if isinstance(source, torch.Tensor):
            return cls._of_tensor(source)
        if hasattr(source, "load_shard") and hasattr(source, "shard_ranges"):  # ExtractionCache
            ranges = list(source.shard_ranges)
            if not ranges:
                raise EmptyDatasetError(f"extraction cache {getattr(source, 'path', '')} holds no images")
            tg = None
            try:
                tg = source.targets()
            except Exception:  # noqa: BLE001 - a cache without CLIP targets; the caller must pass them
                tg = None
            return cls(ranges, lambda k: source.load_shard(k)[0], len(source), len(source.names), source.dim,
                       names=tuple(source.names), meta=dict(source.meta), targets=tg,
                       dtype=getattr(source, "dtype", torch.float32))
        raise InputError(
            f"contributions must be a [N, C, D] tensor, a Decomposition or an ExtractionCache, got {type(source).__name__}"
        )

    @classmethod
    def _of_tensor(cls, x: torch.Tensor, names=None, meta=None) -> "_Data":
        if x.ndim != 3:
            raise InputError(f"contributions must be [N, C, D], got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise EmptyDatasetError("contributions hold no images (N = 0)")
        return cls([(0, x.shape[0])], lambda k: x, x.shape[0], x.shape[1], x.shape[2], names=names, meta=meta,
                   dtype=x.dtype, tensor=x)


def _batches(data: _Data, mask: torch.Tensor, batch_size: int, gen: Optional[torch.Generator]):
    """Yield (global indices, contributions) for images where ``mask`` is True; shuffled when ``gen`` is given."""
    order = range(data.num_chunks)
    if gen is not None:
        order = torch.randperm(data.num_chunks, generator=gen).tolist()
    for k in order:
        start, stop = data.chunks[k]
        local = torch.nonzero(mask[start:stop]).flatten()
        if local.numel() == 0:
            continue
        if gen is not None:
            local = local[torch.randperm(local.numel(), generator=gen)]
        chunk = data.load(k)
        for i in range(0, local.numel(), batch_size):
            li = local[i:i + batch_size]
            yield li + start, chunk[li]


# ---------------------------------------------------------------------------------------------------- training


def _penalty_matrix(W: torch.Tensor) -> torch.Tensor:
    """G_i − I on the achievable side, [C, k, k]."""
    C, D, d = W.shape
    if D >= d:
        G = W.transpose(1, 2) @ W
        k = d
    else:
        G = W @ W.transpose(1, 2)
        k = D
    return G - torch.eye(k, device=W.device, dtype=W.dtype)


def _penalty(W: torch.Tensor, probes: Optional[int] = None, gen: Optional[torch.Generator] = None) -> torch.Tensor:
    """(1/(C·d)) Σ_i ‖G_i − I‖²_F, exact or (with ``probes``) Hutchinson-estimated."""
    C, D, d = W.shape
    if probes is None:
        return _penalty_matrix(W).pow(2).sum() / (C * d)
    k = min(D, d)
    z = to_device(torch.randn(C, k, probes, generator=gen, device="cpu"), W.device, W.dtype)
    if D >= d:  # (WᵀW − I) z
        r = W.transpose(1, 2) @ (W @ z) - z
    else:  # (W Wᵀ − I) z
        r = W @ (W.transpose(1, 2) @ z) - z
    return r.pow(2).sum() / (probes * C * d)


def _closed_form(data: _Data, targets: torch.Tensor, mask: torch.Tensor, ridge: float, batch_size: int,
                 device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ridge least-squares map (W [D, d], b [d]) of s = Σ_i c_i onto the targets (float64 accumulation)."""
    D, d = data.D, targets.shape[1]
    sxx = torch.zeros(D, D, dtype=torch.float64, device=device)
    sxt = torch.zeros(D, d, dtype=torch.float64, device=device)
    ss = torch.zeros(D, dtype=torch.float64, device=device)
    st = torch.zeros(d, dtype=torch.float64, device=device)
    n = 0
    for idx, c in _batches(data, mask, batch_size, None):
        s = to_device(c, device).sum(1, dtype=torch.float64)  # float64 accumulation without a float64 copy of c
        t = to_device(targets[idx], device, torch.float64)
        sxx += s.T @ s
        sxt += s.T @ t
        ss += s.sum(0)
        st += t.sum(0)
        n += s.shape[0]
    from . import distributed as dist

    if dist.info().active:  # each rank summed its own images: add the normal equations up across ranks
        sxx, sxt, ss, st = (dist.all_reduce_sum(t) for t in (sxx, sxt, ss, st))
        n = int(dist.all_reduce_sum(torch.tensor([float(n)], dtype=torch.float64)).item())
    ms, mt = ss / n, st / n
    cxx = sxx - n * torch.outer(ms, ms)
    cxt = sxt - n * torch.outer(ms, mt)
    alpha = ridge * max(float(torch.trace(cxx)) / D, 1e-12)
    W = torch.linalg.solve(cxx + alpha * torch.eye(D, dtype=torch.float64, device=device), cxt)
    b = mt - ms @ W
    # The cosine loss is scale invariant: rescale (W, b) to the scale that minimises ‖g·G − I‖²_F, G the Gram
    # matrix on the achievable side, so training starts as close to an isometry as the direction allows.
    G = W.T @ W if D >= d else W @ W.T
    g = float(torch.trace(G)) / max(float(G.pow(2).sum()), 1e-300)
    gamma = math.sqrt(max(g, 1e-12))
    return (W * gamma).float(), (b * gamma).float()


def _combine(c: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Σ_i c_i W_i as one [B, C·D] × [C·D, d] matrix product (faster than the equivalent einsum)."""
    B, C, D = c.shape
    return c.reshape(B, C * D) @ W.reshape(C * D, W.shape[2])


def _evaluate(data: _Data, targets, mask, W, b, batch_size, device) -> Tuple[float, float]:
    """(mean 1 − cos, mean cos) over images where ``mask``."""
    from . import distributed as dist

    tot, n = torch.zeros((), dtype=torch.float64, device=device), 0
    with torch.no_grad():  # sums stay on the device: the host reads them once
        for idx, c in _batches(data, mask, batch_size, None):
            f = _combine(to_device(c, device, torch.float32), W) + b
            cos = torch.nn.functional.cosine_similarity(f, to_device(targets[idx], device), dim=-1)
            tot += cos.sum()
            n += cos.numel()
    tot = float(tot)
    if dist.info().active:  # each rank evaluated its own share of the images
        tot, n = dist.all_reduce_sum(torch.tensor([tot, float(n)], dtype=torch.float64)).tolist()
    mean = tot / max(n, 1)
    return 1.0 - mean, mean


def _num_batches(data: _Data, mask: torch.Tensor, batch_size: int) -> int:
    """How many batches :func:`_batches` yields for ``mask`` (host arithmetic; no data is read)."""
    return sum(-(-int(mask[a:b].sum()) // batch_size) for a, b in data.chunks)


def _data_parallel_epoch(data, targets, local_train, batch_size, gen, W, b, opt, lam_now, probes, device, world):
    """One epoch of data-parallel refinement: each rank steps through its own images; per step one all-reduce
    carries the summed data gradients, the image count and the penalty gradient (ranks that ran out contribute
    zero, as with DDP's Join), and every rank applies the same update. The number of steps is agreed once per
    epoch and the loss stays on the device, so no step makes the host wait for the GPU. Returns (Σ loss, n) over
    all ranks."""
    from . import distributed as dist

    steps = max(dist.all_gather_objects(_num_batches(data, local_train, batch_size)))
    it = iter(_batches(data, local_train, batch_size, gen))
    tot = torch.zeros(2, dtype=torch.float64, device=W.device)
    nW, nb = W.numel(), b.numel()
    for _ in range(steps):
        nxt = next(it, None)
        opt.zero_grad(set_to_none=True)
        count = torch.zeros(1, dtype=W.dtype, device=W.device)
        if nxt is not None:
            idx, c = nxt
            c = to_device(c, device, torch.float32)
            f = _combine(c, W) + b
            data_sum = (1 - torch.nn.functional.cosine_similarity(f, to_device(targets[idx], device), dim=-1)).sum()
            data_sum.backward()
            count.fill_(c.shape[0])
            tot += torch.stack([data_sum.detach().to(torch.float64), count[0].to(torch.float64)])
        parts = [W.grad.flatten() if W.grad is not None else W.new_zeros(nW),
                 b.grad.flatten() if b.grad is not None else b.new_zeros(nb), count]
        if lam_now > 0:
            W.grad = None
            (lam_now * _penalty(W, probes, gen)).backward()
            parts.append(W.grad.flatten())
        red = dist.all_reduce_sum(torch.cat(parts))
        n_all = red[nW + nb]
        gW = red[:nW].view_as(W) / n_all
        if lam_now > 0:
            gW = gW + red[nW + nb + 1:].view_as(W) / world
        W.grad, b.grad = gW, red[nW:nW + nb].view_as(b) / n_all
        opt.step()
    tot = dist.all_reduce_sum(tot)
    return float(tot[0]), int(tot[1])



# ------------------------------------------------------------------------------------------- block-coordinate fit


def _pen_parts(W: torch.Tensor, P: torch.Tensor):
    """For one map W [D, d] and a direction P: (R0, S1, S2) with G(W + αP) − I = R0 + α S1 + α² S2 on the
    achievable side."""
    D, d = W.shape
    if D >= d:
        R0 = W.T @ W
        S1 = W.T @ P
        S2 = P.T @ P
    else:
        R0 = W @ W.T
        S1 = P @ W.T
        S2 = P @ P.T
    R0 = R0 - torch.eye(R0.shape[0], device=W.device, dtype=W.dtype)
    return R0, S1 + S1.T, S2


def _pen_hvp(W: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """Gauss–Newton Hessian of ‖G(W) − I‖²_F applied to P (without the factor 4·mu, see _bcd_block)."""
    if W.shape[0] >= W.shape[1]:
        return W @ (P.T @ W + W.T @ P)
    return (P @ W.T + W @ P.T) @ W


def _line_search(FT, uT, FF, Fu, uu, pen_coef, n_total, reduce):
    """α ≥ 0 minimising mean_x [1 − cos(F + αu, t)] + pen(α), pen a quartic with coefficients ``pen_coef``, over a
    grid refined once. Per-image scalars: FT = ⟨F,t⟩, uT = ⟨u,t⟩, FF = ‖F‖², Fu = ⟨F,u⟩, uu = ‖u‖². Returns
    (α, objective at α, objective at 0)."""
    def values(alphas):
        a = alphas[None, :]
        num = FT[:, None] + uT[:, None] * a
        den = (FF[:, None] + 2 * Fu[:, None] * a + uu[:, None] * a * a).clamp_min(1e-30).sqrt()
        data = reduce((1 - num / den).sum(0, dtype=torch.float64)) / n_total
        aa = alphas.to(torch.float64)
        pen = sum(c * aa ** k for k, c in enumerate(pen_coef))
        return data + pen

    dev = FT.device
    grid = torch.cat([torch.linspace(0, 2, 21), torch.tensor([2.5, 3.0, 4.0])]).to(dev, FT.dtype)
    v = values(grid)
    k = int(torch.argmin(v))
    lo = float(grid[max(k - 1, 0)])
    hi = float(grid[min(k + 1, grid.numel() - 1)])
    fine = torch.linspace(lo, hi, 21, device=dev, dtype=FT.dtype)
    vf = values(fine)
    j = int(torch.argmin(vf))
    if float(vf[j]) <= float(v[k]):
        return float(fine[j]), float(vf[j]), float(v[0])
    return float(grid[k]), float(v[k]), float(v[0])


def _bcd_block(ci, F, T, W, b, mu, n_total, inner, reduce, factor=None, procrustes=True, prox=0.0, eig=None):
    """One step on one map W_i and the shared bias, the other maps fixed, with an exact line search on the true
    objective; returns the decrease of the objective.

    ``ci`` [n, D] this component's contributions, ``F`` [n, d] the current f(x), ``T`` [n, d] unit targets,
    ``W`` [D, d] the map and ``b`` [d] the bias (all three updated in place), ``mu`` = λ/(C·d).

    Model: the reweighted least-squares form of the cosine, Σ_x w_x ‖f − ‖f‖·t‖²/2 with w_x = 1/‖f_x‖² frozen
    (its gradient (f̂ − t)/‖f‖ is ∂(1 − cos)/∂f plus a radial part, so a step moves f towards ‖f‖·t instead of
    only turning it), plus the penalty's Gauss–Newton term 4·mu·J_RᵀJ_R. The bias is eliminated (a step in W_i
    comes with b −= μ_i·ΔW_i, μ_i the weighted mean of c_i), so the block works on centred contributions and a
    change of W_i never shifts f's mean. ``prox`` ρ ≥ 0 adds the proximal term (ρ/2)·‖ΔW_i‖² to what the step
    minimises, in the model and in the line search (ρ = 0: the plain block step); the returned decrease is that
    of the objective itself, which every step still lowers. The D·d system is solved by a few conjugate-gradient
    steps preconditioned with (A + damping + ρ)⁻¹, A = Σ_x w_x (c_i − μ_i)ᵀ(c_i − μ_i): through A's
    eigendecomposition when ``eig`` (default: when ρ > 0), which serves every ρ, else through the Cholesky factor
    of A + damping, ~17× cheaper at D = 768 (``factor``: what an earlier sweep returned, to reuse, which saves one
    of the three [n, D]-sized products; the line search keeps every step a descent whatever the model). A second
    candidate is the nearest isometry (orthogonal Procrustes, the polar factor) of the block's unpenalised
    least-squares map: the straight line to it may cross singular matrices, which steps under the penalty cannot,
    so a map that started among the isometries of the wrong determinant (D = d) reaches the right ones. It is
    tried when ``procrustes`` is True, or when D = d and that map's determinant has the other sign than W_i's; the
    better candidate after its line search is taken. Returns (decrease of the objective, factor)."""
    D, d = W.shape
    FF = (F * F).sum(1)
    inv = FF.clamp_min(1e-30).rsqrt()
    w = inv * inv
    FT = (F * T).sum(1)
    g = (F * inv[:, None] - T) * inv[:, None]
    red = reduce(torch.cat([ci.T @ w, w.sum()[None], g.sum(0)]))
    mean, sw, gb = red[:D] / red[D], red[D], red[D + 1:]
    cc = ci - mean
    if factor is None:
        cw = cc * inv[:, None]
        red = reduce(torch.cat([(cc.T @ g).flatten(), (cw.T @ cw).flatten()]))
        G, A = red[:D * d].view(D, d) / n_total, red[D * d:].view(D, D) / n_total
        damp = max(1e-6 * float(A.diagonal().mean()), 8e-3 * mu, 1e-30)
        if eig or (eig is None and prox > 0):  # one factorisation serves every proximal weight (changing per sweep)
            ev, V = torch.linalg.eigh(A)
            factor = (damp, ev.clamp_min(0), V)
        else:
            L, bad = torch.linalg.cholesky_ex(A + damp * torch.eye(D, device=A.device, dtype=A.dtype))
            factor = (damp, None if int(bad) != 0 else L)
    else:
        G = reduce(cc.T @ g) / n_total
    rho = float(prox)
    if len(factor) == 3:
        damp, ev, V = factor
        solvable = True
    else:
        (damp, L), solvable = factor, factor[1] is not None
        if rho > 0:
            raise InputError("_bcd_block: a proximal weight needs the eigendecomposition factor (eig=True)")
    db0 = -gb / sw  # the bias step that goes with any step in W
    R0 = _pen_parts(W, torch.zeros_like(W))[0]
    grad = G + 4 * mu * (W @ R0 if D >= d else R0 @ W)

    def solve(Rm, shift):  # (A + shift)⁻¹ Rm (the Cholesky factor: shift = damp only)
        if len(factor) == 3:
            return V @ ((V.T @ Rm) / (ev + shift)[:, None])
        return torch.cholesky_solve(Rm, L) if L is not None else Rm / (damp + 8 * mu)

    def prec(Rm):  # (A + damp + rho)⁻¹
        return solve(Rm, damp + rho)

    # Preconditioned conjugate gradients on (A + damp + rho + 4·mu·H_pen) P = −grad. (A + damp + rho)·p is carried
    # along the recursion p ← z + βp, since (A + damp + rho)·z = r, so an iteration costs the penalty term and one
    # solve.
    P = torch.zeros_like(W)
    r = -grad
    z = prec(r)
    p, Ap = z, r
    rz = (r * z).sum()
    for _ in range(inner):
        q = Ap + 4 * mu * _pen_hvp(W, p)
        pq = (p * q).sum()
        if not float(pq) > 0:
            break
        a = rz / pq
        P = P + a * p
        r = r - a * q
        z = prec(r)
        rz_new = (r * z).sum()
        beta = rz_new / rz
        p, Ap = z + beta * p, r + beta * Ap
        rz = rz_new
    ip = lambda X, Y: float((X * Y).sum())  # noqa: E731

    def search(P):
        db = db0 - mean @ P
        u = ci @ P + db
        R0, S1, S2 = _pen_parts(W, P)
        coef = [mu * ip(R0, R0), mu * 2 * ip(R0, S1), mu * (ip(S1, S1) + 2 * ip(R0, S2)) + rho / 2 * ip(P, P),
                mu * 2 * ip(S1, S2), mu * ip(S2, S2)]  # the penalty along the line, and the proximal term
        alpha, v1, v0 = _line_search(FT, (u * T).sum(1), FF, (F * u).sum(1), (u * u).sum(1), coef, n_total, reduce)
        return alpha, v1, v0, u, P, db

    best = search(P)
    if mu > 0 and solvable and (procrustes or D == d):
        M = W - solve(G, damp)
        if procrustes or float(torch.linalg.slogdet(M)[0] * torch.linalg.slogdet(W)[0]) < 0:
            X, _, Yh = torch.linalg.svd(M, full_matrices=False)
            alt = search(X @ Yh - W)
            if alt[1] < best[1]:
                best = alt
    alpha, v1, v0, u, P, db = best
    if alpha > 0:
        W.add_(P, alpha=alpha)
        b.add_(db, alpha=alpha)
        F.add_(u, alpha=alpha)
    return v0 - v1 + rho / 2 * alpha * alpha * ip(P, P), factor  # the decrease of the objective itself


def _bias_block(F, T, b, n_total, reduce):
    """Gauss–Newton step with line search on the shared bias (no penalty)."""
    FF = (F * F).sum(1)
    inv = FF.clamp_min(1e-30).rsqrt()
    FT = (F * T).sum(1)
    g = (FT * inv * inv * inv)[:, None] * F - inv[:, None] * T
    red = reduce(torch.cat([g.sum(0), (inv * inv).sum()[None]]))
    step = -red[:-1] / red[-1].clamp_min(1e-30)
    alpha, v1, v0 = _line_search(FT, T @ step, FF, F @ step, (step * step).sum().expand_as(FF), [0.0], n_total,
                                 reduce)
    if alpha > 0:
        b.add_(step, alpha=alpha)
        F.add_(step, alpha=alpha)
    return v0 - v1


def _project(passes, T, W, b, n_total, reduce, steps: int):
    """The exact-isometry candidate of (W, b): every map replaced by its polar factor (:func:`_polar`: orthonormal
    columns, or rows when D < d; penalty 0) and the shared bias refitted on the training images by up to ``steps``
    Gauss–Newton steps (:func:`_bias_block`). One pass over the source. Returns (Wp, bp, F, Fv, training 1 − cos):
    the predictions for this rank's training and held-out images at (Wp, bp)."""
    C, D, d = W.shape
    Wp, bp = _polar(W), b.detach().clone()
    F, Fv = passes.apply(Wp.view(C * D, d), bp)
    for _ in range(steps):
        if _bias_block(F, T, bp, n_total, reduce) < 1e-9:
            break
    Fv.add_(bp - b.detach())  # Fv was computed with the bias before its refit
    cos_sum = torch.nn.functional.cosine_similarity(F, T, dim=-1).sum(dtype=torch.float64)
    return Wp, bp, F, Fv, 1.0 - float(reduce(cos_sum[None])[0]) / n_total



def _masked_index(data: _Data, mask: torch.Tensor) -> torch.Tensor:
    """Global indices of the images where ``mask``, in the order :func:`_batches` (unshuffled) yields them."""
    return torch.cat([torch.nonzero(mask[a:b]).flatten() + a for a, b in data.chunks])


def _component_group(data: _Data, mask: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Contributions of components lo..hi−1 for the images where ``mask``, ``[n, hi − lo, D]`` in the source's
    dtype, read chunk by chunk (one pass over the cache)."""
    return _component_rows(data, [mask], lo, hi, "cpu", data.dtype)[0].view(-1, hi - lo, data.D)


_CG_STEPS = 4  # conjugate-gradient steps per block solve (the D·d system of one map)
_PROCRUSTES_SWEEPS = 2  # sweeps in which every block also tries the Procrustes candidate (later: on a det flip)
_REFRESH = 3  # the block curvature A is recomputed in the first two sweeps and then every _REFRESH-th
# Proximal weight κ_k of sweep k, in units of the mean block curvature ā: start·decay^(k−1), 0 once below min.
# Off by default (start 0): measured on planted data (benchmarks/RESULTS.md, "CompAlign training", schedule
# 16·0.7^(k−1)) it lifts bcd's held-out cosine where the maps are underdetermined and the targets noisy
# (n = 0.35·C·D: 0.318 → 0.385 at D = d = 48, 0.293 → 0.409 at 32 → 64), but stays far below Adam's (0.498,
# 0.505), gains little at n = 0.94·C·D (0.961 → 0.966, Adam 0.982) and needs 3× the sweeps where bcd applies
# (n = 3.5·C·D: 25 instead of 8, same result). `aligner_training.py schedules` sets these to measure.
_PROX_START, _PROX_DECAY, _PROX_MIN = 0.0, 0.7, 1e-3


def _prox_weight(sweep: int) -> float:
    """The proximal weight κ of a sweep (times the mean block curvature ā): large to small, then 0."""
    k = _PROX_START * _PROX_DECAY ** (sweep - 1)
    return k if k >= _PROX_MIN else 0.0


class _Best:
    """Held-out early stopping as every fitter keeps it: the best held-out objective so far, with its cosine, epoch
    and maps (a copy), and ``bad``, the evaluations since it last improved by more than ``tol``."""

    def __init__(self, W, b, obj, cos, tol):
        self.obj, self.cos, self.epoch, self.bad, self.tol = obj, cos, 0, 0, tol
        self.state = (W.detach().clone(), b.detach().clone())

    def held_out(self, obj, cos, epoch, W, b, count: bool) -> bool:
        """Record one held-out evaluation; True when it is the new best. A miss counts toward patience only when
        ``count`` (the objective is comparable only once the penalty is at full strength)."""
        if obj < self.obj - self.tol:
            self.obj, self.cos, self.epoch, self.bad = obj, cos, epoch, 0
            self.state = (W.detach().clone(), b.detach().clone())
            return True
        if count:
            self.bad += 1
        return False

    def take(self, obj, cos, epoch, W, b) -> None:
        """Make this state the result, whatever its objective (``isometric=True`` chose it)."""
        self.obj, self.cos, self.epoch, self.bad = obj, cos, epoch, 0
        self.state = (W.detach().clone(), b.detach().clone())

    def last(self, epoch, W, b) -> None:
        """Without a held-out split the latest iterate is the result."""
        self.state, self.epoch = (W.detach().clone(), b.detach().clone()), epoch

    def result(self):
        """(maps, epoch, held-out cosine) of the best iterate."""
        return self.state, self.epoch, self.cos


def _fit_bcd(data, targets, local_train, local_val, W, b, cfg, device, progress, objective_on, history):
    """Block-coordinate Gauss–Newton sweeps (the ``method="bcd"`` path of :func:`fit_aligner`).

    f(x) is held for every training image ([n, d], the only per-image state); a sweep visits the bias, then every
    map W_i in turn (:func:`_bcd_block`: with the others fixed, a step in W_i and the bias from the block's
    statistics, computed from c_i and f alone, with an exact line search on the true objective) and updates f by
    the block's change. Components are read from the source in groups whose contributions fit in
    ``cfg.memory_gb``; a sweep costs about three [n, D] × [D, d] products per component. The block curvature is
    recomputed in the first two sweeps and every ``_REFRESH``-th, and reused in between. Returns (best_state,
    best_epoch, best_cos, stop_reason)."""
    from tqdm.auto import tqdm

    from . import distributed as dist

    di = dist.info()
    reduce = dist.all_reduce_sum if di.active else (lambda t: t)
    C, D, d = data.C, data.D, targets.shape[1]
    idx = _masked_index(data, local_train)
    T = to_device(targets[idx], device)
    n_local = idx.numel()
    n_total = float(reduce(torch.tensor([float(n_local)], dtype=torch.float64)).item()) if di.active else float(n_local)
    Fs = []
    mom1 = torch.zeros(C, D, dtype=torch.float64, device=device)  # per component Σ_x c_i and Σ_x ‖c_i‖²
    mom2 = torch.zeros(C, dtype=torch.float64, device=device)
    with torch.no_grad():  # every map starts as the shared W_0: f = (Σ_i c_i) W_0 + b, no [B, C·D] product
        for _, c in _batches(data, local_train, max(cfg.batch_size, 1024), None):
            c = to_device(c, device)
            Fs.append(c.sum(1, dtype=torch.float32) @ W[0] + b)
            for j in range(0, c.shape[0] if _PROX_START > 0 else 0, 256):  # float32 slices: float16 squares overflow
                cj = c[j:j + 256].float()
                mom1 += cj.sum(0, dtype=torch.float64)
                mom2 += cj.pow(2).sum((0, 2), dtype=torch.float64)
    F = torch.cat(Fs) if Fs else torch.zeros(0, d, device=device)
    del Fs
    # The proximal weights are relative to the mean block curvature over all components, ā = mean_x 1/‖f‖² ·
    # mean_i tr Cov(c_i)/D (one scale for every block: see _prox_weight)
    red = reduce(torch.cat([mom1.flatten(), mom2, (F * F).sum(1).clamp_min(1e-30).reciprocal().sum(
        dtype=torch.float64)[None]]))
    var = red[C * D:C * D + C] / n_total - (red[:C * D].view(C, D) / n_total).pow(2).sum(1)
    curv = float(var.mean()) / D * float(red[-1]) / n_total
    itemsize = torch.empty((), dtype=getattr(data, "dtype", torch.float32)).element_size()
    n_max = max(dist.all_gather_objects(n_local))
    per = max(1, int(cfg.memory_gb * 2 ** 30 // max(n_max * D * itemsize, 1)))
    groups = [(lo, min(lo + per, C)) for lo in range(0, C, per)]
    tensor = getattr(data, "tensor", None)
    mu_full = cfg.lam / (C * d)
    warm = cfg.penalty_warmup
    n_val = int(local_val.sum()) if not di.active else int(dist.all_reduce_sum(
        torch.tensor([float(local_val.sum())], dtype=torch.float64)).item())

    best = _Best(W, b, history[0]["val_objective"] if n_val else float("inf"), history[0]["val_cosine"], cfg.tol)
    reason = "max_epochs"
    factors = [None] * C  # per map: (damping, factorisation of its curvature A), reused between refreshes
    t_start = time.perf_counter()
    bar = tqdm(range(1, cfg.max_epochs + 1), desc="CompAlign (bcd)", unit="sweep",
               disable=not progress or di.rank != 0)
    for sweep in bar:
        prox = _prox_weight(sweep)
        lam_now = cfg.lam * min(1.0, sweep / warm) if warm else cfg.lam
        mu = mu_full * lam_now / cfg.lam if cfg.lam > 0 else 0.0
        gain = _bias_block(F, T, b, n_total, reduce)
        for lo, hi in groups:
            grp = None if tensor is not None else _component_group(data, local_train, lo, hi)
            for i in range(lo, hi):
                ci = tensor[idx, i] if tensor is not None else grp[:, i - lo]
                fresh = sweep <= 2 or sweep % _REFRESH == 0
                dec, factors[i] = _bcd_block(to_device(ci, device, torch.float32), F, T, W[i], b, mu, n_total,
                                             _CG_STEPS, reduce, factor=None if fresh else factors[i],
                                             procrustes=sweep <= _PROCRUSTES_SWEEPS, prox=prox * curv,
                                             eig=_PROX_START > 0)
                gain += dec
            del grp
        cos_tr = float(reduce(torch.nn.functional.cosine_similarity(F, T, dim=-1).sum(dtype=torch.float64)[None])[0])
        entry = {"epoch": sweep, "seconds": round(time.perf_counter() - t_start, 3),
                 "train_loss": 1.0 - cos_tr / n_total, "lam": lam_now, "decrease": gain,
                 "prox": prox}
        if n_val:
            obj, cos, pen = objective_on(local_val)
            entry.update(val_objective=obj, val_cosine=cos, penalty=pen)
            best.held_out(obj, cos, sweep, W, b, count=sweep >= warm)
            bar.set_postfix(val_cos=f"{cos:.4f}", best=best.epoch)
        else:
            best.last(sweep, W, b)
            entry.update(penalty=float(_penalty(W)))
            bar.set_postfix(train_loss=f"{entry['train_loss']:.4f}")
        history.append(entry)
        if progress and di.rank == 0:
            vc = f", held-out cosine {entry['val_cosine']:.5f}" if n_val else ""
            bar.write(f"sweep {sweep}: training 1 − cos {entry['train_loss']:.5f}{vc}, isometry penalty "
                      f"{entry['penalty']:.2e}")
        if n_val and best.bad >= cfg.patience and sweep >= warm:
            reason = "no held-out improvement"
            break
        if not n_val and sweep >= max(warm, 1) and abs(gain) <= cfg.tol:
            reason = "no training improvement"
            break
    bar.close()
    return (*best.result(), reason)


# ---------------------------------------------------------------------------------------------------- joint fit

# Whether the L-BFGS pairs are dropped whenever the penalty ramp changes λ (the earlier behaviour). Off: the pairs
# are kept (they then mix slightly different objectives), measured better at C = 16 and C = 150 (RESULTS.md,
# "Joint L-BFGS at C = 150"); `aligner_training.py schedules --runs joint-reset` sets it to measure.
_RAMP_RESET = False
_ISO_FINISH = True  # joint: try the exact-isometry candidate after descent (see _fit_joint)
_EXACT = 1e-9  # an isometry penalty below this is an exact isometry up to float32 rounding (isometric=True)
_LBFGS_HISTORY = 5  # L-BFGS correction pairs kept (fewer when memory_gb cannot hold them; at least 1)
_FLIP_ROUNDS = 5  # D = d: rounds of reflection candidates, each where descent has stopped (see _fit_joint)
_TRAPPED = 3.0  # a map counts as trapped in the wrong det ±1 set when its data-term signature exceeds this
_PASS_BYTES = 2 ** 28  # float32 bytes of one [B, C·D] batch of a joint pass


class _Passes:
    """The joint fitter's passes over the source, chunk by chunk in a fixed order (so a cache is streamed and the
    result does not depend on how it is sharded beyond float32 rounding). ``apply(P, pb)``: c(x)·P + pb for every
    training and held-out image ([n, d], [m, d]; ``shared``: P [D, d] applied to Σ_i c_i); ``grad(gF)``:
    Σ_x c(x)ᵀ gF(x) over the training images ([C·D, d]). Each is one read of the source and one
    [B, C·D] × [C·D, d]-sized product per batch: all C maps at once."""

    def __init__(self, data: "_Data", train: torch.Tensor, val: torch.Tensor, device):
        self.data, self.device = data, device
        self.plan, nt, nv = [], 0, 0
        for k, (a, b) in enumerate(data.chunks):
            tl, vl = torch.nonzero(train[a:b]).flatten(), torch.nonzero(val[a:b]).flatten()
            if tl.numel() or vl.numel():
                self.plan.append((k, tl, nt, vl, nv))
            nt, nv = nt + tl.numel(), nv + vl.numel()
        self.n_train, self.n_val = nt, nv
        self.rows = max(1, min(4096, _PASS_BYTES // (4 * data.C * data.D)))

    def _batches(self, chunk, local):
        C, D = self.data.C, self.data.D
        for i in range(0, local.numel(), self.rows):
            yield i, to_device(chunk[local[i:i + self.rows]], self.device, torch.float32).reshape(-1, C * D)

    def apply(self, P: torch.Tensor, pb: torch.Tensor, shared: bool = False):
        C, D, d = self.data.C, self.data.D, P.shape[-1]
        Ut = torch.empty(self.n_train, d, device=self.device)
        Uv = torch.empty(self.n_val, d, device=self.device)
        for k, tl, t0, vl, v0 in self.plan:
            chunk = self.data.load(k)
            for local, start, U in ((tl, t0, Ut), (vl, v0, Uv)):
                for i, c in self._batches(chunk, local):
                    if shared:  # every map equal: (Σ_i c_i)·P
                        c = c.view(-1, C, D).sum(1)
                    U[start + i:start + i + c.shape[0]] = torch.addmm(pb, c, P)
        return Ut, Uv

    def project(self, w: torch.Tensor):
        """z_ij(x) = c_i(x)·w_ij for every training and held-out image ([n, C, k], [m, C, k]); ``w`` [C, k, D]."""
        C, D = self.data.C, self.data.D
        Zt = torch.empty(self.n_train, C, w.shape[1], device=self.device)
        Zv = torch.empty(self.n_val, C, w.shape[1], device=self.device)
        for k, tl, t0, vl, v0 in self.plan:
            chunk = self.data.load(k)
            for local, start, Z in ((tl, t0, Zt), (vl, v0, Zv)):
                for i, c in self._batches(chunk, local):
                    Z[start + i:start + i + c.shape[0]] = torch.einsum("bcD,ckD->bck", c.view(-1, C, D), w)
        return Zt, Zv

    def grad(self, gF: torch.Tensor) -> torch.Tensor:
        C, D = self.data.C, self.data.D
        G = torch.zeros(C * D, gF.shape[1], device=self.device)
        for k, tl, t0, _, _ in self.plan:
            if tl.numel():
                chunk = self.data.load(k)
                for i, c in self._batches(chunk, tl):
                    G.addmm_(c.T, gF[t0 + i:t0 + i + c.shape[0]])
        return G


def _cos_grad(F: torch.Tensor, T: torch.Tensor, n_total: float):
    """(∂/∂f of Σ_x [1 − cos(f, t)] / n_total per image [n, d], Σ_x cos) for unit targets T."""
    FF = (F * F).sum(1).clamp_min(1e-30)
    inv = FF.rsqrt()
    cos = (F * T).sum(1) * inv
    return ((cos * inv * inv)[:, None] * F - inv[:, None] * T) / n_total, cos.sum(dtype=torch.float64)


def _penalty_grad(W: torch.Tensor):
    """(∇_W Σ_i ‖G_i − I‖²_F, G − I) on the achievable side: 4·W(WᵀW − I) or 4·(WWᵀ − I)W."""
    R = _penalty_matrix(W)
    return 4 * (W @ R if W.shape[1] >= W.shape[2] else R @ W), R


def _penalty_line(W: torch.Tensor, P: torch.Tensor, R: torch.Tensor) -> List[float]:
    """Coefficients of Σ_i ‖G_i(W + αP) − I‖²_F as a quartic in α (R = G(W) − I), all maps at once."""
    if W.shape[1] >= W.shape[2]:
        S1, S2 = W.transpose(1, 2) @ P, P.transpose(1, 2) @ P
    else:
        S1, S2 = P @ W.transpose(1, 2), P @ P.transpose(1, 2)
    S1 = S1 + S1.transpose(1, 2)
    ip = lambda X, Y: float((X * Y).sum(dtype=torch.float64))  # noqa: E731
    return [ip(R, R), 2 * ip(R, S1), ip(S1, S1) + 2 * ip(R, S2), 2 * ip(S1, S2), ip(S2, S2)]


def _line_min(F, U, T, pen, n_total, reduce, a0):
    """Exact line search: α > 0 minimising φ(α) = Σ_x [1 − cos(F + αU, t)] / n_total + Σ_k pen[k]·α^k (the data
    term from five per-image scalars, the penalty a quartic), by bracketing on the slope and a safeguarded
    secant/bisection zoom to a local minimum. ``a0``: the first trial step. Returns (α, φ(α), φ(0)); α = 0 when
    the direction does not descend."""
    d64 = torch.float64
    FT, UT = (F * T).sum(1, dtype=d64), (U * T).sum(1, dtype=d64)
    FF, FU, UU = (F * F).sum(1, dtype=d64), (F * U).sum(1, dtype=d64), (U * U).sum(1, dtype=d64)

    def phi(a):
        num = FT + a * UT
        q = (FF + 2 * a * FU + a * a * UU).clamp_min(1e-30)
        den = q.sqrt()
        val = (1 - num / den).sum()
        slope = -(UT / den - num * (FU + a * UU) / (q * den)).sum()
        v, s = reduce(torch.stack([val, slope])).tolist()
        return (v / n_total + sum(c * a ** k for k, c in enumerate(pen)),
                s / n_total + sum(k * c * a ** (k - 1) for k, c in enumerate(pen) if k))

    f0, g0 = phi(0.0)
    if not g0 < 0:
        return 0.0, f0, f0
    lo, flo, glo = 0.0, f0, g0
    a, hi = a0, None
    for _ in range(80):  # expand until the value rises or the slope turns
        fa, ga = phi(a)
        if fa > flo or ga >= 0:
            hi, ghi = a, ga
            break
        lo, flo, glo = a, fa, ga
        a *= 4.0
    if hi is None:
        return lo, flo, f0
    for _ in range(100):  # zoom: slope at lo < 0, hi above lo or sloping up: a minimum lies between
        w = hi - lo
        m = lo - glo * w / (ghi - glo) if ghi > 0 else lo + w / 2  # secant on the slope, else bisection
        m = min(max(m, lo + 0.05 * w), hi - 0.05 * w)
        fm, gm = phi(m)
        if fm > flo or gm >= 0:
            hi, ghi = m, gm
        else:
            lo, flo, glo = m, fm, gm
        if abs(glo) <= 1e-6 * abs(g0) or hi - lo <= 1e-7 * hi:
            break
    return lo, flo, f0


def _fit_joint(data, targets, local_train, local_val, W, b, cfg, device, progress, history,
               start_shared: bool = True, desc: str = "CompAlign (joint)", predictions=None):
    """L-BFGS on all maps and the bias at once (the ``method="joint"`` path of :func:`fit_aligner`).

    The objective is fit_aligner's: mean_x [1 − cos(f(x), t(x))] over the training images plus
    λ/(C·d)·Σ_i ‖G_i − I‖²_F. f(x) is held for every training and held-out image ([n, d] each). An iteration:
    the L-BFGS direction P (two-loop recursion over ``_LBFGS_HISTORY`` correction pairs, initial scaling sᵀy/yᵀy;
    steepest descent at the start and after any reset); one pass computes U = c·P for every image (all C maps as
    one product); the exact line search along it (:func:`_line_min`: per-image scalars and the penalty's quartic,
    no further pass); f ← f + αU, for the held-out images too (their cosine per iteration costs no extra pass);
    one pass for the gradient at the new point. So an iteration costs two reads of the source and the multiply-
    adds of one forward and one backward pass over it, like one Adam epoch without its per-batch penalty. During a
    penalty ramp (``penalty_warmup`` iterations) the gradient follows λ and the correction pairs are kept (they
    then mix slightly different objectives; resetting them, ``_RAMP_RESET``, made the first iterations steepest-
    descent steps and was measured worse at every size). After descent one more pass evaluates the exact-isometry
    candidate (``_ISO_FINISH``): the best iterate's maps replaced by their polar factors, the bias refitted; it is
    taken when it lowers the held-out objective (the training objective without a held-out split) and recorded in
    the history either way (``projected``, ``taken``); with ``cfg.isometric`` it is taken unless an isometric start
    (penalty < ``_EXACT``) has the lower objective, which is then the result, and the bias gets
    ``_DUAL_BIAS_STEPS`` Gauss–Newton steps instead of one. Returns (best_state, best_epoch, best_cos,
    stop_reason)."""
    from tqdm.auto import tqdm

    from . import distributed as dist

    di = dist.info()
    reduce = dist.all_reduce_sum if di.active else (lambda t: t)
    C, D, d = data.C, data.D, targets.shape[1]
    passes = _Passes(data, local_train, local_val, device)
    T = to_device(targets[_masked_index(data, local_train)], device)
    Tv = to_device(targets[_masked_index(data, local_val)], device) if passes.n_val else targets.new_zeros(0, d)
    count = lambda n: float(reduce(torch.tensor([float(n)], dtype=torch.float64))[0])  # noqa: E731
    n_total, n_val = count(passes.n_train), count(passes.n_val)
    mu_full, warm = cfg.lam / (C * d), cfg.penalty_warmup
    mu_of = lambda it: mu_full * min(1.0, it / warm) if warm else mu_full  # noqa: E731
    vec_bytes = 4 * (C * D * d + d)
    m = max(1, min(_LBFGS_HISTORY, int(cfg.memory_gb * 2 ** 30 // (2 * vec_bytes))))
    dot = lambda x, y: float(torch.dot(x[0].flatten(), y[0].flatten())) + float(torch.dot(x[1], y[1]))  # noqa: E731

    with torch.no_grad():
        if predictions is not None:  # the start's predictions, computed by the caller (method="dual")
            F, Fv = predictions
        elif start_shared:  # every map starts as the shared W_0
            F, Fv = passes.apply(W[0], b, shared=True)
        else:  # a start with maps of their own
            F, Fv = passes.apply(W.view(C * D, d), b)

        def gradient(mu):
            gF, cos_sum = _cos_grad(F, T, n_total)
            gW = passes.grad(gF).view(C, D, d)
            gb = gF.sum(0)
            if di.active:
                red = reduce(torch.cat([gW.flatten(), gb, cos_sum.to(gW.dtype)[None]]))
                gW, gb, cos_sum = red[:C * D * d].view(C, D, d), red[C * D * d:-1], red[-1]
            pg, R = _penalty_grad(W)
            gW.add_(pg, alpha=mu)
            return (gW, gb), R, 1.0 - float(cos_sum) / n_total

        def val_cos():  # every rank takes part in the sum, also one without held-out images of its own
            if not n_val:
                return None
            s = torch.nn.functional.cosine_similarity(Fv, Tv.to(Fv.device), dim=-1).sum(dtype=torch.float64)
            return float(reduce(s[None])[0]) / n_val

        def reflect():
            # D = d: the isometries form two sets (det ±1) that steps under the penalty cannot cross. A map stuck
            # in the wrong one is one reflection away from the right one: W_i ← W_i(I − 2 v vᵀ), |v| = 1, which
            # leaves the penalty unchanged (‖H(G − I)H‖ = ‖G − I‖ for orthogonal H) and changes f by the rank-one
            # −2·z(x)·vᵀ, z = c_i·W_i v. A trapped map shows itself in the data term's gradient: sym(W_iᵀ ∂L/∂W_i)
            # has one large positive eigenvalue (the direction the data push to shrink through zero, which the
            # penalty holds up), ≥ _TRAPPED × every negative one (planted C = 16, D = d = 48: 3.6–12 at trapped
            # maps, ≤ 2.2 at the others); its eigenvector is the reflection. Such maps are reflected even when that
            # alone raises the training objective (the other maps have adapted to the trapped one): descent goes
            # on from there, and the held-out split decides, since the best iterate is kept. Any other map is
            # reflected (along that eigenvector or its least stretched direction) where that alone lowers the
            # training objective: one pass gives every z, each candidate's exact change follows from per-image
            # scalars.
            pg, _ = _penalty_grad(W)
            S = W.transpose(1, 2) @ (g[0] - mu * pg)
            es, Vs = torch.linalg.eigh(S + S.transpose(1, 2))
            trapped = es[:, -1] > _TRAPPED * es[:, 0].abs()
            V = torch.stack([Vs[:, :, -1], torch.linalg.eigh(W.transpose(1, 2) @ W)[1][:, :, 0]], 1)  # [C, 2, d]
            del pg, S, Vs
            wk = W @ V.transpose(1, 2)  # [C, D, 2]
            zk, zvk = passes.project(wk.transpose(1, 2).contiguous())  # [n, C, 2]
            FF, FT = (F * F).sum(1, keepdim=True), (F * T).sum(1, keepdim=True)
            cos0 = FT * FF.clamp_min(1e-30).rsqrt()
            Fv_, Tv_ = torch.einsum("nd,ckd->nck", F, V), torch.einsum("nd,ckd->nck", T, V)
            new = (FT[:, :, None] - 2 * zk * Tv_) * (FF[:, :, None] - 4 * zk * Fv_ + 4 * zk * zk).clamp_min(
                1e-30).rsqrt()
            gains = reduce((new - cos0[:, :, None]).sum(0, dtype=torch.float64)) / n_total  # mean cosine rise [C, 2]
            gain, j = gains.max(1)
            j = torch.where(trapped.to(j.device), torch.zeros_like(j), j)
            ar = torch.arange(C, device=W.device)
            v, w, z, zv = V[ar, j], wk[ar, :, j], zk[:, ar, j], zvk[:, ar, j]
            take = torch.nonzero(trapped.to(gain.device) | (gain > 1e-9)).flatten().to(W.device)
            if not take.numel():
                return 0
            W[take] -= 2 * w[take][:, :, None] * v[take][:, None, :]
            F.add_(-2 * z[:, take] @ v[take])
            Fv.add_(-2 * zv[:, take] @ v[take])
            return int(take.numel())

        # Only where the data determine the maps (as for method="auto"'s bcd): below, a map's determinant is not
        # determined either, and a reflection that fits the training images better fits their noise (planted C =
        # 16, D = d = 48, n = 0.94·C·D: held-out cosine 0.978 with reflections, 0.985 without).
        flips = D == d and n_total >= _BCD_MIN_RATIO * C * D
        rounds, state = 0, {"reflected": 0}

        def jump():
            # Where descent has stopped (patience spent, or no descent step left): try the reflections; if any map
            # jumped, descent goes on from there (new gradient, fresh curvature pairs) with patience restored.
            nonlocal g, R, train_loss, hist, rounds
            if not (flips and mu > 0):
                return False
            rounds += 1
            state["reflected"] = reflect()
            if state["reflected"]:
                g, R, train_loss = gradient(mu)
                hist = []
            return bool(state["reflected"])

        mu = mu_of(1)
        g, R, train_loss = gradient(mu)
        hist: List[tuple] = []  # (s, y, 1/sᵀy)
        first = history[-1]  # the start: the shared map, or the dual fit that is refined
        off = int(first["epoch"])
        best = _Best(W, b, first["val_objective"] if n_val else float("inf"), first.get("val_cosine"), cfg.tol)
        best.epoch = off
        iso_start = None  # (objective, held-out cosine, epoch, W, b) of a start that is an exact isometry
        if cfg.isometric and first.get("penalty") is not None and first["penalty"] < _EXACT:
            start_obj = first["val_objective"] if n_val else first["train_loss"] + cfg.lam * first["penalty"]
            iso_start = (start_obj, first.get("val_cosine"), off, W.clone(), b.clone())
        reason = "max_epochs"
        t_start = time.perf_counter()
        bar = tqdm(range(1, cfg.max_epochs + 1), desc=desc, unit="iteration",
                   disable=not progress or di.rank != 0)
        for it in bar:
            mu_now = mu_of(it)
            if mu_now != mu:  # the penalty weight ramps: same W, another objective; the pairs are kept (_RAMP_RESET)
                g[0].add_(_penalty_grad(W)[0], alpha=mu_now - mu)
                mu = mu_now
                if _RAMP_RESET:
                    hist = []
            for _ in range(2):  # the quasi-Newton direction, then (if it does not descend) steepest descent
                if hist:  # two-loop recursion: P = −H·g
                    q0, q1 = g[0].clone(), g[1].clone()
                    alphas = []
                    for s, y, rho in reversed(hist):
                        a = rho * dot(s, (q0, q1))
                        q0.add_(y[0], alpha=-a)
                        q1.add_(y[1], alpha=-a)
                        alphas.append(a)
                    s, y, _ = hist[-1]
                    gamma = dot(s, y) / dot(y, y)  # the initial inverse Hessian: a scalar
                    q0.mul_(gamma)
                    q1.mul_(gamma)
                    for (s, y, rho), a in zip(hist, reversed(alphas)):
                        beta = rho * dot(y, (q0, q1))
                        q0.add_(s[0], alpha=a - beta)
                        q1.add_(s[1], alpha=a - beta)
                    P, a0 = (q0.neg_(), q1.neg_()), 1.0
                    if not dot(P, g) < 0:  # not a descent direction (can only be rounding): steepest descent
                        hist, P = [], None
                if not hist:
                    P = (-g[0], -g[1])
                    a0 = 0.01 * float(W.norm()) / math.sqrt(max(dot(P, P), 1e-300))
                U, Uv = passes.apply(P[0].view(C * D, d), P[1])
                alpha, f1, f0 = _line_min(F, U, T, [mu * c for c in _penalty_line(W, P[0], R)], n_total, reduce, a0)
                if alpha > 0 or not hist:
                    break
                hist = []  # the quasi-Newton direction did not descend: once more from steepest descent
            if not alpha > 0:
                if rounds < _FLIP_ROUNDS and it >= warm and jump():
                    continue
                reason = "converged"
                break
            W.add_(P[0], alpha=alpha)
            b.add_(P[1], alpha=alpha)
            F.add_(U, alpha=alpha)
            Fv.add_(Uv, alpha=alpha)
            del U, Uv
            s = (P[0].mul_(alpha), P[1].mul_(alpha))  # P is a fresh tensor, never g itself
            g_new, R, train_loss = gradient(mu)
            y = (g_new[0] - g[0], g_new[1] - g[1])
            sy = dot(s, y)
            if sy > 1e-10 * math.sqrt(dot(s, s) * dot(y, y)):
                hist.append((s, y, 1.0 / sy))
                if len(hist) > m:
                    hist.pop(0)
            g = g_new
            pen = float(R.pow(2).sum(dtype=torch.float64)) / (C * d)
            entry = {"epoch": off + it, "seconds": round(time.perf_counter() - t_start, 3), "train_loss": train_loss,
                     "lam": mu * C * d, "decrease": f0 - f1, "step": alpha,
                     "reflected": state["reflected"]}
            state["reflected"] = 0
            if n_val:
                cos = val_cos()
                obj = 1.0 - cos + cfg.lam * pen
                entry.update(val_objective=obj, val_cosine=cos, penalty=pen)
                best.held_out(obj, cos, off + it, W, b, count=it >= warm)
                bar.set_postfix(val_cos=f"{cos:.4f}", best=best.epoch)
            else:
                best.last(off + it, W, b)
                entry.update(penalty=pen)
                best.bad = best.bad + 1 if f0 - f1 <= cfg.tol else 0
                bar.set_postfix(train_loss=f"{train_loss:.4f}")
            history.append(entry)
            if progress and di.rank == 0:
                vc = f", held-out cosine {entry['val_cosine']:.5f}" if n_val else ""
                bar.write(f"iteration {off + it}: training 1 − cos {train_loss:.5f}{vc}, isometry penalty {pen:.2e} "
                          f"({entry['seconds']:.0f} s)")
            if best.bad >= cfg.patience and it >= warm:
                if rounds < _FLIP_ROUNDS and jump():
                    best.bad = 0
                    continue
                reason = "no held-out improvement" if n_val else "no training improvement"
                break
        bar.close()
        if (_ISO_FINISH and cfg.lam > 0) or cfg.isometric:
            # The exact-isometry candidate: every map of the best iterate replaced by its nearest isometry (polar
            # factor: orthonormal columns, or rows when D < d; penalty 0) and the bias refitted. One pass. Kept when
            # it lowers the held-out objective (without a held-out split: the training objective). Where the maps
            # are underdetermined the fit lies off the isometries by more than the data can tell, and the candidate
            # is taken (planted C = 150, D = d = 32 and 64 at 0.35·C·D, 32 at 0.63·C·D; RESULTS.md).
            Wp, bp, F, Fv, tr = _project(passes, T, *best.state, n_total, reduce,
                                         _DUAL_BIAS_STEPS if cfg.isometric else 1)
            pen = float(_penalty(Wp))
            ep = off + it + 1
            entry = {"epoch": ep, "seconds": round(time.perf_counter() - t_start, 3), "train_loss": tr,
                     "lam": cfg.lam, "projected": True, "penalty": pen}
            if n_val:
                cos = val_cos()
                obj = 1.0 - cos + cfg.lam * pen
                entry.update(val_objective=obj, val_cosine=cos)
            if cfg.isometric:
                # Exact isometries asked for: the better of this candidate and an isometric start (the dual
                # stage's polar factors), whatever the penalised iterates reached.
                here = obj if n_val else tr + cfg.lam * pen
                entry["taken"] = iso_start is None or here <= iso_start[0]
                if entry["taken"]:
                    best.take(obj if n_val else here, cos if n_val else None, ep, Wp, bp)
                else:
                    best.take(*iso_start)
            elif n_val:
                entry["taken"] = best.held_out(obj, cos, ep, Wp, bp, count=False)
            else:
                entry["taken"] = tr + cfg.lam * pen < history[-1]["train_loss"] + cfg.lam * history[-1]["penalty"]
                if entry["taken"]:
                    best.last(ep, Wp, bp)
            history.append(entry)
            if progress and di.rank == 0:
                vc = f", held-out cosine {entry['val_cosine']:.5f}" if n_val else ""
                bar.write(f"isometric finish (polar factors): training 1 − cos {tr:.5f}{vc}, isometry penalty "
                          f"{pen:.2e}: {'taken' if entry['taken'] else 'not taken'}")
    return (*best.result(), reason)


def _polar(W: torch.Tensor, group: int = 16) -> torch.Tensor:
    """The nearest isometry of every map ([C, D, d]): U·Vᵀ from W_i = U·Σ·Vᵀ (orthonormal columns when D ≥ d, rows
    when D < d). Computed as W·(WᵀW)^(−1/2) (or (WWᵀ)^(−1/2)·W) through the eigendecomposition of the small Gram
    matrix, ~5× faster than the SVD at D = d = 768 (150 maps: 17 s against 89 s, one thread); by the SVD when a
    map is far from an isometry (Gram condition number above 10³), where that loses accuracy. ``group`` maps at
    a time, so the temporaries stay a few map-sized arrays."""
    if W.shape[0] > group:
        return torch.cat([_polar(W[i:i + group], group) for i in range(0, W.shape[0], group)])
    wide = W.shape[1] < W.shape[2]
    G = W @ W.transpose(1, 2) if wide else W.transpose(1, 2) @ W
    try:
        e, V = torch.linalg.eigh(G)
        if bool((e[:, 0] > 1e-3 * e[:, -1]).all()):
            inv_sqrt = (V * e.rsqrt()[:, None, :]) @ V.transpose(1, 2)
            return inv_sqrt @ W if wide else W @ inv_sqrt
    except RuntimeError:
        pass
    try:
        U, _, Vh = torch.linalg.svd(W, full_matrices=False)
    except RuntimeError:  # an ill-conditioned map: float64 converges where float32 may not
        U, _, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return (U @ Vh).to(W.dtype)


# ------------------------------------------------------------------------------------------- method="dual"

# Ridge strengths tried by the dual fit, in units of the training kernel's mean eigenvalue tr(K)/n; the held-out
# split picks one (without one: _DUAL_ALPHA). On the planted problems of benchmarks/RESULTS.md the best lay at
# 0.001–0.03 for every shape and ratio measured (0.078–3.5·C·D, full size included) and the held-out cosine varied
# by < 0.001 between 1e-3 and 3e-2, falling from 0.1 on. So the search goes from the weakest up and stops at the
# first strength that is worse than the best so far (at full size: two factorisations instead of six).
_DUAL_ALPHAS = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
_DUAL_ALPHA = 1e-2
_DUAL_ROWS = 2048  # rows per block of the kernel's blockwise products (only the upper triangle is computed)
_DUAL_BIAS_STEPS = 5  # Gauss–Newton steps on the shared bias of the isometric candidate
_DUAL_RESCALE = 3  # at most this many ridge solves on targets rescaled to the predictions' norms


def _dual_bytes(n_train: int, n_val: int) -> int:
    """Memory the dual fit holds besides the contributions: the float64 kernel, its Cholesky factor and the
    held-out rows of the kernel."""
    return 8 * (2 * n_train * n_train + n_val * n_train)


def _component_rows(data: _Data, masks, lo: int, hi: int, device, dtype=torch.float32) -> List[torch.Tensor]:
    """Contributions of components lo..hi−1 as rows ``[n_k, (hi − lo)·D]`` of ``dtype`` on ``device``, one tensor
    per mask (images in :func:`_masked_index` order), filled chunk by chunk: one read of the source for all
    masks."""
    sizes = [int(mk.sum()) for mk in masks]
    out = [torch.empty(n, (hi - lo) * data.D, device=device, dtype=dtype) for n in sizes]
    at = [0] * len(masks)
    for k, (a, b) in enumerate(data.chunks):
        locs = [torch.nonzero(mk[a:b]).flatten() for mk in masks]
        if not any(loc.numel() for loc in locs):
            continue
        chunk = data.load(k)
        for j, loc in enumerate(locs):
            if loc.numel():
                rows = to_device(chunk[:, lo:hi][loc], device, dtype)
                out[j][at[j]:at[j] + loc.numel()] = rows.reshape(loc.numel(), -1)
                at[j] += loc.numel()
    return out


def _fit_dual(data, targets, local_train, local_val, cfg, device, progress, history):
    """Joint ridge regression in its dual form, then the nearest isometries (the ``method="dual"`` path of
    :func:`fit_aligner`).

    With n training images and fewer of them than C·D unknowns per output coordinate, the joint least-squares
    problem min ‖X W − T‖² + α‖W‖² over all maps at once (X [n, C·D] the centred contributions, T the centred
    targets) has the solution W = Xᵀ (K + α I)⁻¹ T with the n × n kernel K = X Xᵀ: one pass of kernel products
    (n²·C·D/2 multiply-adds, the upper triangle only), a Cholesky solve of the n × n system for the ridge
    strengths in ``_DUAL_ALPHAS`` from the weakest up (the held-out rows of the kernel give each strength's
    held-out cosine without touching the contributions again; the search stops at the first strength whose
    held-out cosine is below the best so far, and the best is taken), up to ``_DUAL_RESCALE`` solves at that
    strength on the targets scaled to the predictions' norms (kept while the held-out cosine rises: least squares on unit targets
    weighs every image alike, the cosine does not see the norm), and one pass for W. The data term's minimum-norm
    fit is what early-stopped descent from zero approaches, without the iterations; on planted data at the paper's
    ratio (n = 0.078·C·D) it generalises far better than early-stopped descent from the shared start (joint) or
    Adam (benchmarks/RESULTS.md). Its maps are shrunk far from isometries, so every map is then replaced by its polar
    factor (penalty 0) and the shared bias refitted on the training images (``_DUAL_BIAS_STEPS`` Gauss–Newton
    steps); of the two candidates, ridge and isometric, the one with the lower held-out objective (without a
    held-out split: training objective) is the result of this stage, recorded as ``history`` entry 1 (``alphas``:
    held-out cosine per strength tried). Components are read in groups that fit ``memory_gb`` (one read of the
    source per group for the kernel, one for W). Returns (W, b, predictions): the training and held-out images'
    predictions at the isometric start, for the refinement (no pass to recompute them); None for the ridge one."""
    from tqdm.auto import tqdm

    C, D, d = data.C, data.D, targets.shape[1]
    t0 = time.perf_counter()
    T = to_device(targets[_masked_index(data, local_train)], device, torch.float64)
    val_idx = _masked_index(data, local_val) if bool(local_val.any()) else None
    Tv = to_device(targets[val_idx], device) if val_idx is not None else None
    n, m = T.shape[0], (0 if Tv is None else Tv.shape[0])
    masks = [local_train] + ([local_val] if m else [])
    budget = cfg.memory_gb * 2 ** 30
    group = max(1, min(C, int(budget // 2 // (4 * (n + m) * D))))
    K = torch.zeros(n, n, dtype=torch.float64, device=device)
    Kv = torch.zeros(m, n, dtype=torch.float64, device=device)
    mu = torch.empty(C * D, device=device)
    groups = list(range(0, C, group))
    bar = tqdm(total=2 * len(groups), desc="CompAlign (dual)", unit="group", disable=not progress)
    for lo in groups:
        hi = min(C, lo + group)
        parts = _component_rows(data, masks, lo, hi, device)
        Xt = parts[0]
        mu_g = Xt.mean(0, dtype=torch.float64).to(Xt.dtype)
        mu[lo * D:hi * D] = mu_g
        Xt -= mu_g
        for i in range(0, n, _DUAL_ROWS):  # K += Xt Xtᵀ, upper triangle of blocks
            for j in range(i, n, _DUAL_ROWS):
                K[i:i + _DUAL_ROWS, j:j + _DUAL_ROWS] += (Xt[i:i + _DUAL_ROWS] @ Xt[j:j + _DUAL_ROWS].T).double()
        if m:
            Xv = parts[1]
            Xv -= mu_g
            Kv += (Xv @ Xt.T).double()
        del parts, Xt
        bar.update(1)
    blocks = torch.arange(n, device=device) // _DUAL_ROWS
    upper = blocks[:, None] <= blocks[None, :]
    K = torch.where(upper, K, K.T)  # the lower blocks from their mirror images
    del upper, blocks
    tm = T.mean(0)
    scale = float(K.diagonal().mean())
    if scale <= 0:
        raise InputError("fit_aligner(method='dual'): every training image has the same contributions (the "
                         "centred kernel is zero); nothing to fit")

    def mean_cos(F, Tg):
        return float(torch.nn.functional.cosine_similarity(F, Tg.to(F.dtype), dim=-1).mean())

    L = torch.empty_like(K)  # the Cholesky factor, computed in place (only its lower triangle is read)
    info = torch.empty((), dtype=torch.int32, device=device)
    factored = [None]  # the strength L is the factor at

    def factor(a) -> bool:
        """L ← the Cholesky factor of K + a·scale·I; False where that is numerically singular."""
        L.copy_(K)
        L.diagonal().add_(a * scale)
        torch.linalg.cholesky_ex(L, out=(L, info))
        factored[0] = a
        return not int(info)

    def solve(Tt):
        """The ridge fit to targets Tt with the current factor: (A, intercept, training and held-out predictions,
        held-out cosine). The training predictions need no product with K: (K + a·scale·I)·A = Tt − mean, so
        K·A + mean = Tt − a·scale·A."""
        mean = Tt.mean(0)
        A = torch.cholesky_solve(Tt - mean, L)
        Fv = Kv @ A + mean
        return A, mean, Tt - factored[0] * scale * A, mean_cos(Fv, Tv) if m else None

    alphas, best = {}, None
    for a in (_DUAL_ALPHAS if m else (_DUAL_ALPHA,)):
        if not factor(a):  # numerically singular at this strength (n near or above C·D): try the next
            continue
        sol = solve(T)
        alphas[a] = sol[3]
        if best is None or (m and sol[3] > best[1][3]):
            best = (a, sol)
        elif m:  # the held-out cosine fell: stronger ridges are not tried (it is taken as unimodal in α)
            break
    if best is None:
        raise InputError(f"fit_aligner(method='dual'): the training kernel is singular at every ridge strength "
                         f"tried ({_DUAL_ALPHAS} × its mean eigenvalue); use method='bcd' or 'adam'")
    alpha, (A, tr_mean, Ft, ridge_cos) = best  # tr_mean: the ridge fit's intercept
    if _DUAL_RESCALE and factored[0] != alpha:  # the factor at the chosen strength, for the rescaled solves
        factor(alpha)
    train_ridge = mean_cos(Ft, T)
    rescaled = 0
    for _ in range(_DUAL_RESCALE):
        # The cosine ignores each prediction's norm, least squares on unit targets does not: refit to the targets
        # scaled to the current predictions' norms (the reweighting that bcd's Gauss–Newton step makes), kept
        # where the held-out cosine (without a split: the training cosine) rises.
        A2, mean2, F2, cos2 = solve(T * Ft.norm(dim=1, keepdim=True))
        tr2 = mean_cos(F2, T)
        if not (cos2 > ridge_cos if m else tr2 > train_ridge):
            break
        A, tr_mean, Ft, train_ridge, ridge_cos, rescaled = A2, mean2, F2, tr2, cos2, rescaled + 1
    K = L = None  # free the n × n arrays before the pass for W (the closures above are done with them)
    A = A.float()
    W = torch.empty(C, D, d, device=device)
    for lo in groups:  # W = Xᵀ A, group by group
        hi = min(C, lo + group)
        Xt = _component_rows(data, [local_train], lo, hi, device)[0]
        Xt -= mu[lo * D:hi * D]
        W[lo:hi] = (Xt.T @ A).view(hi - lo, D, d)
        del Xt
        bar.update(1)
    bar.close()
    b_ridge = tr_mean.float() - mu @ W.view(C * D, d)
    pen_ridge = float(_penalty(W))

    # The isometric candidate: polar factors, the bias refitted on the training images from the scale of the
    # predictions (b such that the mean prediction is γ·mean target, γ the mean norm of the centred predictions).
    P = _polar(W)
    passes = _Passes(data, local_train, local_val, device)
    F, Fv = passes.apply(P.view(C * D, d), torch.zeros(d, device=device))
    muP = mu @ P.view(C * D, d)
    gamma = float((F - muP).norm(dim=1).mean())
    bp = gamma * tm.float() - muP
    b0 = bp.clone()
    F += bp
    Fv += bp
    Tf = T.float()
    for _ in range(_DUAL_BIAS_STEPS):
        if _bias_block(F, Tf, bp, float(n), lambda t: t) < 1e-9:
            break
    Fv += bp - b0
    pen_iso = float(_penalty(P))
    train_iso = mean_cos(F, Tf)
    iso_cos = mean_cos(Fv, Tv) if m else None
    lam = cfg.lam
    if m:
        obj_r, obj_i = 1 - ridge_cos + lam * pen_ridge, 1 - iso_cos + lam * pen_iso
    else:
        obj_r, obj_i = 1 - train_ridge + lam * pen_ridge, 1 - train_iso + lam * pen_iso
    iso = obj_i <= obj_r
    Wb, bb = (P, bp) if iso else (W, b_ridge)
    predictions = (F, Fv) if iso else None  # the refinement's start predictions: no pass to recompute them
    entry = {"epoch": 1, "seconds": round(time.perf_counter() - t0, 3), "stage": "dual", "alpha": alpha,
             "alphas": {str(k): v for k, v in alphas.items()}, "train_loss": 1 - (train_iso if iso else train_ridge),
             "lam": lam, "isometric": iso, "penalty": pen_iso if iso else pen_ridge,
             "ridge": {"val_cosine": ridge_cos, "penalty": pen_ridge, "rescaled": rescaled},
             "polar": {"val_cosine": iso_cos, "penalty": pen_iso}}
    if m:
        entry.update(val_objective=min(obj_r, obj_i), val_cosine=iso_cos if iso else ridge_cos)
    history.append(entry)
    if progress:
        vc = (f"held-out cosine ridge {ridge_cos:.5f} (α = {alpha:g} × mean eigenvalue), isometric {iso_cos:.5f}"
              if m else f"training cosine ridge {train_ridge:.5f}, isometric {train_iso:.5f}")
        print(f"CompAlign (dual): {vc}; isometry penalty ridge {pen_ridge:.2e}, isometric {pen_iso:.2e}; "
              f"kept the {'isometric' if iso else 'ridge'} maps ({entry['seconds']:.0f} s)")
    return Wb.contiguous(), bb.contiguous(), predictions


def fit_aligner(contributions, targets: Optional[torch.Tensor] = None, *, lam: float = 1.0, seed: int = 0,
                val_fraction: float = 0.1, method: str = "auto", lr: Optional[float] = None, batch_size: int = 256,
                max_epochs: Optional[int] = None, patience: Optional[int] = None, weight_decay: float = 0.0,
                ridge: float = 1e-3, penalty_probes: Optional[int] = None, penalty_warmup: Optional[int] = None,
                tol: float = 1e-5, memory_gb: float = 2.0, isometric: bool = False, device="cpu",
                names: Optional[Sequence[str]] = None,
                model_name: Optional[str] = None, clip_model: Optional[str] = None,
                progress: bool = True) -> Aligner:
    """Fit one map W_i per component (and a shared bias) from contributions to CLIP image embeddings.

    ``contributions``: ``[N, C, D]`` tensor (any float dtype; converted per batch), a :class:`Decomposition` or an
    :class:`ExtractionCache` (then ``targets``, ``names``, ``model_name`` and ``clip_model`` default to what the
    cache stores). ``targets``: ``[N, d]`` CLIP image embeddings (L2-normalised here). See :class:`AlignConfig`
    for the other settings and the module docstring for the loss. Returns an :class:`Aligner` whose
    ``held_out_cosine`` is the mean cosine on the held-out images at the best epoch.

    ``method="auto"`` (default) takes ``"bcd"`` when there are at least 2·C·D training images, ``"adam"`` from
    C·D/2 to 2·C·D, and below C·D/2 (the paper's 10,000 images for C = 150, D = 768 are 0.078·C·D) ``"dual"``
    where its n × n kernel fits ``memory_gb`` (2·8·n² bytes: ~11,000 training images with the default 2 GiB)
    and the fit runs in one process, else ``"joint"``. With fewer images than C·D the maps are not determined by
    the data (C·D·d unknowns, n·d target values): each block of bcd's first sweep is solved exactly and fits the
    noise of the others (planted N = 10,000, C = 150, D = d = 768: held-out cosine 0.08 after sweep 1 against
    0.15 for the shared-map baseline), while the dual fit's minimum-norm joint solution and early-stopped descent
    regularise. On planted data (``benchmarks/RESULTS.md``, 1,000 held-out images) the dual fit has the highest
    held-out cosine of the four methods at every ratio measured, with exact isometries (penalty < 1e-11) in 10 of
    the 13 settings: C = 150, D = d = 32: 0.362 at the paper's ratio 0.078 (joint 0.285, Adam 0.242), 0.686 at
    0.35 (0.627, 0.554), 0.956 at 0.63 (0.912, 0.885); D = d = 64: 0.363 and 0.701 (Adam 0.235, 0.551); D ≠ d
    (32 → 64, 64 → 32): 0.35–0.39 at 0.078 and 0.66–0.67 at 0.35 (Adam 0.23–0.26, 0.54). At the paper's size it
    takes under 6 minutes on 2 CPU cores to a held-out cosine of 0.349 with exact isometries, where joint took
    84 minutes to 0.249 and Adam, after 76 minutes (33 epochs, still short of its own stop), had 0.275; at D ≠ d
    (384 → 768, 1024 → 512, one core) 5.3 and 9.5 minutes, 1/12 of Adam's time to its own stop, ending 0.07–0.09
    higher with exact isometries (``isometric=True``). From
    C·D/2 up ``"auto"`` keeps Adam and bcd: on the concept world's small ViTs (1.1–1.4·C·D) the dual fit's maps
    reach Adam's held-out cosine (0.956–0.960) but keep the components' property structure worse (26 instead of
    29 of the 55 interpretation goals of ``benchmarks/concept_world.py``), which planted maps drawn independently
    per component cannot show.
    ``config["method"]`` records the method used.
    """
    from tqdm.auto import tqdm

    if method not in ("auto",) + _METHODS:
        raise InputError(f"method must be one of {('auto',) + _METHODS}, got {method!r}")
    from ._cli_checks import check_device

    check_device(device, "fit_aligner")  # a device this machine lacks is named before any work
    data = _Data.of(contributions)
    requested = method
    from . import distributed as dist

    n_val_est = int(round(data.N * val_fraction)) if 0 < val_fraction < 1 else 0
    n_train_est = data.N - n_val_est
    dual_fits = _dual_bytes(n_train_est, n_val_est) <= memory_gb * 2 ** 30
    if method == "auto":  # by how far the data determine the maps (see above)
        ratio = n_train_est / (data.C * data.D)
        method = "bcd" if ratio >= _BCD_MIN_RATIO else "adam" if ratio >= _DUAL_MAX_RATIO else (
            "dual" if dual_fits and not dist.info().active else "joint")
    elif method == "dual":
        if dist.info().active:
            raise InputError("method='dual' runs in one process (its n × n kernel couples every pair of training "
                             "images); under torch.distributed use method='joint', 'adam' or 'bcd'")
        if not dual_fits:
            need = _dual_bytes(n_train_est, n_val_est) / 2 ** 30
            raise InputError(f"method='dual' holds an n × n float64 kernel and its Cholesky factor: {need:.2f} GiB "
                             f"for n = {n_train_est} training images, more than memory_gb = {memory_gb:g}; raise "
                             f"memory_gb or use method='joint', 'adam' or 'bcd'")
    defaults = _DEFAULTS[method]
    cfg = AlignConfig(lam=lam, method=method, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                      max_epochs=defaults[0] if max_epochs is None else max_epochs,
                      patience=defaults[1] if patience is None else patience, val_fraction=val_fraction,
                      ridge=ridge, seed=seed, penalty_probes=penalty_probes,
                      penalty_warmup=defaults[2] if penalty_warmup is None else penalty_warmup, tol=tol,
                      memory_gb=memory_gb, isometric=isometric)
    if targets is None:
        targets = data.targets
        if targets is None:
            raise InputError("fit_aligner needs targets [N, d] (CLIP image embeddings); this source stores none. "
                             "Extract with clip=... or pass targets=")
    if names is None:
        names = data.names if data.names is not None else tuple(f"component.{i}" for i in range(data.C))
    names = tuple(names)
    if len(names) != data.C:
        raise MismatchError(f"{len(names)} names for {data.C} components")
    model_name = model_name or data.meta.get("model")
    clip_model = clip_model or data.meta.get("clip_model")
    if targets.ndim != 2 or targets.shape[0] != data.N:
        raise MismatchError(f"targets must be [N, d] with N = {data.N} (the number of images), got {tuple(targets.shape)}")
    bad = ~torch.isfinite(targets.detach().cpu()).all(1)
    if bool(bad.any()):
        raise InputError(f"fit_aligner: the target of image {int(torch.nonzero(bad)[0])} has NaN or Inf")
    targets = torch.nn.functional.normalize(targets.detach().to(torch.float32), dim=-1).cpu()
    N, C, D, d = data.N, data.C, data.D, targets.shape[1]
    device = torch.device(device)

    gen = torch.Generator().manual_seed(seed)
    n_val = int(round(N * val_fraction)) if val_fraction > 0 else 0
    if val_fraction > 0:
        n_val = min(max(n_val, 1), N - 1)
    if N - n_val < 2:
        raise EmptyDatasetError(f"fit_aligner needs at least 2 training images; got N = {N} with {n_val} held out")
    val_mask = torch.zeros(N, dtype=torch.bool)
    val_mask[torch.randperm(N, generator=gen)[:n_val]] = True
    if 0 < n_val < _SMALL_VAL:
        warnings.warn(f"fit_aligner: only {n_val} of {N} images are held out; a mean cosine over so few images says "
                      f"little about unseen ones (its standard error is large). Use ≥ {_SMALL_VAL} held-out images "
                      "(more images or a larger val_fraction).", UserWarning, stacklevel=2)
    train_mask = ~val_mask

    # Under torch.distributed every rank takes a disjoint share of the training and held-out images: the closed
    # form and the evaluations are all-reduced, and refinement is data-parallel (gradients all-reduced each step,
    # with uneven shares handled as DDP's Join does), so all ranks hold the same maps.
    di = dist.info()
    local_train, local_val = train_mask, val_mask
    if di.active:
        local_train = torch.zeros(N, dtype=torch.bool)
        local_train[torch.nonzero(train_mask).flatten()[di.rank::di.world_size]] = True
        local_val = torch.zeros(N, dtype=torch.bool)
        local_val[torch.nonzero(val_mask).flatten()[di.rank::di.world_size]] = True
    W0, b0 = _closed_form(data, targets, local_train, ridge, max(batch_size, 1024), device)
    W = W0.unsqueeze(0).repeat(C, 1, 1).contiguous().requires_grad_(cfg.method == "adam")
    b = b0.clone().requires_grad_(cfg.method == "adam")
    lr_used = lr if lr is not None else 0.05 / math.sqrt(max(D, d))
    try:  # the fused kernel is several times faster for tens of millions of parameters (CPU and GPU)
        opt = torch.optim.Adam([W, b], lr=lr_used, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.Adam([W, b], lr=lr_used, weight_decay=weight_decay)

    def objective_on(mask):
        loss, cos = _evaluate(data, targets, mask, W.detach(), b.detach(), max(batch_size, 1024), device)
        with torch.no_grad():
            pen = float(_penalty(W.detach()))
        return loss + lam * pen, cos, pen

    history: List[dict] = []
    if n_val:
        best_obj, init_cos, pen0 = objective_on(local_val)
    else:
        best_obj, init_cos, pen0 = float("inf"), None, float(_penalty(W.detach()))
    history.append({"epoch": 0, "train_loss": None, "val_objective": best_obj if n_val else None,
                    "val_cosine": init_cos, "penalty": pen0})

    def exact(Wb, bb, best_cos):
        """``isometric=True``: the result's maps replaced by their polar factors and the bias refitted (one pass
        over the source), recorded as one more history entry."""
        reduce = dist.all_reduce_sum if di.active else (lambda t: t)
        passes = _Passes(data, local_train, local_val, device)
        T = to_device(targets[_masked_index(data, local_train)], device)
        n_total = float(reduce(torch.tensor([float(passes.n_train)], dtype=torch.float64))[0])
        with torch.no_grad():
            Wp, bp, _, Fv, tr = _project(passes, T, Wb.detach(), bb.detach(), n_total, reduce, _DUAL_BIAS_STEPS)
            pen = float(_penalty(Wp))
            cos = None
            if n_val:
                Tv = to_device(targets[_masked_index(data, local_val)], device)
                cos_sum = torch.nn.functional.cosine_similarity(Fv, Tv, dim=-1).sum(dtype=torch.float64)
                cos = float(reduce(cos_sum[None])[0]) / n_val
        entry = {"epoch": int(history[-1]["epoch"]) + 1, "stage": "isometric", "train_loss": tr, "penalty": pen,
                 "val_cosine": cos, "val_objective": 1.0 - cos + lam * pen if n_val else None}
        history.append(entry)
        if progress and di.rank == 0 and n_val:
            print(f"CompAlign (isometric=True): polar factors of the result, bias refitted: held-out cosine "
                  f"{cos:.5f} (was {best_cos:.5f}), isometry penalty {pen:.2e}")
        return Wp, bp, entry["epoch"], cos

    def result(best_state, best_epoch, best_cos, stop):
        Wb, bb = best_state
        if cfg.isometric and float(_penalty(Wb.detach())) >= _EXACT:
            Wb, bb, best_epoch, best_cos = exact(Wb, bb, best_cos)
        config = attrs.asdict(cfg)
        config.update(best_epoch=best_epoch, n_train=int(train_mask.sum()), n_val=n_val,
                      penalty_side="WtW" if D >= d else "WWt", stopped=stop, method_requested=requested)
        if cfg.method == "adam":
            config.update(lr_used=lr_used)
        al = Aligner(Wb.detach().cpu(), bb.detach().cpu(), names, model_name=model_name, clip_model=clip_model,
                     config=config, held_out_cosine=best_cos if n_val else None, init_cosine=init_cos,
                     history=history, model_fingerprint=data.meta.get("model_fingerprint"))
        if progress and di.rank == 0 and n_val:
            print(f"CompAlign ({cfg.method}): held-out cosine {best_cos:.5f} on {n_val} images (baseline, one shared "
                  f"linear map of Σ_i c_i: {init_cos:.5f}); best {_UNIT[cfg.method]} "
                  f"{best_epoch}, stopped: {stop}")
        return al

    if cfg.method == "bcd":
        with torch.no_grad():
            W, b = W.detach(), b.detach()
            return result(*_fit_bcd(data, targets, local_train, local_val, W, b, cfg, device, progress,
                                    objective_on, history))
    if cfg.method == "joint":
        W, b = W.detach(), b.detach()
        return result(*_fit_joint(data, targets, local_train, local_val, W, b, cfg, device, progress, history))
    if cfg.method == "dual":
        with torch.no_grad():
            W, b, start = _fit_dual(data, targets, local_train, local_val, cfg, device, progress, history)
        return result(*_fit_joint(data, targets, local_train, local_val, W, b, cfg, device, progress, history,
                                  start_shared=False, desc="CompAlign (dual, refinement)", predictions=start))
    best = _Best(W, b, best_obj, init_cos, cfg.tol)
    t_start = time.perf_counter()
    bar = tqdm(range(1, cfg.max_epochs + 1), desc="CompAlign (adam)", unit="epoch",
               disable=not progress or di.rank != 0)
    stop = "max_epochs"
    for epoch in bar:
        # continuation: λ ramps up linearly over the first `penalty_warmup` epochs (see AlignConfig)
        lam_now = lam * min(1.0, epoch / cfg.penalty_warmup) if cfg.penalty_warmup else lam
        tot, n = 0.0, 0
        if not di.active:
            tot_dev = torch.zeros((), dtype=torch.float64, device=device)  # read once per epoch, not per step
            for idx, c in _batches(data, train_mask, batch_size, gen):
                c = to_device(c, device, torch.float32)
                t = to_device(targets[idx], device)
                f = _combine(c, W) + b
                data_loss = (1 - torch.nn.functional.cosine_similarity(f, t, dim=-1)).mean()
                loss = data_loss + lam_now * _penalty(W, cfg.penalty_probes, gen) if lam_now > 0 else data_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot_dev += data_loss.detach() * c.shape[0]
                n += c.shape[0]
            tot = float(tot_dev)
        else:
            tot, n = _data_parallel_epoch(data, targets, local_train, batch_size, gen, W, b, opt, lam_now,
                                          cfg.penalty_probes, device, di.world_size)
        entry = {"epoch": epoch, "seconds": round(time.perf_counter() - t_start, 3), "train_loss": tot / max(n, 1),
                 "lam": lam_now}
        if n_val:
            obj, cos, pen = objective_on(local_val)
            entry.update(val_objective=obj, val_cosine=cos, penalty=pen)
            counted = epoch >= cfg.penalty_warmup  # the objective only becomes comparable once λ is at full strength
            if not best.held_out(obj, cos, epoch, W, b, count=counted) and counted and best.bad % 2 == 0:
                for group in opt.param_groups:  # plateau: halve the step before giving up
                    group["lr"] *= 0.5
            bar.set_postfix(val_cos=f"{cos:.4f}", best=best.epoch)
        else:
            best.last(epoch, W, b)
            entry.update(penalty=float(_penalty(W.detach())))
            bar.set_postfix(train_loss=f"{entry['train_loss']:.4f}")
        history.append(entry)
        if progress and di.rank == 0:
            vc = f", held-out cosine {entry['val_cosine']:.5f}" if n_val else ""
            bar.write(f"epoch {epoch}: training 1 − cos {entry['train_loss']:.5f}{vc}, isometry penalty "
                      f"{entry['penalty']:.2e}, λ {lam_now:.3g} ({entry['seconds']:.0f} s)")
        if n_val and best.bad >= cfg.patience and epoch >= cfg.penalty_warmup:
            stop = "no held-out improvement"
            break
    bar.close()
    return result(*best.result(), stop)
