"""CLI commands for the applications (METHOD.md §6): ``retrieve``, ``heatmap``, ``segment``, ``ablate``,
``spurious``. Each is a thin layer over :mod:`vitdecomp.retrieval`, :mod:`vitdecomp.heatmap`,
:mod:`vitdecomp.segmentation` and :mod:`vitdecomp.ablation`, writing JSON, arrays and PNGs under ``--out``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["add_commands"]

from ._cli_common import HelpFormatter as _RAW, deprecated_alias, input_check_arg, model_check_arg, refuse_other_model

_EPILOG_RETRIEVE = """examples:
  # rank images of an extraction cache by "a beach", restricted to the top-10 components for 'location'
  vitdecomp retrieve cache/ --aligner deit.aligner.safetensors --property location --text "a beach" --out ret/
  # images whose colour resembles that of the cache's image 12 (top components by specificity for 'color')
  vitdecomp retrieve cache/ --aligner deit.aligner.safetensors --property color --reference 12 --out ret/
  # a reference outside the cache is decomposed with the model
  vitdecomp retrieve cache/ --aligner a.safetensors --property pattern --reference zebra.jpg \\
      --model timm:deit_base_patch16_224 --out ret/
The cache comes from vitdecomp.extract(model, folder, out_dir); the aligner from vitdecomp.fit_aligner. Writes
ranking.json (property-restricted and whole-representation rankings) and sheet.png (one row each).
"""

_EPILOG_HEATMAP = """examples:
  vitdecomp heatmap timm:deit_base_patch16_224 cat.jpg --aligner deit.aligner.safetensors --text "striped pattern" \\
      --cache cache/ --k 5 --out heat/
  vitdecomp heatmap timm:swin_base_patch4_window7_224 beach.jpg --aligner swin.aligner.safetensors \\
      --property location --cache cache/ --out heat/
