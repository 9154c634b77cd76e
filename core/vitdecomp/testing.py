"""Conformance kit: the checks every model family (built-in or third-party pack) must pass.

Use it from a pack's tests::

    from vitdecomp import testing

    def test_conformance():
        model = build_small_model()                       # real architecture, random weights
        testing.perturb_parameters(model)                 # move norms / LayerScale / biases off their init
        testing.run_conformance(model, image_size=(32, 32), reference=lambda m, x: m.forward_own(x))

Every check raises ``AssertionError`` with a message naming the model, dtype and granularity that failed.

:func:`check_attributions` checks each component (and token split), not only the sum, against
:func:`attribution_oracle`: the model's own forward with norms at their forward statistics, attention outputs
and branch writes cut into leaves, differentiated (``⟨∂z/∂write, write⟩`` is that write's exact share with
everything else frozen). It never calls the adapter's algebra, only its names, ``unwrap`` and ``representation``.

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

import attrs
import torch

from . import api
from ._records import KINDS, group_key
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
    "attribution_oracle",
    "check_attributions",
    "OracleResult",
    "OracleError",
    "ATTRIBUTION_TOLERANCE",
]

#: The option sets every adapter must reconstruct exactly (``start`` is filled in per model).
GRANULARITIES = (
    {"heads": True},
    {"heads": False},
    {"heads": True, "start": "middle"},
    {"heads": True, "tokens": "source"},
    {"heads": True, "bias": "even"},
    {"heads": True, "bias": "paper"},  # skipped for adapters without ``paper_bias``
)

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


def perturb_parameters(model: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Move norm weights/biases, LayerScale gammas and BatchNorm running statistics away from their identity
    initialisation, and every bias (Linear, convolution, attention projections: timm initialises them to zero)
    and prefix token away from zero (in place), so that exactness and attribution tests cannot pass by accident
    — a component that drops a bias, or a norm's β, shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            low = name.lower()
            if any(k in low for k in ("norm", "ln_", "ln.", "gamma", "ls1", "ls2", "ls_1", "ls_2", "scale", ".bn", "bn.")) \
                    or re.search(r"(^|\.)ln\d?(\.|$)", low):
                p.add_(scale * torch.randn(p.shape, generator=g).to(p))
            elif _BIAS.search(low) or re.search(r"(cls|reg|dist)_token$|class_embedding$", low):
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
            if opts.get("bias") == "paper" and not getattr(ad, "paper_bias", False):
                continue
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

    Asserts that no operation mixes devices or waits for the GPU inside ``decompose`` (with ``fingerprint=False``:
    the default weight fingerprint copies the weights to the host, a wait by design), that contributions,
    representation and the lazy error live on the device, and that token splits / spatial maps of the first
    ``materialize`` components are produced there too. Returns ``[(options, shape of contributions), ...]``."""
    results = []
    for opts in granularities:
        opts = dict(opts)
        m = copy.deepcopy(model).eval()
        if opts.get("bias") == "paper" and not getattr(api.find_adapter(m, adapter, registry=registry), "paper_bias",
                                                       False):
            continue
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
                dec = api.decompose(g, x, adapter=adapter, registry=registry, fingerprint=False, **opts)
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


# ---------------------------------------------------------------------------------------------- attribution oracle
#
# Independent of the engine under test: the model's own forward runs once with every norm's statistics detached
# (its own eps, biased variance), every attention's output cut into a leaf right after ``A @ V`` (softmax weights
# and values of the forward), and every branch named by a component cut into a leaf at the module that writes it.
# What remains between the leaves and z is the frozen linear map, so ⟨∂z_d/∂leaf, leaf⟩ is exactly the change in
# z_d when that one write is removed with everything else held at its forward value. One backward per output
# dimension gives every component at once; attention heads are split by the head axis of ``A @ V`` and by source
# token with the attention weights of the forward, ``Σ_q A_qj ⟨∂z/∂o_q, v_j⟩``.

_ATTN_SYNONYMS = ("attn", "attention", "self_attn")
_MLP_SYNONYMS = ("mlp", "output.dense")
_BIAS = re.compile(r"(^|\.|_)bias$")


class OracleError(AssertionError):
    """The attribution oracle could not build its frozen model (it names the component or module)."""


def _int_path(path: str) -> tuple:
    return tuple(int(p) for p in path.split(".") if p.isdigit())


