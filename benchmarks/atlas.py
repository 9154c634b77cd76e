"""How long a large component atlas takes to build, and how fast its pages load in a browser.

    python benchmarks/atlas.py                          # Swin-B layout (429 components), 10,000 images
    python benchmarks/atlas.py --images 2000 --threads 1 --work /tmp/atlas-bench

A real timm Swin with Swin-B's layout (depths 2-2-18-2, heads 4-8-16-32: 429 components) but narrow
(``--embed-dim``, default 32 → D = 256) and on 64×64 concept-world images, random weights, is extracted once into
a float16 cache of ``--images`` image files (not timed). Its aligner is a random linear map into the concept-world
CLIP's space (d = that CLIP's width; fitting is not what is measured here), the texts come from that CLIP's text
tower, the TextSpan pool is the built-in pool. Then :func:`vitdecomp.atlas` is timed per stage, with token heat maps
from the model, and headless Chromium (when installed) loads the index and a component page: the load time is
``performance`` navigation start → load event. Prints a Markdown row for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--embed-dim", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--textspan-images", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--heatmaps", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vitdecomp-atlas-bench"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from vitdecomp import datasets as D
    from vitdecomp._atlas import atlas, check_site
    from vitdecomp.api import load_model
    from vitdecomp.compalign import Aligner
    from vitdecomp.concept_world import evaluate as E
    from vitdecomp.concept_world import models as M
    from vitdecomp.extraction import ExtractionCache, extract
    from vitdecomp.plotting import to_rgb
    from vitdecomp.text import load_text_pool

    work = args.work
    imgs = work / "images"
    torch.manual_seed(0)
    loaded = load_model("timm:swin_base_patch4_window7_224", random_init=True, img_size=64, window_size=2,
                        embed_dim=args.embed_dim)
    if not (imgs / f"{args.images - 1:05d}.png").is_file():
        from PIL import Image

        imgs.mkdir(parents=True, exist_ok=True)
        X = D.ConceptWorld(args.images, 11).tensors()
        for i in range(args.images):
            Image.fromarray(to_rgb(X[i], mean=D.MEAN, std=D.STD)).save(imgs / f"{i:05d}.png")
        del X
    cache_dir = work / f"cache-{args.images}-{args.embed_dim}"
    t0 = time.perf_counter()
    cache = extract(loaded, imgs, cache_dir, batch_size=64, dtype=torch.float16, shard_size=2048, progress=True)
    t_extract = time.perf_counter() - t0
    print(cache, f"(extract or reopen: {t_extract:.0f} s)")
    cache = ExtractionCache.open(cache_dir)

    clip = M.load("clip")
    enc = E.text_encoder(clip)
    d = enc.dim
    g = torch.Generator().manual_seed(0)
    C, Dm = len(cache.names), cache.dim
    aligner = Aligner(torch.randn(C, Dm, d, generator=g) / Dm ** 0.5, torch.zeros(d), cache.names,
                      model_name=cache.model_name, clip_model="vitdecomp:concept_world/clip")
    pool = load_text_pool()
    paths, root = cache.paths(), Path(cache.meta["data"]["root"])

    def inputs(ix):
        from PIL import Image

        xs = []
        for i in ix:
            with Image.open(root / paths[i]) as im:
                xs.append(loaded.preprocess(im.convert("RGB")))
        return torch.stack(xs)

    out = work / "atlas"
    t0 = time.perf_counter()
    res = atlas(cache, aligner, out, encoder=enc, templates=None,
                properties={f: E.property_texts(f) for f in D.FACTOR_NAMES}, pool=pool, model=loaded.model,
                inputs=inputs, iters=args.iters, textspan_images=args.textspan_images,
                heatmap_components=args.heatmaps, progress=False)
    wall = time.perf_counter() - t0
    problems = check_site(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    load_index = load_comp = None
    from vitdecomp._browser import Chromium, find_chromium

    if find_chromium():
        with Chromium() as b:
            reps = [b.open(res.path) for _ in range(3)]
            load_index = sorted(r.load_ms for r in reps)[1]
            comp = b.open(out / "c" / "0100.html")
            load_comp = comp.load_ms
            ok = all(r.ok for r in reps) and comp.ok
    else:
        ok = None
    s = res.seconds
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    print(f"atlas: {C} components, D = {Dm}, d = {d}, {len(cache)} images, pool {len(pool)} texts, "
          f"{res.thumbnails} thumbnails, {res.heatmaps} heat maps, {res.files} files, {size / 2**20:.1f} MiB; "
          f"structural problems: {sum(map(len, problems.values()))}; browser ok: {ok}")
    print("| images | components | TextSpan images | texts (s) | pass 1 (s) | TextSpan (s) | pass 2 (s) | heat maps (s) "
          "| thumbnails (s) | pages (s) | total (s) | index load (ms) | component page load (ms) |")
    print(f"| {len(cache)} | {C} | {min(args.textspan_images, len(cache))} | {s['texts']:.1f} | {s['pass1']:.1f} | "
          f"{s['textspan']:.1f} | {s['pass2']:.1f} | {s['heatmaps']:.1f} | {s['thumbnails']:.1f} | {s['pages']:.1f} | "
          f"{wall:.1f} | {load_index if load_index is None else round(load_index)} | "
          f"{load_comp if load_comp is None else round(load_comp)} |")


if __name__ == "__main__":
    main()
