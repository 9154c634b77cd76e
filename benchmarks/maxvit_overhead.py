"""MaxViT decomposition overhead: time and peak memory relative to a plain forward.

    python benchmarks/maxvit_overhead.py [--model maxvit_small_tf_224] [--batch 8] [--repeats 3] [--threads N]

Random-init timm model, float32, CPU (or --device cuda). Modes, each measured in a fresh subprocess for peak memory:

* ``forward``   — z = the adapter's representation (forward_features + head pooling/norm), under no_grad;
* ``component`` — ``decompose(model, x)`` (heads on, explicit constants);
* ``spatial``   — ``decompose(model, x, tokens="source")`` and every component's ``spatial_map`` materialised once
  (one at a time, not kept), i.e. all components split over the positions where they write;
* ``sources``   — as ``spatial``, plus every head's source-position map (``maxvit.source_map``).

Time: all modes run in one process, interleaved (forward, component, spatial, sources, forward, ...) after one
warm-up each, and the minimum over ``--repeats`` rounds is kept, so that load from other processes on a shared
machine hits every mode alike. Beside wall time, each call's process CPU time (user + system, the minimum over the
rounds; on a loaded machine it moves much less than wall time) and minor page faults (the median; fresh pages the
allocator had to map, whose cost is in the system time) are printed. Peak memory: each mode once more in a fresh subprocess, as the peak RSS increase
over the state after building the model and the input (CPU), or ``torch.cuda.max_memory_allocated`` (GPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _setup(args):
    import timm
    import torch

    import vitdecomp
    from vitdecomp_plugins.maxvit import source_map

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval().to(args.device)
    x = torch.randn(args.batch, 3, *model.img_size, device=args.device)
    ad = vitdecomp.find_adapter(model)

    def forward():
        with torch.no_grad():
            return ad.representation(model, x)

    def component():
        return vitdecomp.decompose(model, x, fingerprint=False)  # the decomposition itself

    def spatial(with_sources=False):
        dec = vitdecomp.decompose(model, x, tokens="source", fingerprint=False)
        with torch.no_grad():
            for name in dec.names:
                dec.spatial_map(name)
                if with_sources and name in dec.meta["source_tokens"]:
                    source_map(dec, name)
        return dec

    fns = {"forward": forward, "component": component, "spatial": spatial, "sources": lambda: spatial(True)}
    return torch, fns


def run_memory(args) -> dict:
    torch, fns = _setup(args)
    fn = fns[args.mode]
    cuda = args.device.startswith("cuda")
    base = _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    out = fn()
    res = {"mode": args.mode}
    res["peak_mb"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20 if cuda else _rss_mb() - base
    if args.mode == "component":
        res.update(components=len(out), error=out.error)
    return res


def _usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def run_times(args, modes):
    """Per mode: wall times, and per call (user s, system s, minor faults)."""
    torch, fns = _setup(args)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times = {m: [] for m in modes}
    usage = {m: [] for m in modes}
    for m in modes:
        fns[m]()  # warm-up
    for _ in range(args.repeats):
        for m in modes:
            sync()
            u0 = _usage()
            t = time.perf_counter()
            out = fns[m]()
            sync()
            times[m].append(time.perf_counter() - t)
            del out
            usage[m].append(tuple(b - a for a, b in zip(u0, _usage())))
    return times, usage


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="maxvit_small_tf_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", default="forward,component,spatial,sources")
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    from _device import require_device

    require_device(args.device)
    if args.mode:
        print(json.dumps(run_memory(args)))
        return
    modes = args.modes.split(",")
    results = {}
    for mode in modes:
        cmd = [sys.executable, __file__, "--mode", mode, "--model", args.model, "--batch", str(args.batch),
               "--threads", str(args.threads), "--device", args.device]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[mode] = json.loads(out)
        print(json.dumps(results[mode]), flush=True)
    times, usage = run_times(args, modes)
    for mode in modes:
        results[mode]["time_s"] = min(times[mode])
        results[mode]["times"] = [round(t, 3) for t in times[mode]]
        results[mode]["cpu_s"] = min(u + s for u, s, _ in usage[mode])
        results[mode]["sys_s"] = statistics.median(s for _, s, _ in usage[mode])
        results[mode]["faults"] = int(statistics.median(f for _, _, f in usage[mode]))
        print(mode, results[mode]["times"], flush=True)
    fwd = results.get("forward")
    import torch

    threads = args.threads or torch.get_num_threads()
    print(f"\n{args.model}, batch {args.batch}, {args.device}, float32, {threads} threads, {args.repeats} rounds")
    print(f"{'mode':<10} {'time (s)':>9} {'÷ forward':>10} {'peak MB':>9} {'÷ forward':>10} {'cpu (s)':>8} "
          f"{'÷ forward':>10} {'sys (s)':>8} {'faults':>8}")
    for mode, r in results.items():
        rt = r["time_s"] / fwd["time_s"] if fwd else float("nan")
        rm = r["peak_mb"] / fwd["peak_mb"] if fwd and fwd["peak_mb"] > 0 else float("nan")
        rc = r["cpu_s"] / fwd["cpu_s"] if fwd and fwd["cpu_s"] > 0 else float("nan")
        print(f"{mode:<10} {r['time_s']:>9.3f} {rt:>10.2f} {r['peak_mb']:>9.0f} {rm:>10.2f} {r['cpu_s']:>8.3f} "
              f"{rc:>10.2f} {r['sys_s']:>8.3f} {r['faults']:>8d}")
    if "component" in results:
        print(f"components: {results['component']['components']}, relative error {results['component']['error']:.2e}")


if __name__ == "__main__":
    main()
