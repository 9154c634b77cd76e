"""Swin decomposition overhead: time and peak memory of ``vitdecomp.decompose`` ÷ a plain forward.

Modes (each timed against the model's own ``forward_head(forward_features(x), pre_logits=True)`` under
``torch.no_grad()``, interleaved with it, same process, same threads):

* ``component``: ``decompose(model, x)`` — every head, bias, MLP, merge constant (heads on);
* ``spatial``: ``decompose(model, x, tokens="source")`` and then every component's spatial map
  ``dec.spatial_map(name)`` ([B, H_S, W_S, D] on its stage grid), each reduced to a heat map (its norm over D)
  and dropped before the next — what drawing every map costs. Keeping all maps at once would need
  Σ_i B·H_S·W_S·D floats (printed as ``all maps kept``).

Peak memory: in a fresh process per mode (after a warm-up of the same mode on one image), the rise of the peak RSS
(VmHWM, reset through /proc/self/clear_refs) over the RSS before the call, model and input already resident.

    python benchmarks/swin_overhead.py                     # swin_base_patch4_window7_224, batch 8
    python benchmarks/swin_overhead.py --batch 4 --repeats 2 --model swin_tiny_patch4_window7_224
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import subprocess
import sys
import time

import torch


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024.0  # MiB
    return float("nan")


def _peak_rise(fn) -> float:
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    before = _status("VmRSS")
    out = fn()
    rise = _status("VmHWM") - before
    del out
    gc.collect()
    return rise


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="swin_base_patch4_window7_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--modes", default="component,spatial")
    ap.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # internal: child process
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import timm

    import vitdecomp
    from vitdecomp import testing

    model = timm.create_model(args.model, pretrained=False).eval()
    testing.perturb_parameters(model)  # norms away from identity, so the error figure means something
    H, W = model.patch_embed.img_size
    x = torch.randn(args.batch, 3, H, W, generator=torch.Generator().manual_seed(0))

    def forward():
        with torch.no_grad():
            return model.forward_head(model.forward_features(x), pre_logits=True)

    def component():
        return vitdecomp.decompose(model, x, fingerprint=False)  # the decomposition itself

    def spatial():
        dec = vitdecomp.decompose(model, x, tokens="source", fingerprint=False)
        heat = {}
        for name in dec.names:
            heat[name] = dec.spatial_map(name).norm(dim=-1)
        return dec, heat

    modes = {"forward": forward, "component": component, "spatial": spatial}
    if args.memory_of:
        fn = modes[args.memory_of]
        full = x
        x = full[:1]
        fn()  # warm-up on one image
        x = full
        print(f"{_peak_rise(fn):.1f}")
        return
    wanted = [m for m in args.modes.split(",") if m]
    dec = component()  # warm-up, and the figures below
    forward()
    n_comp = len(dec)
    err32 = dec.error
    dec_t = vitdecomp.decompose(model, x[:1], tokens="source")
    all_maps = sum(dec_t.spatial_map(n).numel() for n in dec_t.names) * args.batch * 4 / 2**20
    del dec, dec_t

    times = {"forward": []}
    times.update({m: [] for m in wanted})
    for _ in range(args.repeats):
        for name, fn in [("forward", forward)] + [(m, modes[m]) for m in wanted]:
            gc.collect()
            t = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t)
            del out
    mem = {}
    for m in ["forward"] + wanted:
        cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--threads",
               str(torch.get_num_threads()), "--memory-of", m]
        mem[m] = float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])

    fwd = statistics.median(times["forward"])
    print(f"model {args.model} (random init, perturbed norms), batch {args.batch}, {x.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"components: {n_comp}; float32 relative reconstruction error {err32:.2e}")
    print(f"{'mode':<10} {'median s':>9} {'÷ forward':>10} {'all runs (s)':>28} {'peak rise MiB':>14} {'÷ forward':>10}")
    for name in ["forward"] + wanted:
        med = statistics.median(times[name])
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"{name:<10} {med:9.2f} {med / fwd:10.2f} {runs:>28} {mem[name]:14.0f} {mem[name] / max(mem['forward'], 1e-9):10.2f}")
    print(f"all maps kept at once would take {all_maps:.0f} MiB")
    print(f"machine: {platform.node()}, {platform.platform()}; load average {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
