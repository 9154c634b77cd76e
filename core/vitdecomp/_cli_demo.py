"""``vitdecomp demo``: the whole method, offline, on the concept world's shipped models.

Loads the small CLIP and the factor classifiers trained by :mod:`vitdecomp.concept_world.train`, draws
concept-world images, decomposes them exactly, aligns every component to the small CLIP (CompAlign), scores the
components for each property (CompAttribute), describes the top ones with text (TextSpan over concept-world
captions), checks all of it against the world's ground truth (:mod:`vitdecomp.concept_world.evaluate`), retrieves
by reference image, draws token heat maps, writes a browsable component atlas of the first model
(``atlas/index.html``, :func:`vitdecomp.atlas`) and repairs a spurious correlation. Writes ``report.md`` (with PNGs)
and ``results.json`` to ``--out``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

__all__ = ["add_commands", "run_demo", "write_atlas"]

_EPILOG = """examples:
  vitdecomp demo                          # full report in ./vitdecomp-demo/ (under a minute on 2 CPU cores)
  vitdecomp demo --quick --out /tmp/demo  # one model, few images (under a minute)
  vitdecomp demo --models deit swin maxvit clip --images 2000
Everything runs offline: the models (a small CLIP and DeiT / Swin / MaxViT classifiers, a few MB) ship with
vitdecomp and were trained on the procedural concept world by `python -m vitdecomp.concept_world.train`.
"""


def add_commands(subparsers) -> None:
    from ._cli_common import HelpFormatter

    p = subparsers.add_parser("demo", help="offline demo on the shipped concept-world models; writes a report",
                              epilog=_EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, default=Path("vitdecomp-demo"), help="report folder (default vitdecomp-demo/)")
    p.add_argument("--quick", action="store_true", help="DeiT only, 300 images, no Swin/MaxViT (a smoke test)")
    p.add_argument("--models", nargs="+", default=None, choices=("deit", "swin", "maxvit", "clip"),
                   help="models to analyse (default: deit swin maxvit)")
    p.add_argument("--images", type=int, default=None, help="evaluation images (and as many to fit the aligners); "
                   "default 1000, 300 with --quick")
    p.add_argument("--no-spurious", action="store_true", help="skip the spurious-correlation repair")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models or (["deit"] if args.quick else ["deit", "swin", "maxvit"])
    n = args.images or (300 if args.quick else 1000)
    report = run_demo(args.out, models=models, n=n, spurious=not args.no_spurious, quick=args.quick)
    print(f"wrote {report}")
    return 0


def _fmt(x, nd=2):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _known(man: dict, name: str, factor: str) -> str:
    """Held-out accuracy of model ``name`` and the small CLIP's zero-shot accuracy for ``factor`` (from the manifest)."""
    m = man.get(name, {}).get("metrics", {})
    own = m.get("test_accuracy", m.get("zero_shot_accuracy", {}))
    zs = man.get("clip", {}).get("metrics", {}).get("zero_shot_accuracy", {})
    own = own.get(factor) if isinstance(own, dict) else None
    return f"{_fmt(own)} / {_fmt(zs.get(factor))}"


def write_atlas(run, out, *, dataset, images, encoder, pool, **kwargs):
    """The demo's component atlas of a concept-world model run (:func:`vitdecomp.concept_world.evaluate.prepare_run`
    on ``images`` drawn from ``dataset``): :func:`vitdecomp.atlas` with the small CLIP's raw texts, the property
    phrases, the images' captions and token heat maps. ``kwargs`` override the atlas settings."""
    from . import datasets as D
    from ._atlas import atlas
    from .concept_world import evaluate as E
    from .concept_world import models as M

    settings = dict(templates=None, heatmap_components=12, textspan_images=500, progress=False, log=lambda m: None,
                    title=f"concept-world {run.name}: component atlas")
    settings.update(kwargs)
    return atlas(run.contributions, run.aligner, out, encoder=encoder,
                 properties={f: E.property_texts(f) for f in run.bases}, pool=pool, images=images, mean=D.MEAN,
                 std=D.STD, image_ids=[dataset.caption(i) for i in range(len(images))], model=run.model,
                 inputs=lambda ix: M.prepare(run.name, images[ix]), **settings)


