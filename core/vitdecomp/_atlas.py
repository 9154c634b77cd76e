"""A component atlas: every component of a model on one browsable, offline page (``vitdecomp atlas``).

:func:`atlas` writes a static site that opens from ``file://`` with no server and no network — every script and
style ships in the package (``vitdecomp/data/atlas/``), no CDN, no web font. It is built from the library's own
pieces over an extraction cache (or a contributions tensor) and its CompAlign :class:`~vitdecomp.Aligner`:

* **index.html** — a sortable, filterable, paginated table of all components (name, kind, stage, block, head,
  variance carried, CompAttribute score per property, the first TextSpan text) and a layer × head grid coloured by a
  chosen property's score (:class:`~vitdecomp.StreamingScores`, score_i(P) = (1/k) Σ_j corr_x(⟨a_i, b_j⟩, ⟨s, b_j⟩)).
* **c/NNNN.html**, one per component — its TextSpan descriptions with the share of the component's variance each
  explains (:func:`~vitdecomp.textspan`, on a subsample of ``textspan_images`` images); its score, variance explained
  and specificity for every property; the images that push it most and least along its top directions (the
  directions of its first TextSpan texts, ⟨a_i(x), t_j⟩ over *all* images, thumbnails of the cache's own images);
  token heat maps ⟨c_i(p) W_i, t_1⟩ on its top images (:func:`~vitdecomp.token_heatmap`, needs the model); links
  to its neighbours in the same block and the same slot of the previous / next block.
* **p/NAME.html**, one per property — components ranked by score, and retrieval by each of the property's texts
  restricted to its top-k components next to the whole representation (:func:`~vitdecomp.retrieve_by_text`'s
  ranking, ⟨Σ_{i∈S} a_i(x), t⟩).
* **atlas.json** — everything above as data (format ``vitdecomp.atlas/1``).

Large models stay usable: the source is read in two streaming passes (memory independent of N apart from the
TextSpan subsample, 4·C·d·``textspan_images`` bytes), per-component pages are small static files, thumbnails are
written once per image and lazy-loaded, and the index table is paginated in the browser.
"""

from __future__ import annotations

import html
import html.parser
import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import attrs
import torch

from .errors import InputError, MismatchError

__all__ = ["atlas", "AtlasResult", "component_layout", "check_site", "FORMAT"]

FORMAT = "vitdecomp.atlas/1"
_ASSETS = Path(__file__).parent / "data" / "atlas"
_ASSET_FILES = ("atlas.css", "atlas.js")


@attrs.define(eq=False)
class AtlasResult:
    """What :func:`atlas` wrote: ``path`` (index.html), ``out`` (the folder), counts and per-stage ``seconds``."""

    path: Path
    out: Path
    components: int
    properties: tuple
    images: int
    thumbnails: int
    heatmaps: int
    files: int
    seconds: Dict[str, float] = attrs.field(factory=dict)


# ---------------------------------------------------------------------------------------------------- layout

_HEAD = re.compile(r"^(?P<row>.+)\.attn\.head\.(?P<h>\d+)$")


def component_layout(names: Sequence[str]) -> List[dict]:
    """Where each component sits, from its name: ``{"name", "kind", "stage", "block", "head", "row", "col"}``.

    ``row`` is the block the component belongs to (``blocks.3``, ``stages.2.blocks.1``,
    ``stages.1.blocks.0.attn_grid``) or None for model-level components (``embed``, ``norm.bias``); ``col`` its
    slot in that row (``head 3``, ``mlp``, ``attn.bias``, ...). Kinds follow :data:`vitdecomp._records.KINDS`.
    """
    out = []
    for n in names:
        stage = re.search(r"(?:^|\.)stages\.(\d+)", n)
        block = re.search(r"(?:^|\.)blocks\.(\d+)", n)
        rec = {"name": n, "stage": int(stage.group(1)) if stage else None,
               "block": int(block.group(1)) if block else None, "head": None, "row": None, "col": None}
        m = _HEAD.match(n)
        if m:
            rec.update(kind="head", head=int(m.group("h")), row=m.group("row"), col=f"head {int(m.group('h'))}")
        else:
            last = n.rsplit(".", 1)[-1]
            if n in ("embed", "stem") or n.startswith("embed.") or n.startswith("stem."):
                kind = "embed"
            elif n == "init":
                kind = "residual"
            elif last in ("bias", "shift") or n.endswith(".bias"):
                kind = "const"
            elif last == "mlp":
                kind = "mlp"
            elif last in ("conv", "mbconv"):
                kind = "conv"
            elif last == "attn":
                kind = "attn"
            else:
                kind = "other"
            rec["kind"] = kind
            if block and kind != "embed":
                end = block.end()
                rest = n[end:].lstrip(".")
                head_part = n[:end]
                # keep a sub-branch (MaxViT attn_block / attn_grid) in the row so that grids line up per branch
                sub = rest.split(".", 1)
                if len(sub) == 2 and sub[0].startswith("attn_"):
                    head_part, rest = f"{head_part}.{sub[0]}", sub[1]
                rec["row"], rec["col"] = head_part, rest or last
        out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------------- inputs


