"""Extraction throughput: images/s of ``vitdecomp.extract`` against a plain forward pass over the same data.

Both paths use the same DataLoader (PIL images → the model's preprocessing) and batch size, so the ratio is the
cost of decomposing (per-head components), casting to the cache dtype and writing safetensors shards. A third run
adds CLIP targets (a second model's forward, with its own preprocessing).

    python benchmarks/extract_speed.py                       # deit_small, 64 images, batch 16
    python benchmarks/extract_speed.py --model timm:vit_base_patch16_224 --n 32 --batch 8
Random weights (no downloads); timings do not depend on the weight values.
"""

from __future__ import annotations

import argparse
import platform
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="timm:deit_small_patch16_224")
    ap.add_argument("--clip", default="open_clip:ViT-B-16")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import vitdecomp
    from vitdecomp.extraction import _collate, _Items, extract

    loaded = vitdecomp.load_model(args.model, random_init=True)
    data = _Images(args.n)
    print(f"{args.model}: {args.n} images, batch {args.batch}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")

    # plain forward over the same loader (representation = the tensor that is decomposed)
    items = _Items(data, loaded.preprocess, None)
    loader = torch.utils.data.DataLoader(items, batch_size=args.batch, collate_fn=_collate)
    with torch.no_grad():
        vitdecomp.representation(loaded.model, next(iter(loader))[0])  # warm-up
        t0 = time.perf_counter()
        for x, *_ in loader:
            vitdecomp.representation(loaded.model, x)
        t_fwd = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        extract(loaded, data, f"{tmp}/warm", batch_size=args.batch, progress=False)  # warm-up (fingerprint etc.)
        t0 = time.perf_counter()
        cache = extract(loaded, data, f"{tmp}/a", batch_size=args.batch, progress=False)
        t_ext = time.perf_counter() - t0
        C, D = len(cache.names), cache.dim
        clip = vitdecomp.load_model(args.clip, random_init=True)
        t0 = time.perf_counter()
        extract(loaded, data, f"{tmp}/b", batch_size=args.batch, clip=clip, progress=False)
        t_clip = time.perf_counter() - t0

    rows = [("plain forward", t_fwd), ("extract (float16 cache)", t_ext), (f"extract + CLIP targets ({args.clip})", t_clip)]
    print(f"components C={C}, D={D}; cache {args.n * C * D * 2 / 2**20:.1f} MiB")
    print(f"{'path':45} {'images/s':>9} {'× forward':>10}")
    for name, t in rows:
        print(f"{name:45} {args.n / t:9.2f} {t / t_fwd:10.2f}")


if __name__ == "__main__":
    main()
