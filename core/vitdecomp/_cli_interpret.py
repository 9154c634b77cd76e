"""CLI subcommands for interpretation via text: ``extract``, ``align``, ``describe``, ``score``.

A thin layer over :func:`vitdecomp.extract`, :func:`vitdecomp.fit_aligner`, :func:`vitdecomp.textspan_all`
(Gandelsman et al. 2024, TextSpan) and :class:`vitdecomp.StreamingScores` (Balasubramanian et al. 2024,
CompAttribute: the mean correlation score_i(P) = (1/k) Σ_j corr_x(⟨a_i, b_j⟩, ⟨s, b_j⟩)). ``cli.py`` calls
:func:`add_commands`.
"""

from __future__ import annotations

import fnmatch
import json
import sys
from pathlib import Path
from typing import List, Optional

__all__ = ["add_commands"]

_EPILOG_EXTRACT = """examples:
  vitdecomp extract timm:deit_base_patch16_224 imagenet_val/ --out cache/deit \\
      --clip open_clip:ViT-L-14/laion2b_s32b_b82k
  vitdecomp extract timm:deit_base_patch16_224 --weights deit.pth photos/ --out cache/deit \\
      --clip open_clip:ViT-L-14 --clip-weights vitl14.bin --dtype float32 --shard-size 2048
  vitdecomp extract open_clip:ViT-B-16/laion2b_s34b_b88k photos/ --out cache/clip   # CLIP analysed in its own space
The folder is searched recursively for .jpg/.jpeg/.png; first-level subfolders are labels. Rerunning the same
command continues an interrupted extraction; a cache made with another model or settings is refused.
"""

_EPILOG_ALIGN = """examples:
  vitdecomp align cache/deit --out deit_to_vitl14.safetensors
  vitdecomp align cache/deit --out a.safetensors --lam 1 --epochs 20 --patience 2 --val-fraction 0.1
  vitdecomp align cache/deit --out a.safetensors --method dual --memory-gb 8   # the dual fit, up to ~23,000 training images
  vitdecomp align cache/deit --out a.safetensors --isometric   # every map an exact isometry
  vitdecomp align cache/deit --out a.safetensors --method joint   # L-BFGS on all maps at once
  vitdecomp align cache/deit --out a.safetensors --method adam --epochs 200   # the stochastic-gradient reference
  vitdecomp align cache/clip --identity --out clip_identity.safetensors   # the analysed model is the CLIP model
"""

_EPILOG_DESCRIBE = """examples:
  vitdecomp describe cache/deit --aligner a.safetensors --components 'blocks.11.attn.head.*'
  vitdecomp describe cache/deit --aligner a.safetensors --pool my_texts.txt --iters 5 --format markdown
  vitdecomp describe cache/deit --aligner a.safetensors --text-weights vitl14.bin --format json --out spans.json
The text model defaults to the aligner's CLIP model. The pool's texts are embedded as given (as Gandelsman et
al. do); --templates imagenet averages each over CLIP's 80 ImageNet prompts instead (80× the encoding work).
"""

_EPILOG_SCORE = """examples:
  vitdecomp score cache/deit --aligner a.safetensors --property color
  vitdecomp score cache/deit --aligner a.safetensors --property color --property texture --plot color.png
  vitdecomp score cache/deit --aligner a.safetensors --properties-file mine.toml --property material --top 20
Columns: score = mean correlation (1/k) Σ_j corr_x(⟨a_i, b_j⟩, ⟨s, b_j⟩) over the property's k text directions
(CompAttribute, in [-1, 1]); VE = share of the component's variance inside the property's text span (in [0, 1]);
specificity = score minus the best score for any other property (the other --property values and --against;
not shown when there is nothing to compare against).
Properties: color texture pattern shape location person animal fabric vehicle waterbirds_spurious
waterbirds_core, those plugins register, and those in --properties-file (TOML or JSON).
"""


# ---------------------------------------------------------------------------------------------------- helpers


def _dtype(name: str):
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def _start(value: str):
    if "," in value:
        a, b = value.split(",", 1)
        return [int(a), int(b)]
    return int(value)


