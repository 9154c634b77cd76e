"""One prepared GPU run (for a lent GPU machine): correctness of the CUDA path and the issue-#8 throughput figures.

    python benchmarks/gpu_check.py                 # ≈ 5–8 min on one H100/H200
    python benchmarks/gpu_check.py --quick         # correctness only (CompAlign without the full-size fit)

1. Correctness on CUDA: every built-in family (tiny random models) decomposes exactly in float32 on the GPU
   (error ≤ 1e-5) and agrees with the CPU decomposition; bf16 autocast reports its error against float32; with
   ``torch.cuda.set_sync_debug_mode("error")`` a decomposition (every granularity) raises on any host
   synchronisation — the real-GPU counterpart of the simulated-CUDA tests.
2. Extraction on CUDA (pinned loading, asynchronous copies): the cache equals a CPU extraction's.
3. CompAlign on CUDA: every fitter (dual, joint, bcd, adam) on a planted problem keeps its maps on the GPU (peak
   allocation at least the maps' size) and ends within 5e-3 held-out cosine of the CPU fit; the full-size dual fit
   (N = 10,000, C = 150, D = 384 → d = 768, ``isometric=True``) timed on the GPU.
4. Throughput (images/s) of extraction versus a plain forward at batch 64/128/256 for ViT-B/16, Swin-B and
   MaxViT-S, fp32 and bf16 (target: ≥ 0.8× the plain forward's throughput at component level).
Prints one JSON line per measurement; paste the table into benchmarks/RESULTS.md with the GPU's name.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time

import torch


def _sync():
    torch.cuda.synchronize()


def correctness() -> None:
    import open_clip
    import timm

    import vitdecomp
    from vitdecomp import testing

    models = {
        "deit": timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8),
        "dinov2_reg": timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, depth=2, img_size=32,
                                        patch_size=8),
        "swin": timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=4,
                                  embed_dim=32, depths=(2, 2), num_heads=(2, 4)),
        "maxvit": timm.create_model("maxvit_tiny_tf_224", pretrained=False, img_size=64),
        "clip": open_clip.CLIP(embed_dim=24, vision_cfg={"image_size": 32, "layers": 2, "width": 48, "patch_size": 8,
                                                           "head_width": 16},
                               text_cfg={"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}),
    }
    for name, m in models.items():
        m = testing.perturb_parameters(m.eval())
        size = 64 if name in ("swin", "maxvit") else 32
        x = torch.randn(4, 3, size, size)
        cpu = vitdecomp.decompose(m, x, tokens="source")
        g = copy.deepcopy(m).cuda()
        gpu = vitdecomp.decompose(g, x.cuda(), tokens="source", check=True)
        diff = float((gpu.contributions.cpu() - cpu.contributions).norm() / cpu.contributions.norm())
        bf = vitdecomp.decompose(g, x.cuda(), autocast="bf16")
        tok = max(float((gpu.token_contributions(n).sum(1) - gpu[n]).norm() / gpu.representation.norm())
                  for n in gpu.names[:20])
        syncs, xg = [], x.cuda()
        for opts in testing.GRANULARITIES:
            opts = {k: v for k, v in opts.items() if k != "start"}
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                d = vitdecomp.decompose(g, xg, **opts)
                if opts.get("tokens"):
                    d.spatial_map(d.names[2])
            except RuntimeError as exc:  # the sync debug mode raises on a synchronising call
                syncs.append(f"{opts}: {exc}")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        print(json.dumps({"check": "cuda-exactness", "family": name, "error": gpu.error, "cpu_vs_gpu": diff,
                          "token_sum_error": tok, "bf16_error": bf.error,
                          "bf16_error_vs_float32": bf.meta["error_vs_float32"], "host_syncs": syncs}), flush=True)
        assert gpu.error <= 1e-5 and diff <= 1e-4, name


def extraction_equal() -> None:
    import timm

    import vitdecomp

    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8).eval()
    data = torch.utils.data.TensorDataset(torch.randn(40, 3, 32, 32), torch.zeros(40, dtype=torch.long))
    with tempfile.TemporaryDirectory() as d:
        a = vitdecomp.extract(m, data, d + "/cpu", batch_size=8, shard_size=16, dtype=torch.float32, progress=False)
        b = vitdecomp.extract(m, data, d + "/gpu", batch_size=8, shard_size=16, dtype=torch.float32, device="cuda",
                              progress=False)
        diff = float((a.contributions() - b.contributions()).norm() / a.contributions().norm())
    print(json.dumps({"check": "cuda-extraction", "cpu_vs_gpu": diff}), flush=True)
    assert diff <= 1e-4


def aligners(device: str = "cuda", full: bool = True, size=(3000, 8, 32, 32)) -> list:
    """Every CompAlign fitter on ``device`` against the CPU on planted data (``aligner_training.planted``); with
    ``full`` also the full-size dual fit on the device, timed. Returns the records it prints."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import aligner_training as A

    import vitdecomp

    cuda = torch.device(device).type == "cuda"
    N, C, D, d = size
    c, t, _, _ = A.planted(N, C, D, d)
    records = []
    for method in ("dual", "joint", "bcd", "adam"):
        kw = {"method": method, "progress": False, "max_epochs": 30}
        ref = vitdecomp.fit_aligner(c, t, device="cpu", **kw)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        got = vitdecomp.fit_aligner(c, t, device=device, **kw)
        wall = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if cuda else None
        rec = {"check": "compalign-device", "device": device, "method": method, "wall_s": round(wall, 2),
               "held_out_cosine": got.held_out_cosine, "cpu_held_out_cosine": ref.held_out_cosine,
               "peak_device_bytes": peak, "map_bytes": C * D * d * 4}
        print(json.dumps(rec), flush=True)
        records.append(rec)
        assert abs(got.held_out_cosine - ref.held_out_cosine) <= 5e-3, rec
        assert not cuda or peak >= C * D * d * 4, rec  # the maps lived on the device
    if full:
        c, t, _, _ = A.planted(10_000, 150, 384, 768)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        al = vitdecomp.fit_aligner(c, t, method="dual", isometric=True, device=device, progress=False)
        rec = {"check": "compalign-full-size", "device": device, "shape": "N 10000, C 150, 384 -> 768",
               "wall_s": round(time.perf_counter() - t0, 1), "held_out_cosine": al.held_out_cosine,
               "isometry_penalty": A._isometry(al.weight)[0]}
        print(json.dumps(rec), flush=True)
        records.append(rec)
    return records


