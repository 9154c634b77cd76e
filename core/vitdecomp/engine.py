"""Engine primitives that adapters drive: frozen normalisation statistics and hook bookkeeping.

Everything between a component's output and the representation is linear once the normalisation statistics
are frozen at the values the forward pass used (METHOD.md §1). The helpers here compute those statistics from
the *actual* tensors a norm saw (captured by hooks), with the module's own eps and the biased variance, and
apply the resulting linear map to stacks of components.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, List, Optional

import attrs
import torch
from torch import nn

__all__ = ["FrozenNorm", "freeze_norm", "HookSet", "is_identity", "forward_autocast", "index_tensor", "to_device", "to_host",
           "synchronize"]

# (device type, reduced dtype, working dtype) while vitdecomp.decompose(..., autocast=...) runs
_AUTOCAST: contextvars.ContextVar = contextvars.ContextVar("vitdecomp_forward_autocast", default=None)


def to_device(t, device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A host tensor (or nested list of numbers) on ``device`` without making the host wait for the GPU.

    A plain ``.to("cuda")`` / ``torch.tensor(..., device="cuda")`` from pageable memory synchronises the stream
    (the host waits for every queued kernel); here host data are staged through pinned memory and copied
    asynchronously. Tensors already on an accelerator, and CPU targets, go through ``.to`` unchanged."""
    device = torch.device(device)
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if dtype is not None and t.device.type == "cpu":
        t = t.to(dtype)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device, dtype) if dtype is not None else t.to(device)
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t)
    return host.to(device, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the host without waiting: CPU tensors as they are; CUDA tensors copied asynchronously into pinned
    host memory (queued behind the work that produces ``t``). Call :func:`synchronize` before reading."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


def synchronize(device) -> None:
    """Block until the work queued on ``device`` has finished — the copies queued by :func:`to_host` among it
    (a no-op off CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def as_range(values) -> Optional[range]:
    """``values`` (ints) as a ``range`` when they are consecutive and ascending, else None."""
    values = [int(v) for v in values]
    if values and values == list(range(values[0], values[0] + len(values))):
        return range(values[0], values[0] + len(values))
    return None


def index_tensor(values, device) -> torch.Tensor:
    """Integer indices ``values`` (a sequence of ints) as a long tensor on ``device`` without making the host wait:
    a contiguous range is built there (``arange``), anything else goes through :func:`to_device`."""
    r = as_range(values)
    if r is not None:
        return torch.arange(r.start, r.stop, device=device)
    return to_device(torch.tensor([int(v) for v in values], dtype=torch.long), device)


@contextlib.contextmanager
def forward_autocast(device_type: str, dtype: torch.dtype, work_dtype: torch.dtype):
    """While active, every :class:`HookSet` runs the model's forward under ``torch.autocast(device_type, dtype)``
    and hands its hooks tensors upcast to ``work_dtype``, so adapters' readout algebra stays in full precision."""
    token = _AUTOCAST.set((device_type, dtype, work_dtype))
    try:
        yield
    finally:
        _AUTOCAST.reset(token)


def _cast(x, dtype):
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x
    if isinstance(x, tuple):
        return tuple(_cast(v, dtype) for v in x)
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    return x


def is_identity(module) -> bool:
    return module is None or isinstance(module, nn.Identity)


@attrs.define(eq=False)
class FrozenNorm:
    """A LayerNorm / RMSNorm with statistics frozen at a forward pass.

    ``apply_linear(u)`` is the linear part γ ⊙ C(u) (C centres over the last axis for LayerNorm, identity for
    RMSNorm) — the per-position factor 1/σ is kept apart in ``inv_scale`` so callers can fold it into pooling
    weights. ``bias`` is β (or None).
    """

    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    inv_scale: torch.Tensor  # shape of the input without its last axis
    center: bool

    def apply_linear(self, u: torch.Tensor) -> torch.Tensor:
        if self.center:
            u = u - u.mean(-1, keepdim=True)
        if self.weight is not None:
            u = u * self.weight
        return u


def _norm_kind(module):
    """('layer'|'rms', eps, weight, bias) for the norm modules vitdecomp understands, else None."""
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm) or name in ("LayerNorm", "LayerNormFp32", "LayerNorm2d"):
        eps = getattr(module, "eps", 1e-5)
        return "layer", eps, getattr(module, "weight", None), getattr(module, "bias", None)
    if isinstance(module, getattr(nn, "RMSNorm", ())) or name in ("RmsNorm", "RMSNorm", "RmsNormFp32"):
        eps = getattr(module, "eps", None)
        if eps is None:
            eps = torch.finfo(torch.float32).eps
        return "rms", eps, getattr(module, "weight", None), getattr(module, "bias", None)
    return None


def supported_norm(module) -> bool:
    return is_identity(module) or _norm_kind(module) is not None


def freeze_norm(module, x: torch.Tensor) -> Optional[FrozenNorm]:
    """Freeze ``module`` (a norm over the last axis) at input ``x``; None for Identity."""
    if is_identity(module):
        return None
    kind = _norm_kind(module)
    if kind is None:
        raise TypeError(f"Cannot freeze normalisation module {type(module).__name__}")
    k, eps, w, b = kind
    if getattr(module, "elementwise_affine", True) is False:
        w = b = None
    xd = x.to(torch.float64) if x.dtype != torch.float64 else x
    if k == "layer":
        var = xd.var(-1, unbiased=False)
        inv = torch.rsqrt(var + eps)
    else:
        inv = torch.rsqrt(xd.pow(2).mean(-1) + eps)
    inv = inv.to(x.dtype)
    cast = (lambda t: None if t is None else t.detach().to(x.dtype))
    return FrozenNorm(weight=cast(w), bias=cast(b), inv_scale=inv, center=(k == "layer"))


class HookSet:
    """Registers forward (pre-)hooks and removes them all on exit, even on error.

    Run the model's forward inside ``with HookSet() as hooks:``. Under :func:`forward_autocast` (what
    ``decompose(..., autocast=...)`` sets) the block runs under ``torch.autocast``, while hooks run with autocast
    off on tensors upcast to the working dtype; code after the block runs in full precision.
    """

    def __init__(self):
        self._handles: List = []
        self._ac = _AUTOCAST.get()
        self._ctx = None

    def _call(self, fn: Callable, *xs):
        """Call a hook; under forward_autocast with its tensors upcast and autocast off, so whatever the hook
        computes (attention rows, reductions) is in the working precision."""
        if self._ac is None:
            return fn(*xs)
        with torch.autocast(self._ac[0], enabled=False):
            return fn(*(_cast(x, self._ac[2]) for x in xs))

    def pre(self, module: nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_pre_hook(lambda m, args: self._call(fn, args[0] if args else None)))

    def pre_kw(self, module: nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_pre_hook(
            lambda m, args, kwargs: self._call(fn, args, kwargs), with_kwargs=True))

    def post(self, module: nn.Module, fn: Callable, *, always: bool = False) -> None:
        """``fn(output)`` after ``module`` runs; ``always``: also when its forward raises (``fn(None)``)."""
        self._handles.append(module.register_forward_hook(lambda m, args, out: self._call(fn, out),
                                                          always_call=always))

    def __enter__(self):
        if self._ac is not None:
            self._ctx = torch.autocast(self._ac[0], dtype=self._ac[1])
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
            self._ctx = None
        return False
