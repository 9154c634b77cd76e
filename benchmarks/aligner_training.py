"""CompAlign training: the dual fit (``method="dual"``), joint L-BFGS (``"joint"``), block-coordinate sweeps
(``"bcd"``) and Adam (``"adam"``).

Data: planted targets written as a real extraction cache (float16 shards, exactly what :func:`vitdecomp.extract`
writes), so ``fit_aligner`` streams it as it would a real one. Component i contributes c_i(x) = s_i·g + o_i
(g ~ N(0, I_D), scales s_i from 0.5 to 2, offsets o_i); the targets are t(x) = Σ_i c_i(x) Q_i + q + ε(x) with
known maps Q_i (orthonormal columns, or rows when D < d), a bias q and isotropic noise ε with ‖ε‖ ≈ ``--noise``·
‖Σ c_i Q_i‖, so the best achievable held-out cosine is below 1. Reported per fit: wall time, sweeps/epochs,
held-out cosine, the baseline (one shared ridge map of Σ_i c_i), the isometry deviation (1/(C·d))·Σ‖G_i − I‖²_F
and max_i ‖G_i − I‖_F/√k (G_i the Gram matrix on the achievable side, k its size), and the relative map error.

    # a cache (≈ N·C·D·2 bytes) under /tmp, then fits on it; delete it afterwards
    python benchmarks/aligner_training.py write /tmp/planted --n 10000 --c 150 --dim 768 --target-dim 768
    python benchmarks/aligner_training.py fit /tmp/planted --method dual --threads 2 --json dual.json
    python benchmarks/aligner_training.py fit /tmp/planted --method dual --isometric --threads 2   # exact isometries
    python benchmarks/aligner_training.py fit /tmp/planted --method adam --threads 2 --json adam.json  # hours
    python benchmarks/aligner_training.py fit /tmp/planted --method joint --threads 2 --max-epochs 25 --json j.json
    python benchmarks/aligner_training.py adam-steps /tmp/planted --steps 3   # Adam's per-step time, extrapolated
    python benchmarks/aligner_training.py bcd-blocks /tmp/planted --blocks 2  # bcd's per-block time, extrapolated
    python benchmarks/aligner_training.py block-times --dim 384 --target-dim 768   # the same on random data
    python benchmarks/aligner_training.py block-times --dim 384 --target-dim 768 --adam   # Adam's step there
    python benchmarks/aligner_training.py compare --n 10000 --c 150 --dim 96 --methods dual joint adam bcd  # to their stops
    # in memory, one thread: plain bcd, bcd with a proximal schedule κ_k = 16·0.7^(k−1), and Adam on the same data
    python benchmarks/aligner_training.py schedules --n 300 --c 16 --dim 48 --runs joint adam bcd prox:16,0.7
    # n_train = 0.078·C·D with 1,000 held-out images on top; joint as shipped, with a 30-iteration ramp, and as it
    # was before (pairs reset at every ramp step, no isometric finish, 10-iteration ramp)
    python benchmarks/aligner_training.py schedules --ratio 0.078 --c 150 --dim 32 --runs dual adam joint joint:30 \
        joint-reset-noiso:10
    python benchmarks/aligner_training.py joint-probe --n 300 --c 16 --dim 48   # full-batch GD and L-BFGS, all maps
    python benchmarks/aligner_training.py stiefel --ratio 0.35 --c 150 --dim 32 [--start joint] [--det-oracle]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def _maps(C, D, d, g):
    k = max(D, d)
    return torch.stack([torch.linalg.qr(torch.randn(k, k, generator=g))[0][:D, :d] for _ in range(C)])


def write_cache(out, N, C, D, d, noise=0.1, shard=500, seed=0):
    """Write a planted extraction cache to ``out`` (must not exist) and the planted maps beside it.

    The cache is in the current format (``vitdecomp.extraction/2``: settings digest and checksum in every shard,
    written by the library's own shard writer), so :meth:`ExtractionCache.open` verifies it like any other."""
    import hashlib

    from vitdecomp import extraction as X
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    g = torch.Generator().manual_seed(seed)
    maps = _maps(C, D, d, g)
    scale = torch.linspace(0.5, 2.0, C)[None, :, None]
    offset = 0.3 * torch.randn(C, D, generator=g)
    bias = 0.2 * torch.randn(d, generator=g)
    names = [f"planted.{i}" for i in range(C)]
    num = math.ceil(N / shard)
    ident = f"planted:N{N}-C{C}-D{D}-d{d}-noise{noise}-seed{seed}"
    settings = {"format": X._FORMAT, "model": f"planted:C{C}-D{D}",
                "model_fingerprint": hashlib.sha256(ident.encode()).hexdigest()[:32],
                "decompose": {"heads": True, "start": None, "tokens": None, "bias": "explicit"}, "dtype": "float16",
                "clip_model": f"planted-clip:d{d}", "clip_fingerprint": None, "shard_size": shard, "num_images": N,
                "num_shards": num, "data_fingerprint": f"dataset:{N}", "autocast": None,
                "data": {"kind": "dataset", "class": "benchmarks.aligner_training.planted"}}
    settings = json.loads(json.dumps(settings))
    digest = X._settings_digest(settings)
    for j in range(num):
        a, b = j * shard, min(N, (j + 1) * shard)
        c = (torch.randn(b - a, C, D, generator=g) * scale + offset).half()
        clean = c.float().reshape(b - a, C * D) @ maps.reshape(C * D, d)
        eps = torch.randn(b - a, d, generator=g)
        eps = eps * (noise * clean.norm(dim=1, keepdim=True) / eps.norm(dim=1, keepdim=True))
        t = torch.nn.functional.normalize(clean + bias + eps, dim=-1)
        tensors = {"contributions": c.contiguous(), "representation": c.float().sum(1).contiguous(),
                   "targets": t.contiguous()}
        shard_meta = {"start": a, "stop": b, "labels": [None] * (b - a), "max_error": 0.0, "settings": digest,
                      "inputs": [hashlib.sha256(f"{ident}:{i}".encode()).hexdigest()[:32] for i in range(a, b)],
                      "skipped": []}
        shard_meta["checksum"] = X._checksum(tensors, shard_meta)
        X._write_shard(out, j, tensors, shard_meta, j)
    meta = {**settings, "names": names, "dim": D, "target_dim": d, "complete": True, "world_size": 1,
            "index": [{"file": X._shard_name(j), "start": j * shard, "stop": min(N, (j + 1) * shard), "rank": 0}
                      for j in range(num)]}
    X._atomic_write_json(out / "meta.json", meta)
    save_file({"maps": maps.contiguous()}, str(out / "planted_maps.safetensors"))
    return out


def _isometry(W):
    C, D, d = W.shape
    G = W.transpose(1, 2) @ W if D >= d else W @ W.transpose(1, 2)
    E = G - torch.eye(G.shape[1])
    per = E.pow(2).sum((1, 2))
    return float(per.sum() / (C * d)), float((per.sqrt() / math.sqrt(G.shape[1])).max())


def fit(path, method, **kw):
    from safetensors.torch import load_file

    import vitdecomp

    cache = vitdecomp.ExtractionCache.open(path)
    maps = load_file(str(Path(path) / "planted_maps.safetensors"))["maps"]
    t0, p0 = time.perf_counter(), time.process_time()
    al = vitdecomp.fit_aligner(cache, method=method, **kw)
    wall, cpu = time.perf_counter() - t0, time.process_time() - p0
    pen, worst = _isometry(al.weight)
    rel = (al.weight - maps).norm(dim=(1, 2)) / maps.norm(dim=(1, 2))
    return {"method": method, "isometric": bool(kw.get("isometric")), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "steps": len(al.history) - 1,
            "best": al.config["best_epoch"], "held_out_cosine": al.held_out_cosine, "baseline_cosine": al.init_cosine,
            "isometry_penalty": pen, "isometry_max_dev": worst, "map_error_median": float(rel.median()),
            "map_error_max": float(rel.max()), "stopped": al.config.get("stopped"),
            "curve": [h.get("val_cosine") for h in al.history], "seconds": [h.get("seconds") for h in al.history],
            "history": al.history}


def planted(N, C, D, d, noise=0.1, seed=0):
    """The planted problem of :func:`write_cache` in memory (one draw of all N images): (c [N, C, D] with float16
    values, unnormalised targets [N, d], maps [C, D, d], the planted bias [d])."""
    g = torch.Generator().manual_seed(seed)
    maps = _maps(C, D, d, g)
    scale = torch.linspace(0.5, 2.0, C)[None, :, None]
    offset = 0.3 * torch.randn(C, D, generator=g)
    bias = 0.2 * torch.randn(d, generator=g)
    c = (torch.randn(N, C, D, generator=g) * scale + offset).half().float()
    clean = c.reshape(N, C * D) @ maps.reshape(C * D, d)
    eps = torch.randn(N, d, generator=g)
    eps = eps * (noise * clean.norm(dim=1, keepdim=True) / eps.norm(dim=1, keepdim=True))
    return c, clean + bias + eps, maps, bias


def schedules(N, C, D, d, runs, noise=0.1, val_fraction=0.1):
    """Fits on one in-memory planted problem (same data and held-out split for every run): ``"dual"``, ``"joint"``,
    ``"adam"``, ``"bcd"``
    (the plain block steps) or ``"prox:START,DECAY"`` (bcd whose block steps minimise the objective plus the
    proximal term (κ_k·ā/2)·‖ΔW_i‖², κ_k = START·DECAY^(k−1); see vitdecomp.compalign._PROX_START). ``joint`` and
    ``adam`` take ``:W`` for ``penalty_warmup=W``; ``joint`` also ``-reset`` (its L-BFGS pairs dropped at every
    ramp step, ``compalign._RAMP_RESET``) and ``-noiso`` (no isometric finish, ``compalign._ISO_FINISH``), e.g.
    ``joint-reset-noiso:10``, the joint fit as it was before. Besides the fields of :func:`fit`: the training
    objective at the result, the held-out cosine against the noise-free targets Σ_i c_i Q_i + q, the share of
    maps with the planted determinant sign (D = d) and what the isometric finish gave."""
    import vitdecomp.compalign as ca

    c, t, maps, bias = planted(N, C, D, d, noise)
    g = torch.Generator().manual_seed(0)  # fit_aligner's held-out split (seed 0)
    val = torch.zeros(N, dtype=torch.bool)
    val[torch.randperm(N, generator=g)[: round(val_fraction * N)]] = True
    saved = ca._PROX_START, ca._PROX_DECAY, ca._RAMP_RESET, ca._ISO_FINISH
    out = []
    try:
        for run in runs:
            base, _, arg = run.partition(":")  # e.g. "prox:16,0.7", "joint-reset-noiso:10"
            method, kw = base.split("-")[0], {}
            ca._PROX_START, ca._PROX_DECAY = 0.0, 0.7
            ca._RAMP_RESET, ca._ISO_FINISH = "-reset" in base, "-noiso" not in base
            if method == "prox":
                method = "bcd"
                ca._PROX_START, ca._PROX_DECAY = map(float, arg.split(","))
            elif arg:
                kw["penalty_warmup"] = int(arg)
            t0, p0 = time.perf_counter(), time.process_time()
            al = ca.fit_aligner(c, t, method=method, val_fraction=val_fraction, progress=False, **kw)
            wall, cpu = time.perf_counter() - t0, time.process_time() - p0
            pen, worst = _isometry(al.weight)
            rel = (al.weight - maps).norm(dim=(1, 2)) / maps.norm(dim=(1, 2))
            clean = torch.einsum("ncD,cDd->nd", c[val], maps) + bias
            out.append({"run": run, "n_train": int((~val).sum()), "ratio": round(int((~val).sum()) / (C * D), 2),
                        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "steps": len(al.history) - 1,
                        "best": al.config["best_epoch"],
                        "held_out_cosine": al.held_out_cosine, "baseline_cosine": al.init_cosine,
                        "train_objective": float(1 - al.cosine(c[~val], t[~val]).mean()) + pen,
                        "cosine_vs_noise_free": float(torch.nn.functional.cosine_similarity(
                            al.total(c[val]), clean, dim=-1).mean()),
                        "isometry_penalty": pen, "isometry_max_dev": worst, "map_error_median": float(rel.median()),
                        "map_error_max": float(rel.max()), "stopped": al.config.get("stopped"),
                        "det_agrees": float((torch.linalg.det(al.weight).sign() == torch.linalg.det(maps).sign())
                                            .float().mean()) if D == d else None,
                        "isometric_finish": {k: al.history[-1].get(k) for k in ("taken", "val_cosine")}
                        if al.history[-1].get("projected") else None,
                        "curve": [round(h.get("val_cosine"), 4) for h in al.history], "load_after": os.getloadavg()})
            print(json.dumps(out[-1]), flush=True)
    finally:
        ca._PROX_START, ca._PROX_DECAY, ca._RAMP_RESET, ca._ISO_FINISH = saved
    return out


def joint_probe(N, C, D, d, sgd_lr=30.0, sgd_steps=1500, lbfgs_iters=30, noise=0.1):
    """Full-batch joint steps on every map at once, on the in-memory planted problem of :func:`schedules` (same
    start, data and held-out split as fit_aligner): plain gradient descent (``sgd_lr``) and L-BFGS (history 10,
    strong-Wolfe line search), the same objective (1 − cos + the exact penalty, λ = 1). Reports the best held-out
    cosine and where it was reached, in full passes over the training images (forward + backward each): a probe
    of what a joint (not block-wise) step does where the maps are underdetermined, not a fitter."""
    from vitdecomp.compalign import _Data, _closed_form, _penalty

    c, t, _, _ = planted(N, C, D, d, noise)
    t = torch.nn.functional.normalize(t, dim=-1)
    g = torch.Generator().manual_seed(0)
    val = torch.zeros(N, dtype=torch.bool)
    val[torch.randperm(N, generator=g)[: round(0.1 * N)]] = True
    W0, b0 = _closed_form(_Data.of(c), t, ~val, 1e-3, 1024, torch.device("cpu"))
    ct, tt, cv, tv = c[~val].reshape(-1, C * D), t[~val], c[val].reshape(-1, C * D), t[val]
    res = {}
    for name in ("gd", "lbfgs"):
        W = W0.repeat(C, 1).contiguous().requires_grad_(True)  # [C·D, d]: the C maps stacked
        b = b0.clone().requires_grad_(True)
        passes, best = [0], (0, -1.0)

        def closure():
            passes[0] += 1
            opt.zero_grad()
            loss = (1 - torch.nn.functional.cosine_similarity(ct @ W + b, tt, dim=-1)).mean() + _penalty(
                W.view(C, D, d))
            loss.backward()
            return loss

        if name == "gd":
            opt = torch.optim.SGD([W, b], lr=sgd_lr)
            steps = sgd_steps
        else:
            opt = torch.optim.LBFGS([W, b], lr=1, max_iter=1, history_size=10, line_search_fn="strong_wolfe")
            steps = lbfgs_iters
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.step(closure)
            with torch.no_grad():
                cos = float(torch.nn.functional.cosine_similarity(cv @ W + b, tv, dim=-1).mean())
            if cos > best[1]:
                best = (passes[0], cos)
        res[name] = {"best_held_out_cosine": best[1], "at_pass": best[0], "passes": passes[0],
                     "wall_s": round(time.perf_counter() - t0, 1)}
    return res


def stiefel_probe(N, C, D, d, start="shared", flip_det=False, iters=300, patience=10, history=5, noise=0.1,
                  val_fraction=0.1):
    """Exact-isometry fitting, a probe (not a fitter): Riemannian L-BFGS on the product of Stiefel manifolds (every
    map kept an isometry: orthonormal columns, or rows when D < d; the penalty is 0 throughout), on the in-memory
    planted problem of :func:`schedules` (same data and split). Riemannian gradient = the Euclidean one projected
    on the tangent space; polar retraction (``compalign._polar``); the correction pairs are projected on the new
    tangent space each iteration; Armijo backtracking on the retracted point; the held-out cosine decides as in
    fit_aligner (patience ``patience``). ``start``: ``"shared"`` (the polar factor of fit_aligner's shared start,
    one determinant for every map) or ``"joint"`` (the polar factors of the shipped joint fit's maps: an
    exact-isometry polish). ``flip_det``: an oracle for D = d, each start map given the planted map's determinant
    sign (what the det ±1 sets cost)."""
    import vitdecomp.compalign as ca

    c, t, maps, _ = planted(N, C, D, d, noise)
    t = torch.nn.functional.normalize(t, dim=-1)
    g = torch.Generator().manual_seed(0)
    val = torch.zeros(N, dtype=torch.bool)
    val[torch.randperm(N, generator=g)[: round(val_fraction * N)]] = True
    t0 = time.perf_counter()
    if start == "joint":
        al = ca.fit_aligner(c, t, method="joint", val_fraction=val_fraction, progress=False)
        W, b = ca._polar(al.weight), al.bias.clone()
    else:
        W0, b = ca._closed_form(ca._Data.of(c), t, ~val, 1e-3, 1024, torch.device("cpu"))
        W = ca._polar(W0[None]).repeat(C, 1, 1)
    if flip_det and D == d:
        W[torch.linalg.det(W).sign() != torch.linalg.det(maps).sign(), :, -1] *= -1
    ct, tt, n = c[~val].reshape(-1, C * D), t[~val], int((~val).sum())
    cv, tv = c[val].reshape(-1, C * D), t[val]

    def tangent(W, G):  # projection on the tangent space at W
        if D >= d:
            S = W.transpose(1, 2) @ G
            return G - W @ ((S + S.transpose(1, 2)) / 2)
        S = G @ W.transpose(1, 2)
        return G - ((S + S.transpose(1, 2)) / 2) @ W

    def loss_grad(W, b):
        gF, cos = ca._cos_grad(ct @ W.reshape(C * D, d) + b, tt, n)
        return 1 - float(cos) / n, (tangent(W, (ct.T @ gF).view(C, D, d)), gF.sum(0))

    def held_out(W, b):
        return float(torch.nn.functional.cosine_similarity(cv @ W.reshape(C * D, d) + b, tv, dim=-1).mean())

    dot = lambda x, y: float((x[0] * y[0]).sum() + (x[1] * y[1]).sum())  # noqa: E731
    L, grad = loss_grad(W, b)
    best, bad, pairs, curve = (held_out(W, b), 0, W, b), 0, [], []
    curve.append(round(best[0], 4))
    for it in range(1, iters + 1):
        q, alphas = [grad[0].clone(), grad[1].clone()], []
        for s_, y_, rho in reversed(pairs):  # two-loop recursion in the current tangent space
            a = rho * dot(s_, q)
            q[0] -= a * y_[0]
            q[1] -= a * y_[1]
            alphas.append(a)
        if pairs:
            s_, y_, _ = pairs[-1]
            q = [x * (dot(s_, y_) / dot(y_, y_)) for x in q]
            for (s_, y_, rho), a in zip(pairs, reversed(alphas)):
                beta = rho * dot(y_, q)
                q[0] += (a - beta) * s_[0]
                q[1] += (a - beta) * s_[1]
            P, step = (tangent(W, -q[0]), -q[1]), 1.0
        if not pairs or not dot(P, grad) < 0:
            P = (-grad[0], -grad[1])
            step = 0.01 * float(W.norm()) / math.sqrt(dot(P, P))
        slope = dot(P, grad)
        while True:  # Armijo on the retracted point
            Wn, bn = ca._polar(W + step * P[0]), b + step * P[1]
            Ln = float((1 - torch.nn.functional.cosine_similarity(ct @ Wn.reshape(C * D, d) + bn, tt, dim=-1)).mean())
            if Ln <= L + 1e-4 * step * slope or step < 1e-12:
                break
            step *= 0.5
        if not Ln < L:
            break
        Ln, grad_n = loss_grad(Wn, bn)
        s_ = (tangent(Wn, Wn - W), bn - b)
        y_ = (grad_n[0] - tangent(Wn, grad[0]), grad_n[1] - grad[1])
        pairs = [((tangent(Wn, a[0]), a[1]), (tangent(Wn, y[0]), y[1]), None) for a, y, _ in pairs] + [(s_, y_, None)]
        pairs = [(a, y, 1 / dot(a, y)) for a, y, _ in pairs[-history:]
                 if dot(a, y) > 1e-10 * math.sqrt(dot(a, a) * dot(y, y))]
        W, b, L, grad = Wn, bn, Ln, grad_n
        cos = held_out(W, b)
        curve.append(round(cos, 4))
        if cos > best[0] + 1e-5:
            best, bad = (cos, it, W, b), 0
        else:
            bad += 1
            if bad >= patience:
                break
    cos, it_best, Wb, _ = best
    pen, worst = _isometry(Wb)
    rel = (Wb - maps).norm(dim=(1, 2)) / maps.norm(dim=(1, 2))
    return {"run": f"stiefel start={start}" + (" det oracle" if flip_det else ""), "n_train": n,
            "ratio": round(n / (C * D), 3), "wall_s": round(time.perf_counter() - t0, 1), "steps": len(curve) - 1,
            "best": it_best, "held_out_cosine": cos, "start_cosine": curve[0], "isometry_penalty": pen,
            "isometry_max_dev": worst, "map_error_median": float(rel.median()),
            "det_agrees": float((torch.linalg.det(Wb).sign() == torch.linalg.det(maps).sign()).float().mean())
            if D == d else None, "load_after": os.getloadavg()}


def adam_steps(path, steps, batch=256):
    """Seconds per Adam step (exact penalty) of fit_aligner's training loop on the cache's data, and the held-out
    evaluation pass: timed pieces, for extrapolating an epoch where a full Adam fit does not fit the time."""
    from vitdecomp.compalign import _Data, _closed_form, _combine, _evaluate, _penalty

    import vitdecomp

    cache = vitdecomp.ExtractionCache.open(path)
    data = _Data.of(cache)
    t = torch.nn.functional.normalize(data.targets.float(), dim=-1)
    N = data.N
    g = torch.Generator().manual_seed(0)
    val = torch.zeros(N, dtype=torch.bool)
    val[torch.randperm(N, generator=g)[: round(0.1 * N)]] = True
    t0 = time.perf_counter()
    W0, b0 = _closed_form(data, t, ~val, 1e-3, 1024, torch.device("cpu"))
    t_init = time.perf_counter() - t0
    W = W0.unsqueeze(0).repeat(data.C, 1, 1).contiguous().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    opt = torch.optim.Adam([W, b], lr=1e-3, fused=True)
    shard = cache.load_shard(0)[0]
    times = []
    for k in range(steps + 1):  # the first is a warm-up
        idx = torch.randint(0, shard.shape[0], (batch,), generator=g)
        t0 = time.perf_counter()
        f = _combine(shard[idx].float(), W) + b
        loss = (1 - torch.nn.functional.cosine_similarity(f, t[idx], dim=-1)).mean() + _penalty(W)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    _evaluate(data, t, val, W.detach(), b.detach(), 1024, torch.device("cpu"))
    t_eval = time.perf_counter() - t0
    step = sum(times[1:]) / steps
    per_epoch = math.ceil(int((~val).sum()) / batch) * step + t_eval
    return {"closed_form_s": round(t_init, 1), "step_s": round(step, 2), "eval_s": round(t_eval, 1),
            "epoch_s_extrapolated": round(per_epoch, 1)}


def bcd_blocks(path, blocks=2):
    """Seconds per block step of the bcd sweep on the cache's data (first-sweep kind: curvature computed and the
    Procrustes candidate tried; later kind: curvature reused, no Procrustes), for extrapolating a sweep."""
    from vitdecomp.compalign import _CG_STEPS, _Data, _bcd_block, _closed_form, _component_group

    import vitdecomp

    cache = vitdecomp.ExtractionCache.open(path)
    data = _Data.of(cache)
    t = torch.nn.functional.normalize(data.targets.float(), dim=-1)
    N, C, d = data.N, data.C, t.shape[1]
    g = torch.Generator().manual_seed(0)
    train = torch.ones(N, dtype=torch.bool)
    train[torch.randperm(N, generator=g)[: round(0.1 * N)]] = False
    W0, b0 = _closed_form(data, t, train, 1e-3, 1024, torch.device("cpu"))
    W = W0.unsqueeze(0).repeat(blocks, 1, 1).contiguous()
    b = b0.clone()
    t0 = time.perf_counter()
    grp = _component_group(data, train, 0, blocks)
    t_read = time.perf_counter() - t0
    idx = torch.nonzero(train).flatten()
    T = t[idx]
    F = torch.zeros(len(idx), d)
    for k in range(0, len(idx), 1000):  # f(x) of the shared start: (Σ_i c_i) W_0 + b_0
        F[k:k + 1000] = cache.contributions(idx[k:k + 1000]).float().sum(1) @ W0 + b0
    res = {"read_group_s_per_component": round(t_read / blocks, 2)}
    factors = []
    for kind, kw in (("first", {"procrustes": True}), ("later", {"procrustes": False})):
        times = []
        for i in range(blocks):
            t0 = time.perf_counter()
            _, fac = _bcd_block(grp[:, i].float(), F, T, W[i], b, 1.0 / (C * d), float(len(idx)), _CG_STEPS,
                                lambda x: x, factor=factors[i] if kind == "later" else None, **kw)
            times.append(time.perf_counter() - t0)
            if kind == "first":
                factors.append(fac)
        res[f"block_s_{kind}"] = round(sum(times) / blocks, 2)
        res[f"sweep_s_{kind}_extrapolated"] = round(C * (sum(times) / blocks + t_read / blocks), 1)
    return res


def block_times(n, C, D, d, blocks=2):
    """bcd's per-block seconds on random data of one shape (timings do not depend on the values): the D ≠ d
    shapes without writing a cache. Extrapolated to a sweep over C components (reading not included)."""
    from vitdecomp.compalign import _CG_STEPS, _bcd_block

    g = torch.Generator().manual_seed(0)
    k = max(D, d)
    W = torch.stack([torch.linalg.qr(torch.randn(k, k, generator=g))[0][:D, :d] for _ in range(blocks)])
    b = torch.zeros(d)
    T = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    F = torch.randn(n, d, generator=g) * 20
    c = [torch.randn(n, D, generator=g).half() for _ in range(blocks)]
    res, factors = {"n": n, "C": C, "D": D, "d": d}, []
    _bcd_block(c[0].float(), F.clone(), T, W[0].clone(), b.clone(), 1.0 / (C * d), float(n), _CG_STEPS,
               lambda x: x, procrustes=True)  # warm-up (first-call costs of the linear-algebra kernels)
    for kind in ("first", "later"):
        times = []
        for i in range(blocks):
            t0 = time.perf_counter()
            _, fac = _bcd_block(c[i].float(), F, T, W[i], b, 1.0 / (C * d), float(n), _CG_STEPS, lambda x: x,
                                factor=factors[i] if kind == "later" else None, procrustes=kind == "first")
            times.append(time.perf_counter() - t0)
            if kind == "first":
                factors.append(fac)
        res[f"block_s_{kind}"] = round(sum(times) / blocks, 2)
        res[f"sweep_s_{kind}_extrapolated"] = round(C * sum(times) / blocks, 1)
    return res


def adam_step_times(n, C, D, d, steps=1, batch=256):
    """Seconds per Adam step (exact penalty) on random data of one shape, and the epoch it extrapolates to
    (n training images, held-out evaluation not included)."""
    from vitdecomp.compalign import _combine, _penalty

    g = torch.Generator().manual_seed(0)
    c = torch.randn(batch, C, D, generator=g).half()
    t = torch.nn.functional.normalize(torch.randn(batch, d, generator=g), dim=-1)
    W = (torch.randn(C, D, d, generator=g) / math.sqrt(max(D, d))).requires_grad_(True)
    b = torch.zeros(d, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=1e-3, fused=True)
    times = []
    for _ in range(steps + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        f = _combine(c.float(), W) + b
        loss = (1 - torch.nn.functional.cosine_similarity(f, t, dim=-1)).mean() + _penalty(W)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    step = sum(times[1:]) / steps
    return {"n": n, "C": C, "D": D, "d": d, "adam_step_s": round(step, 2),
            "adam_epoch_s_extrapolated": round(math.ceil(n / batch) * step, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("write", "compare"):
        p = sub.add_parser(name)
        if name == "write":
            p.add_argument("out")
        p.add_argument("--n", type=int, default=10_000)
        p.add_argument("--c", type=int, default=150)
        p.add_argument("--dim", type=int, default=768)
        p.add_argument("--target-dim", type=int, default=None, help="d (default: D)")
        p.add_argument("--noise", type=float, default=0.1)
    p = sub.add_parser("fit")
    p.add_argument("cache")
    p.add_argument("--method", default="bcd", choices=("bcd", "adam", "joint", "dual"))
    p.add_argument("--max-epochs", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--isometric", action="store_true", help="fit_aligner(isometric=True): exact isometries")
    p = sub.add_parser("adam-steps")
    p.add_argument("cache")
    p.add_argument("--steps", type=int, default=3)
    p = sub.add_parser("bcd-blocks")
    p.add_argument("cache")
    p.add_argument("--blocks", type=int, default=2)
    p = sub.add_parser("block-times")
    p.add_argument("--n", type=int, default=9000)
    p.add_argument("--c", type=int, default=150)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--target-dim", type=int, default=768)
    p.add_argument("--adam", action="store_true", help="time Adam steps instead")
    sub.choices["compare"].add_argument("--adam-epochs", type=int, default=None)
    sub.choices["compare"].add_argument("--methods", nargs="+", default=["dual", "joint", "bcd", "adam"],
                                        choices=("dual", "joint", "bcd", "adam"))
    sub.choices["compare"].add_argument("--threads", type=int, default=None)
    p = sub.add_parser("joint-probe")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--c", type=int, default=16)
    p.add_argument("--dim", type=int, default=48)
    p.add_argument("--target-dim", type=int, default=None, help="d (default: D)")
    p.add_argument("--sgd-lr", type=float, default=30.0)
    p.add_argument("--sgd-steps", type=int, default=1500)
    p = sub.add_parser("stiefel")
    p.add_argument("--ratio", type=float, required=True, help="n_train / (C·D); --val-images held out on top")
    p.add_argument("--val-images", type=int, default=1000)
    p.add_argument("--c", type=int, default=150)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--target-dim", type=int, default=None, help="d (default: D)")
    p.add_argument("--start", choices=("shared", "joint"), default="shared")
    p.add_argument("--det-oracle", action="store_true")
    p.add_argument("--iters", type=int, default=300)
    p = sub.add_parser("schedules")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--c", type=int, default=16)
    p.add_argument("--dim", type=int, default=48)
    p.add_argument("--target-dim", type=int, default=None, help="d (default: D)")
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--ratio", type=float, default=None,
                   help="n_train / (C·D) instead of --n (then --val-images are held out on top)")
    p.add_argument("--val-images", type=int, default=1000)
    p.add_argument("--runs", nargs="+", default=["bcd", "prox:16,0.7", "adam"])
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()}")

    if args.cmd == "write":
        t0 = time.perf_counter()
        write_cache(args.out, args.n, args.c, args.dim, args.target_dim or args.dim, args.noise)
        print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")
    elif args.cmd == "fit":
        if args.threads:
            torch.set_num_threads(args.threads)
        res = fit(args.cache, args.method, max_epochs=args.max_epochs, isometric=args.isometric, progress=True)
        res["load_after"] = os.getloadavg()
        print(json.dumps(res))
        if args.json:
            Path(args.json).write_text(json.dumps(res))
    elif args.cmd == "adam-steps":
        print(json.dumps(adam_steps(args.cache, args.steps)))
    elif args.cmd == "block-times":
        fn = adam_step_times if args.adam else block_times
        print(json.dumps(fn(args.n, args.c, args.dim, args.target_dim)))
    elif args.cmd == "bcd-blocks":
        print(json.dumps(bcd_blocks(args.cache, args.blocks)))
    elif args.cmd == "joint-probe":
        torch.set_num_threads(1)
        print(json.dumps(joint_probe(args.n, args.c, args.dim, args.target_dim or args.dim, args.sgd_lr,
                                     args.sgd_steps)))
    elif args.cmd == "stiefel":
        torch.set_num_threads(1)
        n = round(args.ratio * args.c * args.dim) + args.val_images
        print(json.dumps(stiefel_probe(n, args.c, args.dim, args.target_dim or args.dim, args.start, args.det_oracle,
                                       args.iters, val_fraction=args.val_images / n)), flush=True)
    elif args.cmd == "schedules":
        torch.set_num_threads(args.threads)
        d = args.target_dim or args.dim
        n, vf = args.n, args.val_fraction
        if args.ratio is not None:  # a fixed number of held-out images: their mean cosine to ±0.003
            n = round(args.ratio * args.c * args.dim) + args.val_images
            vf = args.val_images / n
        schedules(n, args.c, args.dim, d, args.runs, args.noise, vf)
    else:  # compare: the methods on one planted cache in a temporary folder
        if args.threads:
            torch.set_num_threads(args.threads)
        tmp = Path(tempfile.mkdtemp(prefix="align_bench_"))
        try:
            path = write_cache(tmp / "cache", args.n, args.c, args.dim, args.target_dim or args.dim, args.noise)
            for method in args.methods:
                kw = {"max_epochs": args.adam_epochs} if method == "adam" and args.adam_epochs else {}
                res = fit(path, method, progress=False, **kw)
                res["load_after"] = os.getloadavg()
                res.pop("history")
                print(json.dumps(res), flush=True)
        finally:
            shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
