"""Train the concept world's models and write the weights that ship with vitdecomp.

    python -m vitdecomp.concept_world.train                       # every model, into the package's data folder
    python -m vitdecomp.concept_world.train --models deit --out /tmp/cw --threads 2

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
* ``*_spurious``: the Waterbirds recipe — the factor classifier (the "pretrained" backbone) fine-tuned with a new
  2-class head on small vs large, :class:`~vitdecomp.datasets.SpuriousConceptWorld` train split (the background
  agrees with the label in 95% of the images); reported: mean and worst-group accuracy on the balanced test split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
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

# Per-model settings (steps are what fits a few CPU-minutes each on one core).
DEFAULT_CONFIGS: Dict[str, dict] = {
    "clip": {"n_train": 12000, "epochs": 5, "lr": 2e-3, "batch": 128, "weight_decay": 0.05},
    "deit": {"n_train": 12000, "epochs": 8, "lr": 2e-3, "batch": 128, "weight_decay": 0.05},
    "swin": {"n_train": 12000, "epochs": 5, "lr": 2e-3, "batch": 64, "weight_decay": 0.05},
    "maxvit": {"n_train": 12000, "epochs": 4, "lr": 2e-3, "batch": 64, "weight_decay": 0.05},
    # The Waterbirds recipe: fine-tune the factor classifier ("pretrained" backbone, new 2-class head) on the
    # spurious training split.
    "deit_spurious": {"n_train": 4000, "epochs": 2, "lr": 5e-4, "batch": 64, "weight_decay": 0.05,
                      "correlation": 0.95, "init_from": "deit"},
    "swin_spurious": {"n_train": 4000, "epochs": 2, "lr": 5e-4, "batch": 64, "weight_decay": 0.05,
                      "correlation": 0.95, "init_from": "swin"},
    "maxvit_spurious": {"n_train": 4000, "epochs": 2, "lr": 5e-4, "batch": 64, "weight_decay": 0.05,
                        "correlation": 0.95, "init_from": "maxvit"},
}
N_EVAL = 2000
N_EVAL_SPURIOUS = 2000


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


def _init_from(model, parent: Path) -> None:
    """Copy every weight of the parent checkpoint whose shape matches (all but the classifier)."""
    from safetensors.torch import load_file

    if not parent.is_file():
        raise FileNotFoundError(f"{parent} does not exist; train the parent model first")
    own = model.state_dict()
    state = {k: v.float() for k, v in load_file(str(parent)).items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(state, strict=False)


def train_model(name: str, cfg: dict, *, seed: int = 0, cache: Optional[Path] = None, log=print,
                weights_dir: Optional[Path] = None) -> torch.nn.Module:
    """Train model ``name`` with settings ``cfg`` (see :data:`DEFAULT_CONFIGS`); returns it in eval mode.
    ``cfg["init_from"]`` starts from that model's weights in ``weights_dir`` (all but the classifier)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
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
    model = M.build(name)
    if cfg.get("init_from"):
        _init_from(model, Path(weights_dir or M.WEIGHTS_DIR) / f"{cfg['init_from']}.safetensors")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    B, N = cfg["batch"], len(ds)
    steps_per_epoch = N // B
    total = steps_per_epoch * cfg["epochs"]
    warmup = max(1, total // 20)
    tok = M.tokenizer() if name == "clip" else None
    factor_rows = [ds.factors(i) for i in range(N)] if name == "clip" else None
    step = 0
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(cfg["epochs"]):
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
                txt = F.normalize(model.encode_text(tok(texts)), dim=-1)
                logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T  # [images, texts]
                fy = Y[idx]  # [B, 6]
                same = fy[:, None, :] == fy[None, :, :]  # [img, txt-owner, factor]
                pos = (same | ~mention[None, :, :]).all(-1).float()  # caption j is true of image i
                loss = 0.5 * (-(pos / pos.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
                              - (pos / pos.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean())
            else:
                logits = model(x)
                loss = F.cross_entropy(logits, Y[idx]) if spurious else _factor_loss(logits, Y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
            cnt += len(idx)
            step += 1
        log(f"[{name}] epoch {epoch + 1}/{cfg['epochs']} loss {tot / cnt:.4f} ({time.perf_counter() - t0:.0f} s)")
    return model.eval()


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
        pred = torch.cat([model(X[i:i + 256]).argmax(1) for i in range(0, len(X), 256)])
        correct = (pred == ds.labels("label")).float()
        groups = ds.groups()
        per_group = {ds.group_names[g]: float(correct[groups == g].mean()) for g in range(4)}
        return {"test_accuracy": float(correct.mean()), "worst_group_accuracy": min(per_group.values()),
                "group_accuracy": per_group, "n_test": len(ds)}
    ds = D.ConceptWorld(N_EVAL, seed + 3)
    X = M.prepare(name, D.normalize(generate(ds, cache)))
    table = ds.factor_table()
    if name == "clip":
        return {"zero_shot_accuracy": clip_zero_shot(model, X, table), "n_test": len(ds)}
    logits = torch.cat([model(X[i:i + 256]) for i in range(0, len(X), 256)])
    acc = {f: float((logits[:, sl].argmax(1) == table[:, k]).float().mean())
           for k, (f, sl) in enumerate(M.FACTOR_SLICES.items())}
    return {"test_accuracy": acc, "n_test": len(ds)}


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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    manifest_path = args.out / "models.json"
    for name in args.models:
        cfg = dict(DEFAULT_CONFIGS[name])
        cfg["epochs"] = max(1, int(round(cfg["epochs"] * args.scale)))
        t0 = time.perf_counter()
        model = train_model(name, cfg, seed=args.seed, cache=args.cache, weights_dir=args.out)
        wall = time.perf_counter() - t0
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
            "metrics": metrics,
        }
        _update_manifest(manifest_path, name, entry)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
