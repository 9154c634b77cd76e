"""Does interpretation find what is really there? CompAttribute, TextSpan, retrieval and spurious repair measured
against the ground truth of the concept world.

For a model and held-out concept-world images with known factors (shape, color, pattern, position, size,
background), everything is computed from the exact decomposition z(x) = Σ_i c_i(x) (:func:`vitdecomp.decompose`):

**Ground truth per component** (model space, no CLIP, no text), for a factor F with values v and group means
m_i(v) = E[c_i | F = v] − E[c_i]:

* ``r2`` — R²_i(F) = Σ_x ‖m_i(v(x))‖² / Σ_x ‖c_i(x) − E c_i‖²: the share of the component's own variance that F
  explains (the R² of the least-squares probe one-hot(F) → c_i; an ANOVA over the D output dimensions).
* ``attribution`` — A_i(F) = Σ_x ⟨m_i(v(x)), M(v(x))⟩ / Σ_x ‖M(v(x))‖² with M = Σ_i m_i: the component's share of
  the F-driven variance of the representation z (Σ_i A_i(F) = 1). This is what "the components that carry F" means:
  take them away and z no longer varies with F.

**What the method says** (the small CLIP of the concept world is the text model): CompAlign maps each component
into the small CLIP's image space (:func:`vitdecomp.fit_aligner`, fitted on separate images), a property's texts are
the factor's phrases (``"a red shape"``, ``"a green shape"``, ...; :func:`vitdecomp.datasets.factor_phrase`) encoded
by the small CLIP's text tower (:class:`vitdecomp.TextEncoder`, raw texts: the concept world's vocabulary has no
ImageNet templates), and CompAttribute scores the components (:func:`vitdecomp.mean_correlation`; also
:func:`vitdecomp.variance_explained` against ``r2``).

**Metrics** per model and property:

* Spearman rank correlation of the score with ``attribution`` and with ``r2`` (and of VE with ``r2``); as a
  property-blind control, the same for the ranking by each component's total variance (large components carry
  more of everything);
* precision@k: the share of the top-k components by score that are among the top-k by ``attribution``
  (chance k/C; control: the top-k by variance);
* TextSpan: for every component, does the first text TextSpan picks from the pool of all 25 single-factor phrases
  name the factor with the highest ``r2``? (over components whose variance is at least 1% of the largest);
* retrieval by reference image: precision@10 of images sharing the query's factor value, ranking by the cosine of
  Σ_{i∈S} c_i over S = the top-k components by *specificity* for the property, versus the whole representation z,
  versus S = the top-k by ground truth (oracle); chance 1/|values|;
* spurious repair (``*_spurious`` models, small vs large with the background correlated in training): worst-group
  accuracy on the balanced test split before and after mean-ablating the top-k components by
  score(background) − score(size) (:func:`vitdecomp.ablation.repair_spurious`, means from the held-out validation
  split), for several k, and with the ground-truth ranking A(background) − A(size) as the oracle.

:func:`evaluate` runs it for one model; ``benchmarks/concept_world.py`` for all of them.
"""

from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Sequence

import attrs
import torch

from .. import datasets as D
from . import models as M

__all__ = ["ModelRun", "prepare_run", "ground_truth", "spearman", "evaluate", "evaluate_spurious", "property_texts",
           "single_factor_pool", "caption_pool", "text_encoder", "decompose_images", "clip_embeddings",
           "factor_independence", "goals", "GOALS", "goals_markdown", "independence_markdown"]

#: The validity goals of the concept world (issue #17): Spearman ρ(score, attribution) per property and family;
#: TextSpan's first pick naming the true factor for components that carry one; property-restricted retrieval at least
#: as precise as the whole representation; spurious repair by scores reaching this share of the oracle's
#: worst-group gain.
GOALS = {"spearman": 0.8, "textspan": 0.8, "retrieval_vs_whole": 0.0, "repair_share": 0.8}
#: A component "carries a factor" when that factor explains at least this share of its variance (R²) and the
#: component's variance is at least 1% of the largest component's.
CARRY_R2 = 0.25

