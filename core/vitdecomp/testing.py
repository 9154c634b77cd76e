"""Conformance kit: the checks every model family (built-in or third-party pack) must pass.

Use it from a pack's tests::

    from vitdecomp import testing

    def test_conformance():
        model = build_small_model()                       # real architecture, random weights
        testing.perturb_parameters(model)                 # move norms / LayerScale away from identity init
        testing.run_conformance(model, image_size=(32, 32), reference=lambda m, x: m.forward_own(x))

Every check raises ``AssertionError`` with a message naming the model, dtype and granularity that failed.

:func:`check_cuda_placement` runs the decomposition on a *simulated* CUDA device (PyTorch's fake tensors carry
shapes, dtypes and devices but no data), so a machine without a GPU still proves that an adapter keeps every
tensor on the model's device and never makes the host wait for the GPU (``.item()``, ``float(t)``, boolean-mask
indexing, ``.cpu()``, ``nonzero`` ...) inside a decomposition.
"""

from __future__ import annotations

import contextlib
import copy
import re
import traceback
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
    "check_cuda_placement",
    "simulated_cuda",
    "HostSyncError",
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


class HostSyncError(AssertionError):
    """An operation that makes the host wait for the GPU ran on a CUDA tensor inside a checked region."""


#: aten operations whose result the host must read from the device (each one waits for the GPU's queue).
_SYNC_OPS = ("_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
             "unique_consecutive", "repeat_interleave", "equal", "allclose")


def _user_frames() -> str:
    """The innermost stack frames outside torch (where the offending call was written), innermost first."""
    frames = [f for f in traceback.extract_stack()[:-3] if "/torch/" not in f.filename and "testing.py" not in f.filename]
    return " ← ".join(f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.line}"
                      for f in reversed(frames[-3:]))


@contextlib.contextmanager
def simulated_cuda(*, allow: int = 0):
    """A context in which ``"cuda"`` tensors are simulated (no GPU needed) and host synchronisations are caught.

    Inside it, create tensors and move modules with ``device="cuda"`` as usual: they become fake tensors (shape,
    dtype, device; no data). Mixing devices raises as it would on a GPU; an operation on a CUDA tensor that makes
    the host wait for the device (``.item()``, ``float()``/``bool()`` of a tensor, boolean-mask indexing,
    ``nonzero``, a blocking device→host copy such as ``.cpu()``) raises :class:`HostSyncError` naming the code
    line. Blocking host→device copies count too (``.to("cuda")`` without ``non_blocking=True`` waits for the
    stream). Values cannot be read inside the context: it checks placement and synchronisation, not numbers
    (those are checked on CPU). Yields an object whose ``paused()`` context lets set-up code through and whose
    ``syncs`` lists the synchronisations seen; ``allow=k`` lets the first ``k`` blocking copies through (a
    function that streams many batches and reads its result once at the end must show a count that does not
    grow with the number of batches). Reading a value (``.item()``, masks) cannot be allowed: there is none.
    """
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.utils._python_dispatch import TorchDispatchMode
    except ImportError as exc:  # pragma: no cover - private torch API moved
        raise RuntimeError(f"simulated CUDA needs torch's fake tensors ({exc}); torch {torch.__version__}") from exc

    def on_cuda(x) -> bool:
        return isinstance(x, torch.Tensor) and x.device.type == "cuda"

    class _SyncSpy(TorchDispatchMode):
        armed = True

        @contextlib.contextmanager
        def paused(self):
            """Let synchronising operations through (setting up: moving a model to the device, say)."""
            self.armed = False
            try:
                yield
            finally:
                self.armed = True

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if not self.armed:
                return func(*args, **kwargs)
            name = func._schema.name.split("::")[-1]
            flat = list(args) + list(kwargs.values())
            flat += [t for a in flat if isinstance(a, (list, tuple)) for t in a]
            why = None
            if name in _SYNC_OPS and any(on_cuda(a) for a in flat):
                why = f"aten.{name} on a CUDA tensor"
            elif name == "_to_copy" and on_cuda(args[0]) and kwargs.get("device") is not None \
                    and torch.device(kwargs["device"]).type == "cpu" and not kwargs.get("non_blocking", False):
                why = "a blocking device→host copy (.cpu() / .to('cpu'))"
            elif name == "_to_copy" and isinstance(args[0], torch.Tensor) and not on_cuda(args[0]) \
                    and kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cuda" \
                    and not kwargs.get("non_blocking", False):
                why = "a blocking host→device copy (.to('cuda') without non_blocking=True waits for the stream)"
            elif name == "copy_" and isinstance(args[1], torch.Tensor) and on_cuda(args[0]) != on_cuda(args[1]) \
                    and not (len(args) > 2 and args[2]) and not kwargs.get("non_blocking", False):
                why = "a blocking copy_ between host and device"
            elif name == "index" and on_cuda(args[0]) and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
                why = "boolean-mask indexing of a CUDA tensor"
            if why is not None:
                self.syncs.append(f"{why} at {_user_frames()}")
                if len(self.syncs) > allow or not why.startswith("a blocking"):
                    raise HostSyncError(f"{why} makes the host wait for the GPU; at {_user_frames()}")
            return func(*args, **kwargs)

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    spy = _SyncSpy()
    spy.syncs = []
    with fake, spy:
        yield spy


