"""Coverage: which timm / transformers vision transformers vitdecomp decomposes exactly, and at what cost.

Run by hand (not a test; a few minutes on 2 cores):

    python benchmarks/coverage.py                          # every model below, markdown table on stdout
    python benchmarks/coverage.py --only vit_ deit --out benchmarks/coverage.md

One or two models per timm transformer-style module, built with random weights, the fewest blocks and the
smallest image size the constructor takes (falling back to the model's defaults), and the vision models that
transformers ships (tiny random configs). For each model and each way of choosing an adapter — ``dispatch``
(the registered family adapters, as ``vitdecomp.decompose`` chooses) and ``auto`` (``adapter="auto"``, when an
adapter of that name is registered) — it decomposes one random image in float32 and reports

* the outcome: ``exact (heads)`` / ``exact (blocks)`` (the finest granularity it gave: attention heads split, or
  block-level branches), ``refused`` with the first words of the reason (``UnsupportedModelError``,
  ``NoAdapterError``, ...), ``inexact`` (reconstruction above 1e-5, which should never happen: the library
  checks) or ``error`` (any other exception, a bug to look at);
* the relative error ‖Σc − z‖/‖z‖;
* time ÷ forward: one decomposition over one plain forward (``vitdecomp.representation``), each the second of
  two runs (the auto adapter's fx trace is cached after the first), measured back to back in this process so
  both see the same machine load (noisy on a shared machine: ±50 % between runs); without the weight
  fingerprint (``fingerprint=False``, as in the other overhead benchmarks: hashing every weight is a cost of its
  own, measured in ``benchmarks/fingerprint.py``), and on tiny models at batch 1, where per-call overhead
  dominates (the full-size ratios are in ``benchmarks/auto_overhead.py`` and the family benchmarks).
"""

from __future__ import annotations

import argparse
import platform
import re
import signal
import sys
import time
import traceback

import torch

#: (timm module, model name, constructor keyword sets tried in order; the last is the model's defaults)
SMALL = ({"img_size": 64, "depth": 2}, {"img_size": 64}, {})
TIMM = [
    ("vision_transformer", "vit_tiny_patch16_224", SMALL),
    ("vision_transformer", "vit_small_patch16_224.augreg_in21k", (
        {"img_size": 64, "depth": 2, "global_pool": "avg", "fc_norm": True},)),
    ("vision_transformer", "vit_base_patch16_siglip_224", (  # MAP (attention-pool) head
        {"img_size": 64, "depth": 2, "embed_dim": 96, "num_heads": 2},)),
    ("deit", "deit_tiny_distilled_patch16_224", SMALL),
    ("deit", "deit3_small_patch16_224", SMALL),
    ("cait", "cait_xxs24_224", ({"img_size": 64, "depth": 2},)),
    ("beit", "beit_base_patch16_224", ({"img_size": 64, "depth": 2, "embed_dim": 96, "num_heads": 2},)),
    ("eva", "eva02_tiny_patch14_224", ({"img_size": 56, "depth": 2},) + SMALL),
    ("xcit", "xcit_nano_12_p16_224", ({"img_size": 64, "depth": 2},) + SMALL),
    ("pit", "pit_ti_224", ({"img_size": 64},) + SMALL[2:]),
    ("twins", "twins_pcpvt_small", ({"img_size": 64, "depths": (1, 1, 1, 1)},) + SMALL[1:]),
    ("pvt_v2", "pvt_v2_b0", ({"img_size": 64},) + SMALL[2:]),
    ("convit", "convit_tiny", ({"img_size": 64, "depth": 2},) + SMALL),
    ("crossvit", "crossvit_tiny_240", ({"img_size": 240},)),
    ("tnt", "tnt_s_patch16_224", ({"img_size": 64, "depth": 2},) + SMALL),
    ("vision_transformer_relpos", "vit_relpos_small_patch16_224", SMALL),
    ("vision_transformer_sam", "samvit_base_patch16", ({"img_size": 64, "depth": 2, "global_attn_indexes": (1,),
                                                        "embed_dim": 96, "num_heads": 2},)),
    ("naflexvit", "naflexvit_base_patch16_gap", ({"img_size": 64, "depth": 2, "embed_dim": 96, "num_heads": 2},)),
    ("mvitv2", "mvitv2_tiny", ({"img_size": 64},) + SMALL[2:]),
    ("hiera", "hiera_tiny_224", ({"img_size": 64},) + SMALL[2:]),
    ("tiny_vit", "tiny_vit_5m_224", ({"img_size": 64},) + SMALL[2:]),
    ("levit", "levit_128s", ({},)),
    ("efficientformer", "efficientformer_l1", ({},)),
    ("efficientformer_v2", "efficientformerv2_s0", ({"img_size": 64},) + SMALL[2:]),
    ("davit", "davit_tiny", ({"depths": (1, 1, 1, 1)},) + SMALL[2:]),
    ("gcvit", "gcvit_xxtiny", ({"img_size": 64},) + SMALL[2:]),
    ("volo", "volo_d1_224", ({"img_size": 64},) + SMALL[2:]),
    ("coat", "coat_tiny", ({"img_size": 64},) + SMALL[2:]),
    ("focalnet", "focalnet_tiny_srf", ({"depths": (1, 1, 1, 1)},) + SMALL[2:]),
    ("visformer", "visformer_tiny", ({"img_size": 64},) + SMALL[2:]),
    ("nextvit", "nextvit_small", ({},)),
    ("fastvit", "fastvit_t8", ({},)),
    ("edgenext", "edgenext_xx_small", ({},)),
    ("metaformer", "poolformer_s12", ({},)),
    ("swin", "swin_tiny_patch4_window7_224", ({"img_size": 56, "depths": (1, 1, 1, 1)},) + SMALL[2:]),
    ("swinv2", "swinv2_tiny_window8_256", ({"img_size": 64, "window_size": 4, "depths": (1, 1, 1, 1)},) + SMALL[2:]),
    ("swinv2_cr", "swinv2_cr_tiny_224", ({"img_size": 64, "window_size": 4, "depths": (1, 1, 1, 1)},) + SMALL[2:]),
    ("maxxvit", "maxvit_rmlp_pico_rw_256", ({"img_size": 64},) + SMALL[2:]),
    ("maxxvit", "coatnet_nano_rw_224", ({"img_size": 64},) + SMALL[2:]),
    ("vision_transformer_hybrid", "vit_tiny_r_s16_p8_224", ({"img_size": 64, "depth": 2},) + SMALL),
    ("vitamin", "vitamin_small_224", ({"img_size": 64, "depth": 2},) + SMALL),
]