def _source_names(source, aligner, names):
    from .extraction import ExtractionCache

    if isinstance(source, ExtractionCache):
        got = tuple(source.names)
    elif isinstance(source, torch.Tensor):
        if source.ndim != 3:
            raise InputError(f"atlas: source must be an ExtractionCache or contributions [N, C, D], got shape "
                             f"{tuple(source.shape)}")
        got = tuple(names) if names is not None else tuple(aligner.names)
        if len(got) != source.shape[1]:
            raise MismatchError(f"atlas: {len(got)} names for contributions with C = {source.shape[1]}")
    else:
        raise InputError(f"atlas: source must be an ExtractionCache or a contributions tensor [N, C, D], got "
                         f"{type(source).__name__}")
    if got != tuple(aligner.names):
        from .compalign import _first_difference

        raise MismatchError(f"atlas: the aligner was fit for other components than the source holds "
                            f"({_first_difference(got, aligner.names)})")
    return got


def _properties(properties, encoder, templates) -> Dict[str, dict]:
    """``{name: {"descriptions": [...], "basis": [k, d]}}`` from names, Property records or description lists."""
    from .properties import Property, get_property

    if properties is None:
        from .properties import list_properties

        properties = [n for n in list_properties() if not n.startswith("waterbirds")]
    if isinstance(properties, Mapping):
        items = list(properties.items())
    else:
        items = [(p.name, p) if isinstance(p, Property) else (p, p) for p in properties]
    if not items:
        raise InputError("atlas: give at least one property (a name such as 'color', a Property, or "
                         "{name: [descriptions]})")
    out = {}
    for name, p in items:
        if isinstance(p, str):
            p = get_property(p)
        if isinstance(p, Property):
            texts = list(p.descriptions)
        elif isinstance(p, torch.Tensor):
            raise InputError(f"atlas: property {name!r} is a tensor; give its descriptions (the atlas shows them and "
                             "retrieves by them) and a text encoder")
        else:
            texts = [str(t) for t in p]
        if not texts:
            raise InputError(f"atlas: property {name!r} has no descriptions")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
            raise InputError(f"atlas: property name {name!r} must use only letters, digits, '_', '-', '.'")
        out[str(name)] = {"descriptions": texts, "basis": encoder.encode(texts, templates=templates, progress=False)}
    return out


def _image_source(source, images, mean, std):
    """A function i → something :func:`vitdecomp.plotting.to_rgb` draws, or None when no image is known."""
    if images is None:
        paths = source.paths() if hasattr(source, "paths") else None
        if not paths:
            return None
        root = Path(source.meta.get("data", {}).get("root", "."))
        return lambda i: root / paths[i]
    if callable(images):
        return images
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise InputError(f"atlas: images must be [N, 3, H, W], got shape {tuple(images.shape)}")
        return lambda i: images[i]
    seq = list(images)
    return lambda i: seq[i]


# ---------------------------------------------------------------------------------------------------- html


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _page(title: str, body: str, *, depth: int, script: bool = False) -> str:
    up = "../" * depth
    js = f'<script src="{up}assets/atlas.js"></script>' if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{_e(title)}</title><link rel="stylesheet" href="{up}assets/atlas.css"></head>\n'
            f'<body>\n{body}\n{js}</body></html>\n')


def _fmt(x, nd=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{nd}f}"


def _thumb(rel: str, caption: str, href: Optional[str] = None, size: int = 96) -> str:
    img = f'<img src="{_e(rel)}" alt="{_e(caption)}" width="{size}" height="{size}" loading="lazy">'
    if href:
        img = f'<a href="{_e(href)}">{img}</a>'
    return f'<figure class="thumb">{img}<figcaption>{_e(caption)}</figcaption></figure>'


# ---------------------------------------------------------------------------------------------------- main