def _load_model(spec, weights, random_init, device, seed=0, **kw):
    from .api import load_model

    return load_model(spec, weights=weights, random_init=random_init, device=device, seed=seed, **kw)


def _text_encoder(args, default_model: Optional[str]):
    from .errors import InputError
    from .text import TextEncoder

    spec = args.text_model or default_model
    if not spec:
        raise InputError("no text model known: pass --text-model open_clip:<arch>/<tag>")
    if not spec.startswith("open_clip:"):
        raise InputError(f"the text model must be an open_clip model string ('open_clip:<arch>/<tag>'), got {spec!r}")
    if args.text_model and default_model and args.text_model != default_model:
        print(f"warning: texts are encoded with {args.text_model}, but the aligner targets {default_model}",
              file=sys.stderr)
    loaded = _load_model(spec, args.text_weights, args.text_random_init, args.device)
    return TextEncoder.from_model(loaded, cache_dir=args.text_cache, device=args.device)


def _open(args):
    from .compalign import Aligner
    from .errors import MismatchError
    from .extraction import ExtractionCache

    cache = ExtractionCache.open(args.cache)
    aligner = Aligner.load(args.aligner, device=args.device, check_model=not args.no_model_check)
    aligner.check_source(cache)  # same names and sizes but another model's weights is an error
    if aligner.names != cache.names:
        from .compalign import _first_difference

        raise MismatchError(
            f"aligner {args.aligner} was fit for other components than cache {args.cache} holds "
            f"({_first_difference(cache.names, aligner.names)})"
        )
    return cache, aligner