def throughput(batches, dtypes, n_batches: int) -> None:
    import timm

    import vitdecomp
    from vitdecomp.api import _autocast_dtype

    for arch in ("vit_base_patch16_224", "swin_base_patch4_window7_224", "maxvit_small_tf_224"):
        m = timm.create_model(arch, pretrained=False).eval().cuda()
        for bs in batches:
            x = torch.randn(bs, 3, 224, 224, device="cuda")
            for dt in dtypes:
                ac = _autocast_dtype(dt) if dt != "fp32" else None

                def fwd():
                    with torch.no_grad(), torch.autocast("cuda", dtype=ac or torch.float32, enabled=ac is not None):
                        return vitdecomp.representation(m, x)

                def dec():  # component level; the forward reduced under autocast, the readout in float32
                    d = vitdecomp.decompose(m, x, autocast=ac, compare_float32=False)
                    return d.contributions.to("cpu", non_blocking=True)

                res = {}
                for label, fn in (("forward", fwd), ("decompose", dec)):
                    fn(); _sync()
                    t0 = time.perf_counter()
                    for _ in range(n_batches):
                        fn()
                    _sync()
                    res[label] = bs * n_batches / (time.perf_counter() - t0)
                peak = torch.cuda.max_memory_allocated() / 2**30
                print(json.dumps({"check": "throughput", "model": arch, "batch": bs, "dtype": dt,
                                  "forward_img_s": res["forward"], "decompose_img_s": res["decompose"],
                                  "ratio": res["decompose"] / res["forward"], "peak_gib": peak,
                                  "gpu": torch.cuda.get_device_name()}), flush=True)
                torch.cuda.reset_peak_memory_stats()
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--n-batches", type=int, default=5)
    args = ap.parse_args()
    from _device import require_device

    require_device("cuda")  # this script is the GPU check: it says clearly when there is no GPU
    correctness()
    extraction_equal()
    aligners("cuda", full=not args.quick)
    if not args.quick:
        throughput(args.batches, ("fp32", "bf16"), args.n_batches)


if __name__ == "__main__":
    main()
