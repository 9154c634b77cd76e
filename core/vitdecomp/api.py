"""Public entry points: ``decompose``, ``representation``, ``load_model``."""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import attrs
import torch

from ._input_range import check_image_range, input_stats
from ._plugins import Registry, default_registry
from .adapter import DecomposeOptions
from .decomposition import Decomposition, _Shifted, _take, tolerance_for
from .errors import InputError, UnsupportedModelError

__all__ = ["decompose", "representation", "load_model", "LoadedModel", "find_adapter", "choose_adapter",
           "unwrap_loaded"]


@attrs.define(eq=False)
class LoadedModel:
    """A model in eval mode with its preprocessing transform (PIL image → tensor) and the string it came from."""

    model: Any
    preprocess: Any
    name: str
    tokenizer: Any = None

    def __iter__(self):  # allows ``model, preprocess = load_model(...)``
        return iter((self.model, self.preprocess))


@contextlib.contextmanager
def _blame(ad, model, registry: Optional[Registry], what: str):
    """Turn an adapter's own crash (not a VitDecompError, not out-of-memory) into :class:`AdapterError` naming the
    adapter, its plugin and the model class: a pack that claims models it then fails on is named."""
    from .errors import AdapterError, VitDecompError

    try:
        yield
    except (VitDecompError, MemoryError, torch.OutOfMemoryError, AssertionError):  # assertions: test tooling
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised, named and chained
        try:
            plugin = (registry or default_registry()).plugin_of(ad)
        except Exception:  # noqa: BLE001 - the message must not fail
            plugin = None
        cls = type(model)
        raise AdapterError(
            f"adapter {getattr(ad, 'name', ad)!r}" + (f" of {plugin}" if plugin else "")
            + f" claimed model class {cls.__module__}.{cls.__qualname__} but failed on its {what}: "
            f"{type(exc).__name__}: {exc}. Report it to the pack's authors; pass adapter=... to use another one"
        ) from exc
def unwrap_loaded(model):
    """The module inside a :class:`LoadedModel`; anything else unchanged. Every function that takes a model
    accepts what :func:`load_model` returns."""
    return model.model if isinstance(model, LoadedModel) else model


def find_adapter(model, adapter=None, *, registry: Optional[Registry] = None):
    """The adapter that will decompose ``model`` (see :meth:`Registry.find_adapter`)."""
    return (registry or default_registry()).find_adapter(unwrap_loaded(model), adapter)


def choose_adapter(model, adapter=None, *, registry: Optional[Registry] = None):
    """Which adapter will decompose ``model`` and why: a :class:`vitdecomp.AdapterChoice` (the adapter, its
    plugin, ``how`` — override / claimed / fallback — and what every adapter asked answered)."""
    return (registry or default_registry()).choose(model, adapter)


def _param_like(module):
    for p in module.parameters():
        return p
    return None


def _validate(model, images, adapter) -> None:
    if not isinstance(images, torch.Tensor):
        raise InputError(f"images must be a torch.Tensor [B, 3, H, W]; got {type(images).__name__}")
    if images.ndim != 4:
        raise InputError(
            f"images must be a 4-D tensor [B, C, H, W] of preprocessed images; got shape {tuple(images.shape)}"
            + (" (add a batch axis with images.unsqueeze(0))" if images.ndim == 3 else "")
        )
    if not images.is_floating_point():
        raise InputError(
            f"images must be a floating-point tensor (float32 or float64, preprocessed and normalised); got {images.dtype}"
        )
    if images.shape[0] == 0:
        raise InputError("images is an empty batch (B = 0)")
    expected = getattr(adapter, "in_channels", lambda m: 3)(model)
    if images.shape[1] != expected:
        raise InputError(f"images have {images.shape[1]} channels; this model takes {expected} (shape [B, {expected}, H, W])")
    _check_eval(model)
    p = _param_like(model)
    if p is not None:
        if p.dtype != images.dtype:
            raise InputError(
                f"images are {images.dtype} but the model's parameters are {p.dtype}; convert one of them "
                f"(e.g. model.double() and images.double() for float64)"
            )
        if p.device != images.device:
            raise InputError(f"images are on {images.device} but the model is on {p.device}")


def _check_eval(model) -> None:
    """Raise when the model or any of its submodules is in training mode."""
    if not isinstance(model, torch.nn.Module):
        return
    training = [n for n, m in model.named_modules() if m.training]
    if training:
        which = "the model itself" if training[0] == "" else f"submodule {training[0]!r}"
        more = f" and {len(training) - 1} more" if len(training) > 1 else ""
        raise InputError(
            f"{type(model).__name__} is in training mode ({which}{more}); vitdecomp refuses to decompose it "
            "(dropout, drop-path and BatchNorm batch statistics make the forward stochastic). Call model.eval() first."
        )


