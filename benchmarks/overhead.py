"""Decomposition overhead: decompose time ÷ plain forward time, and peak extra memory.

Run by hand (not a test):

    python benchmarks/overhead.py                       # deit_base + vit_small, batch 8, CPU
    python benchmarks/overhead.py --models deit_base_patch16_224 --batch 64 --device cuda

Each (model, mode) runs in a fresh subprocess. Timing: median of --reps runs after a warm-up, interleaving the
plain forward (``vitdecomp.representation``, i.e. the model's own forward_features + forward_head) with the
mode being measured so both see the same machine load. Memory: CPU — in another fresh process, after a warm-up
call, the peak resident set size of one call above the level before it (Linux VmHWM, reset through
/proc/self/clear_refs; glibc is told to return freed tensors to the OS with MALLOC_MMAP_THRESHOLD_; the model's
weights and the input are resident before, so this is the call's working memory); CUDA —
torch.cuda.max_memory_allocated above the level before the call. Models use random weights (timings do not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

MODES = ("forward", "component", "branch", "token")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(model_name: str, mode: str, batch: int, reps: int, device: str, dtype: str, threads: int) -> dict:
    import timm
    import torch

    import vitdecomp

    if threads:
        torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    model = timm.create_model(model_name, pretrained=False).eval().to(device=device, dtype=dt)
    size = model.pretrained_cfg["input_size"][1:]
    x = torch.randn(batch, 3, *size, device=device, dtype=dt)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def fwd():
        with torch.no_grad():
            return vitdecomp.representation(model, x)

    def run():
        if mode == "forward":
            return fwd()
        return vitdecomp.decompose(model, x, heads=mode != "branch", tokens="source" if mode == "token" else None,
                                   fingerprint=False)  # the decomposition itself (the fingerprint: fingerprint.py)

    if os.environ.get("VITDECOMP_BENCH_MEMORY") and not device.startswith("cuda"):
        # CPU memory: a warm-up call first (one-time kernel/library initialisation is not working memory), then
        # the measured call. The parent sets MALLOC_MMAP_THRESHOLD_ so glibc returns freed tensors to the OS
        # instead of keeping them in its heap, which would hide the call's peak from the RSS high-water mark.
        import gc

        out = run()
        del out
        gc.collect(); ok = _reset_peak(); base = _rss_kib("VmRSS")
        out = run()
        if mode == "token":
            out.token_contributions(out.names[1])
        peak_mb = (_rss_kib("VmHWM") - base) / 1024 if ok else float("nan")
        return {"model": model_name, "mode": mode, "peak_extra_mb": peak_mb}
    fwd(); run(); sync()  # warm-up
    t_fwd, t_mode = [], []
    for _ in range(reps):
        sync(); t0 = time.perf_counter(); fwd(); sync(); t_fwd.append(time.perf_counter() - t0)
        sync(); t0 = time.perf_counter(); out = run(); sync(); t_mode.append(time.perf_counter() - t0)
        del out
    # peak memory of one call
    if device.startswith("cuda"):
        torch.cuda.empty_cache(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
        out = run(); sync(); peak = torch.cuda.max_memory_allocated() - base
        if mode == "token":  # materialise one head's token split too, as a user would
            out.token_contributions(out.names[1])
        del out
        peak_mb = peak / 2**20
    else:
        ok = _reset_peak(); base = _rss_kib("VmRSS")
        out = run()
        if mode == "token":
            out.token_contributions(out.names[1])
        peak_mb = (_rss_kib("VmHWM") - base) / 1024 if ok else float("nan")
        del out
    return {"model": model_name, "mode": mode, "batch": batch, "device": device, "dtype": dtype,
            "forward_s": statistics.median(t_fwd), "mode_s": statistics.median(t_mode),
            "ratio": statistics.median(t_mode) / statistics.median(t_fwd), "peak_extra_mb": peak_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["deit_base_patch16_224", "vit_small_patch16_224"])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", help="also write results to this file")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    from _device import require_device

    require_device(args.device)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch, args.reps, args.device, args.dtype, args.threads)))
        return
    rows = []
    for m in args.models:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--worker", m, mode, "--batch", str(args.batch), "--reps", str(args.reps),
                   "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if res.returncode:
                print(res.stderr, file=sys.stderr)
                raise SystemExit(f"worker failed for {m} {mode}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            if not args.device.startswith("cuda"):
                mem = subprocess.run(cmd, capture_output=True, text=True,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1", "VITDECOMP_BENCH_MEMORY": "1",
                                          "MALLOC_MMAP_THRESHOLD_": "65536"})
                if mem.returncode:
                    print(mem.stderr, file=sys.stderr)
                    raise SystemExit(f"memory worker failed for {m} {mode}")
                r["peak_extra_mb"] = json.loads(mem.stdout.strip().splitlines()[-1])["peak_extra_mb"]
            print(f"{r['model']:28} {r['mode']:9} batch {r['batch']:3} {r['device']:5} forward {r['forward_s'] * 1e3:8.1f} ms  "
                  f"{r['mode']} {r['mode_s'] * 1e3:8.1f} ms  ratio {r['ratio']:5.2f}×  peak +{r['peak_extra_mb']:7.1f} MB",
                  flush=True)
    info = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        if args.device.startswith("cuda"):
            info["gpu"] = torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001
        pass
    print(json.dumps(info))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