def _resolve(root, mods: dict, path: str, *, synonyms: Sequence[str] = (), want=None):
    """The module of ``root`` that component path ``path`` names: the path itself, or the shallowest module with
    the same block indices whose path ends in the same suffix (``stages.1.blocks.0.mlp`` → ``layers.1.blocks.0.mlp``;
    ``blocks.2.attn`` → ``encoder.layer.2.attention``); ``synonyms`` are alternative last segments."""
    parts = path.split(".")
    last_int = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
    ints = _int_path(path)
    suffix = ".".join(parts[last_int + 1:])
    tails = [suffix] if suffix else [""]
    if suffix and suffix.rsplit(".", 1)[-1] in synonyms:
        head = suffix.rsplit(".", 1)[0] + "." if "." in suffix else ""
        tails += [head + s for s in synonyms if head + s != suffix]
    for tail in tails:
        if path in mods and tail == suffix and (want is None or want(mods[path])):
            return path, mods[path]
        cands = []
        for name, mod in mods.items():
            if _int_path(name) != ints:
                continue
            npart = name.split(".")
            nl = max((i for i, p in enumerate(npart) if p.isdigit()), default=-1)
            rest = ".".join(npart[nl + 1:])
            if (rest == tail or (not ints and tail and rest.endswith("." + tail))) and (nl >= 0 or not ints) \
                    and (want is None or want(mod)):
                cands.append(name)
        if cands:
            cands.sort(key=lambda n: (n.count("."), n))
            return cands[0], mods[cands[0]]
    return None, None


def _block_path(name: str) -> str:
    parts = name.split(".")
    last_int = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
    if parts[-2:-1] == ["head"]:  # blocks.3.attn.head.7: the head index is not the block's
        parts = parts[:-2]
        last_int = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
    return ".".join(parts[: last_int + 1])


def _positions(x: torch.Tensor, grid) -> Optional[torch.Tensor]:
    """``x`` (one image's stream tensor) as ``[T, C]`` rows in ``grid`` order, or None if its layout does not match."""
    if grid is None:
        return None
    T, hw = grid.num_tokens, (grid.h, grid.w)
    if x.ndim == 3 and x.shape[0] == 1 and x.shape[1] == T:
        return x[0]
    if x.ndim == 3 and x.shape[0] == 1 and grid.num_prefix and x.shape[1] == grid.h * grid.w:
        # a stream of the patch tokens alone (CaiT: the class token is a stream of its own)
        return torch.cat([x.new_zeros(grid.num_prefix, x.shape[2]), x[0]])
    if x.ndim == 3 and x.shape[0] == 1 and x.shape[1] == 1 and grid.num_prefix:
        # a stream of the class token alone (CaiT): grid token 0
        return torch.cat([x[0], x.new_zeros(T - 1, x.shape[2])])
    if x.ndim == 3 and x.shape[1] == 1 and x.shape[0] == T:
        return x[:, 0]
    if x.ndim == 4 and grid.num_prefix == 0 and x.shape[0] == 1:
        if tuple(x.shape[1:3]) == hw:
            return x[0].reshape(T, -1)
        if tuple(x.shape[2:4]) == hw:
            return x[0].reshape(x.shape[1], T).T
    return None


