"""The ``auto`` adapter's overhead: decompose time ÷ plain forward time, CPU, against the family plugin where one
exists.

Run by hand (not a test):

    python benchmarks/auto_overhead.py --batch 4 --reps 3 --threads 2
    python benchmarks/auto_overhead.py --models vit_base_patch16_224 beit_base_patch16_224

Forward = ``forward_head(forward_features(x), pre_logits=True)``; each mode runs interleaved with forwards so
both see the same machine load; medians of ``--reps`` after one warm-up call (the auto adapter's fx traces are
cached by then; ``min/min`` is the ratio of the fastest of each). Modes: ``component`` (heads split), ``branch``
(``heads=False``), ``token`` (``tokens="source"``). Random weights (timings do not depend on them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import timm
import torch

import vitdecomp

#: model → the family adapter to compare with (None: the auto adapter is the only one)
MODELS = {
    "vit_base_patch16_224": "timm-vit",
    "beit_base_patch16_224": None,
    "vit_base_patch16_siglip_224": None,  # MAP (attention-pool) head
    "focalnet_tiny_srf": None,  # hierarchical: 2×2 / 4×4 patch convs between stages (grouped terms)
    "pvt_v2_b0": None,  # hierarchical: overlapping 3×3 stride-2 convs (writes carried forward through them)
    "twins_pcpvt_small": None,  # hierarchical with heads split: patch convs, position convs outside the blocks
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="*", default=["component", "branch", "token"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"# torch {torch.__version__}, timm {timm.__version__}, threads {a.threads}, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    all_modes = {"component": {}, "branch": {"heads": False}, "token": {"tokens": "source"}}

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    for name in a.models:
        m = timm.create_model(name, pretrained=False).eval()
        x = torch.randn(a.batch, 3, *m.pretrained_cfg["input_size"][1:])
        adapters = ["auto"] + ([MODELS[name]] if MODELS.get(name) else [])
        with torch.no_grad():
            fwd = lambda: m.forward_head(m.forward_features(x), pre_logits=True)  # noqa: E731
            fwd()
            for mode in a.modes:
                kw = all_modes[mode]
                for ad in adapters:
                    try:  # warm-up (and the fx traces)
                        dec = vitdecomp.decompose(m, x, adapter=ad, fingerprint=False, **kw)
                    except vitdecomp.UnsupportedModelError as exc:  # e.g. token detail through an overlapping conv
                        print(f"{name:28s} {mode:9s} {ad:8s} refused: {str(exc)[:100]}", flush=True)
                        continue
                    f, d = [], []
                    for _ in range(a.reps):
                        f.append(timed(fwd))
                        d.append(timed(lambda: vitdecomp.decompose(m, x, adapter=ad, fingerprint=False, **kw)))
                    F, D = statistics.median(f), statistics.median(d)
                    print(f"{name:28s} {mode:9s} {ad:8s} batch {a.batch}: forward {F * 1e3:8.1f} ms  decompose "
                          f"{D * 1e3:8.1f} ms  ratio {D / F:.2f}× (min/min {min(d) / min(f):.2f}×)  components "
                          f"{len(dec)}  error {dec.error:.1e}  load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