Components: the top --k attention heads by variance explained for the text (or property), computed over --cache
(or over the given images when there are several), or --components NAME ... Writes <image>_heatmap.png (the
map on the photo at full resolution, with title, colour bar and a diverging colour map centred at 0),
<image>_heatmap.npy (raw map on the model's input), <image>_heatmap_photo.npy (the map carried back through the
model's resize and centre crop onto the photo, NaN where the crop removed it), <image>_overlay.png (pixel-exact
overlay on the model's input) and heatmap.json.
"""

_EPILOG_SEGMENT = """examples:
  vitdecomp segment timm:deit_base_patch16_224 imagenet-seg/ --out seg/ --examples 8
  vitdecomp segment timm:maxvit_small_tf_224.in1k data/ --out seg/ --limit 500 --batch-size 16
Folder layout: ROOT/images/<name>.jpg, ROOT/masks/<name>.png (non-zero = foreground; without masks/ only the
maps are written), optional ROOT/labels.csv with "<name>,<class index>" (default: the predicted class).
Writes metrics.json (pixel accuracy, mIoU foreground-only and two-class, mAP) and, per example, pixel-exact
overlays (<name>_saliency.png, <name>_mask.png) and a figure with colour bar and legend (<name>_figure.png).
"""

_EPILOG_ABLATE = """examples:
  vitdecomp ablate timm:deit_base_patch16_224 --data val/ --heldout train_subset/ --labels-file classes.txt --out abl/
  vitdecomp ablate timm:swin_base_patch4_window7_224 --data val/ --heldout held/ --order execution --out abl/
Folders hold one subfolder per class: integer names are class indices, otherwise --labels-file lists the class
folder names in class-index order (default: sorted names). Means come from --heldout. 'score' order ablates the
components with the smallest direct effect (estimated on --heldout) first; --scores FILE (JSON {name: score})
overrides. Writes curves.json and curves.png.
"""

_EPILOG_SPURIOUS = """examples:
  vitdecomp spurious timm:deit_base_patch16_224 --weights deit_waterbirds.pth waterbirds/ \\
      --aligner deit.aligner.safetensors --k 10 --out wb/
  vitdecomp spurious timm:vit_base_patch16_224.dino --weights dino_wb.pth groups/ --aligner dino.safetensors --out wb/
DATA is Waterbirds (metadata.csv: img_filename, y, place, split 0/1/2 = train/val/test) or folders
DATA/<split>/<class>_<place>/*.jpg. Scores and ablation means come from --heldout-split (default val), never from
the test split. Writes results.json and groups.png.
"""


# ---------------------------------------------------------------------------------------------------- shared


def _model_args(p, *, required: bool = True):
    if required:
        p.add_argument("model", help="model string, e.g. timm:deit_base_patch16_224")
    else:
        p.add_argument("--model", default=None, help="model string, e.g. timm:deit_base_patch16_224")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--random-init", action="store_true",
                     help="random weights (offline work, tests), seeded by --init-seed")
    src.add_argument("--weights", metavar="PATH", help="local checkpoint")
    p.add_argument("--init-seed", type=int, default=0,
                   help="seed of the --random-init weights (the same in every command, so chained commands agree)")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="build the model for N×N inputs (timm models)")
    deprecated_alias(p, "--img-size", "--image-size", "image_size", type=int)
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra constructor argument, e.g. depth=2 (repeatable; values parsed as JSON when possible)")


def _model_kwargs(items) -> dict:
    from .errors import InputError

    kw = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--model-arg {item!r} is not KEY=VALUE")
        try:
            kw[key] = json.loads(value)
        except ValueError:
            kw[key] = value
    return kw


def _clip_args(p):
    p.add_argument("--aligner", required=True, metavar="PATH", help="CompAlign aligner (vitdecomp.fit_aligner, .save)")
    p.add_argument("--text-model", default=None,
                   help="open_clip model for the texts, e.g. open_clip:ViT-L-14/laion2b_s32b_b82k "
                        "(default: the aligner's CLIP model)")
    p.add_argument("--text-weights", metavar="PATH", default=None, help="local checkpoint of the text model")
    p.add_argument("--text-random-init", action="store_true", help="random text model (tests only)")
    deprecated_alias(p, "--clip", "--text-model", "text_model")
    deprecated_alias(p, "--clip-weights", "--text-weights", "text_weights")
    deprecated_alias(p, "--clip-random-init", "--text-random-init", "text_random_init", flag=True)
    p.add_argument("--text-cache", metavar="DIR", default=None, help="cache text embeddings on disk here")
    p.add_argument("--properties-file", metavar="PATH", default=None, help="TOML/JSON with your own properties")
    model_check_arg(p)


def _out_args(p):
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu", help="torch device for models and batch math, e.g. cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    deprecated_alias(p, "--no-progress", "--quiet", "quiet", flag=True)


def _load_model(args):
    from . import api

    kw = _model_kwargs(getattr(args, "model_arg", None))
    if getattr(args, "image_size", None):
        kw["img_size"] = args.image_size
    return api.load_model(args.model, weights=args.weights, random_init=args.random_init, seed=args.init_seed,
                          device=args.device, **kw)


def _aligner(args):
    from .compalign import Aligner

    return Aligner.load(args.aligner, device=args.device, check_model=not args.no_model_check)


def _encoder(args, aligner):
    from .errors import InputError
    from .text import TextEncoder

    name = args.text_model or aligner.clip_model
    if not name:
        raise InputError("the aligner does not name its CLIP model; pass --text-model (e.g. "
                         "open_clip:ViT-L-14/laion2b_s32b_b82k)")
    if name.startswith("open_clip:"):
        name = name[len("open_clip:"):]
    pretrained = None
    if args.text_random_init:
        name = name.split("/", 1)[0]
    elif args.text_weights:
        name, pretrained = name.split("/", 1)[0], args.text_weights
    import torch

    with torch.random.fork_rng(devices=[]):  # a random text model is seeded like every --random-init model
        torch.manual_seed(getattr(args, "init_seed", 0))
        enc = TextEncoder.from_pretrained(name, pretrained, cache_dir=args.text_cache, device=args.device)
    enc.progress = not args.quiet
    return enc


def _property(args, name):
    from .properties import get_property, load_properties

    if args.properties_file:
        mine = load_properties(args.properties_file)
        if name in mine:
            return mine[name]
    return get_property(name)


def _all_property_names(args) -> List[str]:
    from .properties import list_properties, load_properties

    names = [n for n in list_properties(False) if not n.startswith("waterbirds")]
    if args.properties_file:
        names += [n for n in load_properties(args.properties_file) if n not in names]
    return names


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def _decompose_paths(loaded, paths: Sequence[Path], *, batch_size: int, progress: bool, desc: str, tokens=None,
                     device=None, check_input: bool = True, aligner=None):
    """Contributions [N, C, D] and representations [N, D] of image files (on the host), decomposed in batches on
    ``device`` (results copied to the host asynchronously, one wait at the end). The model's weight fingerprint
    is computed once; ``aligner`` is checked against it before any image is decomposed."""
    from .engine import to_host, synchronize

    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    from .api import decompose
    from .errors import EmptyDatasetError, InputError

    if not paths:
        raise EmptyDatasetError(f"{desc}: no images")
    model = loaded.model
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    cs, zs, names = [], [], None
    from ._fingerprint import weights_fingerprint

    fp = weights_fingerprint(model)  # once, not per batch
    if aligner is not None:
        aligner.check_source({"model_fingerprint": fp}, where=f"the model {loaded.name}")
    for i in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch", disable=not progress):
        xs = []
        for p in paths[i:i + batch_size]:
            try:
                with Image.open(p) as im:
                    xs.append(loaded.preprocess(im.convert("RGB")))
            except (OSError, ValueError) as exc:
                raise InputError(f"cannot read image {str(p)!r}: {exc}") from exc
        dec = decompose(model, torch.stack(xs).to(dtype), tokens=tokens, device=device, fingerprint=fp,
                        check_input=check_input)
        names = dec.names
        cs.append(to_host(dec.contributions))
        zs.append(to_host(dec.representation))
    synchronize(next((p.device for p in model.parameters()), "cpu"))
    return torch.cat(cs), torch.cat(zs), names


def _progress(args) -> bool:
    return not getattr(args, "quiet", False)


def _check_aligner(aligner, path, names, dim, model_name=None, what="the model") -> None:
    """Refuse an aligner fit for another model (component names, D, model string)."""
    refuse_other_model("aligner", path, names=aligner.names, model_name=aligner.model_name, dim=aligner.in_dim,
                       expected_names=names, expected_model=model_name, expected_dim=dim, expected_what=what)


def _check_cache(cache, path, loaded, names, dim) -> None:
    """Refuse an extraction cache made with another model than ``loaded`` (names, D, model string, weights)."""
    from ._fingerprint import weights_fingerprint

    refuse_other_model("cache", path, names=cache.names, model_name=cache.model_name, dim=cache.dim,
                       fingerprint=cache.meta.get("model_fingerprint"), expected_names=names,
                       expected_model=loaded.name, expected_dim=dim,
                       expected_fingerprint=weights_fingerprint(loaded.model),
                       expected_what=f"the model {loaded.name}")


# ---------------------------------------------------------------------------------------------------- retrieve


def cmd_retrieve(args) -> int:
    from .errors import InputError
    from .extraction import ExtractionCache
    from .retrieval import property_scores, retrieve_by_image, retrieve_by_text
    from .scores import specificity

    if (args.text is None) == (args.reference is None):
        raise InputError("give exactly one of --text or --reference")
    cache = ExtractionCache.open(args.cache)
    if args.reference is not None and args.reference.isdigit() and int(args.reference) >= len(cache):
        raise InputError(f"--reference {args.reference}: the cache holds images 0..{len(cache) - 1}")
    aligner = _aligner(args)
    _check_aligner(aligner, args.aligner, cache.names, cache.dim, cache.model_name, what=f"cache {args.cache}")
    aligner.check_source(cache)
    enc = _encoder(args, aligner)
    prop = _property(args, args.property)
    out = Path(args.out)
    progress = _progress(args)
    bases = {prop.name: prop.embed(enc)}
    if args.reference is not None:
        for name in (args.against.split(",") if args.against else _all_property_names(args)):
            if name and name != prop.name:
                bases[name] = _property(args, name).embed(enc)
    acc = property_scores(cache, bases, aligner=aligner, batch_size=args.batch_size * 16, progress=progress,
                          device=args.device)
    paths = cache.paths()
    root = Path(cache.meta.get("data", {}).get("root", "."))
    if args.text is not None:
        t = enc.encode([args.text])[0]
        res = retrieve_by_text(cache, t, aligner=aligner, component_scores=acc.mean_correlation(prop.name), k=args.k,
                               query=f"text {args.text!r}, property {prop.name}", device=args.device,
                               include_constant=args.include_constant)
        query_img = None
    else:
        sc = acc.scores()
        spec = specificity(sc, prop.name)
        ref = args.reference
        if ref.isdigit():
            reference, query_img = int(ref), (root / paths[int(ref)] if paths else None)
        elif paths and ref in paths:
            reference, query_img = paths.index(ref), root / ref
        elif paths and Path(ref).resolve() in [(root / p).resolve() for p in paths]:
            reference = [(root / p).resolve() for p in paths].index(Path(ref).resolve())
            query_img = Path(ref)
        else:
            if not Path(ref).is_file():
                raise InputError(f"--reference {ref!r} is neither an index, a path in the cache nor an image file")
            if not args.model:
                raise InputError(f"--reference {ref!r} is not in the cache; pass --model to decompose it")
            loaded = _load_model(args)
            c, _, names = _decompose_paths(loaded, [Path(ref)], batch_size=1, progress=False, desc="reference",
                                           device=args.device, check_input=not args.no_input_check)
            _check_cache(cache, args.cache, loaded, names, c.shape[-1])
            reference, query_img = c[0], Path(ref)
        res = retrieve_by_image(cache, reference, component_scores=spec, k=args.k,
                                query=f"reference {ref}, property {prop.name}", device=args.device,
                                include_constant=args.include_constant)
    ranked, base = res.ranked(args.top), res.ranked(args.top, baseline=True)
    _print_selection(res, "CompAttribute score" if args.text is not None else "specificity")
    print(f"{'rank':>4}  {'property-restricted':40} {'whole representation':40}")
    for i, ((a, sa), (b, sb)) in enumerate(zip(ranked, base)):
        print(f"{i + 1:>4}  {str(a)[:30]:30} {sa:9.4f} {str(b)[:30]:30} {sb:9.4f}")
    _write_json(out / "ranking.json", {**res.as_dict(args.top), "k": args.k, "cache": str(args.cache)})
    if paths:
        from .plotting import contact_sheet

        rows = {f"{prop.name} (top {args.k})": [root / str(i) for i, _ in ranked],
                "whole representation": [root / str(i) for i, _ in base]}
        titles = [[f"{s:.3g}" for _, s in ranked], [f"{s:.3g}" for _, s in base]]
        if query_img is not None:
            rows = {"query": [query_img], **rows}
            titles = [["reference"]] + titles
        contact_sheet(None, out / "sheet.png", rows=rows, titles=titles, title=res.query)
        print(f"wrote {out / 'ranking.json'} and {out / 'sheet.png'}")
    else:
        print(f"wrote {out / 'ranking.json'} (the cache has no image paths: no contact sheet)")
    return 0


def _print_selection(res, what: str) -> None:
    """The chosen components with their scores, what was skipped, and any warning about the selection."""
    import sys

    print(f"{res.query}: {len(res.components)} components chosen by {what}"
          + (f" (carrying {100 * res.variance_share:.3g}% of the component variance)"
             if res.variance_share is not None else ""))
    for name, sc in res.selection():
        print(f"  {name:40} {what} {sc:+.4f}" if sc is not None else f"  {name}")
    if res.skipped:
        print(f"  (not eligible: {len(res.skipped)} constant or zero-variance components, e.g. "
              f"{', '.join(res.skipped[:3])}; use --include-constant to allow them)")
    for note in res.notes:
        print(f"warning: {note}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- heatmap


def cmd_heatmap(args) -> int:
    import numpy as np
    import torch

    from .errors import InputError
    from .heatmap import map_to_photo, preprocess_geometry, token_heatmap
    from .plotting import heatmap_figure, overlay
    from .retrieval import property_scores

    if (args.text is None) == (args.property is None):
        raise InputError("give exactly one of --text or --property")
    aligner = _aligner(args)
    unknown = [c for c in args.components or () if c not in aligner.names]
    if unknown:
        raise InputError(f"--components {' '.join(unknown)}: not components of the aligner's model; names look like "
                         f"{list(aligner.names[:3])} ... {list(aligner.names[-2:])}")
    loaded = _load_model(args)
    enc = _encoder(args, aligner)
    if args.text is not None:
        t = enc.encode([args.text])[0]
        basis, query = t[None], f"text {args.text!r}"
    else:
        basis, query, t = _property(args, args.property).embed(enc), f"property {args.property}", None
    from PIL import Image

    from .api import decompose

    paths = [Path(p) for p in args.images]
    dtype = next(loaded.model.parameters()).dtype
    from ._fingerprint import weights_fingerprint

    fp = weights_fingerprint(loaded.model)  # once for every image; the aligner is checked against it first
    aligner.check_source({"model_fingerprint": fp}, where=f"the model {loaded.name}")
    decs, inputs = [], []
    for p in paths:
        try:
            with Image.open(p) as im:
                x = loaded.preprocess(im.convert("RGB"))[None]
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read image {str(p)!r}: {exc}") from exc
        inputs.append(x[0])
        decs.append(decompose(loaded.model, x.to(dtype), tokens="source", device=args.device, fingerprint=fp,
                              check_input=not args.no_input_check))
    names, dim = decs[0].names, decs[0].contributions.shape[-1]
    _check_aligner(aligner, args.aligner, names, dim, loaded.name, what=f"the model {loaded.name}")
    scores = None
    if not args.components:
        if args.cache:
            from .extraction import ExtractionCache

            source = ExtractionCache.open(args.cache)
            _check_cache(source, args.cache, loaded, names, dim)
        elif len(paths) >= 2:
            source = torch.cat([d.contributions for d in decs])
        else:
            raise InputError("ranking components by variance explained needs several images: pass --cache DIR "
                             "(an extraction cache of the same model) or --components NAME ...")
        scores = property_scores(source, basis, aligner=aligner, batch_size=256,
                                 device=args.device).variance_explained()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mean, std = _mean_std(loaded)
    record = {"query": query, "images": {}}
    label = "⟨Σ_i c_i(p) W_i, t⟩ (signed)" if t is not None else "‖B_P Σ_i c_i(p) W_i‖ (property subspace norm)"
    for p, x, dec in zip(paths, inputs, decs):
        hm = token_heatmap(dec, aligner, text=t, basis=None if t is not None else basis, components=args.components,
                           scores=scores, k=args.k, kinds=None if args.all_kinds else ("head",), mode=args.mode,
                           query=query, input_size=tuple(x.shape[-2:]), grid=args.grid)
        heat = hm.maps[0]
        np.save(out / f"{p.stem}_heatmap.npy", hm.numpy()[0])
        comps = ", ".join(hm.components[:3]) + (f" + {len(hm.components) - 3} more" if len(hm.components) > 3 else "")
        entry = {"array": f"{p.stem}_heatmap.npy", "min": float(heat.min()), "max": float(heat.max())}
        with Image.open(p) as im:
            photo = im.convert("RGB")
        try:
            geo = preprocess_geometry(loaded.preprocess, (photo.height, photo.width))
        except InputError as exc:  # a preprocessing we cannot invert: draw on the model's input, and say so
            geo, where = None, f"drawn on the model's input ({exc})"
        if geo is not None:
            on_photo = map_to_photo(heat, geo, mode=args.mode)
            np.save(out / f"{p.stem}_heatmap_photo.npy", on_photo.numpy())
            entry["photo_array"] = f"{p.stem}_heatmap_photo.npy"
            where = f"on the photo through {' + '.join(geo.steps) or 'no resize'}"
            image, shown = photo, on_photo
        else:
            image, shown = x, heat
        heatmap_figure(image, shown, out / f"{p.stem}_heatmap.png", title=f"{query} — {comps}", label=label,
                       alpha=args.alpha, mean=mean, std=std, note=f"grid: {hm.grid_description()}; {where}")
        overlay(x, heat, out / f"{p.stem}_overlay.png", alpha=args.alpha, mean=mean, std=std)
        entry.update({"png": f"{p.stem}_heatmap.png", "overlay": f"{p.stem}_overlay.png", "placement": where,
                      "grid": hm.grid_description()})
        record["images"][str(p)] = entry
        record["components"] = list(hm.components)
    _write_json(out / "heatmap.json", record)
    print(f"{query}; components: {', '.join(record['components'])}")
    print(f"wrote {len(paths)} heat map(s) to {out}")
    return 0


def _mean_std(loaded):
    for t in getattr(loaded.preprocess, "transforms", []):
        if type(t).__name__ == "Normalize":
            return tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    return None, None


# ---------------------------------------------------------------------------------------------------- segment


def cmd_segment(args) -> int:
    import numpy as np
    from PIL import Image

    from .plotting import overlay, segmentation_figure
    from .segmentation import evaluate_segmentation

    loaded = _load_model(args)
    ev = evaluate_segmentation(loaded.model, args.root, preprocess=loaded.preprocess, batch_size=args.batch_size,
                               limit=args.limit, mode=args.mode, keep=args.examples, progress=_progress(args),
                               device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for (name, rgb, sal, mask, gt), cls in zip(ev.examples, ev.classes):
        overlay(rgb, sal, out / f"{name}_saliency.png", alpha=0.5)
        m = np.zeros(rgb.shape, dtype=np.uint8)
        m[..., 1] = mask.numpy() * 255
        if gt is not None:
            m[..., 0] = gt.numpy() * 255  # red: ground truth, green: predicted, yellow: both
        Image.fromarray(((rgb.astype(np.float64) * 0.5) + m * 0.5).astype(np.uint8)).save(out / f"{name}_mask.png")
        segmentation_figure(rgb, sal, mask, out / f"{name}_figure.png", truth=gt,
                            title=f"{name}: class {cls}, {loaded.name}")
    rec = {"root": str(args.root), "num_images": len(ev.names),
           "metrics": ev.metrics.as_dict() if ev.metrics is not None else None,
           "classes": dict(zip(ev.names, ev.classes))}
    _write_json(out / "metrics.json", rec)
    if ev.metrics is not None:
        m = ev.metrics
        print(f"images {m.num_images}  pixel accuracy {m.pixel_accuracy:.3f}  mIoU (foreground) {m.miou_foreground:.3f}  "
              f"mIoU (two-class) {m.miou_two_class:.3f}  mAP {m.mean_ap:.3f}  mAP (two-class) {m.mean_ap_two_class:.3f}")
    else:
        print(f"segmented {len(ev.names)} images (no masks/ folder: no metrics)")
    print(f"wrote {out / 'metrics.json'} and {len(ev.examples)} example(s)")
    return 0


# ---------------------------------------------------------------------------------------------------- ablate


def _class_folder(root, labels_file: Optional[str]):
    from .errors import EmptyDatasetError, InputError
    from .extraction import IMAGE_SUFFIXES

    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root} is not a directory of class folders")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if labels_file:
        order = [s.strip() for s in Path(labels_file).read_text().splitlines() if s.strip()]
        cmap = {n: i for i, n in enumerate(order)}
        unknown = [c for c in classes if c not in cmap]
        if unknown:
            raise InputError(f"class folders {unknown[:5]} of {root} are not in {labels_file}")
    elif classes and all(c.isdigit() for c in classes):
        cmap = {c: int(c) for c in classes}
    else:
        cmap = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for c in classes:
        for f in sorted((root / c).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(f)
                labels.append(cmap[c])
    if not paths:
        raise EmptyDatasetError(f"no images in class folders under {root}")
    return paths, labels


def cmd_ablate(args) -> int:
    import torch

    from .ablation import (ablation_curve, component_means, direct_effects, execution_order, prediction_head,
                           score_order)
    from .errors import InputError
    from .plotting import plot_curves

    loaded = _load_model(args)
    head = prediction_head(loaded.model)
    progress = _progress(args)
    paths, labels = _class_folder(args.data, args.labels_file)
    hpaths, hlabels = _class_folder(args.heldout, args.labels_file)
    c, z, names = _decompose_paths(loaded, paths, batch_size=args.batch_size, progress=progress,
                                   desc="decomposing data", device=args.device, check_input=not args.no_input_check)
    hc, hz, _ = _decompose_paths(loaded, hpaths, batch_size=args.batch_size, progress=progress,
                                 desc="decomposing held-out", device=args.device,
                                 check_input=not args.no_input_check)
    means = component_means(hc, device=args.device)
    y = torch.tensor(labels)
    curves = {}
    for order in args.order:
        if order == "execution":
            seq = execution_order(names)
        else:
            if args.scores:
                table = json.loads(Path(args.scores).read_text())
                missing = [n for n in names if n not in table]
                if missing:
                    raise InputError(f"--scores {args.scores} lacks {len(missing)} components, e.g. {missing[:3]}")
                sc = torch.tensor([float(table[n]) for n in names])
            else:
                sc = direct_effects(hc, torch.tensor(hlabels), head, means, device=args.device)
            seq = score_order(sc, names)
        steps = None
        if args.steps:
            n = len(seq)
            steps = sorted({round(i * n / args.steps) for i in range(args.steps + 1)})
        curves[order] = ablation_curve(c, y, head, means, seq, steps=steps, label=order, names=names,
                                       representation=z, progress=progress, device=args.device)
    out = Path(args.out)
    first = next(iter(curves.values()))
    _write_json(out / "curves.json", {k: v.as_dict() for k, v in curves.items()})
    plot_curves({f"{k} order": (v.num_ablated.tolist(), v.accuracy.tolist()) for k, v in curves.items()},
                out / "curves.png", baseline=float(first.accuracy[0]),
                title=f"mean ablation, {loaded.name}")
    print(f"accuracy with nothing ablated: {float(first.accuracy[0]):.4f} ({first.num_images} images)")
    for k, v in curves.items():
        pts = ", ".join(f"{int(n)}:{float(a):.3f}" for n, a in list(zip(v.num_ablated, v.accuracy))[:: max(1, len(v.accuracy) // 8)])
        print(f"{k:10} {pts}")
    print(f"wrote {out / 'curves.json'} and {out / 'curves.png'}")
    return 0


# ---------------------------------------------------------------------------------------------------- spurious


def cmd_spurious(args) -> int:
    from .ablation import prediction_head, read_group_folders, read_waterbirds, repair_spurious
    from .plotting import plot_group_accuracies
    from .retrieval import property_scores

    root = Path(args.data)
    data = read_waterbirds(root) if (root / "metadata.csv").is_file() else read_group_folders(root)
    held, test = data.subset(args.heldout_split), data.subset(args.test_split)
    if args.limit:
        held, test = held.head(args.limit), test.head(args.limit)
    loaded = _load_model(args)
    aligner = _aligner(args)
    enc = _encoder(args, aligner)
    head = prediction_head(loaded.model)
    progress = _progress(args)
    hc, _, names = _decompose_paths(loaded, held.paths(), batch_size=args.batch_size, progress=progress,
                                    desc=f"decomposing {args.heldout_split}", device=args.device,
                                    check_input=not args.no_input_check, aligner=aligner)
    _check_aligner(aligner, args.aligner, names, hc.shape[-1], loaded.name, what=f"the model {loaded.name}")
    tc, tz, _ = _decompose_paths(loaded, test.paths(), batch_size=args.batch_size, progress=progress,
                                 desc=f"decomposing {args.test_split}", device=args.device)
    sp, co = _property(args, args.spurious), _property(args, args.core)
    acc = property_scores(hc, {sp.name: sp.embed(enc), co.name: co.embed(enc)}, aligner=aligner,
                          device=args.device)
    res = repair_spurious(tc, test.labels, test.places, hc, head, acc.mean_correlation(sp.name),
                          acc.mean_correlation(co.name), k=args.k, names=names, representation=tz,
                          device=args.device)
    print(res.summary())
    out = Path(args.out)
    _write_json(out / "results.json", {**res.as_dict(), "data": str(root), "heldout_split": args.heldout_split,
                                       "test_split": args.test_split, "num_heldout": len(held),
                                       "num_test": len(test), "class_names": data.class_names,
                                       "place_names": data.place_names})

    def lab(key):
        y, p = key
        cn = data.class_names[y] if data.class_names and y < len(data.class_names) else f"y={y}"
        pn = data.place_names[p] if data.place_names and p < len(data.place_names) else f"place={p}"
        return f"{cn} on {pn}"

    before = {lab(k): v for k, v in res.before.groups.items()}
    after = {lab(k): v for k, v in res.after.groups.items()}
    plot_group_accuracies(before, after, out / "groups.png",
                          title=f"worst group {res.before.worst:.3f} → {res.after.worst:.3f} (top {args.k} ablated)")
    print(f"wrote {out / 'results.json'} and {out / 'groups.png'}")
    return 0


# ---------------------------------------------------------------------------------------------------- parser


def add_commands(sub) -> None:
    """Add ``retrieve``, ``heatmap``, ``segment``, ``ablate`` and ``spurious`` to the ``vitdecomp`` parser."""
    p = sub.add_parser("retrieve", help="retrieve images by text or by a reference image w.r.t. a property",
                       epilog=_EPILOG_RETRIEVE, formatter_class=_RAW)
    p.add_argument("cache", help="extraction cache folder (vitdecomp.extract)")
    _clip_args(p)
    p.add_argument("--property", required=True, help="property, e.g. color, texture, pattern, location")
    p.add_argument("--text", default=None, help="probe text, e.g. 'a beach'")
    p.add_argument("--reference", default=None, help="reference image: index or path in the cache, or an image file")
    p.add_argument("--against", default=None,
                   help="comma-separated properties specificity is taken against (default: every built-in one)")
    p.add_argument("--k", type=int, default=10, help="number of components kept (default 10)")
    p.add_argument("--top", type=int, default=10, help="number of images shown (default 10)")
    p.add_argument("--include-constant", action="store_true",
                   help="allow constant (bias, norm offset) and zero-variance components to be chosen")
    _model_args(p, required=False)
    input_check_arg(p)
    _out_args(p)
    p.set_defaults(func=cmd_retrieve)

    p = sub.add_parser("heatmap", help="token heat maps of the top components for a text or property",
                       epilog=_EPILOG_HEATMAP, formatter_class=_RAW)
    _model_args(p)
    p.add_argument("images", nargs="+", help="image files")
    _clip_args(p)
    p.add_argument("--text", default=None, help="text to map, e.g. 'striped pattern'")
    p.add_argument("--property", default=None, help="property to map (norm inside its subspace)")
    p.add_argument("--k", type=int, default=5, help="number of top components (default 5)")
    p.add_argument("--components", nargs="+", default=None, metavar="NAME", help="use these components")
    p.add_argument("--cache", default=None, help="extraction cache to rank components by variance explained")
    p.add_argument("--all-kinds", action="store_true", help="rank every component kind, not only attention heads")
    p.add_argument("--mode", choices=("bilinear", "nearest"), default="bilinear",
                   help="between grid cells: interpolate, or keep the cells as blocks (exact placement)")
    p.add_argument("--grid", choices=("coarsest", "native"), default="coarsest",
                   help="hierarchical models: sum every map into the model's coarsest grid (no merge-slot "
                        "checkerboard), or show each component on its own grid")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    input_check_arg(p)
    _out_args(p)
    p.set_defaults(func=cmd_heatmap)

    p = sub.add_parser("segment", help="zero-shot segmentation from the spatial decomposition of a class logit",
                       epilog=_EPILOG_SEGMENT, formatter_class=_RAW)
    _model_args(p)
    p.add_argument("root", help="folder with images/ and masks/ (see below)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--examples", type=int, default=8, help="write overlays of the first N images")
    p.add_argument("--mode", choices=("bilinear", "nearest"), default="bilinear")
    _out_args(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("ablate", help="accuracy versus components mean-ablated (direct effects)",
                       epilog=_EPILOG_ABLATE, formatter_class=_RAW)
    _model_args(p)
    p.add_argument("--data", required=True, help="evaluation images, one folder per class")
    p.add_argument("--heldout", required=True, help="held-out images for the means, one folder per class")
    p.add_argument("--labels-file", default=None, help="class folder names, one per line, in class-index order")
    p.add_argument("--order", nargs="+", choices=("execution", "score"), default=["execution", "score"])
    p.add_argument("--scores", default=None, help="JSON {component: score} for the score order")
    p.add_argument("--steps", type=int, default=None, help="evaluate at about this many points (default: every count)")
    input_check_arg(p)
    _out_args(p)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("spurious", help="repair a spurious correlation (Waterbirds) by mean-ablating components",
                       epilog=_EPILOG_SPURIOUS, formatter_class=_RAW)
    _model_args(p)
    p.add_argument("data", help="Waterbirds root (metadata.csv) or DATA/<split>/<class>_<place>/ folders")
    _clip_args(p)
    p.add_argument("--k", type=int, default=10, help="components ablated (default 10, as the paper)")
    p.add_argument("--spurious", default="waterbirds_spurious", help="property of the spurious feature")
    p.add_argument("--core", default="waterbirds_core", help="property of the core feature")
    p.add_argument("--heldout-split", default="val", help="split for scores and means (default val)")
    p.add_argument("--test-split", default="test", help="split evaluated (default test)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of each split")
    input_check_arg(p)
    _out_args(p)
    p.set_defaults(func=cmd_spurious)
