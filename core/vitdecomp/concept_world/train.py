"""Train the concept world's models and write the weights that ship with vitdecomp.

    python -m vitdecomp.concept_world.train                       # every model, into the package's data folder
    python -m vitdecomp.concept_world.train --models deit --out /tmp/cw --threads 2

A run saves a checkpoint after every epoch (model, optimiser, step, random states; ``--checkpoints``, default
``~/.cache/vitdecomp/concept_world_train``) and, rerun with the same command, continues from the last one: a killed
run loses at most an epoch and ends with the weights an uninterrupted run would have written. A checkpoint made with
other settings (configuration, seed, architecture) is an error, never silently reused; ``--restart`` discards it.
The held-out accuracy is logged after every epoch (1,000 monitor images, seed ``seed + 4``).

Each model is trained from seed ``--seed`` on freshly generated images (:mod:`vitdecomp.datasets`), evaluated on
held-out images, stored as float16 safetensors (``<name>.safetensors``, loaded back as float32; the accuracies
are measured *after* that round trip) and recorded in ``models.json``: the command, seed, configuration,
data sizes, wall time and accuracies. Data seeds: training images seed ``seed + 1``, evaluation images seed
``seed + 3`` (the evaluation module uses ``seed + 2`` for its own held-out set).

* ``clip``: contrastive image / caption training. A caption names every factor half of the time and otherwise each
  factor with probability ½ (``"a red shape"``, ``"a circle on water"``), so the text tower also embeds short
  descriptions of one property; the loss treats every caption true of an image as a positive (multi-positive
  InfoNCE), so partial captions do not create false negatives. Reported: zero-shot accuracy per factor, classifying
  each image by the nearest of its factor's phrases (``"a red shape"``, ``"a green shape"``, ...).
* ``deit`` / ``swin`` / ``maxvit``: one cross-entropy per factor over the slices of a 25-way head.
* ``pos_init: "sincos"`` (DeiT and the CLIP's image tower): the learned position embedding starts at a 2-D sine /
  cosine table (scaled by ½) instead of noise, so absolute position is readable from the first step (from noise, a
  small ViT took longer than its whole budget to learn "top left" from "center"). The parameter stays learned; the
  architecture is timm's / open_clip's own.
* ``phrase_weight`` (CLIP): besides the caption contrastive loss, each image is classified against the text tower's
  embeddings of every factor's phrases (``"a red shape"``, ...; cross-entropy per factor at the CLIP's logit scale,
  averaged over the factors and weighted by ``phrase_weight``; 6 gives each factor the weight it has in the
  classifiers' summed loss), which is the zero-shot task itself and what teaches the towers the single-factor
  phrases (with weight 1, shape reached 0.57 zero-shot after 9 of 14 epochs).
* ``*_spurious``: the Waterbirds recipe — the factor classifier (the "pretrained" backbone) fine-tuned with a new
  2-class head on small vs large, :class:`~vitdecomp.datasets.SpuriousConceptWorld` train split (the background
  agrees with the label in 97% of the images; at 95% the Swin fine-tune's worst group was already 0.98, at
  99% every model's was 0); reported: mean and worst-group accuracy on the balanced test split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import datasets as D
from . import models as M

__all__ = ["DEFAULT_CONFIGS", "generate", "train_model", "evaluate_model", "main"]

# Per-model settings (what reaches >= 0.95 held-out accuracy per factor on one CPU core; see models.json).
DEFAULT_CONFIGS: Dict[str, dict] = {
    "clip": {"n_train": 20000, "epochs": 16, "lr": 3e-3, "batch": 128, "weight_decay": 0.05, "pos_init": "sincos",
             "phrase_weight": 6.0},
    "deit": {"n_train": 20000, "epochs": 14, "lr": 3e-3, "batch": 128, "weight_decay": 0.05, "pos_init": "sincos"},
    "swin": {"n_train": 20000, "epochs": 16, "lr": 2e-3, "batch": 64, "weight_decay": 0.05},
    "maxvit": {"n_train": 16000, "epochs": 12, "lr": 2e-3, "batch": 64, "weight_decay": 0.05},
    # The Waterbirds recipe: fine-tune the factor classifier ("pretrained" backbone, new 2-class head) on the
    # spurious training split.
    "deit_spurious": {"n_train": 4000, "epochs": 2, "lr": 5e-4, "batch": 64, "weight_decay": 0.05,
                      "correlation": 0.97, "init_from": "deit"},
    "swin_spurious": {"n_train": 4000, "epochs": 2, "lr": 5e-4, "batch": 64, "weight_decay": 0.05,
                      "correlation": 0.97, "init_from": "swin"},
    "maxvit_spurious": {"n_train": 4000, "epochs": 2, "lr": 5e-4, "batch": 64, "weight_decay": 0.05,
                        "correlation": 0.97, "init_from": "maxvit"},
}
N_EVAL = 2000
N_EVAL_SPURIOUS = 2000
N_MONITOR = 1000
CHECKPOINT_FORMAT = "vitdecomp.concept_world.checkpoint/1"
DEFAULT_CHECKPOINTS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vitdecomp" / "concept_world_train"


def generate(ds: D.ConceptWorld, cache: Optional[Path] = None) -> torch.Tensor:
    """All images of ``ds`` as uint8 ``[N, 3, S, S]`` (optionally cached in ``cache`` as .npy)."""
    spur = f"{ds.split}_{ds.correlation}_{D.SPURIOUS_FACTOR}" if isinstance(ds, D.SpuriousConceptWorld) else ""
    key = f"{type(ds).__name__}_{ds.n}_{ds.seed}_{spur}_{ds.image_size}_{D.GENERATOR_VERSION}.npy"
    if cache is not None and (cache / key).is_file():
        return torch.from_numpy(np.load(cache / key))
    arr = np.stack([ds.array(i) for i in range(ds.n)]).transpose(0, 3, 1, 2).copy()
    if cache is not None:
        import os

        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f"{key}.{os.getpid()}.tmp.npy"
        np.save(tmp, arr)
        os.replace(tmp, cache / key)
    return torch.from_numpy(arr)


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _factor_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return sum(F.cross_entropy(logits[:, sl], y[:, k]) for k, sl in enumerate(M.FACTOR_SLICES.values()))


def _clip_batch_texts(factors: List[dict], rng: np.random.Generator):
    texts, masks = [], []
    for f in factors:
        if rng.random() < 0.5:
            mention = list(D.FACTOR_NAMES)
        else:
            mention = [k for k in D.FACTOR_NAMES if rng.random() < 0.5] or [D.FACTOR_NAMES[int(rng.integers(6))]]
        texts.append(D.caption(f, mention))
        masks.append([k in mention for k in D.FACTOR_NAMES])
    return texts, torch.tensor(masks)


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """``[side·side, dim]`` 2-D sine/cosine position table (rows in row-major grid order; first half of the
    channels encode the row, second half the column)."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    g = torch.arange(side, dtype=torch.float64)
    gy, gx = torch.meshgrid(g, g, indexing="ij")

    def one(pos):
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], 1)

    return torch.cat([one(gy), one(gx)], 1).float()