@contextlib.contextmanager
def _frozen_functions(state):
    """Patch torch's norm and attention entry points for the oracle's pass (restored on exit)."""
    F = torch.nn.functional
    orig = {k: getattr(F, k) for k in ("layer_norm", "group_norm", "rms_norm", "scaled_dot_product_attention",
                                       "batch_norm") if hasattr(F, k)}
    orig_matmul, orig_tmatmul, orig_bmm = torch.matmul, torch.Tensor.__matmul__, torch.bmm

    def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
        dims = tuple(range(-len(tuple(normalized_shape)), 0))
        y = (input - input.mean(dims, keepdim=True)) * torch.rsqrt(
            input.var(dims, unbiased=False, keepdim=True).detach() + eps)
        y = y * weight if weight is not None else y
        return y + bias if bias is not None else y

    def rms_norm(input, normalized_shape, weight=None, eps=None):
        eps = torch.finfo(input.dtype).eps if eps is None else eps
        dims = tuple(range(-len(tuple(normalized_shape)), 0))
        y = input * torch.rsqrt(input.pow(2).mean(dims, keepdim=True).detach() + eps)
        return y * weight if weight is not None else y

    def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
        B, C = input.shape[:2]
        g = input.reshape(B, num_groups, -1)
        y = ((g - g.mean(-1, keepdim=True)) * torch.rsqrt(g.var(-1, unbiased=False, keepdim=True).detach() + eps))
        y = y.reshape(input.shape)
        shape = (1, C) + (1,) * (input.ndim - 2)
        y = y * weight.reshape(shape) if weight is not None else y
        return y + bias.reshape(shape) if bias is not None else y

    def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                   eps=1e-5):
        # eval mode: an affine map per channel, written out so the running mean can be a gradient input (the
        # constant −γ·μ/σ of an eval BatchNorm is attributed through it)
        if training or running_mean is None or running_var is None:
            return orig["batch_norm"](input, running_mean, running_var, weight, bias, training, momentum, eps)
        shape = (1, -1) + (1,) * (input.ndim - 2)
        y = (input - running_mean.reshape(shape)) * torch.rsqrt(running_var.detach().reshape(shape) + eps)
        y = y * weight.reshape(shape) if weight is not None else y
        return y + bias.reshape(shape) if bias is not None else y

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        out = orig["scaled_dot_product_attention"](query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                   is_causal=is_causal, scale=scale, **kw)
        s = scale if scale is not None else query.shape[-1] ** -0.5
        logits = torch.einsum("...qc,...kc->...qk", query, key) * s
        L, S = logits.shape[-2:]
        if is_causal:
            logits = logits.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
        probs = torch.softmax(logits, -1).detach()
        if not state.owners:  # an attention whose heads are no components (CaiT's class attention): weights frozen
            return torch.einsum("...qk,...kc->...qc", probs, value)
        return state.attention(probs, value, out)

    def is_probs(a):
        a = a.detach() if isinstance(a, torch.Tensor) else a
        return (isinstance(a, torch.Tensor) and a.is_floating_point() and a.ndim >= 3 and bool((a >= 0).all())
                and bool(torch.allclose(a.sum(-1), torch.ones((), dtype=a.dtype), atol=1e-4)))

    def is_mixed(a):
        # attention weights mixed across heads after the softmax (talking heads: a Linear over the head axis):
        # every row of a head sums to the same value, which a query-key product's rows do not
        if not (isinstance(a, torch.Tensor) and a.is_floating_point() and a.ndim >= 4 and a.shape[-2] > 1):
            return False
        a = a.detach()
        rows = a.sum(-1)
        return bool(torch.allclose(rows, rows.mean(-1, keepdim=True), rtol=1e-5, atol=1e-6 * float(a.abs().max())))

    def attention_product(a, b, out):
        if not state.owners:
            return orig_matmul(a.detach(), b) if is_probs(a) else out
        if is_probs(a) or is_mixed(a):
            return state.attention(a.detach(), b, out)
        return out

    def matmul(a, b, *args, **kw):
        out = orig_matmul(a, b, *args, **kw)
        return attention_product(a, b, out) if not args and not kw else out

    def tmatmul(a, b):
        return attention_product(a, b, orig_tmatmul(a, b))

    def bmm(a, b, *args, **kw):  # nn.MultiheadAttention with need_weights (SigLIP's MAP head): softmax, then bmm
        out = orig_bmm(a, b, *args, **kw)
        return attention_product(a, b, out) if not args and not kw else out

    repl = {"layer_norm": layer_norm, "group_norm": group_norm, "rms_norm": rms_norm,
            "scaled_dot_product_attention": sdpa, "batch_norm": batch_norm}
    try:
        for k in orig:
            setattr(F, k, repl[k])
        torch.matmul, torch.Tensor.__matmul__, torch.bmm = matmul, tmatmul, bmm
        yield
    finally:
        for k, v in orig.items():
            setattr(F, k, v)
        torch.matmul, torch.Tensor.__matmul__, torch.bmm = orig_matmul, orig_tmatmul, orig_bmm


@attrs.define(eq=False)
class OracleResult:
    """What :func:`attribution_oracle` computed for one image: ``contributions[name]`` ``[D]`` for every component;
    ``tokens[name]`` ``[T, D]`` on ``grid_of(name)``, each component at the positions it writes (heads: their query
    rows); ``sources[name]`` ``[T, D]`` each head split by the token it reads; ``z`` the representation; ``notes``
    what could not be checked and why."""

    contributions: dict
    tokens: dict
    sources: dict
    z: torch.Tensor
    notes: list


class _State:
    def __init__(self):
        self.owners: list = []
        self.calls: dict = {}

    def attention(self, probs, value, out):
        owner = self.owners[-1]
        if owner in self.calls:
            raise OracleError(f"attention module {owner!r} computed A·V twice in one forward; the oracle needs one "
                              f"attention product per head group")
        err = float((torch.einsum("...qk,...kc->...qc", probs, value.detach()) - out.detach()).abs().max())
        scale = float(out.detach().abs().max()) or 1.0
        if err > 1e-6 * scale:
            raise OracleError(f"{owner!r}: recomputed attention weights do not reproduce the attention output "
                              f"(max deviation {err:.2e}); unsupported attention arguments")
        leaf = out.detach().requires_grad_()
        self.calls[owner] = (probs, value, leaf)
        return leaf