def _check_finite(images: torch.Tensor, what: str = "images") -> None:
    """Raise naming the first image that holds NaN or Inf. Synchronises, so decompose calls it on the CPU (or when
    it synchronises anyway for ``check=True``); on an accelerator the extraction loop checks once per shard."""
    bad = ~torch.isfinite(images).flatten(1).all(1)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        kind = "NaN" if bool(torch.isnan(images[i]).any()) else "Inf"
        n = int(bad.sum())
        err = InputError(f"{what}[{i}] contains {kind}" + (f" ({n} images of the batch are not finite)" if n > 1 else "")
                         + "; every value must be finite")
        err.index = i  # the image's position in the batch, for callers that know its name (extract)
        raise err


def _fingerprint_of(model, fingerprint) -> Optional[str]:
    """``decompose``'s ``fingerprint=``: True → hash the weights now; a 32-hex-digit string → as given; False → None."""
    if fingerprint is True:
        from ._fingerprint import weights_fingerprint

        return weights_fingerprint(model) if isinstance(model, torch.nn.Module) else None
    if fingerprint is False or fingerprint is None:
        return None
    if isinstance(fingerprint, str) and len(fingerprint) == 32 and all(ch in "0123456789abcdef" for ch in fingerprint):
        return fingerprint
    raise InputError(f"fingerprint={fingerprint!r}: use True (hash the model's weights now), False (record none) or "
                     "the 32-hex-digit string vitdecomp.weights_fingerprint(model) returned")


def _autocast_dtype(value):
    if value is None or value is False:
        return None
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if isinstance(value, str):
        if value not in table:
            raise InputError(f"autocast={value!r}: use 'bf16' or 'fp16' (or torch.bfloat16 / torch.float16)")
        return table[value]
    if value in (torch.bfloat16, torch.float16):
        return value
    raise InputError(f"autocast={value!r}: use torch.bfloat16 or torch.float16")


def _place(model, images, device):
    """Move the model (in place) and the images to ``device``; both as they are when ``device`` is None."""
    if device is None:
        return model, images
    device = torch.device(device)

    def there(d: torch.device) -> bool:
        return d.type == device.type and (device.index is None or d.index == device.index)

    p = _param_like(model) if isinstance(model, torch.nn.Module) else None
    if p is not None and not there(p.device):
        model = model.to(device)
    if isinstance(images, torch.Tensor) and not there(images.device):
        from .engine import to_device

        images = to_device(images, device)
    return model, images


def _apply_even_bias(dec: Decomposition) -> Decomposition:
    const = [i for i, c in enumerate(dec.components) if c.kind == "const"]
    if not const:
        return dec
    keep = [i for i, c in enumerate(dec.components) if c.kind != "const"]
    share = _take(dec.contributions, const).sum(1) / len(keep)  # [B, D]
    contributions = _take(dec.contributions, keep) + share.unsqueeze(1)
    comps = tuple(dec.components[i] for i in keep)
    details = {}
    if dec.token_details:
        for c in comps:
            details[c.name] = _Shifted(dec.token_details.get(c.name), share)
    return Decomposition(contributions=contributions, components=comps, representation=dec.representation,
                         grid=dec.grid, token_details=details, token_grids=dict(dec.token_grids),
                         meta={**dec.meta, "bias": "even"})


