"""CaiT (contrib pack vitdecomp-cait) decomposition overhead: decompose time ÷ plain forward time, CPU.

Run by hand (not a test), with the pack importable (``pip install -e contrib/vitdecomp-cait``):

    python benchmarks/cait_overhead.py --model cait_xxs24_224 --batch 8 --reps 3 --threads 1

Forward = the model's own ``forward_head(forward_features(x), pre_logits=True)``; runs interleaved with each
mode so both see the same machine load; medians. Random weights (timings do not depend on them).
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import vitdecomp
from vitdecomp import Registry
from vitdecomp_cait import cait


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cait_xxs24_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    reg = Registry.from_plugins([cait])
    m = timm.create_model(a.model, pretrained=False).eval()
    x = torch.randn(a.batch, 3, *m.pretrained_cfg["input_size"][1:])
    modes = {"component": {}, "branch": {"heads": False}, "token": {"tokens": "source"}}

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    with torch.no_grad():
        fwd = lambda: m.forward_head(m.forward_features(x), pre_logits=True)  # noqa: E731
        fwd()
        for mode, kw in modes.items():
            dec = vitdecomp.decompose(m, x, registry=reg, **kw)  # warm-up
            f, d = [], []
            for _ in range(a.reps):
                f.append(timed(fwd))
                d.append(timed(lambda: vitdecomp.decompose(m, x, registry=reg, **kw)))
            F, D = statistics.median(f), statistics.median(d)
            print(f"{a.model} {mode:9s} batch {a.batch}: forward {F * 1e3:8.1f} ms  {mode} {D * 1e3:8.1f} ms  "
                  f"ratio {D / F:.2f}×  components {len(dec)}  error {dec.error:.1e}")


if __name__ == "__main__":
    main()