def atlas(source, aligner, out, *, encoder=None, properties=None, pool: Optional[Sequence[str]] = None,
          templates="imagenet", names: Optional[Sequence[str]] = None,
          images: Union[None, torch.Tensor, Sequence, Callable] = None, mean=None, std=None, image_ids=None,
          model=None, inputs: Union[None, torch.Tensor, Callable] = None, iters: int = 5, rank: int = 80,
          textspan_images: int = 1000, top_images: int = 6, directions: int = 2, heatmap_components: int = 32,
          heatmap_images: int = 3, retrieval_texts: int = 4, k: int = 10, thumb_size: int = 96, page_size: int = 100,
          batch_size: int = 256, title: Optional[str] = None, device=None, progress: bool = True,
          log: Optional[Callable[[str], None]] = None) -> AtlasResult:
    """Write a browsable atlas of every component to the folder ``out``; returns an :class:`AtlasResult`.

    :param source: an :class:`~vitdecomp.ExtractionCache` or contributions ``[N, C, D]`` (with ``names``, default
        the aligner's).
    :param aligner: the model's CompAlign :class:`~vitdecomp.Aligner` (``Aligner.identity`` for CLIP itself).
    :param encoder: a :class:`~vitdecomp.TextEncoder` in the aligner's CLIP space; embeds the property
        descriptions and the TextSpan ``pool`` (with ``templates``, as :meth:`TextEncoder.encode`).
    :param properties: property names (default: every built-in one except Waterbirds'), :class:`Property`
        records, or ``{name: [descriptions]}``.
    :param pool: TextSpan's text pool (default :func:`vitdecomp.load_text_pool`).
    :param images: what the thumbnails show: default the cache's own image files; or ``[N, 3, H, W]`` tensors
        (un-normalised with ``mean``/``std``), a sequence of paths / PIL images, or a function i → image.
    :param image_ids: labels of the images in captions (default: the cache's paths, else indices).
    :param model: the analysed model, for token heat maps (``None``: no heat maps); ``inputs`` gives its input for
        image indices: ``[N, 3, H, W]`` or a function ``[i, ...] → [b, 3, H, W]``.
    :param iters: TextSpan texts per component; ``rank`` its rank; ``textspan_images`` the (evenly spaced)
        images it runs on.
    :param top_images: images shown per direction and sign; ``directions`` how many TextSpan directions.
    :param heatmap_components: heat maps for this many components (largest variance first, those with token
        detail), each on its ``heatmap_images`` top images.
    :param retrieval_texts: texts per property retrieved by on its page; ``k`` components kept for retrieval.
    :param page_size: rows of the index table shown at a time.
    """
    from .heatmap import token_heatmap
    from .plotting import overlay, to_rgb
    from .retrieval import constant_components
    from .scores import StreamingScores, specificity
    from .spans import textspan
    from .text import load_text_pool

    say = log if log is not None else (print if progress else (lambda m: None))
    t_all = time.perf_counter()
    seconds: Dict[str, float] = {}
    if encoder is None:
        raise InputError("atlas: give encoder= (a vitdecomp.TextEncoder of the aligner's CLIP model) to embed the "
                         "property descriptions and the TextSpan pool")
    for nm, v in (("iters", iters), ("rank", rank), ("textspan_images", textspan_images), ("top_images", top_images),
                  ("directions", directions), ("k", k), ("batch_size", batch_size), ("thumb_size", thumb_size),
                  ("page_size", page_size)):
        if int(v) < 1:
            raise InputError(f"atlas: {nm} must be ≥ 1, got {v}")
    if heatmap_components < 0 or heatmap_images < 0 or retrieval_texts < 0:
        raise InputError("atlas: heatmap_components, heatmap_images and retrieval_texts must be ≥ 0")
    if model is not None and inputs is None:
        raise InputError("atlas: heat maps need inputs= (the model's input for image indices) next to model=")
    aligner.check_source(source)  # fitted on other weights than the cache's: MismatchError, before any output
    out = Path(out)
    _prepare_out(out)
    all_names = _source_names(source, aligner, names)
    C = len(all_names)
    layout = component_layout(all_names)
    if device is not None:
        aligner = aligner.to(device)
    props = _properties(properties, encoder, templates)
    pool = list(pool) if pool is not None else load_text_pool()
    if not pool:
        raise InputError("atlas: the TextSpan pool is empty")
    t0 = time.perf_counter()
    T = encoder.encode(pool, templates=templates, progress=progress)
    if T.shape[1] != aligner.out_dim:
        raise MismatchError(f"atlas: the encoder's texts have d = {T.shape[1]}, the aligner maps into "
                            f"d = {aligner.out_dim} (CLIP model {aligner.clip_model!r}); use the aligner's CLIP model")
    seconds["texts"] = time.perf_counter() - t0

    # ------------------------------------------------ pass 1: scores, variance, TextSpan subsample
    t0 = time.perf_counter()
    N = source.shape[0] if isinstance(source, torch.Tensor) else len(source)
    if N < 2:
        raise InputError(f"atlas: needs at least 2 images, got {N}")
    n_ts = min(int(textspan_images), N)
    sub = torch.unique(torch.linspace(0, N - 1, n_ts).round().long())
    n_ts = sub.numel()
    where = torch.full((N,), -1, dtype=torch.long)
    where[sub] = torch.arange(n_ts)
    acc = StreamingScores({p: v["basis"] for p, v in props.items()})
    buf = None
    n_seen, mu, m2 = 0, None, None  # per-component mean [C, d] and Σ‖a − mean‖² [C], merged batch by batch
    say(f"atlas: pass 1 over {N} images × {C} components (scores, variance, TextSpan subsample of {n_ts})")
    for idx, a in aligner.iter_aligned(source, batch_size=batch_size):
        acc.update(a)
        nb = a.shape[0]
        mb = a.mean(0)
        m2b = (a - mb).pow(2).sum((0, 2)).to(torch.float64)
        mb = mb.to(torch.float64)
        if mu is None:
            mu, m2 = mb, m2b
            buf = torch.empty(n_ts, C, a.shape[2], dtype=torch.float32)
        else:  # Chan et al.'s pairwise update: no cancellation for components with a large mean
            delta = mb - mu
            m2 = m2 + m2b + delta.pow(2).sum(1) * (n_seen * nb / (n_seen + nb))
            mu = mu + delta * (nb / (n_seen + nb))
        n_seen += nb
        w = where[idx.cpu()]
        keep = w >= 0
        if bool(keep.any()):
            buf[w[keep]] = a[keep.to(a.device)].detach().float().cpu()
    scores = {p: v.cpu().to(torch.float64) for p, v in acc.scores().items()}
    ve = {p: acc.variance_explained(p).cpu().to(torch.float64) for p in props}
    spec = {p: specificity(scores, p).cpu().to(torch.float64) for p in props}
    var = m2.cpu() / (N - 1)  # tr Cov(a_i), unbiased
    share = var / var.sum().clamp_min(1e-300)
    seconds["pass1"] = time.perf_counter() - t0

    # ------------------------------------------------ TextSpan per component
    t0 = time.perf_counter()
    spans: List[list] = []
    say(f"atlas: TextSpan ({iters} texts) for {C} components on {n_ts} images")
    from tqdm.auto import tqdm

    pool_index = {t: j for j, t in enumerate(pool)}
    floor = 1e-10 * float(var.max().clamp_min(0))  # constants (biases): any variance left is round-off
    # One component's TextSpan is a chain of small dependent products; below ~1e8 multiply-adds per round, intra-op
    # threads cost more than they gain (measured 13x slower with 2 threads on a busy 2-core machine): run on one.
    small = (device is None or torch.device(device).type == "cpu") and n_ts * len(pool) * T.shape[1] <= 1e8
    threads = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        for i in tqdm(range(C), desc="TextSpan", unit="component", disable=not progress):
            if float(var[i]) <= floor:
                spans.append([])
                continue
            spans.append(textspan(buf[:, i].contiguous(), T, pool, iters=iters, rank=rank, device=device))
    finally:
        torch.set_num_threads(threads)
    del buf
    seconds["textspan"] = time.perf_counter() - t0

    # ------------------------------------------------ pass 2: projections on own directions and retrieval probes
    t0 = time.perf_counter()
    J = int(directions)
    dirs = torch.zeros(C, J, aligner.out_dim)
    dir_text: List[List[Optional[str]]] = []
    for i in range(C):
        row = []
        for j in range(J):
            if j < len(spans[i]):
                dirs[i, j] = T[pool_index[spans[i][j].text]]
                row.append(spans[i][j].text)
            else:
                row.append(None)
        dir_text.append(row)
    probes = {}
    # as retrieve_by_text chooses: never a constant or a component without variance over the images
    eligible = ~(constant_components(all_names) | (var <= floor))
    for p, v in props.items():
        order = torch.argsort(scores[p], descending=True, stable=True)
        top = order[eligible[order]][: min(k, C)]
        probes[p] = {"texts": v["descriptions"][:retrieval_texts], "components": top,
                     "emb": v["basis"][:retrieval_texts].to(torch.float32)}
    proj = torch.empty(N, C, J)
    ret = {p: (torch.empty(N, len(q["texts"])), torch.empty(N, len(q["texts"]))) for p, q in probes.items()}
    dev_dirs = None
    say("atlas: pass 2 (images along each component's directions, retrieval by property)")
    for idx, a in aligner.iter_aligned(source, batch_size=batch_size):
        if dev_dirs is None:
            dev_dirs = dirs.to(a.device)
            dev_probes = {p: (q["emb"].to(a.device), q["components"].to(a.device)) for p, q in probes.items()}
        ic = idx.cpu()
        proj[ic] = torch.einsum("bcd,cjd->bcj", a, dev_dirs).float().cpu()
        total = None
        for p, (emb, comps) in dev_probes.items():
            if emb.shape[0] == 0:
                continue
            if total is None:
                total = a.sum(1)
            ret[p][0][ic] = (a.index_select(1, comps).sum(1) @ emb.T).float().cpu()
            ret[p][1][ic] = (total @ emb.T).float().cpu()
    seconds["pass2"] = time.perf_counter() - t0

    m = min(int(top_images), N)
    extremes = []  # per component, per direction: (most [(i, v)], least [(i, v)])
    for i in range(C):
        rows = []
        for j in range(J):
            if dir_text[i][j] is None:
                rows.append(None)
                continue
            v = proj[:, i, j]
            hi = torch.argsort(v, descending=True, stable=True)[:m].tolist()
            lo = torch.argsort(v, descending=False, stable=True)[:m].tolist()
            rows.append(([(x, float(v[x])) for x in hi], [(x, float(v[x])) for x in lo]))
        extremes.append(rows)
    retrieval = {}
    for p, q in probes.items():
        lst = []
        for j, text in enumerate(q["texts"]):
            r, b = ret[p][0][:, j], ret[p][1][:, j]
            lst.append({"text": text,
                        "restricted": [(x, float(r[x])) for x in torch.argsort(r, descending=True, stable=True)[:m].tolist()],
                        "whole": [(x, float(b[x])) for x in torch.argsort(b, descending=True, stable=True)[:m].tolist()]})
        retrieval[p] = {"components": [all_names[c] for c in q["components"].tolist()], "queries": lst}

    # ------------------------------------------------ heat maps
    t0 = time.perf_counter()
    draw = _image_source(source, images, mean, std)
    heat: Dict[int, List[tuple]] = {}  # component → [(image, file, value range)]
    heat_notes: Dict[int, str] = {}
    heat_note = "no model was given: heat maps need the model (vitdecomp atlas --model ...)"
    if model is not None and heatmap_components > 0 and heatmap_images > 0:
        heat_note = f"heat maps are drawn for the {heatmap_components} components with the largest variance only"
        if draw is None:
            heat_note = "no images are known for this source: heat maps need images to draw on"
        else:
            heat, heat_notes = _heatmaps(model, inputs, aligner, all_names, layout, share, extremes, dirs, draw, out,
                             heatmap_components, heatmap_images, mean, std, device, token_heatmap, overlay, say)
    seconds["heatmaps"] = time.perf_counter() - t0

    # ------------------------------------------------ thumbnails
    t0 = time.perf_counter()
    used = set()
    for rows in extremes:
        for r in rows:
            if r is not None:
                used.update(x for x, _ in r[0] + r[1])
    for rr in retrieval.values():
        for q in rr["queries"]:
            used.update(x for x, _ in q["restricted"] + q["whole"])
    thumbs = {}
    if draw is not None:
        (out / "img").mkdir(exist_ok=True)
        from PIL import Image

        for x in tqdm(sorted(used), desc="thumbnails", unit="img", disable=not progress):
            rgb = to_rgb(draw(x), mean=mean, std=std)
            im = Image.fromarray(rgb)
            im.thumbnail((thumb_size, thumb_size))
            rel = f"img/{x}.png"
            im.save(out / rel)
            thumbs[x] = rel
    seconds["thumbnails"] = time.perf_counter() - t0

    # ------------------------------------------------ pages
    t0 = time.perf_counter()
    if image_ids is None:
        paths = source.paths() if hasattr(source, "paths") else None
        image_ids = list(paths) if paths else None
    ids = (lambda x: str(image_ids[x])) if image_ids is not None else (lambda x: f"image {x}")
    model_name = getattr(source, "model_name", None) or aligner.model_name or "model"
    title = title or f"{model_name}: component atlas"
    info = {"format": FORMAT, "title": title, "model": model_name, "clip_model": aligner.clip_model,
            "held_out_cosine": aligner.held_out_cosine, "images": N, "textspan_images": n_ts,
            "components": [], "properties": {}}
    for i, rec in enumerate(layout):
        info["components"].append({
            **rec, "index": i, "page": _cpage(i), "variance": float(var[i]), "variance_share": float(share[i]),
            "scores": {p: float(scores[p][i]) for p in props},
            "variance_explained": {p: float(ve[p][i]) for p in props},
            "specificity": {p: float(spec[p][i]) for p in props},
            "textspan": [{"text": s.text, "variance_explained": s.variance_explained} for s in spans[i]],
            "directions": [None if r is None else {"text": dir_text[i][j], "most": r[0], "least": r[1]}
                           for j, r in enumerate(extremes[i])],
            "heatmaps": [{"image": x, "file": f, "min": lo, "max": hi} for x, f, lo, hi in heat.get(i, [])],
            "heatmap_note": None if heat.get(i) else heat_notes.get(i, heat_note),
        })
    for p, v in props.items():
        info["properties"][p] = {"descriptions": v["descriptions"], "page": _ppage(p), **retrieval[p]}
    ctx = _Ctx(info, thumbs, ids, thumb_size, int(page_size))
    (out / "c").mkdir(exist_ok=True)
    (out / "p").mkdir(exist_ok=True)
    for i in range(C):
        (out / _cpage(i)).write_text(_component_page(ctx, i), encoding="utf-8")
    for p in props:
        (out / _ppage(p)).write_text(_property_page(ctx, p), encoding="utf-8")
    (out / "index.html").write_text(_index_page(ctx), encoding="utf-8")
    (out / "assets").mkdir(exist_ok=True)
    for f in _ASSET_FILES:
        shutil.copyfile(_ASSETS / f, out / "assets" / f)
    seconds["pages"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_all
    info["seconds"] = seconds
    files = ([f"c/{Path(_cpage(i)).name}" for i in range(C)] + [_ppage(p) for p in props] + list(thumbs.values())
             + [f for hs in heat.values() for _, f, _, _ in hs] + [f"assets/{f}" for f in _ASSET_FILES]
             + ["index.html", "atlas.json"])
    info["files"] = files
    (out / "atlas.json").write_text(json.dumps(info, indent=1, default=float), encoding="utf-8")
    say(f"atlas: wrote {out / 'index.html'} ({C} components, {len(props)} properties, {len(thumbs)} thumbnails, "
        f"{sum(len(h) for h in heat.values())} heat maps) in {seconds['total']:.1f} s")
    return AtlasResult(path=out / "index.html", out=out, components=C, properties=tuple(props), images=N,
                       thumbnails=len(thumbs), heatmaps=sum(len(h) for h in heat.values()), files=len(files),
                       seconds=seconds)


def _cpage(i: int) -> str:
    return f"c/{i:04d}.html"


def _ppage(p: str) -> str:
    return f"p/{p}.html"


def _prepare_out(out: Path) -> None:
    """Create ``out``; an existing folder must be empty or an atlas this library wrote (its files are replaced,
    nothing else is touched)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"atlas: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        manifest = out / "atlas.json"
        try:
            old = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict) or old.get("format") != FORMAT:
            raise InputError(f"atlas: {out} is not empty and holds no atlas written by vitdecomp (no atlas.json of "
                             f"format {FORMAT}); choose an empty or new folder")
        for rel in old.get("files", []):
            p = (out / rel)
            if p.resolve().is_relative_to(out.resolve()) and p.is_file():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _heatmaps(model, inputs, aligner, names, layout, share, extremes, dirs, draw, out, n_comp, n_img, mean, std,
              device, token_heatmap, overlay, say):
    from .api import decompose

    order = [i for i in torch.argsort(share, descending=True, stable=True).tolist()
             if layout[i]["kind"] not in ("const", "embed", "residual") and extremes[i] and extremes[i][0] is not None]
    if not order:
        return {}, {}
    get = inputs if callable(inputs) else (lambda ix: inputs[ix])
    res: Dict[int, List[tuple]] = {}
    notes: Dict[int, str] = {}
    from ._fingerprint import weights_fingerprint

    fp = weights_fingerprint(model)  # once for every batch below; the aligner must have been fitted on it
    aligner.check_source({"model_fingerprint": fp}, where="the model given for the heat maps")
    # which components have a map on the image grid at all: one probe decomposition of one image
    probe = decompose(model, get([extremes[order[0]][0][0][0][0]]), tokens="source", device=device, fingerprint=fp)
    if tuple(probe.names) != tuple(names):
        from .compalign import _first_difference

        raise MismatchError(f"atlas: the model's components differ from the source's "
                            f"({_first_difference(probe.names, names)}); pass the model the cache was made with")
    want: Dict[int, List[int]] = {}
    for i in order:
        if names[i] not in probe.token_details:
            notes[i] = "the decomposition has no token detail for it"
        elif not bool(probe.spatial_map(names[i]).abs().amax() > 0):
            notes[i] = ("its token map is zero on the image grid (it writes only to prefix tokens such as CLS, "
                        "not to image positions)")
        elif len(want) < n_comp:
            want[i] = [x for x, _ in extremes[i][0][0][:n_img]]
    del probe
    if not want:
        return res, notes
    imgs = sorted({x for v in want.values() for x in v})
    say(f"atlas: token heat maps for {len(want)} components on {len(imgs)} images")
    (out / "hm").mkdir(exist_ok=True)
    step = 8
    for s in range(0, len(imgs), step):
        part = imgs[s:s + step]
        x = get(part)
        dec = decompose(model, x, tokens="source", device=device, fingerprint=fp)
        if tuple(dec.names) != tuple(names):
            from .compalign import _first_difference

            raise MismatchError(f"atlas: the model's components differ from the source's "
                                f"({_first_difference(dec.names, names)}); pass the model the cache was made with")
        for i, xs in want.items():
            sel = [part.index(v) for v in xs if v in part]
            if not sel:
                continue
            if names[i] not in dec.token_details:
                notes[i] = "the decomposition has no token detail for it"
                continue
            hm = token_heatmap(dec, aligner, text=dirs[i, 0], components=[names[i]], query=names[i])
            if not bool(hm.maps[sel].abs().amax() > 0):
                notes[i] = ("its token map is zero on the patch grid (it writes only to prefix tokens such as CLS, "
                            "not to image positions)")
                continue
            for b in sel:
                v = part[b]
                rel = f"hm/{i:04d}_{v}.png"
                heat = hm.maps[b]
                overlay(draw(v), heat, out / rel, alpha=0.5, mean=mean, std=std)
                res.setdefault(i, []).append((v, rel, float(heat.min()), float(heat.max())))
    for i in res:
        res[i].sort(key=lambda t: want[i].index(t[0]))
        notes.pop(i, None)
    return res, notes


# ---------------------------------------------------------------------------------------------------- pages


@attrs.define
class _Ctx:
    info: dict
    thumbs: dict
    ids: Callable
    size: int
    page_size: int = 100

    def img(self, x, value=None, depth=1):
        cap = self.ids(x) if value is None else f"{self.ids(x)} · {value:.3g}"
        rel = self.thumbs.get(x)
        if rel is None:
            return f'<figure class="thumb noimg"><div class="ph">{_e(x)}</div><figcaption>{_e(cap)}</figcaption></figure>'
        return _thumb("../" * depth + rel, cap, size=self.size)


def _nav(depth: int, extra: str = "") -> str:
    up = "../" * depth
    return f'<nav class="top"><a href="{up}index.html">atlas index</a>{extra}</nav>'


def _index_page(ctx: _Ctx) -> str:
    info = ctx.info
    comps = info["components"]
    props = list(info["properties"])
    # grid: rows = blocks in forward order; columns = heads, then the other slots
    rows, cols_head, cols_other = [], set(), []
    cell = {}
    for c in comps:
        if c["row"] is None or c["kind"] == "const":
            continue
        if c["row"] not in rows:
            rows.append(c["row"])
        if c["kind"] == "head":
            cols_head.add(c["head"])
        elif c["col"] not in cols_other:
            cols_other.append(c["col"])
        cell[(c["row"], c["col"])] = c
    cols = [f"head {h}" for h in sorted(cols_head)] + cols_other
    grid = ['<table class="grid" id="grid"><thead><tr><th>block</th>'
            + "".join(f"<th>{_e(col.replace('head ', 'h'))}</th>" for col in cols) + "</tr></thead><tbody>"]
    for r in rows:
        tds = []
        for col in cols:
            c = cell.get((r, col))
            if c is None:
                tds.append("<td></td>")
                continue
            tip = _e(f"{c['name']}: " + ", ".join(f"{p} {v:.2f}" for p, v in c["scores"].items()))
            tds.append(f'<td><a class="cell" href="{c["page"]}" title="{tip}" data-i="{c["index"]}">&#8203;</a></td>')
        grid.append(f"<tr><th>{_e(r)}</th>{''.join(tds)}</tr>")
    grid.append("</tbody></table>")
    others = [c for c in comps if c["row"] is None or c["kind"] == "const"]
    head = ("<tr><th data-k='s' data-c='i'>#</th><th data-k='s' data-c='n'>component</th>"
            "<th data-k='s' data-c='k'>kind</th><th data-k='n' data-c='st'>stage</th><th data-k='n' data-c='b'>block</th>"
            "<th data-k='n' data-c='h'>head</th><th data-k='n' data-c='v'>variance</th>"
            + "".join(f"<th data-k='n' data-c='s{j}'>{_e(p)}</th>" for j, p in enumerate(props))
            + "<th data-k='s' data-c='t'>first TextSpan text</th></tr>")
    # the table's rows as data: the browser renders one page of them at a time (sorting, filtering, paging)
    rows_data = [{"i": c["index"], "n": c["name"], "k": c["kind"], "st": c["stage"], "b": c["block"], "h": c["head"],
                  "v": round(c["variance_share"], 8), "p": c["page"],
                  "t": c["textspan"][0]["text"] if c["textspan"] else "",
                  **{f"s{j}": round(c["scores"][p], 6) for j, p in enumerate(props)}} for c in comps]
    data = json.dumps({"props": props, "rows": rows_data}, separators=(",", ":")).replace("</", "<\\/")
    kinds = sorted({c["kind"] for c in comps})
    opts_p = "".join(f"<option value='{_e(p)}'>{_e(p)}</option>" for p in props)
    plinks = " · ".join(f"<a href='{info['properties'][p]['page']}'>{_e(p)}</a>" for p in props)
    held = info.get("held_out_cosine")
    body = [
        f"<header><h1>{_e(info['title'])}</h1>",
        f"<p class='meta'>{len(comps)} components · {info['images']} images · aligned to {_e(info['clip_model'])}"
        + (f" (held-out cosine {held:.3f})" if held is not None else "") + f" · TextSpan on {info['textspan_images']} "
        "images</p>",
        f"<p>Properties: {plinks}</p></header>",
        "<section><h2>Layer × head grid</h2>",
        "<p>Each cell is one component (rows: blocks in forward order; columns: heads, then the other branches); "
        "its colour is the chosen property's CompAttribute score (or the variance share). Click a cell to open the "
        "component.</p>",
        f"<label>colour by <select id='gridprop'><option value='variance'>variance share</option>{opts_p}</select>"
        "</label> <span id='legend' class='legend'></span>",
        "\n".join(grid),
        ("<p>Outside the grid: " + ", ".join(f"<a href='{c['page']}'>{_e(c['name'])}</a>" for c in others) + "</p>")
        if others else "",
        "</section>",
        "<section><h2>All components</h2>",
        "<div class='controls'><input id='filter' type='search' placeholder='filter by name or text'> "
        "<select id='kind'><option value=''>all kinds</option>"
        + "".join(f"<option>{_e(k)}</option>" for k in kinds) + "</select> "
        "<span id='pager'></span></div>",
        f"<table class='list' id='list' data-page-size='{ctx.page_size}'><thead>{head}</thead><tbody></tbody></table>",
        "<noscript><p>JavaScript is off: the table needs it; the grid and the list above link every component.</p>"
        "</noscript>",
        f"<script type='application/json' id='atlas-data'>{data}</script>",
        "<p class='note'>Click a column header to sort. Scores: CompAttribute's mean correlation (the mean Pearson "
        "correlation of the component's projections with the representation's on the property's text directions). Variance: the "
        "component's share of Σ_i tr Cov(a_i) in CLIP space.</p></section>",
    ]
    return _page(info["title"], "\n".join(body), depth=0, script=True)


def _neighbours(info, i) -> List[tuple]:
    comps = info["components"]
    c = comps[i]
    out = []
    if i > 0:
        out.append(("previous", comps[i - 1]))
    if i + 1 < len(comps):
        out.append(("next", comps[i + 1]))
    if c["row"] is not None:
        rows = []
        for d in comps:
            if d["row"] is not None and d["row"] not in rows:
                rows.append(d["row"])
        r = rows.index(c["row"])
        same = [d for d in comps if d["row"] == c["row"] and d["index"] != i]
        out += [("same block", d) for d in same]
        for label, rr in (("previous block", r - 1), ("next block", r + 1)):
            if 0 <= rr < len(rows):
                cands = [d for d in comps if d["row"] == rows[rr]]
                match = [d for d in cands if d["col"] == c["col"]] or cands[:1]
                out += [(label, d) for d in match[:1]]
    return out


def _component_page(ctx: _Ctx, i: int) -> str:
    info = ctx.info
    c = info["components"][i]
    props = info["properties"]
    where = ", ".join(f"{k} {c[k]}" for k in ("stage", "block", "head") if c[k] is not None) or "model level"
    body = [_nav(1), f"<h1>{_e(c['name'])}</h1>",
            f"<p class='meta'>kind {_e(c['kind'])} · {_e(where)} · variance share {100 * c['variance_share']:.2f}% "
            f"(tr Cov {c['variance']:.4g})</p>"]
    nb: Dict[str, list] = {}
    for lab, d in _neighbours(info, i):
        nb.setdefault(lab, []).append(f"<a href='../{d['page']}'>{_e(d['name'])}</a>")
    if nb:
        body.append("<p class='nb'>" + " &nbsp;|&nbsp; ".join(f"{_e(lab)}: {', '.join(v)}" for lab, v in nb.items())
                    + "</p>")
    body.append("<h2>TextSpan</h2>")
    if c["textspan"]:
        body.append("<table><tr><th>#</th><th>text</th><th>share of variance</th></tr>" + "".join(
            f"<tr><td>{j}</td><td>{_e(s['text'])}</td><td>{s['variance_explained']:.3f}</td></tr>"
            for j, s in enumerate(c["textspan"], 1))
            + f"<tr><td></td><td><em>total</em></td><td>{sum(s['variance_explained'] for s in c['textspan']):.3f}"
              "</td></tr></table>")
    else:
        body.append("<p>This component does not vary over the images (a constant): nothing to describe.</p>")
    body.append("<h2>Properties</h2><table><tr><th>property</th><th>score</th><th>rank</th><th>variance explained</th>"
                "<th>specificity</th></tr>")
    comps = info["components"]
    for p in props:
        rank = 1 + sum(1 for d in comps if d["scores"][p] > c["scores"][p])
        body.append(f"<tr><td><a href='../{props[p]['page']}'>{_e(p)}</a></td><td>{_fmt(c['scores'][p])}</td>"
                    f"<td>{rank} / {len(comps)}</td><td>{_fmt(c['variance_explained'][p])}</td>"
                    f"<td>{_fmt(c['specificity'][p])}</td></tr>")
    body.append("</table>")
    body.append("<h2>Images along its top directions</h2>")
    any_dir = False
    for j, d in enumerate(c["directions"], 1):
        if d is None:
            continue
        any_dir = True
        body.append(f"<h3>direction {j}: “{_e(d['text'])}”</h3><p class='note'>⟨a_i(x), t⟩ over all "
                    f"{info['images']} images</p>")
        body.append("<div class='row'><span class='lab'>most</span>" + "".join(ctx.img(x, v) for x, v in d["most"])
                    + "</div>")
        body.append("<div class='row'><span class='lab'>least</span>" + "".join(ctx.img(x, v) for x, v in d["least"])
                    + "</div>")
    if not any_dir:
        body.append("<p>No direction (the component is constant over the images).</p>")
    body.append("<h2>Token heat maps</h2>")
    if c["heatmaps"]:
        t = c["directions"][0]["text"]
        body.append(f"<p class='note'>Where the component writes the direction of “{_e(t)}” (⟨c_i(p) W_i, t⟩ per "
                    "token, on its top images).</p><div class='row'>")
        for h in c["heatmaps"]:
            body.append(_thumb("../" + h["file"], f"{ctx.ids(h['image'])} · [{h['min']:.2g}, {h['max']:.2g}]",
                               size=2 * ctx.size))
        body.append("</div>")
    else:
        body.append(f"<p class='note'>No heat map for this component: {_e(c['heatmap_note'])}.</p>")
    return _page(c["name"], "\n".join(body), depth=1)


def _property_page(ctx: _Ctx, p: str) -> str:
    info = ctx.info
    pr = info["properties"][p]
    comps = sorted(info["components"], key=lambda d: -d["scores"][p])
    body = [_nav(1, " · " + " · ".join(f"<a href='../{info['properties'][q]['page']}'>{_e(q)}</a>"
                                       for q in info["properties"] if q != p)),
            f"<h1>property: {_e(p)}</h1>", "<p class='meta'>" + _e("; ".join(pr["descriptions"])) + "</p>",
            "<h2>Retrieval by this property's texts</h2>",
            f"<p class='note'>Images ranked by ⟨Σ_{{i∈S}} a_i(x), t⟩ with S the top {len(pr['components'])} components "
            "for the property (first row) and by the whole aligned representation (second row).</p>"]
    for q in pr["queries"]:
        body.append(f"<h3>“{_e(q['text'])}”</h3>")
        body.append("<div class='row'><span class='lab'>top components</span>"
                    + "".join(ctx.img(x, v) for x, v in q["restricted"]) + "</div>")
        body.append("<div class='row'><span class='lab'>whole</span>" + "".join(ctx.img(x, v) for x, v in q["whole"])
                    + "</div>")
    body.append("<h2>Components ranked by score</h2><table><tr><th>rank</th><th>component</th><th>kind</th>"
                "<th>score</th><th>variance explained</th><th>specificity</th><th>first TextSpan text</th></tr>")
    for r, d in enumerate(comps, 1):
        first = d["textspan"][0]["text"] if d["textspan"] else ""
        body.append(f"<tr><td>{r}</td><td><a href='../{d['page']}'>{_e(d['name'])}</a></td><td>{d['kind']}</td>"
                    f"<td>{_fmt(d['scores'][p])}</td><td>{_fmt(d['variance_explained'][p])}</td>"
                    f"<td>{_fmt(d['specificity'][p])}</td><td>{_e(first)}</td></tr>")
    body.append("</table>")
    return _page(f"{p} — {info['title']}", "\n".join(body), depth=1)


# ---------------------------------------------------------------------------------------------------- checking


class _Refs(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids, self.dup, self.refs, self.imgs = set(), [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            if a["id"] in self.ids:
                self.dup.append(a["id"])
            self.ids.add(a["id"])
        for key in ("href", "src"):
            if a.get(key) is not None:
                self.refs.append((tag, a[key]))
        if tag == "img":
            self.imgs.append(a.get("src"))


def check_site(folder) -> Dict[str, List[str]]:
    """Check every HTML page under ``folder`` without a browser: ``{"broken_links": [...], "missing_images":
    [...], "duplicate_ids": [...], "external": [...]}`` (all empty for a sound site). Relative links must name
    existing files (and, with ``#id``, an element of that page), images must be readable image files, ids unique
    per page, and nothing may point to the network."""
    import urllib.parse

    from PIL import Image

    folder = Path(folder)
    problems: Dict[str, List[str]] = {"broken_links": [], "missing_images": [], "duplicate_ids": [], "external": []}
    parsed = {}

    def parse(p: Path) -> _Refs:
        if p not in parsed:
            r = _Refs()
            r.feed(p.read_text(encoding="utf-8"))
            parsed[p] = r
        return parsed[p]

    for page in sorted(folder.rglob("*.html")):
        r = parse(page)
        problems["duplicate_ids"] += [f"{page.relative_to(folder)}: #{d}" for d in r.dup]
        for tag, ref in r.refs:
            u = urllib.parse.urlparse(ref)
            where = f"{page.relative_to(folder)}: {ref}"
            if u.scheme or ref.startswith("//"):
                if u.scheme not in ("data", "javascript", "mailto"):
                    problems["external"].append(where)
                continue
            target = (page.parent / urllib.parse.unquote(u.path)).resolve() if u.path else page.resolve()
            if not target.is_file():
                (problems["missing_images"] if tag == "img" else problems["broken_links"]).append(where)
                continue
            if u.fragment and target.suffix == ".html" and u.fragment not in parse(target).ids:
                problems["broken_links"].append(where)
            if tag == "img":
                try:
                    with Image.open(target) as im:
                        im.verify()
                except Exception:  # noqa: BLE001 - any decoding failure is a missing image
                    problems["missing_images"].append(where)
    return problems