def _hf_models():
    """(transformers class name, model) with tiny random configs."""
    import transformers as tf

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                 patch_size=8)
    out = [
        ("ViTModel", lambda: tf.ViTModel(tf.ViTConfig(**small), add_pooling_layer=False)),
        ("DeiTModel", lambda: tf.DeiTModel(tf.DeiTConfig(**small), add_pooling_layer=False)),
        ("BeitModel", lambda: tf.BeitModel(tf.BeitConfig(**small, use_mean_pooling=False), add_pooling_layer=False)),
        ("Data2VecVisionModel", lambda: tf.Data2VecVisionModel(tf.Data2VecVisionConfig(**small))),
        ("Dinov2Model", lambda: tf.Dinov2Model(tf.Dinov2Config(**small))),
        ("SwinModel", lambda: tf.SwinModel(tf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                         num_heads=[1, 2], window_size=2))),
        ("SiglipVisionModel", lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**small))),
        ("CLIPVisionModel", lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**small))),
        ("ViTMAEModel", lambda: tf.ViTMAEModel(tf.ViTMAEConfig(**small, mask_ratio=0.0))),
    ]
    return [(f"transformers:{n}", f"{n} (tiny config)", make, (32, 32)) for n, make in out]


def _timm_models(only):
    import timm

    out = []
    for module, name, kwsets in TIMM:
        if only and not any(o in name or o in module for o in only):
            continue

        def make(name=name, kwsets=kwsets):
            err = None
            for kw in kwsets:
                try:
                    return timm.create_model(name, pretrained=False, **kw), kw
                except Exception as exc:  # noqa: BLE001 - this size/depth is not accepted: try the next
                    err = exc
            raise err

        out.append((f"timm:{module}", name, make, None))
    return out


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _size(model):
    for get in (lambda: model.patch_embed.img_size, lambda: model.default_cfg["input_size"][1:],
                lambda: model.pretrained_cfg["input_size"][1:]):
        try:
            s = tuple(int(v) for v in get())
            if len(s) == 2:
                return s
        except Exception:  # noqa: BLE001
            continue
    return (224, 224)


def _outcome(model, images, adapter, t_fwd):
    import vitdecomp
    from vitdecomp.errors import VitDecompError

    try:
        dec = vitdecomp.decompose(model, images, adapter=adapter, check=False, fingerprint=False)
        t0 = time.perf_counter()  # timed: the second call (the auto adapter's trace is cached by then)
        vitdecomp.decompose(model, images, adapter=adapter, check=False, fingerprint=False)
        dt = time.perf_counter() - t0
    except _Timeout:
        raise
    except VitDecompError as exc:
        msg = re.sub(r'"[^"]*/site-packages/', '"', " ".join(str(exc).split())).replace("auto adapter: ", "")
        if isinstance(exc, vitdecomp.NoAdapterError):
            msg = f"no adapter claims {type(model).__name__}"
        return f"refused: {type(exc).__name__}: {msg[:220]}", "", ""
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:120]} ({where.filename.split('/')[-1]}:{where.lineno})", "", ""
    err = float(dec.error)
    gran = "heads" if any(c.kind == "head" for c in dec.components) else "blocks"
    ok = "exact" if err <= 1e-5 else "inexact"
    return (f"{ok} ({gran}, {len(dec)} components; {dec.meta.get('adapter', '?')})", f"{err:.1e}",
            f"{dt / max(t_fwd, 1e-9):.1f}×")


