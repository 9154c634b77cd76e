"""How long ``vitdecomp describe`` spends embedding its text pool: texts as given versus the 80 ImageNet templates.

Embedding the pool dominates ``describe`` (TextSpan itself is a few SVDs). The built-in pool has about 3,500
texts; with templates that is 80 × 3,500 = 280,000 prompts through the text tower. This script times
:meth:`vitdecomp.TextEncoder.encode` on the built-in pool:

* texts as given (``templates=None``, the default since issue #16): the whole pool;
* with the 80 ImageNet templates (the old default): ``--subset`` texts (80 × subset prompts), extrapolated
  linearly to the whole pool (labelled as such), because the whole pool takes hours on a 2-core CPU;
* one TextSpan run (N = 1,000 random aligned outputs, rank 80, 10 iterations) against the whole pool.

Text towers: open_clip architectures with random weights (the time does not depend on the values; ViT-B-16's
text tower is ViT-B-32's, ViT-L-14's is wider) and the concept world's small CLIP.

    python benchmarks/textspan_pool.py --arch ViT-B-32 --arch ViT-L-14 --subset 25 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch


def _encoder(arch: str):
    from vitdecomp.text import TextEncoder

    if arch == "concept-world":
        from vitdecomp.concept_world import load_clip

        model, tok = load_clip()
        return TextEncoder.from_model(model, tok, name="concept-world clip")
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(arch)  # random weights
    return TextEncoder.from_model(model, open_clip.get_tokenizer(arch), name=arch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", default=None, help="open_clip architecture or 'concept-world'")
    ap.add_argument("--subset", type=int, default=25, help="texts embedded with the 80 templates")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from vitdecomp.spans import textspan
    from vitdecomp.text import load_text_pool

    pool = load_text_pool()
    print(f"built-in pool: {len(pool)} texts; torch threads {args.threads}")
    print("| text tower | as given: whole pool (s) | 80 templates: subset (s) | 80 templates: whole pool, "
          "extrapolated (s) | ratio | TextSpan N=1000 (s) |")
    print("|---|---|---|---|---|---|")
    for arch in args.arch or ["concept-world", "ViT-B-32"]:
        enc = _encoder(arch)
        enc.progress = False
        t0 = time.perf_counter()
        T = enc.encode(pool, templates=None)
        t_raw = time.perf_counter() - t0
        sub = pool[: args.subset]
        t0 = time.perf_counter()
        enc.encode(sub, templates="imagenet")
        t_sub = time.perf_counter() - t0
        t_tpl = t_sub * len(pool) / len(sub)
        X = torch.randn(1000, T.shape[1], generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        textspan(X, T, pool, iters=10, rank=80)
        t_span = time.perf_counter() - t0
        print(f"| {arch} | {t_raw:.1f} | {t_sub:.1f} ({len(sub)} texts) | {t_tpl:.0f} | {t_tpl / t_raw:.0f}× | "
              f"{t_span:.1f} |", flush=True)


if __name__ == "__main__":
    main()
