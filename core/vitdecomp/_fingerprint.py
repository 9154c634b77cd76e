"""Content fingerprints: a model's full weights, an input item's bytes.

A cache or an aligner records what it was made from; these digests are how "the same" is decided. They hash
bytes, never samples or sums of values, so any change (one weight, a permutation of rows, one pixel) changes
them.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from typing import Any

import torch

from .errors import InputError

__all__ = ["weights_fingerprint", "item_digest", "bytes_digest"]

def _tensors(module: torch.nn.Module):
    items = [("p", n, t) for n, t in module.named_parameters(remove_duplicate=False)]
    items += [("b", n, t) for n, t in module.named_buffers(remove_duplicate=False) if t is not None]
    return sorted(items, key=lambda x: (x[1], x[0]))


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A 32-hex-digit SHA-256 digest over every parameter and buffer of ``module``: names, shapes, dtypes and the
    bytes of the values (tensors hashed in parallel threads; hashlib releases the GIL). Any weight change, a
    permutation included, changes it. Every call reads every byte (no memo: changes through ``.data`` or numpy
    bypass torch's version counters, tests/test_integrity.py shows it); see benchmarks/RESULTS.md for the time on a
    ViT-B. :func:`vitdecomp.decompose` records it (``fingerprint=``) for aligners to check. Weights on an accelerator are
    copied to the host for hashing."""
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"a weight fingerprint needs a torch module, got {type(module).__name__}")
    items = _tensors(module)
    for kind, name, t in items:
        if t.device.type == "meta":
            raise InputError(f"{type(module).__name__}.{name} is on the meta device (no values); load its weights "
                             "before extracting or fitting")

    def one(item) -> bytes:
        kind, name, t = item
        h = hashlib.sha256(f"{kind}:{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        data = t.detach()
        if data.layout != torch.strided:
            data = data.to_dense()
        data = data.to("cpu").contiguous().reshape(-1)
        if data.numel():
            h.update(memoryview(data.view(torch.uint8).numpy()))
        return h.digest()

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        parts = list(pool.map(one, items))
    return hashlib.sha256(b"".join(parts)).hexdigest()[:32]


def bytes_digest(data: bytes) -> str:
    """A 16-hex-digit SHA-256 digest of a file's bytes."""
    return hashlib.sha256(data).hexdigest()[:16]


def _update(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"tensor:{tuple(obj.shape)}:{obj.dtype}\n".encode())
        if t.numel():
            h.update(memoryview(t.view(torch.uint8).numpy()))
        return
    if hasattr(obj, "tobytes") and hasattr(obj, "mode") and hasattr(obj, "size"):  # PIL image
        h.update(f"pil:{obj.mode}:{obj.size}\n".encode())
        h.update(obj.tobytes())
        return
    if hasattr(obj, "tobytes") and hasattr(obj, "dtype") and hasattr(obj, "shape"):  # numpy array
        h.update(f"array:{obj.shape}:{obj.dtype}\n".encode())
        h.update(obj.tobytes())
        return
    if isinstance(obj, (tuple, list)):
        h.update(f"seq:{len(obj)}\n".encode())
        for o in obj:
            _update(h, o)
        return
    if obj is None or isinstance(obj, (str, int, float, bool)):
        h.update(f"{type(obj).__name__}:{obj!r}\n".encode())
        return
    buf = io.BytesIO()
    pickle.dump(obj, buf, protocol=4)
    h.update(buf.getvalue())


def item_digest(obj: Any) -> str:
    """A 16-hex-digit SHA-256 digest of one dataset item (image and label): tensor and array bytes, PIL pixels and mode,
    plain values by repr, anything else pickled."""
    h = hashlib.sha256()
    _update(h, obj)
    return h.hexdigest()[:16]
