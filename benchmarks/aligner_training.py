"""CompAlign training cost: N images, C components, D = d (defaults: the brief's N=10k, C=150, D=d=768).

Two parts:

1. *Full size, timed pieces.* A complete fit at N=10k, C=150, D=d=768 takes hours on a 2-core CPU, so this part
   times the pieces of :func:`vitdecomp.fit_aligner` on data of the full size: the closed-form ridge start (one
   pass over all N images), single Adam steps (batch 256) with the exact isometry penalty and with the
   Hutchinson estimate (``penalty_probes=64``), and the held-out evaluation pass; it extrapolates one epoch from
   them (labelled as such). Contributions are random float16 (the timings do not depend on the values).
2. *Complete fit, reduced width.* ``fit_aligner`` end to end with default settings on planted data (targets made
   by known orthonormal maps) at N=10k, C=150 and D=d=``--fit-dim`` (64): wall time, epochs, held-out cosine,
   and how close the recovered maps are to the planted ones.

    python benchmarks/aligner_training.py
    python benchmarks/aligner_training.py --n 10000 --c 150 --dim 768 --steps 2 --fit-dim 64
"""

from __future__ import annotations

import argparse
import math
import time

import torch


def _timed_pieces(N, C, D, steps, batch):
    from vitdecomp.compalign import _closed_form, _combine, _Data, _penalty

    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    c = torch.empty(N, C, D, dtype=torch.float16)
    for i in range(0, N, 500):
        c[i:i + 500] = torch.randn(min(500, N - i), C, D, generator=g).half()
    targets = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1)
    print(f"  (generated {c.numel() * 2 / 2**30:.2f} GiB of float16 contributions in {time.perf_counter() - t0:.0f} s)")
    data = _Data.of(c)
    mask = torch.ones(N, dtype=torch.bool)
    mask[: N // 10] = False
    t0 = time.perf_counter()
    W0, b0 = _closed_form(data, targets, mask, 1e-3, 1024, torch.device("cpu"))
    t_init = time.perf_counter() - t0
    W = W0.unsqueeze(0).repeat(C, 1, 1).contiguous().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    opt = torch.optim.Adam([W, b], lr=1e-3, fused=True)
    res = {}
    for probes in (None, 64):
        times = []
        for k in range(steps + 1):  # first step is a warm-up
            idx = torch.randint(0, N, (batch,), generator=g)
            t0 = time.perf_counter()
            f = _combine(c[idx].float(), W) + b
            loss = (1 - torch.nn.functional.cosine_similarity(f, targets[idx], dim=-1)).mean() + _penalty(W, probes, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        res[probes] = sum(times[1:]) / steps
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, N // 10, 1024):
            _combine(c[i:min(i + 1024, N // 10)].float(), W)
    t_eval = time.perf_counter() - t0
    return t_init, res, t_eval


def _complete_fit(N, C, D):
    from vitdecomp.compalign import fit_aligner

    g = torch.Generator().manual_seed(1)
    maps = torch.stack([torch.linalg.qr(torch.randn(D, D, generator=g))[0] for _ in range(C)])
    c = torch.randn(N, C, D, generator=g) * torch.linspace(0.5, 2.0, C)[None, :, None]
    t = torch.einsum("ncD,cDd->nd", c, maps)
    t0 = time.perf_counter()
    al = fit_aligner(c.half(), t, progress=False)
    wall = time.perf_counter() - t0
    rel = ((al.weight - maps).norm(dim=(1, 2)) / maps.norm(dim=(1, 2)))
    return wall, al, rel


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--c", type=int, default=150)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per penalty mode (after one warm-up)")
    ap.add_argument("--fit-dim", type=int, default=64, help="D = d of the complete fit (0: skip it)")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    N, C, D = args.n, args.c, args.dim
    print(f"1. timed pieces at N={N}, C={C}, D=d={D} ({C * D * D / 1e6:.0f} M parameters), batch {args.batch}")
    t_init, step, t_eval = _timed_pieces(N, C, D, args.steps, args.batch)
    steps_per_epoch = math.ceil(0.9 * N / args.batch)
    print(f"  closed-form ridge start (one pass over {int(0.9 * N)} images): {t_init:7.1f} s")
    for probes, t in step.items():
        label = "exact penalty" if probes is None else f"penalty_probes={probes}"
        epoch = steps_per_epoch * t + t_eval
        print(f"  Adam step, {label:20}: {t:7.2f} s  → one epoch ({steps_per_epoch} steps + eval) ≈ {epoch / 60:5.1f} min "
              "(extrapolated)")
    print(f"  held-out evaluation pass ({N // 10} images): {t_eval:7.1f} s")

    if args.fit_dim:
        d = args.fit_dim
        print(f"2. complete fit_aligner (defaults) at N={N}, C={C}, D=d={d}, planted orthonormal maps")
        wall, al, rel = _complete_fit(N, C, d)
        print(f"  wall {wall:.1f} s, {len(al.history) - 1} epochs (best {al.config['best_epoch']}), lr {al.config['lr_used']:.4f}")
        print(f"  held-out cosine {al.held_out_cosine:.5f} (closed-form start {al.init_cosine:.5f}); "
              f"relative map error median {rel.median():.4f}, max {rel.max():.4f}")


if __name__ == "__main__":
    main()
