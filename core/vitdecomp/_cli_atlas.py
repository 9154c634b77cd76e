"""``vitdecomp atlas``: a browsable, offline web page of every component of a model (a thin layer over
:func:`vitdecomp.atlas`). ``cli.py`` calls :func:`add_commands`."""

from __future__ import annotations

from pathlib import Path

__all__ = ["add_commands"]

_EPILOG = """examples:
  vitdecomp atlas cache/deit --aligner deit.aligner.safetensors --out atlas/
  vitdecomp atlas cache/deit --aligner deit.aligner.safetensors --out atlas/ \\
      --model timm:deit_base_patch16_224 --heatmaps 48          # also token heat maps (decomposes a few images)
  vitdecomp atlas cache/swin --aligner swin.safetensors --out atlas/ --property color --property texture \\
      --pool my_texts.txt --iters 8 --textspan-images 2000
Open atlas/index.html in a browser: it works from file:// with no server and no network. Thumbnails are the
cache's own image files (caches extracted from a dataset object have none). The text model defaults to the
aligner's CLIP model; texts are embedded with the 80 ImageNet templates (--templates none for raw texts).
"""


def cmd_atlas(args) -> int:
    import torch

    from ._cli_interpret import _load_model, _open, _properties, _text_encoder
    from ._atlas import atlas
    from .errors import InputError
    from .properties import list_properties, load_properties
    from .text import load_text_pool

    cache, aligner = _open(args)
    extra = load_properties(args.properties_file) if args.properties_file else {}
    wanted = args.property or (list(extra) if extra else [n for n in list_properties() if not n.startswith("waterbirds")])
    props = _properties(wanted, extra, args.properties_file)
    enc = _text_encoder(args, aligner.clip_model)
    model = inputs = None
    if args.model:
        paths = cache.paths()
        if not paths:
            raise InputError(f"heat maps need the cache's image files, but {args.cache} was extracted from a dataset "
                             "object (no paths); drop --model")
        kw = {"img_size": args.image_size} if args.image_size else {}
        # seeded by load_model: the same random weights as 'vitdecomp extract --random-init --init-seed N'
        loaded = _load_model(args.model, args.weights, args.random_init, args.device, args.init_seed, **kw)
        root = Path(cache.meta.get("data", {}).get("root", "."))
        dtype = next((p.dtype for p in loaded.model.parameters() if p.is_floating_point()), torch.float32)

        def inputs(ix):
            from PIL import Image

            xs = []
            for i in ix:
                with Image.open(root / paths[i]) as im:
                    xs.append(loaded.preprocess(im.convert("RGB")))
            return torch.stack(xs).to(dtype)

        model = loaded.model
    res = atlas(cache, aligner, args.out, encoder=enc, properties=props, pool=load_text_pool(args.pool),
                templates=None if args.templates == "none" else args.templates, model=model, inputs=inputs,
                iters=args.iters, rank=args.rank, textspan_images=args.textspan_images, top_images=args.top_images,
                heatmap_components=args.heatmaps, heatmap_images=args.heatmap_images, k=args.k,
                batch_size=args.batch_size, title=args.title, device=args.device, progress=not args.quiet,
                log=(lambda m: None) if args.quiet else print)
    print(f"wrote {res.path}: {res.components} components, {len(res.properties)} properties, {res.thumbnails} "
          f"thumbnails, {res.heatmaps} heat maps in {res.seconds['total']:.1f} s")
    return 0


def add_commands(subparsers) -> None:
    from ._cli_common import HelpFormatter
    from ._cli_interpret import _aligner_and_text_model_args

    p = subparsers.add_parser("atlas", help="write a browsable offline web page of every component",
                              epilog=_EPILOG, formatter_class=HelpFormatter)
    p.add_argument("cache", help="extraction cache folder (from 'vitdecomp extract')")
    _aligner_and_text_model_args(p)
    p.add_argument("--out", required=True, type=Path, help="output folder (new, empty, or an earlier atlas)")
    p.add_argument("--templates", choices=("imagenet", "simple", "none"), default="imagenet",
                   help="prompt templates for every text (default: CLIP's 80 ImageNet templates)")
    p.add_argument("--pool", default=None, help="TextSpan text pool, one description per line (default: built-in)")
    p.add_argument("--property", action="append", default=None,
                   help="property to score (repeatable; default: every built-in one except Waterbirds')")
    p.add_argument("--properties-file", default=None, help="TOML or JSON file with more properties")
    p.add_argument("--model", default=None, help="the cache's model string, for token heat maps (optional)")
    msrc = p.add_mutually_exclusive_group()
    msrc.add_argument("--weights", metavar="PATH", default=None, help="local checkpoint of --model")
    msrc.add_argument("--random-init", action="store_true", help="random --model weights (tests only)")
    p.add_argument("--init-seed", type=int, default=0, help="seed of the --random-init weights (as in extract)")
    p.add_argument("--image-size", type=int, default=None, help="build --model for this input size (timm)")
    p.add_argument("--iters", type=int, default=5, help="TextSpan texts per component (default 5)")
    p.add_argument("--rank", type=int, default=80, help="TextSpan rank (default 80)")
    p.add_argument("--textspan-images", type=int, default=1000,
                   help="images TextSpan runs on, evenly spaced over the cache (default 1000)")
    p.add_argument("--top-images", type=int, default=6, help="images per direction and sign (default 6)")
    p.add_argument("--heatmaps", type=int, default=32,
                   help="components with token heat maps, largest variance first (default 32; needs --model)")
    p.add_argument("--heatmap-images", type=int, default=3, help="heat maps per component (default 3)")
    p.add_argument("--k", type=int, default=10, help="components kept for retrieval by a property (default 10)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch read from the cache")
    p.add_argument("--title", default=None, help="page title (default: '<model>: component atlas')")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_atlas)