def _init_positions(name: str, model) -> None:
    """Start the learned position embedding of the patch tokens at ½ · :func:`sincos_2d` (the class token's row
    keeps its initialisation)."""
    if name == "clip":
        pe = model.visual.positional_embedding  # [1 + N, width]
        n = pe.shape[0] - 1
    else:
        pe = model.pos_embed[0]  # [1 + N, D]
        n = pe.shape[0] - model.num_prefix_tokens
    side = math.isqrt(n)
    with torch.no_grad():
        pe[pe.shape[0] - n:] = 0.5 * sincos_2d(side, pe.shape[1])


def _phrase_loss(img: torch.Tensor, phrases: torch.Tensor, sizes: Sequence[int], scale, y: torch.Tensor):
    """Mean over factors of the cross-entropy of classifying each image among its factor's phrase embeddings."""
    logits = scale * img @ phrases.T
    loss, k0 = 0.0, 0
    for k, n in enumerate(sizes):
        loss = loss + F.cross_entropy(logits[:, k0:k0 + n], y[:, k])
        k0 += n
    return loss / len(sizes)


def _identity(name: str, cfg: dict, seed: int) -> dict:
    """What a checkpoint must match to be continued (JSON-comparable)."""
    return json.loads(json.dumps({"name": name, "cfg": cfg, "seed": seed, "architecture": M.describe(name),
                                  "generator": D.GENERATOR_VERSION}))