def check_cuda_placement(model, image_size, *, batch: int = 2, granularities: Iterable[dict] = GRANULARITIES,
                         adapter=None, registry=None, materialize: int = 3) -> list:
    """Decompose ``model`` on a simulated CUDA device (see :func:`simulated_cuda`) at every granularity.

    Asserts that no operation mixes devices or waits for the GPU inside ``decompose``, that contributions,
    representation and the lazy error live on the device, and that token splits / spatial maps of the first
    ``materialize`` components are produced there too. Returns ``[(options, shape of contributions), ...]``."""
    results = []
    for opts in granularities:
        opts = dict(opts)
        m = copy.deepcopy(model).eval()
        if opts.get("start") == "middle":
            opts["start"] = _start_for(m, api.find_adapter(m, adapter, registry=registry))
            if opts["start"] is None:
                continue
        where = f"{type(model).__name__} {opts} on simulated CUDA"
        with simulated_cuda() as sim:
            with sim.paused():
                g = m.to("cuda")
                x = torch.randn(batch, 3, *image_size, device="cuda")
            try:
                dec = api.decompose(g, x, adapter=adapter, registry=registry, **opts)
                err = dec.error_tensor()
                tensors = {"contributions": dec.contributions, "representation": dec.representation, "error": err}
                if opts.get("tokens"):
                    for name in dec.names[:materialize]:
                        tensors[f"token_contributions({name!r})"] = dec.token_contributions(name)
                        tensors[f"spatial_map({name!r})"] = dec.spatial_map(name)
            except HostSyncError as exc:
                raise HostSyncError(f"{where}: {exc}") from None
            except RuntimeError as exc:
                if "device" in str(exc).lower():
                    raise AssertionError(f"{where}: tensors on different devices: {exc}") from exc
                raise
            for label, t in tensors.items():
                assert t.device.type == "cuda", f"{where}: {label} is on {t.device}, expected the model's device"
            results.append((opts, tuple(dec.contributions.shape)))
    return results


def run_conformance(model, image_size, *, batch: int = 2, reference: Optional[Callable] = None,
                    fixed_size: bool = True, seed: int = 0, adapter=None, registry=None,
                    cuda_placement: bool = True) -> list:
    """All checks on ``model`` with a random batch of ``image_size`` (H, W) images (including
    :func:`check_cuda_placement`, which needs no GPU; ``cuda_placement=False`` skips it, e.g. for a model whose
    forward cannot run on fake tensors)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *image_size, generator=g)
    model.eval()
    results = check_reconstruction(model, images, reference=reference, adapter=adapter, registry=registry)
    results += check_reconstruction(model, images[:1], granularities=({"heads": True},), reference=reference,
                                    adapter=adapter, registry=registry)
    check_bad_inputs(model, images, fixed_size=fixed_size, adapter=adapter, registry=registry)
    if cuda_placement:
        check_cuda_placement(model, image_size, batch=batch, adapter=adapter, registry=registry)
    return results