def attribution_oracle(model, image: torch.Tensor, dec, *, adapter=None, registry=None, writes=None) -> OracleResult:
    """Each component's contribution to z for one image ``[1, 3, H, W]``, computed from the model's own forward
    with hooks and autograd only — never from the adapter's algebra.

    ``dec`` (a ``heads=True`` decomposition of ``image``) supplies only the component names and grids. Every
    component is located in ``adapter.unwrap(model)`` by its name (the path itself, or the module with the same
    block indices and suffix; ``attn`` also matches ``attention`` / ``self_attn``, ``mlp`` also ``output.dense``);
    ``writes`` (or the adapter's optional ``oracle_writes(model)``) overrides that: ``{name: module path}`` for a
    branch (the module whose output is the write), ``{name: [parameter paths]}`` for a constant. Heads are the
    head axis of the attention product ``A @ V`` inside the attention module; ``embed`` / ``init`` are the stream
    entering the first decomposed block, less the constants the decomposition lists before it.
    """
    ad = api.find_adapter(model, adapter, registry=registry)
    root = ad.unwrap(model)
    overrides = dict(getattr(ad, "oracle_writes", lambda m: {})(root) or {})
    overrides.update(writes or {})
    ran: set = set()  # names resolve only to modules the representation's forward runs (not a CLIP text tower)
    hk = torch.nn.modules.module.register_module_forward_pre_hook(lambda mod, a: ran.add(id(mod)))
    try:
        with torch.no_grad():
            ad.representation(root, image)
    finally:
        hk.remove()
    mods = {n: mod for n, mod in root.named_modules() if id(mod) in ran}
    params = dict(root.named_parameters())
    comps = list(dec.components)
    head_groups: dict = {}
    branches: dict = {}
    consts: dict = {}
    stats: list = []  # BatchNorm running means taken as gradient inputs for the oracle's pass
    param_writes: set = set()  # embed components that are parameters: placed on the grid where they are written
    starts = []
    for c in comps:
        if c.kind == "head":
            head_groups.setdefault(c.name.rsplit(".head.", 1)[0], []).append(c)
        elif c.kind == "embed" and (c.name in params or isinstance(overrides.get(c.name), (list, tuple))):
            # a parameter written into a stream of its own (CaiT's class token): its contribution is the parameter's
            ov = overrides.get(c.name, [c.name])
            consts[c.name] = [params[p] for p in ([ov] if isinstance(ov, str) else ov)]
            param_writes.add(c.name)
        elif c.kind in ("embed", "residual"):
            starts.append(c)
        elif c.kind == "const":
            ov = overrides.get(c.name)
            if ov is not None:
                consts[c.name] = [params[p] for p in ([ov] if isinstance(ov, str) else ov)]
                continue
            owner = c.name[: -len(".bias")] if c.name.endswith(".bias") else c.name
            path, mod = _resolve(root, mods, owner, synonyms=_ATTN_SYNONYMS)
            if mod is None:
                raise OracleError(f"{ad.name}: cannot locate the module of constant {c.name!r} in "
                                  f"{type(root).__name__}; pass writes={{{c.name!r}: [parameter paths]}}")
            direct = [p for n, p in mod.named_parameters(recurse=False) if n == "bias"]  # a norm's β, a Linear's b
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and not mod.training \
                    and mod.running_mean is not None:  # eval BatchNorm: β − γ·μ/σ, μ a gradient input too
                direct = direct + [mod.running_mean]
                stats.append(mod.running_mean)
            consts[c.name] = direct or [p for n, p in mod.named_parameters() if _BIAS.search(n)]
            if not consts[c.name]:
                raise OracleError(f"{ad.name}: module {path!r} of constant {c.name!r} has no bias parameter; "
                                  f"pass writes={{{c.name!r}: [parameter paths]}}")
        else:
            ov = overrides.get(c.name)
            path, mod = (ov, mods.get(ov)) if ov is not None else _resolve(
                root, mods, c.name, synonyms=_MLP_SYNONYMS if c.kind == "mlp" else _ATTN_SYNONYMS)
            if mod is None:
                raise OracleError(f"{ad.name}: cannot locate the module that writes component {c.name!r} "
                                  f"(kind {c.kind}) in {type(root).__name__}; pass writes={{{c.name!r}: 'module.path'}}")
            if hasattr(mod, "shortcut") and isinstance(getattr(mod, "drop_path", None), torch.nn.Module):
                # a module that adds its own shortcut (timm's MBConv): its write is the branch part, the
                # output of its drop_path, not the sum with the stream
                path, mod = f"{path}.drop_path", mod.drop_path
            branches[c.name] = (path, mod)
    owners = {}
    for g in head_groups:
        ov = overrides.get(g)
        path, mod = (ov, mods.get(ov)) if ov is not None else _resolve(root, mods, g, synonyms=_ATTN_SYNONYMS)
        if mod is None:
            raise OracleError(f"{ad.name}: cannot locate the attention module of heads {g!r}.head.* in "
                              f"{type(root).__name__}; pass writes={{{g!r}: 'module.path'}}")
        owners[g] = path
    first = next((c for c in comps if c.kind not in ("embed", "residual", "const")), None)
    if starts and first is not None:
        bpath, bmod = _resolve(root, mods, _block_path(first.name))
        if bmod is None:
            raise OracleError(f"{ad.name}: cannot locate block {_block_path(first.name)!r} (the stream entering it "
                              f"is {starts[0].name!r})")
    state = _State()
    captured: dict = {}
    leaves: dict = {}
    handles = []

    def capture_input(key):
        def pre(mod, args, kwargs):
            if args and isinstance(args[0], torch.Tensor):
                t, put = args[0], lambda v: ((v,) + tuple(args[1:]), kwargs)
            else:
                k = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
                if k is None:
                    return None
                t, put = kwargs[k], lambda v: (args, {**kwargs, k: v})
            if not t.is_floating_point():
                return None
            if not t.requires_grad:
                t = t.detach().requires_grad_()
                captured.setdefault(key, t)
                return put(t)
            t.retain_grad()
            captured.setdefault(key, t)
            return None
        return pre

    def leaf_output(key):
        def post(mod, args, out):
            t = out[0] if isinstance(out, tuple) else out
            leaf = t.detach().requires_grad_()
            leaves[key] = leaf
            t = leaf.clone()  # the forward may add into the output in place (Twins' ``x = proj(s); x += s``)
            return (t,) + tuple(out[1:]) if isinstance(out, tuple) else t
        return post

    try:
        for g, path in owners.items():
            mod = mods[path]
            handles.append(mod.register_forward_pre_hook(lambda m, a, p=path: state.owners.append(p)))
            handles.append(mod.register_forward_hook(lambda m, a, o: state.owners.pop() and None))
            # candidates for the token layout of this attention: the module and its ancestors' inputs
            parts = path.split(".")
            for k in range(len(parts), 0, -1):
                anc = ".".join(parts[:k])
                if anc in mods:
                    handles.append(mods[anc].register_forward_pre_hook(capture_input(("pos", g, anc)), with_kwargs=True))
        for name, (path, mod) in branches.items():
            handles.append(mod.register_forward_hook(leaf_output(name)))
        if starts and first is not None:
            handles.append(bmod.register_forward_pre_hook(capture_input(("start",)), with_kwargs=True))
        for t in stats:
            t.requires_grad_(True)
        with torch.enable_grad(), _frozen_functions(state):
            z = ad.representation(root, image)
    except BaseException:
        for t in stats:
            t.requires_grad_(False)
        raise
    finally:
        for h in handles:
            h.remove()
    if z.ndim != 2 or z.shape[0] != 1:
        raise OracleError(f"{ad.name}: representation has shape {tuple(z.shape)}, expected [1, D]")
    if not z.requires_grad:
        raise OracleError(f"{ad.name}: representation() does not let gradients through (no_grad inside?)")
    for g, path in owners.items():
        if path not in state.calls:
            raise OracleError(f"{ad.name}: no attention product (F.scaled_dot_product_attention or softmax @ V) "
                              f"seen inside {path!r} for heads {g!r}.head.*")
    missing = [n for n in branches if n not in leaves]
    if missing:
        raise OracleError(f"{ad.name}: modules of components {missing[:3]} never ran")
    D = z.shape[-1]
    inputs, index = [], {}

    def add(key, t):
        index[key] = len(inputs)
        inputs.append(t)

    for g, path in owners.items():
        add(("attn", g), state.calls[path][2])
    for name in branches:
        add(("branch", name), leaves[name])
    for name, ps in consts.items():
        for i, p in enumerate(ps):
            add(("const", name, i), p)
    if ("start",) in captured:
        add(("start",), captured[("start",)])
    grads = [[] for _ in inputs]
    for d in range(D):
        gs = torch.autograd.grad(z[0, d], inputs, retain_graph=True, allow_unused=True)
        for i, gv in enumerate(gs):
            grads[i].append(torch.zeros_like(inputs[i]) if gv is None else gv)
    G = {k: torch.stack(grads[i]).detach() for k, i in index.items()}  # [D, *shape]
    for t in stats:
        t.requires_grad_(False)
    contrib, tokens, sources, notes = {}, {}, {}, []

    def dot(key, value):
        g = G[key]
        return (g * value.detach()).reshape(D, -1).sum(-1)

    channel = set(dec.meta.get("channel_heads", ()))
    for g, comps_g in head_groups.items():
        probs, value, leaf = state.calls[owners[g]]
        Gd = G[("attn", g)]  # [D, R, H, Nq, dh]
        outs = None
        if g in channel:  # attention over channels (XCiT): the product is [.., H, dh, N], tokens last
            leaf, value, Gd = leaf.transpose(-1, -2), value.transpose(-1, -2), Gd.transpose(-1, -2)
            outs = leaf  # each token's head output is its own values through the frozen weights: read at that token
            probs = torch.eye(leaf.shape[-2], dtype=leaf.dtype).expand(*leaf.shape[:-1], leaf.shape[-2])
        H = leaf.shape[-3]
        if sorted(c.head for c in comps_g) != list(range(H)):
            raise AssertionError(f"{ad.name}: the attention product in {owners[g]!r} has {H} heads; the decomposition "
                                 f"lists heads {[c.head for c in comps_g]} for {g!r}")
        per_head = torch.einsum("d...hqc,...hqc->dh", Gd.reshape(D, -1, *leaf.shape[-3:]),
                                leaf.detach().reshape(-1, *leaf.shape[-3:]))
        for c in comps_g:
            if c.head is not None and c.head < H:
                contrib[c.name] = per_head[:, c.head]
        # token split: by source (A_qj ⟨∂z/∂o_q, v_j⟩) or by query row (⟨∂z/∂o_q, o_q⟩) mapped to grid positions
        grid = dec.grid_of(comps_g[0].name)
        rows = _row_positions(g, captured, value, grid, notes)
        if rows is None:
            continue
        R = leaf.reshape(-1, *leaf.shape[-3:]).shape[0]
        Gr = Gd.reshape(D, R, *leaf.shape[-3:])
        vv = (value if outs is None else outs).detach().reshape(R, *value.shape[-3:])
        A = probs.reshape(R, *probs.shape[-3:])
        splits = {"query": torch.einsum("drhqc,rhqc->dhrq", Gr, leaf.detach().reshape(R, *leaf.shape[-3:])),
                  "source": torch.einsum("rhqj,drhqc,rhjc->dhrj", A, Gr, vv)}
        valid = rows >= 0
        for mode, per_row in splits.items():
            per_row = per_row.reshape(D, H, -1)
            out = per_row.new_zeros(H, grid.num_tokens, D)
            out.index_add_(1, rows[valid], per_row[:, :, valid].permute(1, 2, 0))
            lost = per_row[:, :, ~valid].sum(-1)  # [D, H]: rows outside the grid (padding)
            for c in comps_g:
                if c.head is None or c.head >= H:
                    continue
                if float(lost[:, c.head].detach().norm()) > 1e-9 * float(z.detach().norm()):
                    notes.append(f"{c.name}: padding rows carry {float(lost[:, c.head].detach().norm()):.2e} of its {mode} "
                                 f"split; not checked")
                    continue
                (tokens if mode == "query" else sources)[c.name] = out[c.head]
    for name, (path, mod) in branches.items():
        contrib[name] = dot(("branch", name), leaves[name])
        pos = _positions(leaves[name], dec.grid_of(name))
        if pos is not None:
            gp = _positions_d(G[("branch", name)], dec.grid_of(name))
            tokens[name] = (gp * pos.detach()).sum(-1).T
    for name, ps in consts.items():
        contrib[name] = sum(dot(("const", name, i), p) for i, p in enumerate(ps))
        if name in param_writes and len(ps) == 1:
            # a [1, C, h, w] position table added to an NCHW stream (Visformer) keeps its shape
            shape = tuple(ps[0].shape) if ps[0].ndim == 4 else (1, -1, ps[0].shape[-1])
            pos = _positions(ps[0].reshape(shape), dec.grid_of(name))
            if pos is not None:
                gp = _positions_d(G[("const", name, 0)].reshape(D, *shape), dec.grid_of(name))
                tokens[name] = (gp * pos.detach()).sum(-1).T
    if starts:
        c0 = starts[0]
        # constants of the first block itself (its parameters, or an eval BatchNorm's running mean inside it:
        # NextViT's first block starts with a conv + BatchNorm) are not part of the stream entering it
        inside = {id(p) for p in (*bmod.parameters(), *bmod.buffers())} if first is not None else set()
        before = [c.name for c in comps[: comps.index(first)] if c.kind == "const"
                  and not all(id(p) in inside for p in consts[c.name])] if first is not None else []
        if ("start",) in captured:
            x0 = captured[("start",)]
            contrib[c0.name] = dot(("start",), x0) - sum((contrib[n] for n in before), torch.zeros(D, dtype=z.dtype))
            pos = _positions(x0, dec.grid_of(c0.name))
            if pos is not None and not before:
                gp = _positions_d(G[("start",)], dec.grid_of(c0.name))
                tokens[c0.name] = (gp * pos.detach()).sum(-1).T
        else:  # nothing but the stream: it is all of z
            contrib[c0.name] = z[0].detach().clone()
    return OracleResult(contributions=contrib, tokens=tokens, sources=sources, z=z[0].detach(), notes=notes)