def decompose(
    model,
    images: torch.Tensor,
    *,
    heads: bool = True,
    start=None,
    tokens: Optional[str] = None,
    bias: str = "explicit",
    check: bool = False,
    tol: Optional[float] = None,
    adapter=None,
    registry: Optional[Registry] = None,
    autocast=None,
    compare_float32: bool = True,
    device=None,
    fingerprint=True,
    check_input: bool = True,
) -> Decomposition:
    """Decompose the model's final representation of ``images`` exactly into component contributions.

    :param model: a supported model in eval mode (timm ViT/DeiT/DINO/DINOv2, an open_clip CLIP model or its
        ``.visual``, and whatever plugins add), or the :class:`LoadedModel` :func:`load_model` returns.
    :param images: preprocessed float tensor ``[B, 3, H, W]`` in the model's dtype and on its device.
    :param heads: split attention branches into heads (``blocks.i.attn.head.h``) or keep ``blocks.i.attn``.
    :param start: decompose blocks ``start..`` only; the residual stream entering that block is the component
        ``init``.
    :param tokens: ``"source"``: also split attention heads by the token they read from; see
        :meth:`Decomposition.token_contributions`.
    :param bias: ``"explicit"`` (biases and norm offsets are components, each write centred by its own mean at
        a norm); ``"paper"``: the paper's RepDecompose convention exactly (b_O / H to each head; at a norm the
        stream's mean and β split evenly over the leaves present there; no ``const`` components; families on the
        graph engine, see :attr:`Adapter.paper_bias`); ``"even"``: the explicit constants summed and split evenly
        over the other head-level components (not the paper's numbers). In every mode ``heads=False`` is the sum
        of the heads.
    :param check: raise :class:`ReconstructionError` when the relative error exceeds ``tol`` (default by dtype:
        1e-5 for float32, 1e-10 for float64). NaN or Inf in the images or the contributions raises
        :class:`InputError` naming the image, also with ``check=False`` on the CPU; on an accelerator that check
        needs a synchronisation, so it runs with ``check=True`` (:func:`vitdecomp.extract` checks once per shard).
    :param adapter: an adapter name or object, to override dispatch.
    :param autocast: ``torch.bfloat16`` / ``torch.float16`` (or ``"bf16"`` / ``"fp16"``): run the model's forward
        under ``torch.autocast`` (float32 images and model); the decomposition's own algebra stays in float32.
        ``error`` is then measured against the reduced-precision forward's own z (bounded by the rounding of its
        branch outputs, ~1e-3 for bf16) and ``meta["error_vs_float32"]`` against a separate float32 forward —
        reported, never hidden; ``check=True`` applies the reduced dtype's tolerance. Called inside the caller's
        own ``torch.autocast`` context, the same happens with that context's dtype (only the model's forward runs
        reduced; the readout algebra is kept out of it) but without the float32 comparison.
    :param compare_float32: with ``autocast``, also run a float32 forward for ``meta["error_vs_float32"]`` (one
        more forward; :func:`vitdecomp.extract` does it on the first batch of every shard).
    :param device: run on this device (``"cuda"``, ``"cuda:1"``, ``"cpu"``): the model is moved there (in place,
        as ``nn.Module.to`` does) and the images copied there. Default: where the model already is (the images
        must then be on the same device). No step of the decomposition makes the host wait for the device
        (see :func:`vitdecomp.testing.check_cuda_placement`; with ``fingerprint=True`` hashing the weights does,
        see there); reading ``error`` does, once.
    :param fingerprint: the model-weights identity recorded in ``meta["model_fingerprint"]``, which an
        :class:`~vitdecomp.Aligner` fitted on other weights refuses (:meth:`~vitdecomp.Aligner.check_source`).
        ``True`` (default): :func:`vitdecomp.weights_fingerprint` of the model, computed at this call: every
        weight read once (a ViT-B on a shared 2-core box: 0.6–2.3 s, +10% on a batch of 8, +40–80% on one
        image, see benchmarks/RESULTS.md; on an accelerator the weights are copied to the host, a
        synchronisation). It is never memoised: in-place edits through ``.data`` or numpy leave torch's version
        counters unchanged, so no cheap key can prove the weights unchanged. A string: that fingerprint, computed once by the caller with
        ``vitdecomp.weights_fingerprint(model)`` (the cheap path for loops over batches; the caller vouches the
        weights have not changed since). ``False``: none recorded (aligners then cannot check this
        decomposition: an explicit opt-out).
    :param check_input: refuse images that are plainly not preprocessed the way the model expects:
        0–255 pixel values or unnormalised [0, 1] images for a model whose preprocessing normalises (see
        :mod:`vitdecomp._input_range`; the accepted range comes from the model's own preprocessing
        config). Checked where the NaN check is (on the CPU; on an accelerator with ``check=True``, and always
        by :func:`vitdecomp.extract`, on the host). ``False`` accepts any finite values (exotic but legitimate
        inputs).
    :returns: a :class:`Decomposition`; Σ_i c_i = ``representation`` up to ``error``.
    """
    options = DecomposeOptions(heads=heads, start=start, tokens=tokens, bias=bias)
    stats = input_stats(model) if check_input else None
    model, images = _place(unwrap_loaded(model), images, device)
    ad = find_adapter(model, adapter, registry=registry)
    outer = model
    with _blame(ad, outer, registry, "unwrap/validate"):
        model = ad.unwrap(model)
        _validate(model, images, ad)
        ad.validate(model, images)
    if bias == "paper" and not getattr(ad, "paper_bias", False):
        raise UnsupportedModelError(
            f"bias='paper' (the paper's RepDecompose convention) is not implemented by adapter {ad.name!r} for "
            f"{type(model).__name__} (the adapter does not declare paper_bias); use bias='explicit' or 'even' "
            f"with it (families with bias='paper': every description on the graph engine — timm ViT/DeiT/DINO/"
            f"DINOv2, open_clip, CaiT, Swin/SwinV2, MaxViT, the HF pack's ViT/DeiT/DINOv2/CLIP/Swin)")
    sync_ok = check or images.device.type == "cpu"  # never make the host wait for an accelerator unasked
    if sync_ok:
        _check_finite(images)
        if check_input:
            check_image_range(images, stats)
    fp = _fingerprint_of(outer, fingerprint)
    ac = _autocast_dtype(autocast)
    if ac is not None and images.dtype != torch.float32:
        raise InputError(f"autocast={autocast!r} needs float32 images and model; got {images.dtype}")
    dt = images.device.type
    run_ac = ac
    if run_ac is None and images.dtype == torch.float32 and torch.is_autocast_enabled(dt):
        run_ac = torch.get_autocast_dtype(dt)  # the caller's own torch.autocast context
    # the caller's autocast never reaches the readout algebra; only the model's forward runs reduced
    with torch.no_grad(), torch.autocast(dt, enabled=False), _blame(ad, outer, registry, "decomposition"):
        if run_ac is None:
            dec = ad.decompose(model, images, options)
        else:
            from .engine import forward_autocast

            # the model's forward (inside the adapter's HookSet) runs under autocast; captures are upcast
            with forward_autocast(dt, run_ac, images.dtype):
                dec = ad.decompose(model, images, options)
            # z comes out of the reduced-precision forward; keep the record in the working dtype
            dec.representation, dec._error = dec.representation.to(images.dtype), None
            dec.meta["autocast"] = str(run_ac).replace("torch.", "")
            if ac is not None and compare_float32:
                from .decomposition import relative_error

                z32 = ad.representation(model, images)
                dec.meta["error_vs_float32"] = relative_error(dec.total(), z32)
    if bias == "even":  # at head level, so heads=False is the sum of the heads
        dec = _apply_even_bias(dec)
    if not heads:
        dec = dec.group("branch")
        dec.meta.pop("grouped", None)
    dec.meta.setdefault("adapter", ad.name)
    dec.meta.update({"heads": heads, "start": start, "tokens": tokens, "bias": bias, "dtype": str(images.dtype).replace("torch.", ""),
                     "model_fingerprint": fp})
    if sync_ok:
        _check_finite(dec.contributions.detach(), "the contributions of images")
    if check:
        dec.check(tol if tol is not None else (tolerance_for(ac) if ac is not None else None))
    return dec