FIT_SEED = 2  # images the aligner is fitted on (and ablation means are estimated on)
EVAL_SEED = 3  # images everything is measured on


def property_texts(factor: str) -> List[str]:
    """The texts of property ``factor``: its phrase for every value (``"a red shape"``, ...)."""
    return [D.factor_phrase(factor, v) for v in D.FACTORS[factor]]


def single_factor_pool() -> List[str]:
    """The 25 single-factor phrases (TextSpan's pool for the ground-truth check)."""
    return [t for f in D.FACTOR_NAMES for t in property_texts(f)]


def caption_pool(n: int = 400, seed: int = 0) -> List[str]:
    """A pool of concept-world descriptions for TextSpan: the single-factor phrases, every two-factor combination
    of values for pairs of factors sampled at random, and some full captions (deduplicated, ``n`` at most)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pool = single_factor_pool()
    while len(pool) < n:
        k = int(rng.choice([2, 3, 6], p=[0.6, 0.3, 0.1]))
        mention = list(rng.choice(D.FACTOR_NAMES, size=k, replace=False))
        pool.append(D.caption(D.sample_factors(rng), mention))
        pool = list(dict.fromkeys(pool))
    return pool[:n]


def text_encoder(clip=None):
    """A :class:`vitdecomp.TextEncoder` over the small CLIP's text tower and word tokenizer."""
    from ..text import TextEncoder

    clip = clip if clip is not None else M.load("clip")
    return TextEncoder.from_model(clip, M.tokenizer(), name="vitdecomp:concept_world/clip", device="cpu")


