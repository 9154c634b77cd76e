"""``--device`` for the benchmark scripts: refuse, in one clear line, a device this machine does not have."""

from __future__ import annotations


def require_device(device: str, *, count: int = 1) -> str:
    """Return ``device`` if this machine can run on it (``count`` devices of its kind for multi-process runs),
    else exit with a message saying what is missing and what to pass instead."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SystemExit(f"--device {device!r} is not a torch device ({exc}); use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = torch.version.cuda or "no CUDA"
            raise SystemExit(f"--device {device}: this machine has no usable CUDA GPU (torch.cuda.is_available() is "
                             f"False; torch {torch.__version__} built with {built}). Run it on a GPU machine, or "
                             "pass --device cpu.")
        have = torch.cuda.device_count()
        need = (dev.index or 0) + 1 if count == 1 else count
        if need > have:
            raise SystemExit(f"--device {device}: needs {need} CUDA device(s), this machine has {have}")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SystemExit(f"--device {device}: MPS is not available on this machine; pass --device cpu")
    return device
