"""The ``vitdecomp`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import List, Optional

__all__ = ["main", "build_parser"]

from ._cli_common import HelpFormatter, deprecated_alias, input_check_arg, show_defaults

_EPILOG_CHECK = """examples:
  vitdecomp check timm:deit_tiny_patch16_224 --random-init
  vitdecomp check timm:vit_small_patch14_dinov2 --random-init --dtype float64 --tokens
  vitdecomp check open_clip:ViT-B-16 --random-init --batch-size 2 --repeat 3
  vitdecomp check timm:deit_base_patch16_224 --weights deit_base.safetensors
"""

_EPILOG_DECOMPOSE = """examples:
  vitdecomp decompose timm:deit_tiny_patch16_224 --random-init cat.jpg dog.png --out dec.safetensors
  vitdecomp decompose timm:deit_base_patch16_224 --weights deit.pth img/*.jpg --out dec.safetensors --tokens
The output is a safetensors file with 'contributions' [B, C, D], 'representation' [B, D] and JSON metadata
(component names and records, reconstruction error, model, options, image paths); read it back with
vitdecomp.Decomposition.load(path).
"""


def _dtype(name: str):
    import torch

    try:
        return {"float32": torch.float32, "float64": torch.float64}[name]
    except KeyError:
        raise SystemExit(f"--dtype must be float32 or float64, got {name!r}")


def _load(args):
    from . import api

    kw = {}
    size = getattr(args, "image_size", None)
    if size and len(size) == 1:  # one value: build the model for N×N inputs; two: only the check's input H W
        kw["img_size"] = size[0]
    return api.load_model(args.model, weights=args.weights, random_init=args.random_init, seed=args.init_seed,
                          device=getattr(args, "device", "cpu"), **kw)


def _image_size(model, adapter) -> tuple:
    m = adapter.unwrap(model)
    for getter in (
        lambda: tuple(m.patch_embed.img_size),
        lambda: tuple(m.image_size) if isinstance(m.image_size, (tuple, list)) else (m.image_size, m.image_size),
        lambda: tuple(m.default_cfg["input_size"][1:]),
        lambda: tuple(m.pretrained_cfg["input_size"][1:]),
    ):
        try:
            size = getter()
            if size:
                return tuple(int(s) for s in size)
        except Exception:  # noqa: BLE001 - try the next convention
            continue
    return (224, 224)


def cmd_plugins(args) -> int:
    from ._plugins import Registry, default_registry
    from .errors import PluginLoadError

    rc = 0
    try:
        reg = Registry.from_entry_points(lenient=True) if args.lenient else default_registry()
    except PluginLoadError as exc:  # a broken pack never breaks the listing: say what failed, list what loads
        print(f"vitdecomp: error: {exc}", file=sys.stderr)
        print("vitdecomp: listing the plugins that load (as with --lenient):", file=sys.stderr)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            reg = Registry.from_entry_points(lenient=True)
        rc = 1
    for name, why in reg.dropped.items():
        print(f"vitdecomp: skipped {name}: {why}", file=sys.stderr)
    if args.check:
        return _plugins_check(reg, args.check) or rc
    infos = reg.plugins()
    if args.json:
        import attrs

        print(json.dumps([attrs.asdict(i) for i in infos], indent=2))
        return rc
    rows = [("plugin", "origin", "distribution", "version", "loaders", "families")]
    for i in infos:
        rows.append((i.name, "built-in" if i.builtin else "third-party", i.distribution, i.version,
                     ",".join(i.loaders) or "-", ", ".join(i.families) or "-"))
    widths = [max(len(r[k]) for r in rows) for k in range(5)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r[:5], widths)) + "  " + r[5])
    return rc


def _plugins_check(reg, spec: str) -> int:
    """Which adapters claim MODEL (built with random weights: only its structure matters)."""
    from . import api

    from .errors import AmbiguousAdapterError, NoAdapterError

    loaded = api.load_model(spec, random_init=True, registry=reg)
    model = loaded.model
    cls = type(model)
    print(f"{spec}: model class {cls.__module__}.{cls.__qualname__}")
    try:
        choice = reg.choose(model)
    except (NoAdapterError, AmbiguousAdapterError) as exc:
        for name, origin, ok, why in reg.claims(model):
            print(f"  {'CLAIMS' if ok else 'no    '}  {name}  [{origin}]  {why}")
        kind = "NoAdapterError" if isinstance(exc, NoAdapterError) else "AmbiguousAdapterError; pass adapter=<name>"
        print(f"decompose raises {kind}")
        return 1
    for line in choice.lines()[1:]:
        print(line)
    print(f"decompose uses adapter {choice.name!r} ({choice.how})")
    return 0


def cmd_check(args) -> int:
    import torch

    from . import api
    from .decomposition import tolerance_for

    loaded = _load(args)
    model = loaded.model
    dtype = _dtype(args.dtype)
    model = model.to(dtype)
    choice = api.choose_adapter(model, args.adapter)
    adapter = choice.adapter
    from .errors import InputError

    if args.image_size and len(args.image_size) not in (1, 2):
        raise InputError(f"--image-size takes N or H W, got {len(args.image_size)} values")
    size = ((args.image_size * 2)[:2] if args.image_size else _image_size(model, adapter))
    size = tuple(int(v) for v in size)
    if args.repeat < 1:
        raise InputError(f"--repeat must be ≥ 1, got {args.repeat}")
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch_size, 3, *size, generator=g, dtype=dtype).to(args.device)
    from .engine import synchronize

    def timed(fn):
        synchronize(args.device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(args.device)
        return time.perf_counter() - t0, out

    # the decomposition itself is timed: no weight fingerprint (a separate pass over the weights that only aligner
    # checks need; benchmarks/fingerprint.py measures it)
    kw = dict(heads=not args.no_heads, tokens="source" if args.tokens else None, start=args.start, fingerprint=False)
    with torch.no_grad():
        api.representation(model, images, adapter=adapter)  # warm-up
        api.decompose(model, images, **kw, adapter=adapter)
    t_fwd, t_dec = [], []
    for _ in range(args.repeat):  # interleaved, so both see the same machine load
        with torch.no_grad():
            t_fwd.append(timed(lambda: api.representation(model, images, adapter=adapter))[0])
        t, dec = timed(lambda: api.decompose(model, images, **kw, adapter=adapter))
        t_dec.append(t)
    med_fwd, med_dec = statistics.median(t_fwd), statistics.median(t_dec)
    tol = tolerance_for(dtype)
    print(f"model      {loaded.name}  ({type(adapter.unwrap(model)).__name__}, adapter {adapter.name})")
    for k, line in enumerate(choice.lines()):
        print(("adapter    " if k == 0 else "           ") + (line[len("adapter "):] if k == 0 else line))
    print(f"input      {args.batch_size}×3×{size[0]}×{size[1]} {args.dtype}, random normal (seed {args.seed})")
    print(f"components {len(dec)}  representation dim {dec.contributions.shape[-1]}")
    if args.list:
        for c in dec.components:
            print(f"  {c.name:40} {c.kind}")
    else:
        shown = list(dec.names[:4]) + ["..."] + list(dec.names[-3:]) if len(dec) > 8 else list(dec.names)
        print(f"           {', '.join(shown)}")
    if args.tokens:
        g = dec.grid
        print(f"tokens     {g.num_prefix} prefix + {g.h}×{g.w} patches of {g.patch_size[0]}×{g.patch_size[1]} px")
    status = "OK" if dec.error <= tol else "FAILED"
    print(f"error      {dec.error:.3e}  (tolerance {tol:.0e}: {status})")
    rng = (lambda ts: f" [{min(ts) * 1e3:.1f}–{max(ts) * 1e3:.1f}]" if len(ts) > 1 else "")
    print(f"time       median of {args.repeat}: decompose {med_dec * 1e3:.1f} ms{rng(t_dec)}, forward "
          f"{med_fwd * 1e3:.1f} ms{rng(t_fwd)}, ratio {med_dec / max(med_fwd, 1e-9):.2f}×")
    return 0 if dec.error <= tol else 1


def cmd_decompose(args) -> int:
    import torch
    from PIL import Image

    from . import api

    loaded = _load(args)
    model = loaded.model.to(_dtype(args.dtype))
    from .errors import InputError

    batch = []
    for i, path in enumerate(args.images):
        try:
            img = Image.open(path).convert("RGB")
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read image {path!r} (index {i}): {exc}") from exc
        batch.append(loaded.preprocess(img))
    images = torch.stack(batch).to(_dtype(args.dtype))
    dec = api.decompose(model, images, device=args.device, heads=not args.no_heads, tokens="source" if args.tokens else None,
                        start=args.start, bias=args.bias, check=True, check_input=not args.no_input_check)
    # decompose recorded meta["model_fingerprint"], which aligners applied to the file check
    dec.meta.update({"model": loaded.name, "images": [str(p) for p in args.images]})
    dec.save(args.out, tokens=args.tokens)
    print(f"wrote {args.out}: {len(args.images)} images × {len(dec)} components × {dec.contributions.shape[-1]} dims "
          f"(reconstruction error {dec.error:.2e})")
    return 0


def _start(value: str):
    if "," in value:
        a, b = value.split(",", 1)
        return (int(a), int(b))
    return int(value)


def _model_args(p):
    p.add_argument("model", help="model string, e.g. timm:deit_base_patch16_224 or open_clip:ViT-B-16/laion2b_s34b_b88k")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--random-init", action="store_true", help="random weights (offline work), seeded by --init-seed")
    src.add_argument("--weights", metavar="PATH", help="local checkpoint (.safetensors/.pth/.bin, or an open_clip file)")
    p.add_argument("--init-seed", type=int, default=0,
                   help="seed of the --random-init weights (the same in every command, so chained commands agree)")
    p.add_argument("--image-size", type=int, nargs="+", default=None, metavar="N",
                   help="N: build the model for N×N inputs (timm models); check also takes H W (its input only)")
    deprecated_alias(p, "--img-size", "--image-size", "image_size", type=int, nargs=1)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="model and input dtype")
    p.add_argument("--tokens", action="store_true", help="also split attention heads by source token")
    p.add_argument("--no-heads", action="store_true", help="whole attention branches instead of heads")
    p.add_argument("--start", type=_start, default=None, help="decompose blocks from this index (or 'stage,block') on")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitdecomp", description="Exact decomposition of ViT representations.")
    parser.add_argument("--version", action="version", version="vitdecomp 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("plugins", help="list loaded model-family plugins")
    p.add_argument("--json", action="store_true")
    p.add_argument("--lenient", action="store_true", help="skip plugins that fail to load (with a warning)")
    p.add_argument("--check", metavar="MODEL", default=None,
                   help="show which adapters claim MODEL (a model string, built with random weights)")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("check", help="decompose a random batch and report the reconstruction error and timing",
                       epilog=_EPILOG_CHECK, formatter_class=HelpFormatter)
    _model_args(p)
    p.add_argument("--batch-size", type=int, default=2, help="images in the random batch")
    deprecated_alias(p, "--batch", "--batch-size", "batch_size", type=int)
    p.add_argument("--repeat", type=int, default=5, help="timed runs (decompose and forward interleaved); the median is reported")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input batch")
    p.add_argument("--list", action="store_true", help="print every component")
    p.add_argument("--adapter", default=None, metavar="NAME",
                   help="use this adapter instead of dispatch (e.g. 'auto'); the report says which one was used and why")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("decompose", help="decompose image files and write contributions to a safetensors file",
                       epilog=_EPILOG_DECOMPOSE, formatter_class=HelpFormatter)
    _model_args(p)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--bias", default="explicit", choices=("explicit", "paper", "even"),
                   help="biases as components of their own; 'paper': the paper's RepDecompose convention; "
                        "'even': constants split evenly over the other components")
    input_check_arg(p)
    p.set_defaults(func=cmd_decompose)

    for modname in ("_cli_interpret", "_cli_apps", "_cli_demo", "_cli_atlas"):
        try:
            mod = __import__(f"vitdecomp.{modname}", fromlist=["add_commands"])
        except ModuleNotFoundError as exc:
            if exc.name != f"vitdecomp.{modname}":
                raise
            continue
        mod.add_commands(sub)
    show_defaults(parser)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from .errors import VitDecompError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        from ._cli_checks import check_args

        check_args(args)  # argument values, devices and output paths, before any work
        return int(args.func(args) or 0)
    except VitDecompError as exc:
        print(f"vitdecomp: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