@torch.no_grad()
def clip_embeddings(clip, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """L2-normalised small-CLIP image embeddings ``[N, d]``."""
    out = [torch.nn.functional.normalize(clip.encode_image(images[i:i + batch]), dim=-1)
           for i in range(0, len(images), batch)]
    return torch.cat(out)


def decompose_images(name: str, model, images: torch.Tensor, *, batch: int = 250):
    """Exact decomposition (heads split, explicit biases) of 64×64 concept-world ``images`` for model ``name``:
    ``(contributions [N, C, D], representation [N, D], names, max relative error)``."""
    from ..api import decompose

    cs, zs, err, names = [], [], 0.0, None
    for i in range(0, len(images), batch):
        dec = decompose(model, M.prepare(name, images[i:i + batch]), check=True)
        cs.append(dec.contributions)
        zs.append(dec.representation)
        err = max(err, dec.error)
        names = dec.names
    return torch.cat(cs), torch.cat(zs), names, err


# ---------------------------------------------------------------------------------------------- ground truth
def ground_truth(contributions: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
    """``{"r2": [C], "attribution": [C]}`` for one factor (``labels`` [N] value indices); see the module docstring."""
    c = contributions.to(torch.float64)
    c = c - c.mean(0)
    N, C, Dm = c.shape
    K = int(labels.max()) + 1
    onehot = torch.nn.functional.one_hot(labels, K).to(torch.float64)  # [N, K]
    counts = onehot.sum(0).clamp_min(1)
    means = torch.einsum("nk,ncd->kcd", onehot, c) / counts[:, None, None]  # m_i(v) [K, C, D]
    between = (counts[:, None, None] * means.pow(2)).sum((0, 2))  # Σ_x ‖m_i(v(x))‖²
    total = c.pow(2).sum((0, 2))
    r2 = torch.where(total > 0, between / total.clamp_min(1e-300), torch.zeros_like(total))
    Mv = means.sum(1)  # [K, D]
    attr = torch.einsum("k,kcd,kd->c", counts, means, Mv) / (counts[:, None] * Mv.pow(2)).sum()
    return {"r2": r2, "attribution": attr}


def _rank(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank)."""
    x = x.to(torch.float64)
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    for v in torch.unique(x):
        m = x == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two ``[C]`` vectors."""
    ra, rb = _rank(a), _rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def precision_at_k(score: torch.Tensor, truth: torch.Tensor, k: int) -> float:
    top_s = set(torch.argsort(score.to(torch.float64), descending=True, stable=True)[:k].tolist())
    top_t = set(torch.argsort(truth.to(torch.float64), descending=True, stable=True)[:k].tolist())
    return len(top_s & top_t) / k


def retrieval_precision(contributions: torch.Tensor, labels: torch.Tensor, subset: Optional[Sequence[int]],
                        queries: torch.Tensor, top: int = 10) -> float:
    """Mean over ``queries`` of the share of the ``top`` nearest images (cosine of Σ_{i∈subset} c_i; the whole
    representation when ``subset`` is None; the query itself excluded) that share the query's label."""
    c = contributions.to(torch.float64)
    v = c.sum(1) if subset is None else c[:, list(subset)].sum(1)
    v = torch.nn.functional.normalize(v, dim=-1)
    sim = v[queries] @ v.T  # [Q, N]
    sim[torch.arange(len(queries)), queries] = -math.inf
    nn = sim.topk(top, dim=1).indices
    return float((labels[nn] == labels[queries, None]).to(torch.float64).mean())


# ---------------------------------------------------------------------------------------------- runs
@attrs.define(eq=False)
class ModelRun:
    """Everything measured on one model: the decomposition of the evaluation images, the aligner, the aligned
    contributions, scores and ground truth per property."""

    name: str
    model: object
    names: tuple
    contributions: torch.Tensor  # [N, C, D] evaluation images
    representation: torch.Tensor
    table: torch.Tensor  # [N, 6] factor indices of the evaluation images
    aligner: object
    aligned: torch.Tensor  # [N, C, d]
    bases: Dict[str, torch.Tensor]
    scores: Dict[str, torch.Tensor]
    variance_explained: Dict[str, torch.Tensor]
    truth: Dict[str, Dict[str, torch.Tensor]]
    error: float
    held_out_cosine: Optional[float]
    timings: Dict[str, float] = attrs.field(factory=dict)


def prepare_run(name: str, *, clip=None, encoder=None, n_fit: int = 2000, n_eval: int = 2000, model=None,
                fit_images: Optional[torch.Tensor] = None, eval_dataset: Optional[D.ConceptWorld] = None,
                eval_images: Optional[torch.Tensor] = None, max_epochs: int = 60, progress: bool = False,
                properties: Sequence[str] = D.FACTOR_NAMES) -> ModelRun:
    """Decompose, align, score and measure the ground truth for model ``name`` (a factor classifier or ``clip``,
    whose aligner is the identity)."""
    from ..compalign import Aligner, fit_aligner
    from ..scores import mean_correlation, variance_explained

    timings = {}
    clip = clip if clip is not None else M.load("clip")
    encoder = encoder if encoder is not None else text_encoder(clip)
    model = model if model is not None else M.load(name)
    eval_ds = eval_dataset if eval_dataset is not None else D.ConceptWorld(n_eval, EVAL_SEED)
    t0 = time.perf_counter()
    X_eval = eval_images if eval_images is not None else eval_ds.tensors()
    table = eval_ds.factor_table()
    timings["generate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    C_eval, Z_eval, names, err = decompose_images(name, model, X_eval)
    timings["decompose"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if name == "clip":
        aligner = Aligner.identity(names, C_eval.shape[-1], model_name="concept_world:clip")
        held = None
    else:
        X_fit = fit_images if fit_images is not None else D.ConceptWorld(n_fit, FIT_SEED).tensors()
        C_fit, _, _, e2 = decompose_images(name, model, X_fit)
        err = max(err, e2)
        aligner = fit_aligner(C_fit, clip_embeddings(clip, X_fit), names=names, model_name=f"concept_world:{name}",
                              clip_model="concept_world:clip", max_epochs=max_epochs, progress=progress)
        held = aligner.held_out_cosine
    timings["align"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        aligned = aligner(C_eval)
    bases = {f: encoder.encode(property_texts(f), templates=None, progress=False) for f in properties}
    scores = {f: mean_correlation(aligned, b) for f, b in bases.items()}
    ve = {f: variance_explained(aligned, b) for f, b in bases.items()}
    truth = {f: ground_truth(C_eval, table[:, D.FACTOR_NAMES.index(f)]) for f in properties}
    timings["score"] = time.perf_counter() - t0
    return ModelRun(name=name, model=model, names=tuple(names), contributions=C_eval, representation=Z_eval,
                    table=table, aligner=aligner, aligned=aligned, bases=bases, scores=scores, variance_explained=ve,
                    truth=truth, error=err, held_out_cosine=held, timings=timings)


def textspan_agreement(run: ModelRun, encoder, *, min_share: float = 0.01) -> dict:
    """TextSpan (1 pick per component from the 25 single-factor phrases) versus the factor with the highest r2."""
    from ..spans import textspan

    pool = single_factor_pool()
    owner = [f for f in D.FACTOR_NAMES for _ in D.FACTORS[f]]
    T = encoder.encode(pool, templates=None, progress=False)
    var = (run.contributions - run.contributions.mean(0)).pow(2).sum((0, 2))
    keep = [i for i in range(len(run.names)) if var[i] >= min_share * var.max()]
    props = [f for f in D.FACTOR_NAMES if f in run.truth]
    hits, picks, carry_hits, carry, wrong = 0, {}, 0, 0, {}
    for i in keep:
        pick = textspan(run.aligned[:, i], T, pool, iters=1, rank=80)
        if not pick:
            continue
        fac = owner[pool.index(pick[0].text)]
        best = max(props, key=lambda f: float(run.truth[f]["r2"][i]))
        picks[run.names[i]] = (pick[0].text, best)
        hits += fac == best
        if float(run.truth[best]["r2"][i]) >= CARRY_R2:
            carry += 1
            carry_hits += fac == best
            if fac != best:
                wrong[f"{best} → {fac}"] = wrong.get(f"{best} → {fac}", 0) + 1
    return {"agreement": hits / max(1, len(picks)), "n_components": len(picks), "picks": picks,
            "carrying_agreement": carry_hits / carry if carry else None, "n_carrying": carry,
            "carrying_misses": dict(sorted(wrong.items(), key=lambda kv: -kv[1]))}


def evaluate(run: ModelRun, *, k: Optional[int] = None, queries: int = 200, seed: int = 0,
             encoder=None) -> dict:
    """The metrics of the module docstring for one :class:`ModelRun`: ``{property: {...}, "textspan": ...}``."""
    from ..scores import specificity

    C = len(run.names)
    k = k if k is not None else max(3, round(0.1 * C))
    g = torch.Generator().manual_seed(seed)
    q = torch.randperm(run.contributions.shape[0], generator=g)[:queries]
    out = {"model": run.name, "components": C, "k": k, "reconstruction_error": run.error,
           "held_out_cosine": run.held_out_cosine, "properties": {}}
    # a property-blind control: rank components by how much they vary at all
    variance = (run.contributions.to(torch.float64) - run.contributions.to(torch.float64).mean(0)).pow(2).sum((0, 2))
    for f in run.scores:
        s, ve, gt = run.scores[f], run.variance_explained[f], run.truth[f]
        spec = specificity(run.scores, f)
        labels = run.table[:, D.FACTOR_NAMES.index(f)]
        top_spec = torch.argsort(spec, descending=True, stable=True)[:k].tolist()
        top_gt = torch.argsort(gt["attribution"], descending=True, stable=True)[:k].tolist()
        out["properties"][f] = {
            "spearman_score_attribution": spearman(s, gt["attribution"]),
            "spearman_score_r2": spearman(s, gt["r2"]),
            "spearman_ve_r2": spearman(ve, gt["r2"]),
            "spearman_variance_attribution": spearman(variance, gt["attribution"]),
            "precision_at_k_variance": precision_at_k(variance, gt["attribution"], k),
            "precision_at_k": precision_at_k(s, gt["attribution"], k),
            "precision_at_k_chance": k / C,
            "retrieval_components": retrieval_precision(run.contributions, labels, top_spec, q),
            "retrieval_whole": retrieval_precision(run.contributions, labels, None, q),
            "retrieval_oracle": retrieval_precision(run.contributions, labels, top_gt, q),
            "retrieval_chance": 1 / len(D.FACTORS[f]),
            "top_by_score": [run.names[i] for i in torch.argsort(s, descending=True, stable=True)[:k].tolist()],
            "top_by_truth": [run.names[i] for i in top_gt],
            "attribution_captured_by_top_k": float(gt["attribution"][torch.argsort(s, descending=True)[:k]].sum()),
        }
        # where a low ρ comes from (measured): is the factor's share of each component kept by the aligner (truth
        # recomputed on the aligned contributions), and does the score rank the aligned truth?
        aligned_gt = ground_truth(run.aligned, labels)["attribution"]
        out["properties"][f]["spearman_aligned_truth"] = spearman(aligned_gt, gt["attribution"])
        out["properties"][f]["spearman_score_aligned_attribution"] = spearman(s, aligned_gt)
    if encoder is not None:
        out["textspan"] = textspan_agreement(run, encoder)
    return out


def evaluate_spurious(arch: str, *, clip=None, encoder=None, n_val: int = 2000, n_test: int = 2000,
                      ks: Sequence[int] = (1, 2, 3, 5, 10), max_epochs: int = 60, progress: bool = False) -> dict:
    """Spurious repair on ``<arch>_spurious``: CompAttribute ranking by score(background) − score(size) versus the
    ground-truth ranking, worst-group accuracy before / after mean ablation of the top k."""
    from ..ablation import prediction_head, repair_spurious
    from ..compalign import fit_aligner
    from ..scores import mean_correlation

    name = f"{arch}_spurious"
    clip = clip if clip is not None else M.load("clip")
    encoder = encoder if encoder is not None else text_encoder(clip)
    model = M.load(name)
    val = D.SpuriousConceptWorld(n_val, FIT_SEED, split="val")
    test = D.SpuriousConceptWorld(n_test, EVAL_SEED, split="test")
    Xv, Xt = val.tensors(), test.tensors()
    Cv, Zv, names, e1 = decompose_images(name, model, Xv)
    Ct, Zt, _, e2 = decompose_images(name, model, Xt)
    aligner = fit_aligner(Cv, clip_embeddings(clip, Xv), names=names, model_name=f"concept_world:{name}",
                          clip_model="concept_world:clip", max_epochs=max_epochs, progress=progress)
    with torch.no_grad():
        av = aligner(Cv)
    s_sp = mean_correlation(av, encoder.encode(property_texts("background"), templates=None, progress=False))
    s_core = mean_correlation(av, encoder.encode(property_texts(D.SPURIOUS_FACTOR), templates=None, progress=False))
    gt_sp = ground_truth(Cv, val.labels("background"))["attribution"]
    gt_core = ground_truth(Cv, val.labels("label"))["attribution"]
    head = prediction_head(model)
    y = test.labels("label")
    places = torch.tensor([D.SPURIOUS_BACKGROUNDS.index(test.factors(i)["background"]) for i in range(len(test))])
    res = {"model": name, "components": len(names), "reconstruction_error": max(e1, e2),
           "held_out_cosine": aligner.held_out_cosine,
           "spearman_difference": spearman(s_sp - s_core, gt_sp - gt_core), "by_k": {}}
    for k in ks:
        if k > len(names):
            continue
        r = repair_spurious(Ct, y, places, Cv, head, s_sp, s_core, k=k, names=names, representation=Zt)
        o = repair_spurious(Ct, y, places, Cv, head, gt_sp, gt_core, k=k, names=names, representation=Zt)
        res["by_k"][k] = {"before_worst": r.before.worst, "before_average": r.before.average,
                          "after_worst": r.after.worst, "after_average": r.after.average,
                          "oracle_after_worst": o.after.worst, "oracle_after_average": o.after.average,
                          "components": list(r.components), "oracle_components": list(o.components)}
        gain, oracle_gain = r.after.worst - r.before.worst, o.after.worst - r.before.worst
        res["by_k"][k]["share_of_oracle_gain"] = gain / oracle_gain if oracle_gain > 0 else None
    return res


def factor_independence(dataset) -> dict:
    """Cramér's V between every pair of factors over ``dataset`` (0: independent, 1: one determines the other):
    ``{"pairs": {f: {g: V}}`` (f before g in :data:`~vitdecomp.datasets.FACTOR_NAMES`), ``"max": [f, g, V], "n": N}``. Shows the world has no shortcut between factors."""
    table = dataset.factor_table()
    pairs = {}
    for a in range(len(D.FACTOR_NAMES)):
        for b in range(a + 1, len(D.FACTOR_NAMES)):
            ka, kb = len(D.FACTORS[D.FACTOR_NAMES[a]]), len(D.FACTORS[D.FACTOR_NAMES[b]])
            counts = torch.zeros(ka, kb, dtype=torch.float64)
            counts.index_put_((table[:, a], table[:, b]), torch.ones(len(table), dtype=torch.float64), accumulate=True)
            n = counts.sum()
            expect = counts.sum(1, keepdim=True) * counts.sum(0, keepdim=True) / n
            chi2 = float(((counts - expect) ** 2 / expect.clamp_min(1e-12)).sum())
            pairs.setdefault(D.FACTOR_NAMES[a], {})[D.FACTOR_NAMES[b]] = math.sqrt(chi2 / (float(n) * (min(ka, kb) - 1)))
    worst = max(((f, g, v) for f, row in pairs.items() for g, v in row.items()), key=lambda t: t[2])
    return {"pairs": pairs, "max": list(worst), "n": len(table)}


def goals(results: dict) -> List[dict]:
    """Each validity goal of :data:`GOALS` checked on ``results`` (``{"models": {name: evaluate(...)},
    "spurious": {arch: evaluate_spurious(...)}}``): rows ``{model, property, goal, value, target, met, short_by,
    why}``; ``why`` gives the measured diagnosis of a miss (the aligner's and the score's share of it, or the
    model's / the small CLIP's accuracy when either does not know the factor)."""
    rows = []
    for name, res in results.get("models", {}).items():
        for f, r in res["properties"].items():
            rho = r["spearman_score_attribution"]
            why = None
            if not rho >= GOALS["spearman"]:
                why = (f"aligner keeps the truth's ranking at ρ {r.get('spearman_aligned_truth', float('nan')):.2f}; "
                       f"the score ranks the aligned truth at ρ {r.get('spearman_score_aligned_attribution', float('nan')):.2f}")
            rows.append({"model": name, "property": f, "goal": "ρ(score, truth)", "value": rho,
                         "target": GOALS["spearman"], "met": bool(rho >= GOALS["spearman"]),
                         "short_by": max(0.0, GOALS["spearman"] - rho) if rho == rho else None, "why": why})
            diff = r["retrieval_components"] - r["retrieval_whole"]
            rows.append({"model": name, "property": f, "goal": "retrieval: components − whole", "value": diff,
                         "target": GOALS["retrieval_vs_whole"], "met": bool(diff >= -1e-12),
                         "short_by": max(0.0, -diff),
                         "why": None if diff >= -1e-12 else
                         f"oracle components reach {r['retrieval_oracle']:.2f} vs whole {r['retrieval_whole']:.2f}"})
        ts = res.get("textspan")
        if ts and ts.get("carrying_agreement") is not None:
            v = ts["carrying_agreement"]
            rows.append({"model": name, "property": "(all)", "goal": "TextSpan first pick", "value": v,
                         "target": GOALS["textspan"], "met": bool(v >= GOALS["textspan"]),
                         "short_by": max(0.0, GOALS["textspan"] - v),
                         "why": None if v >= GOALS["textspan"] else
                         f"of {ts['n_carrying']} carrying components, wrong picks (true factor → picked): " +
                         (", ".join(f"{k} ×{n}" for k, n in ts.get("carrying_misses", {}).items()) or "none")})
    for arch, sp in results.get("spurious", {}).items():
        shares = {k: r["share_of_oracle_gain"] for k, r in sp["by_k"].items() if r.get("share_of_oracle_gain") is not None}
        if not shares:
            continue
        k_best = max(shares, key=lambda k: shares[k])
        v = shares[k_best]
        rows.append({"model": f"{arch}_spurious", "property": "repair", "goal": "share of oracle worst-group gain",
                     "value": v, "target": GOALS["repair_share"], "met": bool(v >= GOALS["repair_share"]),
                     "short_by": max(0.0, GOALS["repair_share"] - v), "k": k_best,
                     "why": None if v >= GOALS["repair_share"] else
                     f"ρ(score difference, truth difference) {sp['spearman_difference']:.2f}; the oracle itself gains "
                     f"{sp['by_k'][k_best]['oracle_after_worst'] - sp['by_k'][k_best]['before_worst']:+.3f} from a "
                     f"worst group of {sp['by_k'][k_best]['before_worst']:.3f}"})
    return rows


def _fmt(x, nd=2):
    return "–" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def goals_markdown(results: dict) -> list:
    """The validity goals (`vitdecomp.concept_world.evaluate.GOALS`), met or missed by how much, and why."""
    rows = goals(results)
    met = sum(r["met"] for r in rows)
    md = ["", "## Goals", "",
          f"{met} of {len(rows)} met. Goals: ρ(score, truth) ≥ {GOALS['spearman']} for every property and family; "
          f"TextSpan's first pick names the true factor for ≥ {GOALS['textspan']:.0%} of the components that carry "
          f"one (R² ≥ {CARRY_R2}); property-restricted retrieval at least as precise as the whole representation; "
          f"spurious repair by scores reaching ≥ {GOALS['repair_share']:.0%} of the oracle's worst-group gain (best k). "
          "A miss says by how much and what was measured about it: whether the aligner keeps the ground truth's "
          "ranking (truth recomputed on the aligned contributions) and whether the score ranks that aligned truth.", "",
          "| model | property | goal | value | target | met | short by | measured |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = f" (k = {r['k']})" if "k" in r else ""
        md.append(f"| {r['model']} | {r['property']} | {r['goal']}{k} | {_fmt(r['value'])} | {_fmt(r['target'])} | "
                  f"{'yes' if r['met'] else '**no**'} | {_fmt(r['short_by']) if not r['met'] else ''} | {r['why'] or ''} |")
    return md


def independence_markdown(sets: Dict[str, dict]) -> list:
    """Cramér's V between the factors of each named image set (``{"training": factor_independence(...), ...}``)."""
    names = list(D.FACTOR_NAMES)
    labels = " / ".join(f"the {ind['n']:,} {label} images" for label, ind in sets.items())
    md = ["", "## The factors are independent", "",
          f"Cramér's V between every pair of factors (0: independent, 1: one determines the other) over {labels}. "
          "The only planted correlation is the spurious split's (background ↔ size, used by `*_spurious` only).",
          "", "| | " + " | ".join(names[1:]) + " |", "|---|" + "---|" * (len(names) - 1)]
    for a in names[:-1]:
        rows = [ind["pairs"].get(a, {}) for ind in sets.values()]
        cells = [" / ".join(f"{r[b]:.3f}" for r in rows) if b in rows[0] else "" for b in names[1:]]
        md.append(f"| {a} | " + " | ".join(cells) + " |")
    ks, kc = len(D.FACTORS["shape"]), len(D.FACTORS["color"])
    largest = "; ".join(f"{ind['max'][0]}–{ind['max'][1]} {ind['max'][2]:.3f} ({label})" for label, ind in sets.items())
    chance = " / ".join(f"{((ks - 1) * (kc - 1) / (ind['n'] * (min(ks, kc) - 1))) ** 0.5:.3f}" for ind in sets.values())
    md += ["", f"Largest: {largest}. Sampling alone gives V ≈ √((k_a − 1)(k_b − 1) / (N (min(k_a, k_b) − 1))) for "
           f"independent factors, e.g. {chance} for shape–color at these N."]
    return md