def _positions_d(g: torch.Tensor, grid) -> torch.Tensor:
    """``[D, *shape]`` gradients as ``[D, T, C]`` rows in grid order."""
    return torch.stack([_positions(gi, grid) for gi in g])


def _row_positions(g, captured, value, grid, notes) -> Optional[torch.Tensor]:
    """For each (window row, token) of the attention's value tensor, its position on ``grid`` (−1: none), read off
    the model's own partition / shift / padding by autograd: the probe ``Σ (s+1)·⟨v_s, u⟩`` differentiated with
    respect to the stream tensor at the grid, divided by the plain probe's gradient, gives each position's s."""
    cands = [(k[2], t) for k, t in captured.items() if k[0] == "pos" and k[1] == g]
    cands.sort(key=lambda kt: -kt[0].count("."))  # innermost first
    for anc, x in cands:
        if _positions(x, grid) is None or not x.requires_grad or value.grad_fn is None:
            continue
        v = value.reshape(-1, *value.shape[-3:])  # [R, H, N, dh]
        R, H, N, dh = v.shape
        u = torch.randn(H, 1, dh, generator=torch.Generator().manual_seed(7), dtype=v.dtype)
        w = (torch.arange(R * N, dtype=v.dtype) + 1).reshape(R, 1, N, 1)
        g1 = torch.autograd.grad((v * u).sum(), x, retain_graph=True, allow_unused=True)[0]
        gw = torch.autograd.grad((v * u * w).sum(), x, retain_graph=True, allow_unused=True)[0]
        if g1 is None:
            continue
        p1, pw = _positions(g1, grid), _positions(gw, grid)
        nn_ = (p1 * p1).sum(-1)
        read = nn_ > 1e-20 * float(nn_.max())
        s = torch.where(read, (pw * p1).sum(-1) / nn_.clamp_min(1e-300), torch.zeros_like(nn_))
        si = s.round().long() - 1
        resid = (pw - (si + 1).to(pw.dtype).unsqueeze(-1) * p1).norm(dim=-1)
        # a stream of patch tokens alone (CaiT) leaves the grid's prefix positions unread by this attention
        alone = x.ndim == 3 and x.shape[1] == grid.h * grid.w != grid.num_tokens
        unread = ~read
        if alone:
            unread[: grid.num_prefix] = False
        if bool((resid > 1e-6 * pw.norm(dim=-1).clamp_min(1e-300))[read].any()) or bool(unread.any()):
            notes.append(f"{g}: grid positions are not read by exactly one attention row (at {anc!r}); "
                         f"token split not checked")
            return None
        rows = torch.full((R * N,), -1, dtype=torch.long)
        rows[si[read]] = torch.arange(grid.num_tokens)[read]
        if len(set(si[read].tolist())) != int(read.sum()):
            notes.append(f"{g}: two grid positions map to one attention row; token split not checked")
            return None
        return rows
    notes.append(f"{g}: no module input around the attention has the layout of grid {grid}; token split not checked")
    return None


