"""Argument values the command line checks before any work starts (issue 14: "checked before the work starts").

Keyed by argparse destinations, so flags keep their names whatever they are; every failure is an
:class:`~vitdecomp.errors.InputError` (or :class:`~vitdecomp.errors.OutputError`) naming the flag, the value and
what is accepted.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

from .errors import InputError, OutputError

__all__ = ["check_args"]

#: integers that must be ≥ 1
_POSITIVE = ("batch", "batch_size", "top", "k", "img_size", "shard_size", "epochs", "iters", "rank",
             "component_batch", "steps", "limit", "penalty_probes")
#: integers that must be ≥ 0
_NON_NEGATIVE = ("workers", "examples", "patience", "penalty_warmup")
#: floats: (low, high, low inclusive, high inclusive)
_RANGES = {"val_fraction": (0.0, 1.0, True, False), "lam": (0.0, float("inf"), True, False),
           "lr": (0.0, float("inf"), False, False), "alpha": (0.0, 1.0, True, True)}
#: commands whose --out is a file (the others write a folder)
_FILE_OUT = {"cmd_align", "cmd_decompose", "cmd_describe", "cmd_score"}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_numbers(args) -> None:
    for dest in _POSITIVE + _NON_NEGATIVE:
        v = getattr(args, dest, None)
        if v is None or isinstance(v, bool) or not isinstance(v, int):
            continue
        low = 1 if dest in _POSITIVE else 0
        if v < low:
            raise InputError(f"{_flag(dest)} {v}: must be an integer ≥ {low}")
    size = getattr(args, "image_size", None)
    size = [size] if isinstance(size, int) else size  # N (most commands) or H W (check)
    if size is not None and any(s < 1 for s in size):
        raise InputError(f"--image-size {' '.join(map(str, size))}: height and width must be ≥ 1")
    for dest, (lo, hi, lo_in, hi_in) in _RANGES.items():
        v = getattr(args, dest, None)
        if v is None or not isinstance(v, (int, float)):
            continue
        ok = (v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)
        if not ok or v != v:  # NaN fails every comparison
            left, right = "[" if lo_in else "(", "]" if hi_in else ")"
            raise InputError(f"{_flag(dest)} {v}: must be in {left}{lo:g}, {hi:g}{right}")


def check_device(value, where: Optional[str] = None) -> None:
    """Raise :class:`InputError` for a device string torch does not know or a device this machine lacks. The
    message names the command-line flag, or with ``where`` (a function's name) that function's ``device=``."""
    import torch

    what = f"{where}: device={value!r}" if where else f"--device {value}"
    cpu = "device='cpu'" if where else "--device cpu"
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"{what} is not a torch device (use cpu, cuda, cuda:N, mps)") from exc
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{what}: this machine has no CUDA GPU that torch can use "
                             f"(torch.cuda.is_available() is False); use {cpu}")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise InputError(f"{what}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
        return
    backend = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise InputError(f"{what}: torch reports no {dev.type} device on this machine; use {cpu}")


def _probe(folder: Path) -> None:
    """Create and remove a file of our own in ``folder``: the one test of writability that holds for root and
    read-only mounts alike."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".vitdecomp-probe-", suffix=".tmp")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise OutputError(f"the folder {folder} is not writable: {exc.strerror or exc}") from exc


def check_out_file(path) -> None:
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"--out {p} is a folder; give a file path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"--out {p}: the folder {parent} does not exist; create it first")
    _probe(parent)


def check_out_dir(path) -> None:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"--out {p} exists and is not a folder")
    existing = p
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"--out {p}: {existing} is a file, so the folder cannot be created")
    _probe(existing)


def check_args(args) -> None:
    """Check every argument value of a parsed command line; raise before the command does any work."""
    _check_numbers(args)
    if getattr(args, "device", None) is not None:
        check_device(args.device)
    func = getattr(getattr(args, "func", None), "__name__", "")
    out = getattr(args, "out", None)
    if out is not None:
        if func == "cmd_extract":
            from .extraction import check_out

            check_out(Path(out))
        elif func in _FILE_OUT:
            check_out_file(out)
        else:
            check_out_dir(out)
