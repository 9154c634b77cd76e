"""Extraction throughput: images/s of ``vitdecomp.extract`` against a plain forward pass over the same data.

Both paths use the same DataLoader (PIL images → the model's preprocessing) and batch size, so the ratio is the
cost of decomposing (per-head components), casting to the cache dtype and writing safetensors shards. With
``--clip`` a third run adds CLIP targets (a second model's forward, with its own preprocessing). ``--autocast
bf16`` runs both the forward and the extraction under autocast (the extraction also measures its error against
float32 once per shard, which is part of its cost).

    python benchmarks/extract_speed.py                                  # deit_small, 64 images, batch 16
    python benchmarks/extract_speed.py --models timm:vit_base_patch16_224 timm:swin_base_patch4_window7_224 \\
        timm:maxvit_small_tf_224 --n 64 --batch 64 --autocast none bf16 --no-clip --device cuda
Random weights (no downloads); timings do not depend on the weight values.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch
from PIL import Image
from skimage import data as skdata


class _Images(torch.utils.data.Dataset):
    def __init__(self, n):
        base = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
        self.ims = [Image.fromarray(base[i % 4]).rotate(7 * i).resize((256, 256)) for i in range(n)]

    def __len__(self):
        return len(self.ims)

    def __getitem__(self, i):
        return self.ims[i], i % 4


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def bench(spec, data, *, batch, autocast, device, clip=None, repeats=1):
    import vitdecomp
    from vitdecomp.api import _autocast_dtype
    from vitdecomp.extraction import _collate, _Items, extract

    loaded = vitdecomp.load_model(spec, random_init=True, device=device)
    ac = _autocast_dtype(autocast)
    dev = torch.device(device)
    items = _Items(data, loaded.preprocess, None)
    loader = torch.utils.data.DataLoader(items, batch_size=batch, collate_fn=_collate, pin_memory=dev.type == "cuda")

    def forward(dl=loader):
        with torch.no_grad(), torch.autocast(dev.type, dtype=ac or torch.float32, enabled=ac is not None):
            for x, *_ in dl:
                vitdecomp.representation(loaded.model, x.to(dev, non_blocking=True))
        _sync(dev)

    few = torch.utils.data.Subset(data, range(min(len(data), batch)))
    t_fwd, t_ext = [], []
    with tempfile.TemporaryDirectory() as tmp:
        extract(loaded, few, f"{tmp}/warm", batch_size=batch, progress=False, device=dev, autocast=ac)  # warm-up
        forward(torch.utils.data.DataLoader(_Items(few, loaded.preprocess, None), batch_size=batch,
                                            collate_fn=_collate))  # warm-up
        for r in range(repeats):  # interleaved, so both paths see the same machine load
            t0 = time.perf_counter()
            forward()
            t_fwd.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            cache = extract(loaded, data, f"{tmp}/a{r}", batch_size=batch, progress=False, device=dev, autocast=ac)
            t_ext.append(time.perf_counter() - t0)
        tf, te = statistics.median(t_fwd), statistics.median(t_ext)
        row = {"model": spec, "batch": batch, "autocast": autocast or "fp32", "device": str(dev),
               "components": len(cache.names), "dim": cache.dim, "repeats": repeats,
               "forward_img_s": len(data) / tf, "extract_img_s": len(data) / te,
               "extract_throughput_vs_forward": tf / te,
               "forward_runs_s": [round(t, 2) for t in t_fwd], "extract_runs_s": [round(t, 2) for t in t_ext],
               "max_reconstruction_error": cache.max_error,
               "error_vs_float32": max((e for e in cache.shard_errors_vs_float32 if e is not None), default=None)}
        if clip:
            clip_model = vitdecomp.load_model(clip, random_init=True, device=device)
            t0 = time.perf_counter()
            extract(loaded, data, f"{tmp}/b", batch_size=batch, clip=clip_model, progress=False, device=dev,
                    autocast=ac)
            row["extract_with_clip_img_s"] = len(data) / (time.perf_counter() - t0)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["timm:deit_small_patch16_224"])
    ap.add_argument("--clip", default="open_clip:ViT-B-16")
    ap.add_argument("--no-clip", action="store_true", help="skip the run with CLIP targets")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--autocast", nargs="+", default=["none"], choices=["none", "bf16", "fp16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved forward/extract runs; medians reported")
    args = ap.parse_args(argv)
    from _device import require_device

    require_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = _Images(args.n)
    print(f"# {args.n} images, batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, device {args.device}", flush=True)
    for spec in args.models:
        for ac in args.autocast:
            row = bench(spec, data, batch=args.batch, autocast=None if ac == "none" else ac, device=args.device,
                        clip=None if args.no_clip else args.clip, repeats=args.repeats)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