def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _own_checkpoint(path: Path) -> dict:
    """The state saved at ``path`` by this script; an error for an unreadable file or one it did not write (which
    is never reused nor deleted)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise RuntimeError(f"{path} is not a readable concept-world training checkpoint ({type(e).__name__}: {e}); "
                           "it is left alone: move it away or use another --checkpoints") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RuntimeError(f"{path} is not a concept-world training checkpoint (format {CHECKPOINT_FORMAT!r}); "
                           "it was not written by this script, so it is left alone: use another --checkpoints")
    return state


def _load_checkpoint(path: Path, identity: dict) -> Optional[dict]:
    """The checkpoint at ``path`` if it continues a run with ``identity``; None if there is none; an error if
    there is one made with other settings or a file that is no checkpoint of this script."""
    if not path.exists():
        return None
    state = _own_checkpoint(path)
    if state["identity"] != identity:
        diff = sorted(k for k in identity if state["identity"].get(k) != identity[k])
        raise RuntimeError(f"{path} continues a run with other settings (differs in {diff}); pass --restart to "
                           "discard it or --checkpoints DIR to keep it")
    return state


def _init_from(model, parent: Path) -> None:
    """Copy every weight of the parent checkpoint whose shape matches (all but the classifier)."""
    from safetensors.torch import load_file

    if not parent.is_file():
        raise FileNotFoundError(f"{parent} does not exist; train the parent model first")
    own = model.state_dict()
    state = {k: v.float() for k, v in load_file(str(parent)).items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(state, strict=False)


def train_model(name: str, cfg: dict, *, seed: int = 0, cache: Optional[Path] = None, log=print,
                weights_dir: Optional[Path] = None, checkpoint: Optional[Path] = None, restart: bool = False,
                monitor: int = 0) -> torch.nn.Module:
    """Train model ``name`` with settings ``cfg`` (see :data:`DEFAULT_CONFIGS`); returns it in eval mode.
    ``cfg["init_from"]`` starts from that model's weights in ``weights_dir`` (all but the classifier).

    With ``checkpoint`` (a file path), the state after every epoch is saved there and a matching checkpoint is
    continued (``restart=True`` discards it); the result equals an uninterrupted run's. ``monitor`` > 0 logs the
    held-out accuracy on that many images (seed ``seed + 4``) after every epoch. The wall time of all sessions of
    the run is ``model.train_wall_seconds``; the per-epoch log is ``model.train_history``."""
    spurious = name.endswith("_spurious")
    if spurious:
        ds = D.SpuriousConceptWorld(cfg["n_train"], seed + 1, split="train", correlation=cfg["correlation"])
        Y = ds.labels("label")
    else:
        ds = D.ConceptWorld(cfg["n_train"], seed + 1)
        Y = ds.factor_table()
    t0 = time.perf_counter()
    X = generate(ds, cache)
    log(f"[{name}] {len(ds)} training images generated in {time.perf_counter() - t0:.1f} s")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = M.build(name)
    if cfg.get("init_from"):
        _init_from(model, Path(weights_dir or M.WEIGHTS_DIR) / f"{cfg['init_from']}.safetensors")
    elif cfg.get("pos_init") == "sincos":
        _init_positions(name, model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    B, N = cfg["batch"], len(ds)
    steps_per_epoch = N // B
    total = steps_per_epoch * cfg["epochs"]
    warmup = max(1, total // 20)
    tok = M.tokenizer() if name == "clip" else None
    factor_rows = [ds.factors(i) for i in range(N)] if name == "clip" else None
    if name == "clip":
        phrases = [tok([D.factor_phrase(f, v) for v in D.FACTORS[f]]) for f in D.FACTOR_NAMES]
        phrase_sizes = [len(t) for t in phrases]
        phrases = torch.cat(phrases)
    gen = torch.Generator().manual_seed(seed)
    start_epoch, wall_before, history = 0, 0.0, []
    identity = _identity(name, cfg, seed)
    if checkpoint is not None and restart and checkpoint.exists():
        _own_checkpoint(checkpoint)  # --restart discards only what this script wrote
        checkpoint.unlink()
    state = _load_checkpoint(checkpoint, identity) if checkpoint is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        start_epoch, wall_before, history = state["epoch"], state["wall_seconds"], list(state["history"])
        log(f"[{name}] continuing from {checkpoint} after epoch {start_epoch}/{cfg['epochs']}")
    if monitor:
        mon = D.ConceptWorld(monitor, seed + 4) if not spurious else D.SpuriousConceptWorld(monitor, seed + 4, split="test")
        mon_X = M.prepare(name, D.normalize(generate(mon, cache)))
    step = start_epoch * steps_per_epoch
    t_run = time.perf_counter()
    for epoch in range(start_epoch, cfg["epochs"]):
        model.train()
        perm = torch.randperm(N, generator=gen)
        tot, cnt = 0.0, 0
        for b in range(steps_per_epoch):
            idx = perm[b * B:(b + 1) * B]
            x = M.prepare(name, D.normalize(X[idx]))
            for g in opt.param_groups:
                g["lr"] = cfg["lr"] * _schedule(step, total, warmup)
            if name == "clip":
                texts, mention = _clip_batch_texts([factor_rows[i] for i in idx.tolist()], rng)
                img = F.normalize(model.encode_image(x), dim=-1)
                txt = F.normalize(model.encode_text(tok(texts) if not cfg.get("phrase_weight")
                                                    else torch.cat([tok(texts), phrases])), dim=-1)
                txt, phrase_emb = txt[:len(texts)], txt[len(texts):]
                scale = model.logit_scale.exp().clamp(max=100)
                logits = scale * img @ txt.T  # [images, texts]
                fy = Y[idx]  # [B, 6]
                same = fy[:, None, :] == fy[None, :, :]  # [img, txt-owner, factor]
                pos = (same | ~mention[None, :, :]).all(-1).float()  # caption j is true of image i
                loss = 0.5 * (-(pos / pos.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
                              - (pos / pos.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean())
                if cfg.get("phrase_weight"):
                    loss = loss + cfg["phrase_weight"] * _phrase_loss(img, phrase_emb, phrase_sizes, scale, fy)
            else:
                logits = model(x)
                loss = F.cross_entropy(logits, Y[idx]) if spurious else _factor_loss(logits, Y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
            cnt += len(idx)
            step += 1
        entry = {"epoch": epoch + 1, "loss": round(tot / cnt, 5)}
        msg = f"[{name}] epoch {epoch + 1}/{cfg['epochs']} loss {tot / cnt:.4f}"
        if monitor:
            model.eval()
            acc = _accuracy(name, model, mon, mon_X)
            entry["monitor_accuracy"] = acc
            msg += " held-out " + " ".join(f"{k} {v:.3f}" for k, v in acc.items())
        wall = wall_before + time.perf_counter() - t_run
        entry["wall_seconds"] = round(wall, 1)
        history.append(entry)
        log(f"{msg} ({wall:.0f} s)")
        if checkpoint is not None:
            _save_checkpoint(checkpoint, {
                "format": CHECKPOINT_FORMAT, "identity": identity, "epoch": epoch + 1, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "generator": gen.get_state(), "numpy_rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(), "wall_seconds": wall, "history": history})
    model.eval()
    model.train_wall_seconds = wall_before + time.perf_counter() - t_run
    model.train_history = history
    return model


def _group_accuracy(model, ds, X: torch.Tensor):
    """Mean accuracy of a spurious model on prepared images ``X`` of split ``ds`` and its accuracy per group."""
    pred = torch.cat([model(X[i:i + 256]).argmax(1) for i in range(0, len(X), 256)])
    correct = (pred == ds.labels("label")).float()
    groups = ds.groups()
    return float(correct.mean()), {ds.group_names[g]: float(correct[groups == g].mean()) for g in range(4)}


@torch.no_grad()
def _accuracy(name: str, model, ds, X: torch.Tensor) -> Dict[str, float]:
    """Held-out accuracy of ``model`` on prepared images ``X`` of ``ds``: per factor (zero-shot for the CLIP), or
    ``{"mean": ..., "worst_group": ...}`` for a spurious model."""
    if name.endswith("_spurious"):
        mean, per_group = _group_accuracy(model, ds, X)
        return {"mean": mean, "worst_group": min(per_group.values())}
    table = ds.factor_table()
    if name == "clip":
        return clip_zero_shot(model, X, table)
    logits = torch.cat([model(X[i:i + 256]) for i in range(0, len(X), 256)])
    return {f: float((logits[:, sl].argmax(1) == table[:, k]).float().mean())
            for k, (f, sl) in enumerate(M.FACTOR_SLICES.items())}


@torch.no_grad()
def clip_zero_shot(model, images: torch.Tensor, table: torch.Tensor, batch: int = 256) -> Dict[str, float]:
    """Zero-shot accuracy of the small CLIP per factor (nearest of the factor's phrases)."""
    tok = M.tokenizer()
    emb = []
    for i in range(0, len(images), batch):
        emb.append(F.normalize(model.encode_image(images[i:i + batch]), dim=-1))
    emb = torch.cat(emb)
    out = {}
    for k, f in enumerate(D.FACTOR_NAMES):
        t = F.normalize(model.encode_text(tok([D.factor_phrase(f, v) for v in D.FACTORS[f]])), dim=-1)
        out[f] = float(((emb @ t.T).argmax(1) == table[:, k]).float().mean())
    return out


@torch.no_grad()
def evaluate_model(name: str, model, *, seed: int = 0, cache: Optional[Path] = None) -> dict:
    """Held-out accuracies of model ``name`` (per factor; or mean / worst-group for spurious models)."""
    if name.endswith("_spurious"):
        ds = D.SpuriousConceptWorld(N_EVAL_SPURIOUS, seed + 3, split="test")
        X = M.prepare(name, D.normalize(generate(ds, cache)))
        mean, per_group = _group_accuracy(model, ds, X)
        return {"test_accuracy": mean, "worst_group_accuracy": min(per_group.values()),
                "group_accuracy": per_group, "n_test": len(ds)}
    ds = D.ConceptWorld(N_EVAL, seed + 3)
    X = M.prepare(name, D.normalize(generate(ds, cache)))
    key = "zero_shot_accuracy" if name == "clip" else "test_accuracy"
    return {key: _accuracy(name, model, ds, X), "n_test": len(ds)}


def save_model(name: str, model, out: Path) -> Path:
    """Write float16 weights; returns the path. Load back with :func:`vitdecomp.concept_world.models.load`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.safetensors"
    state = {k: v.detach().to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"vitdecomp": json.dumps({"format": "vitdecomp.concept_world/1", "model": name})})
    return path


def _reload(name: str, path: Path):
    from safetensors.torch import load_file

    model = M.build(name)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()})
    return model.eval()


def _versions() -> dict:
    import open_clip
    import timm

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "open_clip": open_clip.__version__, "numpy": np.__version__}


def _update_manifest(path: Path, name: str, entry: dict) -> None:
    """Read-modify-write ``models.json`` under a lock (several training runs may share it)."""
    import fcntl
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / "vitdecomp_concept_world_manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = json.loads(path.read_text()) if path.is_file() else {}
        record.setdefault("models", {})[name] = entry
        record.update({"format": "vitdecomp.concept_world/1", "script": "python -m vitdecomp.concept_world.train",
                       "versions": _versions(), "machine": platform.processor() or platform.machine()})
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitdecomp.concept_world.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_CONFIGS), choices=list(DEFAULT_CONFIGS))
    parser.add_argument("--out", type=Path, default=M.WEIGHTS_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=None, help="cache generated images here (.npy)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply epochs by this (smoke tests)")
    parser.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS,
                        help="save a checkpoint per epoch here and continue from it when rerun (default: %(default)s)")
    parser.add_argument("--restart", action="store_true", help="discard this script's checkpoints of these models")
    parser.add_argument("--monitor", type=int, default=N_MONITOR,
                        help="held-out images to report accuracy on after every epoch (0: none; default %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    manifest_path = args.out / "models.json"
    for name in args.models:
        cfg = dict(DEFAULT_CONFIGS[name])
        cfg["epochs"] = max(1, int(round(cfg["epochs"] * args.scale)))
        ckpt = args.checkpoints / f"{name}-seed{args.seed}.pt"
        model = train_model(name, cfg, seed=args.seed, cache=args.cache, weights_dir=args.out, checkpoint=ckpt,
                            restart=args.restart, monitor=args.monitor)
        wall, history = model.train_wall_seconds, model.train_history
        path = save_model(name, model, args.out)
        model = _reload(name, path)
        metrics = evaluate_model(name, model, seed=args.seed, cache=args.cache)
        print(f"[{name}] trained in {wall:.0f} s; {json.dumps(metrics)}", flush=True)
        entry = {
            "file": path.name,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "architecture": M.describe(name),
            "command": "python -m vitdecomp.concept_world.train " + " ".join(sys.argv[1:] if argv is None else argv),
            "train": {**cfg, "seed": args.seed, "data_seed": args.seed + 1, "threads": args.threads,
                      "wall_seconds": round(wall, 1)},
            "history": history,
            "metrics": metrics,
        }
        _update_manifest(manifest_path, name, entry)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