def _drop_locations(text: str) -> str:
    """Remove `` ("file", line N, in f: code)`` source locations (balanced parentheses)."""
    out, i = [], 0
    while i < len(text):
        if text.startswith(' ("', i):
            depth, j = 0, i + 1
            while j < len(text):
                depth += {"(": 1, ")": -1}.get(text[j], 0)
                j += 1
                if depth == 0:
                    break
            i = j
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def _short(outcome, err, ratio) -> str:
    """One short cell: ``heads 2e-07 1.5×`` / ``blocks ...`` / ``refused: <first clause>`` / ``error``."""
    if outcome.startswith(("exact", "inexact")):
        gran = outcome.split("(", 1)[1].split(",", 1)[0]
        via = outcome.rsplit("; ", 1)[-1].rstrip(")")
        return f"{'' if outcome.startswith('exact') else 'INEXACT '}{gran} ({via}) {err} {ratio}"
    if outcome.startswith("refused"):
        why = outcome.split(": ", 2)[-1]
        why = _drop_locations(why)
        return "refused: " + why[:70].rstrip() + ("…" if len(why) > 70 else "")
    return outcome[:70]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", default=None, help="model or module name fragments to run")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers models")
    p.add_argument("--timeout", type=int, default=90, help="seconds per model before it is reported as timed out")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    p.add_argument("--compact", default=None, help="also write a one-line-per-model summary table (for the README)")
    args = p.parse_args(argv)

    import vitdecomp
    from vitdecomp import testing

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    reg = vitdecomp.default_registry()
    has_auto = any(r.obj.name == "auto" for r in reg.adapters)
    ways = [("dispatch", None)] + ([("auto", "auto")] if has_auto else [])
    models = _timm_models(args.only)
    if not args.no_hf and not args.only:
        models += _hf_models()
    head = "| module | model | " + " | ".join(f"{w}: outcome | rel. error | time ÷ fwd" for w, _ in ways) + " |"
    lines = [head, "|" + "---|" * (2 + 3 * len(ways))]
    compact = ["| module | model | " + " | ".join(w for w, _ in ways) + " |", "|---|---|" + "---|" * len(ways)]
    signal.signal(signal.SIGALRM, _alarm)
    t_all = time.perf_counter()
    for module, name, make, size in models:
        cells = []
        signal.alarm(args.timeout)
        try:
            built = make()
            model, kw = built if isinstance(built, tuple) else (built, {})
            model = model.eval()
            testing.perturb_parameters(model)
            size = size or ((kw["img_size"],) * 2 if isinstance(kw.get("img_size"), int) else _size(model))
            images = torch.randn(1, 3, *size)
            try:
                vitdecomp.representation(model, images)
                t0 = time.perf_counter()
                vitdecomp.representation(model, images)
                t_fwd = time.perf_counter() - t0
            except Exception:  # noqa: BLE001 - no adapter: time the model's own forward
                model(images)
                t0 = time.perf_counter()
                model(images)
                t_fwd = time.perf_counter() - t0
            for _, adapter in ways:
                cells += _outcome(model, images, adapter, t_fwd)
            label = f"{name} {size[0]}px" + (f" ({', '.join(f'{k}={v}' for k, v in kw.items() if k != 'img_size')})"
                                             if kw and set(kw) != {"img_size"} else "")
        except _Timeout:
            cells = cells + [f"timed out after {args.timeout} s", "", ""] * (len(ways) - len(cells) // 3)
            label = name
        except Exception as exc:  # noqa: BLE001 - the model could not be built here
            cells = [f"not built: {type(exc).__name__}: {' '.join(str(exc).split())[:100]}", "", ""] * len(ways)
            label = name
        finally:
            signal.alarm(0)
        row = f"| {module} | {label} | " + " | ".join(c.replace("|", "/") for c in cells) + " |"
        lines.append(row)
        compact.append(f"| {module.split(':', 1)[1]} | {name} | "
                       + " | ".join(_short(*cells[3 * k:3 * k + 3]) for k in range(len(ways))) + " |")
        print(row, file=sys.stderr, flush=True)
    lines.append("")
    lines.append(f"float32, batch 1, random weights (norms/biases perturbed); {platform.processor() or platform.machine()}, "
                 f"torch {torch.__version__}, {torch.get_num_threads()} threads; total {time.perf_counter() - t_all:.0f} s")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    if args.compact:
        with open(args.compact, "w") as f:
            f.write("\n".join(compact + lines[-2:]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