#: Per-component tolerance of :func:`check_attributions`: ``‖c − c_oracle‖ ≤ rtol·‖c_oracle‖ + floor·‖z‖``.
ATTRIBUTION_TOLERANCE = {torch.float64: (1e-7, 1e-11), torch.float32: (2e-3, 1e-6)}


def _compare(failures, name, got, want, z_norm, rtol, floor, what="contribution"):
    err = float((got - want).norm())
    scale = float(want.norm())
    tol = rtol * scale + floor * z_norm
    if not err <= tol:
        ratio = float(got.norm()) / scale if scale > 0 else float("inf")
        failures.append((err / max(tol, 1e-300), f"{what} of {name!r} differs from the attribution oracle by "
                                                 f"{err:.2e} (its own size {scale:.2e}, tolerance {tol:.1e}, "
                                                 f"size ratio {ratio:.3g})"))


def _raise_failures(where, failures):
    if failures:
        failures.sort(key=lambda f: -f[0])
        more = f"; and {len(failures) - 6} more" if len(failures) > 6 else ""
        raise AssertionError(f"{where}: the decomposition credits components with what is not their write: "
                             + "; ".join(m for _, m in failures[:6]) + more)


def check_attributions(model, images: torch.Tensor, *, dtype: torch.dtype = torch.float64, start="middle",
                       tokens: bool = True, adapter=None, registry=None, writes=None,
                       rtol: Optional[float] = None, floor: Optional[float] = None) -> list:
    """Every component's contribution, and its token split, against :func:`attribution_oracle` (one image at a
    time), at ``heads=True`` (with ``tokens="source"``), ``heads=False`` (each branch the sum of its oracle leaves)
    and ``start`` (``"middle"``: the adapter's :func:`middle_start`; None skips it).

    Components are judged on their own scale: ``‖c − c_oracle‖ ≤ rtol·‖c_oracle‖ + floor·‖z‖`` (defaults in
    :data:`ATTRIBUTION_TOLERANCE`), so a small component (LayerScale 1e-4) cannot hide behind the size of z.
    Token splits are compared position by position where the oracle can place them: every component at the
    positions it writes, heads by the token they read (or, when the family declares
    ``dec.meta["head_tokens"] = "query"``, at the rows they write, with ``dec.meta["source_tokens"]`` then checked
    by source; heads of the attention modules listed in ``dec.meta["channel_heads"]`` — attention over channels,
    XCiT's XCA, whose product is ``[.., H, dh, N]`` — at the token each output row belongs to, by source and by
    query alike); components listed in ``dec.meta["spread_tokens"]`` (written at no position, e.g. into an
    attention pool's latent query, and spread evenly by convention) are not compared by position.
    Returns ``[(options, worst relative error, number of checked token splits), ...]``."""
    rt, fl = ATTRIBUTION_TOLERANCE.get(dtype, ATTRIBUTION_TOLERANCE[torch.float32])
    rtol = rt if rtol is None else rtol
    floor = fl if floor is None else floor
    m = copy.deepcopy(model).to(dtype).eval()
    ad = api.find_adapter(m, adapter, registry=registry)
    kw = dict(adapter=ad, registry=registry)
    results = []
    for b in range(images.shape[0]):
        x = images[b:b + 1].to(dtype)
        runs = [{"heads": True, "tokens": "source" if tokens else None}, {"heads": False}]
        if start is not None:
            st = _start_for(ad.unwrap(m), ad) if start == "middle" else start
            if st is not None:
                runs.append({"heads": True, "start": st, "tokens": "source" if tokens else None})
        for opts in runs:
            dec = api.decompose(m, x, **kw, **{**opts, "heads": True})
            where = f"{ad.name} {dtype} image {b} {opts}"
            orc = attribution_oracle(m, x, dec, adapter=ad, registry=registry, writes=writes)
            zn = float(orc.z.norm())
            missing = [n for n in dec.names if n not in orc.contributions]
            if missing:
                raise OracleError(f"{where}: the oracle produced no value for {missing[:5]}")
            total = sum(orc.contributions.values())
            oerr = float((total - orc.z).norm()) / zn
            if not oerr <= (1e-9 if dtype == torch.float64 else 1e-4):
                raise AssertionError(
                    f"{where}: the writes located for the components do not add up to z (oracle error {oerr:.2e}): "
                    f"a constant or branch the model adds is not any component (or the oracle located a name wrong, "
                    f"or a norm outside torch.nn.functional is not frozen); oracle notes: {orc.notes[:3]}")
            worst, checked, failures, unchecked = 0.0, 0, [], []
            if opts["heads"]:
                for name in dec.names:
                    _compare(failures, name, dec[name][0], orc.contributions[name], zn, rtol, floor)
                    worst = max(worst, float((dec[name][0] - orc.contributions[name]).norm()) /
                                max(float(orc.contributions[name].norm()), 1e-300))
            else:
                got_dec = api.decompose(m, x, **kw, **opts)
                want: dict = {}
                for c in dec.components:
                    key = group_key(c, "branch")
                    want[key] = want.get(key, 0) + orc.contributions[c.name]
                assert set(want) == set(got_dec.names), \
                    f"{where}: heads=False names {sorted(set(got_dec.names) ^ set(want))[:5]} are not the branches"
                for name in got_dec.names:
                    _compare(failures, name, got_dec[name][0], want[name], zn, rtol, floor)
                    worst = max(worst, float((got_dec[name][0] - want[name]).norm()) /
                                max(float(want[name].norm()), 1e-300))
            if opts.get("tokens"):
                head_mode = dec.meta.get("head_tokens", "source")
                src_meta = dec.meta.get("source_tokens") or {}
                spread = set(dec.meta.get("spread_tokens") or ())  # written at no position: spread by convention
                for c in dec.components:
                    if c.name not in dec.token_details or c.name in spread:
                        continue
                    T = dec.grid_of(c.name).num_tokens
                    ref = (orc.sources if head_mode == "source" else orc.tokens) if c.kind == "head" else orc.tokens
                    if c.name not in ref and c.kind != "const":
                        unchecked.append(c.name)
                    if c.name in ref:
                        tok = dec.token_contributions(c.name)[0]
                        what = f"token split ({'read' if c.kind == 'head' and head_mode == 'source' else 'written'} positions)"
                        _compare(failures, c.name, tok, ref[c.name], zn, rtol, floor, what=what)
                        checked += 1
                    if c.kind == "head" and c.name in src_meta and c.name in orc.sources:
                        tok = src_meta[c.name].materialize(T)[0]
                        _compare(failures, c.name, tok, orc.sources[c.name], zn, rtol, floor,
                                 what="meta['source_tokens'] split (read positions)")
                        checked += 1
            _raise_failures(where, failures)
            if unchecked:
                raise OracleError(f"{where}: the oracle could not place the token splits of {unchecked[:4]} on their "
                                  f"grids ({'; '.join(orc.notes[:3]) or 'no layout matched'}); check_attributions("
                                  f"..., tokens=False) skips token checks")
            results.append((opts, worst, checked))
    return results


def run_conformance(model, image_size, *, batch: int = 2, reference: Optional[Callable] = None,
                    fixed_size: bool = True, seed: int = 0, adapter=None, registry=None,
                    cuda_placement: bool = True, attributions: bool = True, writes=None) -> list:
    """All checks on ``model`` with a random batch of ``image_size`` (H, W) images (including
    :func:`check_cuda_placement`, which needs no GPU; ``cuda_placement=False`` skips it, e.g. for a model whose
    forward cannot run on fake tensors), and :func:`check_attributions` in float64 on the first image
    (``attributions=False`` skips it; ``writes`` is passed on)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *image_size, generator=g)
    model.eval()
    results = check_reconstruction(model, images, reference=reference, adapter=adapter, registry=registry)
    results += check_reconstruction(model, images[:1], granularities=({"heads": True},), reference=reference,
                                    adapter=adapter, registry=registry)
    if attributions:
        check_attributions(model, images[:1], adapter=adapter, registry=registry, writes=writes)
    check_bad_inputs(model, images, fixed_size=fixed_size, adapter=adapter, registry=registry)
    if cuda_placement:
        check_cuda_placement(model, image_size, batch=batch, adapter=adapter, registry=registry)
    return results