def representation(model, images: torch.Tensor, *, adapter=None, registry: Optional[Registry] = None,
                   device=None) -> torch.Tensor:
    """The family's final representation z ``[B, D]`` as METHOD.md §1 defines it (e.g. timm ViT:
    ``forward_head(forward_features(x), pre_logits=True)``; open_clip: ``encode_image(x)``). ``device`` as in
    :func:`decompose`."""
    model, images = _place(unwrap_loaded(model), images, device)
    ad = find_adapter(model, adapter, registry=registry)
    with _blame(ad, model, registry, "representation"):
        inner = ad.unwrap(model)
        _validate(inner, images, ad)
        ad.validate(inner, images)
        with torch.no_grad():
            return ad.representation(inner, images)


def load_model(
    spec: str,
    *,
    pretrained: bool = True,
    weights=None,
    random_init: bool = False,
    seed: int = 0,
    device="cpu",
    registry: Optional[Registry] = None,
    **kwargs,
) -> LoadedModel:
    """Load a model from a string ``"<prefix>:<name>"``: ``timm:deit_base_patch16_224``,
    ``open_clip:ViT-B-16/laion2b_s34b_b88k`` (and prefixes that plugins register, e.g. ``hf:``).

    Pretrained weights by default; ``weights=PATH`` loads a local checkpoint; ``random_init=True`` builds the
    architecture with random weights (offline work, tests), drawn from torch's generator seeded with ``seed``
    (the global generator's state is restored afterwards), so the same string, keyword arguments and seed give
    the same random model in every process: chained commands (``extract`` then ``heatmap`` with
    ``--random-init``) see one model. Extra keyword arguments go to the model constructor.
    Returns a :class:`LoadedModel` (model in eval mode + preprocessing).
    """
    from .errors import UnknownModelError

    if not isinstance(spec, str) or ":" not in spec:
        raise UnknownModelError(
            f"Model string {spec!r} has no prefix; use '<prefix>:<name>', e.g. 'timm:deit_base_patch16_224' or "
            "'open_clip:ViT-B-16/laion2b_s34b_b88k'"
        )
    prefix, name = spec.split(":", 1)
    loader = (registry or default_registry()).loader_for(prefix)
    if not (random_init or (not pretrained and weights is None)):
        return loader(name, pretrained=pretrained, weights=weights, random_init=random_init, device=device, **kwargs)
    import random

    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            return loader(name, pretrained=pretrained, weights=weights, random_init=random_init, device=device,
                          **kwargs)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
