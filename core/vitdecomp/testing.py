"""Conformance kit: the checks every model family (built-in or third-party pack) must pass.

Use it from a pack's tests::

    from vitdecomp import testing

    def test_conformance():
        model = build_small_model()                       # real architecture, random weights
        testing.perturb_parameters(model)                 # move norms / LayerScale away from identity init
        testing.run_conformance(model, image_size=(32, 32), reference=lambda m, x: m.forward_own(x))

Every check raises ``AssertionError`` with a message naming the model, dtype and granularity that failed.
"""

from __future__ import annotations

import copy
import re
from typing import Callable, Iterable, Optional, Sequence

import torch

from . import api
from ._records import KINDS
from .decomposition import relative_error, tolerance_for
from .errors import InputError

__all__ = [
    "perturb_parameters",
    "check_reconstruction",
    "check_component_names",
    "check_token_sums",
    "check_bad_inputs",
    "run_conformance",
    "GRANULARITIES",
]

#: The option sets every adapter must reconstruct exactly (``start`` is filled in per model).
GRANULARITIES = (
    {"heads": True},
    {"heads": False},
    {"heads": True, "start": "middle"},
    {"heads": True, "tokens": "source"},
    {"heads": True, "bias": "even"},
)

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


def perturb_parameters(model: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Move norm weights/biases, LayerScale gammas and BatchNorm running statistics away from their identity
    initialisation (in place), so that exactness tests cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            low = name.lower()
            if any(k in low for k in ("norm", "ln_", "ln.", "gamma", "ls1", "ls2", "ls_1", "ls_2", "scale", ".bn", "bn.")) \
                    or re.search(r"(^|\.)ln\d?(\.|$)", low):
                p.add_(scale * torch.randn(p.shape, generator=g).to(p))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.add_(scale * torch.randn(b.shape, generator=g).to(b))
            elif name.endswith("running_var"):
                b.mul_(torch.exp(scale * torch.randn(b.shape, generator=g)).to(b))
    return model


def _start_for(model, adapter) -> Optional[object]:
    fn = getattr(adapter, "middle_start", None)
    if fn is not None:
        return fn(model)
    target = adapter.unwrap(model)
    for attr in ("blocks", "resblocks"):
        seq = getattr(target, attr, None) or getattr(getattr(target, "transformer", None), attr, None)
        if seq is not None and len(seq) > 1:
            return len(seq) // 2
    return None


def check_component_names(dec) -> None:
    """Names unique, dotted identifiers, kinds known, heads nested under an ``attn`` branch, blocks in order."""
    names = dec.names
    assert len(set(names)) == len(names), f"duplicate component names: {[n for n in names if names.count(n) > 1][:5]}"
    last_block = -1
    for c in dec.components:
        assert _NAME.match(c.name), f"component name {c.name!r} is not a dotted identifier path"
        assert c.kind in KINDS, f"component {c.name!r} has unknown kind {c.kind!r}"
        if c.kind == "head":
            assert c.head is not None and c.name.endswith(f".head.{c.head}"), f"head component {c.name!r} must end in .head.<index>"
        if c.block is not None:
            assert c.block >= last_block, f"component {c.name!r} (block {c.block}) comes after block {last_block}: not forward order"
            last_block = c.block


def check_token_sums(dec, rtol: Optional[float] = None) -> None:
    """Every component's token split sums over tokens to the component (and spatial maps have the grid shape)."""
    rtol = (tolerance_for(dec.dtype) * 10) if rtol is None else rtol
    scale = dec.representation.norm(dim=-1).max()
    for name in dec.names:
        g = dec.grid_of(name)
        tok = dec.token_contributions(name)
        assert tok.shape == (dec.contributions.shape[0], g.num_tokens, dec.contributions.shape[-1]), \
            f"token_contributions({name!r}) has shape {tuple(tok.shape)}, expected [B, {g.num_tokens}, D]"
        err = float((tok.sum(1) - dec[name]).norm(dim=-1).max() / scale)
        assert err <= rtol, f"token split of {name!r} does not sum to the component: error {err:.2e} > {rtol:.0e}"
        if name == dec.names[0] or g != dec.grid:
            sm = dec.spatial_map(name)
            assert sm.shape[1:3] == (g.h, g.w), f"spatial_map({name!r}) has grid {tuple(sm.shape[1:3])}, expected {(g.h, g.w)}"


def check_reconstruction(
    model,
    images: torch.Tensor,
    *,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
    granularities: Iterable[dict] = GRANULARITIES,
    reference: Optional[Callable] = None,
    adapter=None,
    registry=None,
) -> list:
    """Decompose at every granularity and dtype; assert Σ c_i = z within the dtype tolerance, that z matches
    the model library's own forward (``reference(model, images)``), names follow the rules and token splits
    sum to their components. Returns ``[(dtype, options, error), ...]``."""
    results = []
    for dtype in dtypes:
        m = copy.deepcopy(model).to(dtype).eval()
        x = images.to(dtype)
        ad = api.find_adapter(m, adapter, registry=registry)
        tol = tolerance_for(dtype)
        if reference is not None:
            with torch.no_grad():
                ref = reference(m, x)
            rep = api.representation(m, x, adapter=adapter, registry=registry)
            err = relative_error(rep, ref)
            assert err <= tol, f"{ad.name}: representation differs from the library's own forward by {err:.2e} ({dtype})"
        for opts in granularities:
            opts = dict(opts)
            if opts.get("start") == "middle":
                opts["start"] = _start_for(m, ad)
                if opts["start"] is None:
                    continue
            dec = api.decompose(m, x, adapter=adapter, registry=registry, **opts)
            where = f"{ad.name} {dtype} {opts}"
            assert dec.contributions.shape[0] == x.shape[0], f"{where}: batch axis is not first"
            assert dec.error <= tol, f"{where}: reconstruction error {dec.error:.2e} > {tol:.0e}"
            if reference is not None:
                err = relative_error(dec.total(), ref)
                assert err <= tol, f"{where}: Σ contributions differs from the library's forward by {err:.2e}"
            check_component_names(dec)
            if opts.get("tokens"):
                check_token_sums(dec)
            if opts.get("start") is not None:
                assert any(c.kind == "residual" for c in dec.components), f"{where}: no 'init' residual component"
            if opts.get("heads") is False:
                assert not any(c.kind == "head" for c in dec.components), f"{where}: heads=False still has heads"
            results.append((dtype, opts, dec.error))
    return results


def check_bad_inputs(model, images: torch.Tensor, *, fixed_size: bool = True, adapter=None, registry=None) -> None:
    """Each kind of bad input raises :class:`vitdecomp.InputError` with a message naming the problem."""
    kw = dict(adapter=adapter, registry=registry)

    def expect(fn, needle):
        try:
            fn()
        except InputError as exc:
            assert needle.lower() in str(exc).lower(), f"error message {str(exc)!r} does not mention {needle!r}"
            return
        raise AssertionError(f"no InputError for bad input ({needle})")

    expect(lambda: api.decompose(model, images[0], **kw), "4-D")
    expect(lambda: api.decompose(model, (images * 255).to(torch.uint8), **kw), "floating")
    expect(lambda: api.decompose(model, images[:, :1], **kw), "channels")
    if fixed_size:
        big = torch.nn.functional.interpolate(images, scale_factor=2)
        expect(lambda: api.decompose(model, big, **kw), "size")
    model.train()
    try:
        expect(lambda: api.decompose(model, images, **kw), "training mode")
    finally:
        model.eval()


def run_conformance(model, image_size, *, batch: int = 2, reference: Optional[Callable] = None,
                    fixed_size: bool = True, seed: int = 0, adapter=None, registry=None) -> list:
    """All checks on ``model`` with a random batch of ``image_size`` (H, W) images."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *image_size, generator=g)
    model.eval()
    results = check_reconstruction(model, images, reference=reference, adapter=adapter, registry=registry)
    results += check_reconstruction(model, images[:1], granularities=({"heads": True},), reference=reference,
                                    adapter=adapter, registry=registry)
    check_bad_inputs(model, images, fixed_size=fixed_size, adapter=adapter, registry=registry)
    return results