def _select(names, patterns) -> List[int]:
    from .errors import InputError

    if not patterns:
        return list(range(len(names)))
    idx = [i for i, n in enumerate(names) if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not idx:
        raise InputError(f"no component matches {patterns}; names look like {list(names[:4])} ... {list(names[-2:])}")
    return idx


def _write(text: str, out: Optional[str]) -> None:
    if out:
        Path(out).write_text(text, encoding="utf-8")
        print(f"wrote {out}", file=sys.stderr)
    else:
        print(text)


# ---------------------------------------------------------------------------------------------------- commands


def cmd_extract(args) -> int:
    from . import distributed
    from .extraction import extract

    distributed.init_from_env(device=args.device)  # no-op unless launched by torchrun with WORLD_SIZE > 1
    # random weights are seeded by load_model (--init-seed): the same on every rank, in every run and command
    kw = {"img_size": args.image_size} if args.image_size else {}
    loaded = _load_model(args.model, args.weights, args.random_init, args.device, args.init_seed, **kw)
    clip = None
    if args.clip:
        clip = loaded if args.clip == args.model and not (args.clip_weights or args.clip_random_init) else \
            _load_model(args.clip, args.clip_weights, args.clip_random_init, args.device, args.init_seed)
    dk = {"heads": not args.no_heads, "start": args.start, "bias": args.bias}
    cache = extract(loaded, args.data, args.out, clip=clip, batch_size=args.batch_size, dtype=_dtype(args.dtype),
                    device=args.device, decompose_kwargs=dk, shard_size=args.shard_size, progress=not args.quiet,
                    resume=not args.no_resume, num_workers=args.workers, autocast=args.autocast,
                    on_error="skip" if args.skip_bad_images else "raise", check_input=not args.no_input_check)
    if not distributed.is_main():
        return 0
    print(f"{cache.path}: {len(cache)} images × {len(cache.names)} components × D={cache.dim} ({args.dtype})"
          + (f", CLIP targets d={cache.target_dim} from {cache.clip_model}" if cache.has_targets else "")
          + f"; largest reconstruction error {cache.max_error:.2e}"
          + (f"; skipped {len(cache.skipped)} unreadable image(s), indices {sorted(cache.skipped)[:10]}"
             if cache.skipped else ""))
    return 0


def cmd_align(args) -> int:
    from .compalign import Aligner, fit_aligner
    from .extraction import ExtractionCache

    cache = ExtractionCache.open(args.cache)
    if args.identity:
        aligner = Aligner.identity(cache.names, cache.dim, model_name=cache.model_name)
        aligner.model_fingerprint = cache.meta.get("model_fingerprint")
        aligner.save(args.out)
        print(f"wrote identity aligner for {cache.model_name} ({len(cache.names)} components, d={cache.dim}) to {args.out}")
        return 0
    aligner = fit_aligner(cache, lam=args.lam, seed=args.seed, val_fraction=args.val_fraction, lr=args.lr,
                          method=args.method, batch_size=args.batch_size, max_epochs=args.epochs,
                          patience=args.patience, penalty_probes=args.penalty_probes,
                          penalty_warmup=args.penalty_warmup, tol=args.tol, memory_gb=args.memory_gb,
                          isometric=args.isometric, device=args.device, progress=not args.quiet)
    aligner.save(args.out)
    held = "n/a" if aligner.held_out_cosine is None else f"{aligner.held_out_cosine:.4f}"
    init = "n/a" if aligner.init_cosine is None else f"{aligner.init_cosine:.4f}"
    unit = {"bcd": "sweep", "joint": "iteration", "dual": "iteration"}.get(aligner.config["method"], "epoch")
    print(f"wrote {args.out}: {len(aligner.names)} maps {aligner.in_dim}→{aligner.out_dim} "
          f"({cache.model_name} → {aligner.clip_model}); held-out cosine {held} on {aligner.config['n_val']} images "
          f"(baseline, one shared linear map of the summed representation: {init}; best {unit} "
          f"{aligner.config['best_epoch']}, {aligner.config['method']}, penalty on {aligner.penalty_side})")
    return 0


def cmd_describe(args) -> int:
    from .text import load_text_pool
    from .spans import textspan_all

    cache, aligner = _open(args)
    idx = _select(cache.names, args.components)
    names = [cache.names[i] for i in idx]
    pool = load_text_pool(args.pool)
    enc = _text_encoder(args, aligner.clip_model)
    templates = None if args.templates == "none" else args.templates
    texts = enc.encode(pool, templates=templates, progress=not args.quiet).to(aligner.bias.device)
    results = {}
    step = max(1, args.component_batch)
    for k in range(0, len(idx), step):  # bounded memory: N × step × d at a time
        part = aligner.align_components(cache, names[k:k + step], batch_size=args.batch_size)
        results.update(textspan_all(part, names[k:k + step], texts, pool, iters=args.iters, rank=args.rank,
                                    progress=not args.quiet and len(idx) > 1))
    if args.format == "json":
        text = json.dumps({n: [{"text": t, "variance_explained": v} for t, v in r] for n, r in results.items()},
                          indent=2)
    elif args.format == "markdown":
        lines = []
        for n, r in results.items():
            lines += [f"### `{n}`", "", "| # | text | variance explained |", "|---|---|---|"]
            lines += [f"| {i} | {t} | {v:.4f} |" for i, (t, v) in enumerate(r, 1)]
            lines += [f"| | *total* | {sum(v for _, v in r):.4f} |", ""]
        text = "\n".join(lines)
    else:
        lines = []
        for n, r in results.items():
            lines.append(f"{n}  (explained by {len(r)} texts: {sum(v for _, v in r):.3f})")
            lines += [f"  {i:3d}. {v:7.4f}  {t}" for i, (t, v) in enumerate(r, 1)]
        text = "\n".join(lines)
    _write(text, args.out)
    return 0


def _properties(names, extra, properties_file) -> dict:
    """The named properties: from the user's file first (``extra``), else the registered ones."""
    from .errors import UnknownPropertyError
    from .properties import get_property

    props = {}
    for name in names:
        if name in extra:
            props[name] = extra[name]
            continue
        try:
            props[name] = get_property(name)
        except UnknownPropertyError as exc:
            if extra:
                raise UnknownPropertyError(f"{exc} (also not in {properties_file}: {list(extra)})") from None
            raise
    return props


def cmd_score(args) -> int:
    from .errors import InputError
    from .properties import load_properties
    from .scores import StreamingScores, rank_components, specificity

    cache, aligner = _open(args)
    extra = load_properties(args.properties_file) if args.properties_file else {}
    wanted = args.property or list(extra)
    if not wanted:
        raise InputError("name at least one --property (e.g. --property color) or give --properties-file")
    against = [n for n in (args.against.split(",") if args.against else []) if n and n not in wanted]
    props = _properties(wanted + against, extra, args.properties_file)
    enc = _text_encoder(args, aligner.clip_model)
    bases = {n: p.embed(enc, progress=False) for n, p in props.items()}
    acc = StreamingScores(bases)
    from tqdm.auto import tqdm

    for batch in tqdm(cache.batches(args.batch_size, targets=False), desc="scoring", unit="batch",
                      disable=args.quiet, total=sum(-(-(b - a) // args.batch_size) for a, b in cache.shard_ranges)):
        acc.update(aligner(batch.contributions))
    scores = acc.scores()
    names = list(cache.names)
    has_spec = len(scores) > 1  # with one property the specificity would only repeat the score
    if args.sort == "specificity" and not has_spec:
        raise InputError("--sort specificity needs other properties to compare against: give several --property "
                         "or --against texture,pattern,...")
    report = {}
    for name in wanted:
        ve = acc.variance_explained(name)
        spec = specificity(scores, name) if has_spec else None
        key = {"score": scores[name], "ve": ve, "specificity": spec}[args.sort]
        ranked = rank_components(key, names, top=args.top)
        report[name] = [
            {"rank": r, "component": c, "score": float(scores[name][names.index(c)]),
             "variance_explained": float(ve[names.index(c)]),
             "specificity": None if spec is None else float(spec[names.index(c)])}
            for r, (c, _) in enumerate(ranked, 1)
        ]
    if args.format == "json":
        text = json.dumps({"images": len(cache), "model": cache.model_name, "clip_model": aligner.clip_model,
                           "properties": {n: list(props[n].descriptions) for n in wanted},
                           "specificity_against": [n for n in scores] if has_spec else [],
                           "columns": {"score": "mean correlation (CompAttribute)",
                                       "variance_explained": "share of the component's variance in the text span",
                                       "specificity": "score minus the best other property's score"},
                           "ranking": report}, indent=2)
    else:
        lines = []
        md = args.format == "markdown"
        for name in wanted:
            head = f"{name}: {', '.join(props[name].descriptions)}  ({len(cache)} images, sorted by {args.sort})"
            lines.append(f"### {head}" if md else head)
            sp = (lambda r: f"{r['specificity']:8.4f}") if has_spec else (lambda r: "")
            if md:
                lines += ["", "| rank | component | score (mean corr.) | VE | " + ("specificity |" if has_spec else ""),
                          "|---|---|---|---|" + ("---|" if has_spec else "")]
                lines += [f"| {r['rank']} | `{r['component']}` | {r['score']:.4f} | {r['variance_explained']:.4f} | "
                          + (f"{sp(r).strip()} |" if has_spec else "") for r in report[name]]
            else:
                w = max(len(r["component"]) for r in report[name])
                lines.append(f"  {'rank':>4}  {'component':<{w}}  {'corr':>8}  {'VE':>8}"
                             + (f"  {'specific':>8}" if has_spec else ""))
                lines += [f"  {r['rank']:>4}  {r['component']:<{w}}  {r['score']:8.4f}  {r['variance_explained']:8.4f}"
                          + (f"  {sp(r)}" if has_spec else "") for r in report[name]]
            if not has_spec:
                lines.append("  (specificity not shown: one property; compare against others with --against)")
            else:
                lines.append(f"  (specificity against: {', '.join(n for n in scores if n != name)})")
            lines.append("")
        text = "\n".join(lines).rstrip()
    _write(text, args.out)
    if args.plot:
        _plot(report, args.sort, args.plot, cache.model_name)
    return 0


def _plot(report, sort, path, model_name) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    field = {"score": "score", "ve": "variance_explained", "specificity": "specificity"}[sort]
    k = len(report)
    rows = max(len(v) for v in report.values())
    fig, axes = plt.subplots(k, 1, figsize=(8, 0.8 + 0.28 * rows * k + 0.6 * k), squeeze=False)
    for ax, (prop, ranked) in zip(axes[:, 0], report.items()):
        labels = [r["component"] for r in ranked][::-1]
        values = [r[field] for r in ranked][::-1]
        ax.barh(range(len(values)), values, color=["C0" if v >= 0 else "C3" for v in values])
        ax.set_yticks(range(len(values)), labels, fontsize=8)
        ax.set_xlabel({"score": "mean correlation with the whole representation (CompAttribute score)",
                       "variance_explained": "share of the component's variance in the property's text span",
                       "specificity": "specificity (score minus best other property's)"}[field])
        ax.set_title(f"{prop} — {model_name}", fontsize=10)
        ax.axvline(0, color="k", lw=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- parser


def _common(p, *, cache=True):
    if cache:
        p.add_argument("cache", help="extraction cache folder (from 'vitdecomp extract')")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _aligner_and_text_model_args(p):
    """``--aligner`` and the text encoder's options (``--text-model/--text-weights/--text-random-init/--text-cache``)."""
    p.add_argument("--aligner", required=True, help="aligner file (from 'vitdecomp align')")
    p.add_argument("--text-model", default=None,
                   help="open_clip model for the texts (default: the aligner's CLIP model)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text-weights", default=None, metavar="PATH", help="local checkpoint of the text model")
    src.add_argument("--text-random-init", action="store_true", help="random text model (tests only)")
    p.add_argument("--text-cache", default=None, metavar="DIR", help="on-disk cache of text embeddings")
    from ._cli_common import model_check_arg

    model_check_arg(p)


def _text_args(p):
    _aligner_and_text_model_args(p)
    p.add_argument("--batch-size", type=int, default=256, help="images per batch read from the cache")
    p.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    p.add_argument("--out", default=None, help="write the report here instead of stdout")


def add_commands(subparsers) -> None:
    """Add ``extract``, ``align``, ``describe`` and ``score`` to the ``vitdecomp`` command line."""
    from ._cli_common import HelpFormatter as fmt, deprecated_alias

    p = subparsers.add_parser("extract", help="decompose a folder of images once and cache the contributions",
                              epilog=_EPILOG_EXTRACT, formatter_class=fmt)
    p.add_argument("model", help="model string, e.g. timm:deit_base_patch16_224")
    p.add_argument("data", help="image folder (recursive; first-level subfolders are labels)")
    p.add_argument("--out", required=True, help="cache folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--random-init", action="store_true", help="random weights (offline work), seeded by --init-seed")
    src.add_argument("--weights", metavar="PATH", help="local checkpoint of the model")
    p.add_argument("--init-seed", type=int, default=0,
                   help="seed of the --random-init / --clip-random-init weights (chained commands agree)")
    p.add_argument("--image-size", type=int, default=None, metavar="N", help="build the model for N×N inputs (timm)")
    deprecated_alias(p, "--img-size", "--image-size", "image_size", type=int)
    p.add_argument("--clip", default=None, help="open_clip model for the CompAlign targets, e.g. "
                   "open_clip:ViT-L-14/laion2b_s32b_b82k")
    csrc = p.add_mutually_exclusive_group()
    csrc.add_argument("--clip-weights", metavar="PATH", default=None, help="local checkpoint of the CLIP model")
    csrc.add_argument("--clip-random-init", action="store_true", help="random CLIP weights (tests only)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="storage dtype of the contributions (computed in float32)")
    p.add_argument("--shard-size", type=int, default=1024, help="images per shard (the unit of resumption)")
    p.add_argument("--no-heads", action="store_true", help="whole attention branches instead of heads")
    p.add_argument("--start", type=_start, default=None, help="decompose blocks from this index (or 'stage,block') on")
    p.add_argument("--bias", choices=("explicit", "paper", "even"), default="explicit")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--autocast", choices=("bf16", "fp16"), default=None,
                   help="run the model in reduced precision; the error against float32 is measured per shard")
    p.add_argument("--no-resume", action="store_true", help="discard an existing cache in --out")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip and record images that cannot be read (default: stop, naming the image)")
    from ._cli_common import input_check_arg

    input_check_arg(p)
    _common(p, cache=False)
    p.set_defaults(func=cmd_extract)

    p = subparsers.add_parser("align", help="fit CompAlign maps from cached contributions to CLIP space",
                              epilog=_EPILOG_ALIGN, formatter_class=fmt)
    _common(p)
    p.add_argument("--out", required=True, help="aligner file (.safetensors)")
    p.add_argument("--identity", action="store_true", help="the analysed model is the CLIP model: a_i = c_i")
    p.add_argument("--lam", type=float, default=1.0, help="weight of the isometry penalty (paper: 1)")
    p.add_argument("--method", choices=("auto", "dual", "bcd", "joint", "adam"), default="auto",
                   help="dual: joint ridge regression in its n × n dual form, polar factors, then joint L-BFGS; "
                        "bcd: block-coordinate Gauss–Newton sweeps; joint: L-BFGS on all maps at once; adam: "
                        "stochastic gradients; auto (default): bcd with at least 2·C·D training images, adam "
                        "from C·D/2 to 2·C·D, below that dual where its kernel fits --memory-gb (about 11,000 "
                        "training images at 2 GiB), else joint")
    p.add_argument("--lr", type=float, default=None, help="Adam step (default 0.05/sqrt(max(D, d)))")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=None,
                   help="maximum sweeps (bcd, default 50), iterations (joint and dual's refinement, 500) or "
                        "epochs (adam, 200); early stopping usually ends sooner")
    p.add_argument("--patience", type=int, default=None,
                   help="sweeps/iterations/epochs without a held-out improvement > --tol before stopping (default "
                        "bcd 2, joint 10, dual 5, adam 5)")
    p.add_argument("--tol", type=float, default=1e-5, help="smallest held-out objective decrease that counts")
    p.add_argument("--memory-gb", type=float, default=2.0,
                   help="bcd: GiB of contributions held at once (components are read in groups that fit); joint: "
                        "GiB for its L-BFGS history (up to 5 pairs of map-sized vectors); dual: GiB for its float64 "
                        "n × n kernel and Cholesky factor (auto takes dual only where they fit)")
    p.add_argument("--isometric", action="store_true",
                   help="every map an exact isometry (polar factors, bias refitted): the constrained problem the "
                        "penalty relaxes; by default the best of the penalised objective, which may trade a small "
                        "isometry deviation for held-out cosine")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--penalty-probes", type=int, default=None,
                   help="estimate the isometry penalty with this many random probes (faster for large D, d)")
    p.add_argument("--penalty-warmup", type=int, default=None,
                   help="sweeps/iterations/epochs over which λ ramps up from 0 (default 1 / 10 / 20)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_align)

    p = subparsers.add_parser("describe", help="TextSpan: describe components with texts from a pool",
                              epilog=_EPILOG_DESCRIBE, formatter_class=fmt)
    _common(p)
    _text_args(p)
    p.add_argument("--pool", default=None, help="text pool file, one description per line (default: built-in)")
    p.add_argument("--components", nargs="+", default=None, metavar="PATTERN",
                   help="component names or glob patterns (default: all)")
    p.add_argument("--iters", type=int, default=10, help="texts per component")
    p.add_argument("--rank", type=int, default=80, help="rank of the component's output space")
    p.add_argument("--component-batch", type=int, default=16, help="components aligned at a time (memory)")
    p.add_argument("--templates", choices=("none", "simple", "imagenet"), default="none",
                   help="embed each pool text as given (none) or averaged over CLIP's prompt templates")
    p.set_defaults(func=cmd_describe)

    p = subparsers.add_parser("score", help="CompAttribute: rank components for a property",
                              epilog=_EPILOG_SCORE, formatter_class=fmt)
    _common(p)
    _text_args(p)
    p.add_argument("--property", action="append", default=None, help="property name (repeatable)")
    p.add_argument("--properties-file", default=None, help="TOML or JSON file with more properties")
    p.add_argument("--top", type=int, default=10, help="rows per property")
    p.add_argument("--sort", choices=("score", "ve", "specificity"), default="score",
                   help="rank by the mean correlation (score), variance explained (ve) or specificity")
    p.add_argument("--against", default=None, metavar="P1,P2",
                   help="comma-separated properties the specificity is taken against, besides the other --property")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw a bar chart of the ranking")
    p.set_defaults(func=cmd_score)