def run_demo(out, *, models=("deit", "swin", "maxvit"), n: int = 1000, spurious: bool = True, quick: bool = False,
             log=print) -> Path:
    """Run the demo and write ``out/report.md``; returns its path."""
    import torch

    from . import datasets as D
    from .concept_world import evaluate as E
    from .concept_world import models as M
    from .heatmap import token_heatmap
    from .plotting import contact_sheet, overlay
    from .spans import textspan_all
    from .api import decompose

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    md = ["# vitdecomp demo: the concept world", ""]
    results = {"models": {}, "settings": {"images": n, "models": list(models), "quick": quick}}

    def step(msg):
        log(f"[{time.perf_counter() - t_start:6.1f} s] {msg}")

    step("loading the small CLIP and generating images")
    clip = M.load("clip")
    enc = E.text_encoder(clip)
    eval_ds = D.ConceptWorld(n, E.EVAL_SEED)
    X_eval = eval_ds.tensors()
    X_fit = D.ConceptWorld(n, E.FIT_SEED).tensors()
    mean, std = D.MEAN, D.STD
    contact_sheet([X_eval[i] for i in range(10)], out / "images.png", titles=[eval_ds.caption(i) for i in range(10)],
                  ncols=5, mean=mean, std=std, thumb=2.4, title="concept-world images and their captions")
    man = M.manifest().get("models", {})
    md += [
        "Every image shows one object whose factors are known: shape, color, pattern, position, size and background. "
        "The models below were trained on such images by `python -m vitdecomp.concept_world.train` and ship with "
        "vitdecomp; a small CLIP (image/caption contrastive training) provides the text space.",
        "", "![images](images.png)", "",
        "| model | parameters | trained (s) | held-out accuracy |", "|---|---|---|---|",
    ]
    for name, rec in man.items():
        m = rec.get("metrics", {})
        acc = m.get("test_accuracy", m.get("zero_shot_accuracy"))
        if isinstance(acc, dict):
            acc = ", ".join(f"{k} {v:.2f}" for k, v in acc.items())
            if "zero_shot_accuracy" in m:
                acc = "zero-shot: " + acc
        else:
            acc = f"{acc:.3f} (worst group {m.get('worst_group_accuracy', float('nan')):.3f})"
        md.append(f"| {name} | {rec.get('parameters', '?'):,} | {rec['train'].get('wall_seconds', '?')} | {acc} |")
    md.append("")

    md += ["## Does CompAttribute find the components that carry a property?", "",
           "For each property, every component is scored by CompAttribute (mean correlation, with the small CLIP's "
           "text embeddings of the property's phrases) and compared with the ground truth: the component's share of "
           "the property-driven variance of the representation, measured in the model's own space from the known "
           "factors (`vitdecomp.concept_world.evaluate`). ρ: Spearman rank correlation over components; P@k: overlap "
           "of the top-k by score and by truth (chance k/C); retrieval: precision@10 of images with the same value, "
           "by the top-k components by specificity versus the whole representation (chance 1/#values). The first "
           "column says whether the model and the small CLIP know the factor at all (held-out accuracy; CLIP: "
           "zero-shot): where the small CLIP does not, its text space cannot describe the factor and CompAttribute "
           "has nothing to find.", ""]
    runs = {}
    for name in models:
        step(f"{name}: decompose {2 * n if name != 'clip' else n} images, align to the small CLIP, score")
        run = E.prepare_run(name, clip=clip, encoder=enc, fit_images=X_fit, eval_dataset=eval_ds, eval_images=X_eval,
                            max_epochs=15 if quick else 40)
        runs[name] = run
        res = E.evaluate(run, encoder=enc, queries=100 if quick else 200)
        res["timings"] = run.timings
        results["models"][name] = res
        md += [f"### {name}: {res['components']} components, reconstruction error {res['reconstruction_error']:.1e}"
               + (f", aligner held-out cosine {res['held_out_cosine']:.3f}" if res["held_out_cosine"] is not None else
                  " (CLIP itself: identity aligner)"), "",
               f"| property | accuracy: model / CLIP | ρ(score, truth) | ρ(score, R²) | ρ(VE, R²) | P@{res['k']} (chance) | retrieval: components / whole / oracle (chance) |",
               "|---|---|---|---|---|---|---|"]
        for f, r in res["properties"].items():
            md.append(f"| {f} | {_known(man, name, f)} | {_fmt(r['spearman_score_attribution'])} | {_fmt(r['spearman_score_r2'])} | "
                      f"{_fmt(r['spearman_ve_r2'])} | {_fmt(r['precision_at_k'])} ({_fmt(r['precision_at_k_chance'])}) | "
                      f"{_fmt(r['retrieval_components'])} / {_fmt(r['retrieval_whole'])} / "
                      f"{_fmt(r['retrieval_oracle'])} ({_fmt(r['retrieval_chance'])}) |")
        ts = res.get("textspan")
        if ts:
            md += ["", f"TextSpan's first pick (among the 25 single-factor phrases) names the factor that explains most "
                   f"of the component's variance for {ts['agreement']:.0%} of {ts['n_components']} components.", ""]

    # ---------------------------------------------------------------- TextSpan descriptions
    main = models[0]
    run = runs[main]
    step(f"{main}: TextSpan descriptions")
    pool = E.caption_pool(400)
    T = enc.encode(pool, templates=None, progress=False)
    top = []
    for f in run.scores:
        for i in torch.argsort(run.scores[f], descending=True)[:2].tolist():
            if run.names[i] not in top:
                top.append(run.names[i])
    spans = textspan_all(run.aligned, run.names, T, pool, iters=3, components=top, progress=False)
    md += [f"## TextSpan: the top components of {main}, described", "",
           "The two best-scoring components per property, each described by 3 texts from a pool of 400 concept-world "
           "captions (share of the component's variance each explains), next to the factor that truly explains most "
           "of its variance (R²).", "", "| component | TextSpan | truth: best factor (R²) |", "|---|---|---|"]
    for name in top:
        i = run.names.index(name)
        best = max(run.truth, key=lambda f: float(run.truth[f]["r2"][i]))
        txt = "; ".join(f"{s.text} ({s.variance_explained:.2f})" for s in spans[name])
        md.append(f"| `{name}` | {txt} | {best} ({float(run.truth[best]['r2'][i]):.2f}) |")
    md.append("")

    # ---------------------------------------------------------------- retrieval by reference image
    step(f"{main}: retrieval by reference image")
    from .retrieval import retrieve_by_image
    from .scores import specificity

    md += ["## Retrieval by reference image", "",
           f"{main}: the 8 nearest images to a reference, by the top-{results['models'][main]['k']} components for a "
           "property (by specificity) and by the whole representation.", ""]
    for f in ("color", "shape", "background"):
        if f not in run.scores:
            continue
        ref = 0
        r = retrieve_by_image(run.contributions, ref, component_scores=specificity(run.scores, f),
                              k=results["models"][main]["k"], names=run.names, query=f)
        rows = {f"{f} components": [X_eval[ref]] + [X_eval[i] for i in r.order[:8]],
                "whole representation": [X_eval[ref]] + [X_eval[i] for i in r.baseline_order[:8]]}
        caps = [["reference: " + eval_ds.factors(ref)[f]] + [eval_ds.factors(i)[f] for i in r.order[:8]],
                ["reference: " + eval_ds.factors(ref)[f]] + [eval_ds.factors(i)[f] for i in r.baseline_order[:8]]]
        contact_sheet([], out / f"retrieval_{f}.png", rows=rows, titles=caps, mean=mean, std=std, thumb=1.6)
        md += [f"![retrieval {f}](retrieval_{f}.png)", ""]

    # ---------------------------------------------------------------- heat maps
    step(f"{main}: token heat maps")
    from .scores import variance_explained

    idx = [i for i in range(min(n, 200)) if eval_ds.factors(i)["size"] == "large"][:4]
    dec = decompose(run.model, M.prepare(main, X_eval[idx]), tokens="source")
    panels, titles = [], []
    for f in ("color", "shape"):
        ve = variance_explained(run.aligned, run.bases[f])
        for j, i in enumerate(idx):
            text = D.factor_phrase(f, eval_ds.factors(i)[f])
            emb = enc.encode([text], templates=None, progress=False)[0]
            hm = token_heatmap(dec, run.aligner, text=emb, scores=ve,
                               k=3, image_size=(64, 64), query=text, grid="coarsest")
            lim = float(hm.maps[j].abs().max()) or 1.0  # diverging, centred at 0
            panels.append(overlay(X_eval[i], hm.maps[j], mean=mean, std=std, alpha=0.45, cmap="RdBu_r",
                                  vmin=-lim, vmax=lim))
            titles.append(f"{text} (±{lim:.2g})" if float(hm.maps[j].abs().max()) > 0 else f"{text}: map is zero")
    contact_sheet(panels, out / "heatmaps.png", titles=titles, ncols=4, thumb=2.0,
                  title=f"{main}: top-3 heads by variance explained, projected on the image's own phrase "
                        f"(red +, blue −; grid {hm.grid_description()})")
    md += ["## Token heat maps", "",
           f"{main}: where the 3 heads with the highest variance explained for the property write the direction of "
           "the image's own phrase.", "", "![heat maps](heatmaps.png)", ""]

    # ---------------------------------------------------------------- component atlas
    step(f"{main}: component atlas")
    at = write_atlas(run, out / "atlas", dataset=eval_ds, images=X_eval, encoder=enc, pool=pool)
    results["atlas"] = {"path": "atlas/index.html", "components": at.components, "thumbnails": at.thumbnails,
                        "heatmaps": at.heatmaps, "seconds": at.seconds}
    md += ["## Component atlas", "",
           f"Every component of {main} on one browsable page, offline: **[atlas/index.html](atlas/index.html)** "
           "(a sortable table and a layer × head grid coloured by any property's score; one page per component with "
           "its TextSpan texts, its scores, the images that push it most and least along its top directions and "
           "token heat maps; one page per property with retrieval examples). Written by `vitdecomp.atlas` "
           f"in {at.seconds['total']:.1f} s; `vitdecomp atlas CACHE --aligner A --out DIR` does the same for any "
           "extraction cache.", ""]

    # ---------------------------------------------------------------- spurious repair
    if spurious:
        arch = main if main != "clip" else "deit"
        step(f"{arch}_spurious: spurious-correlation repair")
        sp = E.evaluate_spurious(arch, clip=clip, encoder=enc, n_val=n, n_test=n, ks=(1, 3, 5, 10),
                                 max_epochs=15 if quick else 40)
        results["spurious"] = sp
        md += ["## Spurious correlation: small vs large, background as the shortcut", "",
               f"`{arch}_spurious` is `{arch}` fine-tuned on images where the background (water / grass) agrees with "
               f"the label in {man.get(arch + '_spurious', {}).get('train', {}).get('correlation', float('nan')):.0%} "
               "of the training images; the test split is balanced. Components are ranked by "
               "score(background) − score(size) and the top k are mean-ablated (means from held-out images). The "
               "oracle ranks by the ground-truth attribution instead.", "",
               f"Spearman ρ between the score difference and the ground-truth difference: "
               f"{sp['spearman_difference']:.2f}", "",
               "| k | worst group before | after | oracle after | group average before | after |",
               "|---|---|---|---|---|---|"]
        for k, r in sp["by_k"].items():
            md.append(f"| {k} | {r['before_worst']:.3f} | {r['after_worst']:.3f} | {r['oracle_after_worst']:.3f} | "
                      f"{r['before_average']:.3f} | {r['after_average']:.3f} |")
        md.append("")

    sp_all = {results["spurious"]["model"][: -len("_spurious")]: results["spurious"]} if "spurious" in results else {}
    md += E.goals_markdown({"models": results["models"], "spurious": sp_all}) + [""]
    results["independence"] = {"evaluation": E.factor_independence(eval_ds)}
    md += E.independence_markdown(results["independence"]) + [""]

    elapsed = time.perf_counter() - t_start
    results["seconds"] = elapsed
    md += [f"_Generated by `vitdecomp demo` in {elapsed:.0f} s._", ""]
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    path = out / "report.md"
    path.write_text("\n".join(md))
    step(f"done: {path}")
    return path
