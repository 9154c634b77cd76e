"""timm Swin Transformer family (V1, V2 and V2-Cr).

Supported (by structure: any timm ``SwinTransformer``, ``SwinTransformerV2`` or ``SwinTransformerV2Cr`` with
average pooling):

* Swin V1: ``swin_{tiny,small,base,large}_patch4_window7_224``, ``swin_{base,large}_patch4_window12_384``,
  ``swin_s3_*`` (per-stage windows); blocks ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``; patch merging
  gather 2×2 → LayerNorm(4C) → Linear.
* Swin V2: ``swinv2_*`` (cosine attention, continuous position bias); res-post-norm blocks
  ``x + norm1(attn(x))``, ``x + norm2(mlp(x))`` — the norm sits inside the branch, so a branch's output (norm
  included) is still a component; patch merging gather 2×2 → Linear → LayerNorm.
* Swin V2-Cr: ``swinv2_cr_*`` (``timm.models.swin_transformer_v2_cr``; module paths ``stages.S.blocks.B``): the
  V2 res-post-norm blocks on ``[B, h, w, C]`` maps, patch merging gather 2×2 → LayerNorm(4C) → Linear as in V1,
  and a block's optional main-branch ``norm3`` (the last block's is the final norm, ``stages.S.blocks.B.norm3.bias``)
  frozen on the stream. Refused: a ``norm3`` before a later patch merging (``extra_norm_period`` /
  ``extra_norm_stage``, the ``*_ns_*`` and huge/giant models).

The family is a description on the core's graph engine (:meth:`describe`): one grid stream per stage
(``Graph.stream(..., grid=)``), ``Graph.merge`` between them, window heads (``vitdecomp.graph.WindowHeads``), V2's
post-norm as ``Graph.heads(..., post_norm=)``.

Not supported: ``global_pool`` other than ``'avg'``, features-only wrappers.

Representation: ``model.forward_head(model.forward_features(x), pre_logits=True)`` — the mean over final-stage
positions of the final norm.

Components, in forward order (``stages.S`` is ``model.layers[S]``; ``B`` is the block index within the stage;
``Component.block`` is the global block index, ``Component.stage`` is ``S``):

* ``embed``: the patch embedding with its norm;
* ``stages.S.downsample.norm.bias`` (S ≥ 1): the patch merging's norm offset β (V1: ``reduction @ β``), a constant;
* per block ``stages.S.blocks.B.attn.head.H`` (heads), ``stages.S.blocks.B.attn.bias`` (the output projection's
  bias; in V2 passed through the frozen ``norm1`` together with ``norm1``'s β) and ``stages.S.blocks.B.mlp``
  (the whole MLP branch; in V2 ``norm2`` included);
* ``norm.bias``: the final norm's β (V2-Cr: ``stages.S.blocks.B.norm3.bias``);
* with ``start=k`` (a global block index, a ``(stage, block)`` pair or ``"stages.S.blocks.B"``): the residual
  stream entering that block is ``init`` (kind ``residual``) and replaces ``embed`` and every component before it
  (a patch merging right before the block is inside ``init``).

Spatial detail (``tokens="source"``). Each component's contribution is split exactly over the positions of the
grid of **its own stage**, where it writes: ``dec.token_grids[name]`` is ``TokenGrid(num_prefix=0, h=H_S, w=W_S,
patch_size=patch·2^S)`` (stage 0 for ``embed``, the final stage for ``norm.bias``), and ``dec.spatial_map(name)``
is ``[B, H_S, W_S, D]`` with row ``i``, column ``j`` covering image pixels ``[i·ph, (i+1)·ph) × [j·pw, (j+1)·pw)``.
Each position's value is carried to z through every later patch merging position by position (its merge slots
and the frozen 1/σ of each merge norm and of the final norm at the position it ends in); the shifted-window roll is
undone (positions are read off the block's own roll / pad / partition), so maps sit where the model writes.
``dec.grid`` is the grid of the first decomposed stage. Attention heads are placed at their *query* (output)
positions; the split by the tokens they read is not computed (it needs every
source × merge-slot group pair: about 6.6 GMAC per stage-0 head per image on Swin-B). Constants sit at every
position they are added at; ``norm.bias`` (added after pooling) is spread evenly over the final grid.
"""

from __future__ import annotations

import re
import sys

import torch

from vitdecomp import TokenGrid, hookimpl
from vitdecomp.engine import is_identity, supported_norm
from vitdecomp.errors import InputError, UnsupportedModelError
from vitdecomp.graph import Graph, GraphAdapter, WindowHeads, execute

__all__ = ["TimmSwinAdapter"]


def _swin_classes():
    if "timm" not in sys.modules:
        return ()
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    from timm.models.swin_transformer_v2_cr import SwinTransformerV2Cr

    return SwinTransformer, SwinTransformerV2, SwinTransformerV2Cr


def _is_v2(model) -> bool:
    """Res-post-norm blocks (SwinV2 and SwinV2-Cr)."""
    classes = _swin_classes()
    return len(classes) == 3 and isinstance(model, classes[1:])


def _is_cr(model) -> bool:
    classes = _swin_classes()
    return len(classes) == 3 and isinstance(model, classes[2])


def _stages(model):
    return getattr(model, "layers", None) if getattr(model, "layers", None) is not None else getattr(model, "stages")


def _problems(model) -> list:
    """Structural features this adapter cannot decompose exactly (empty list: fully supported)."""
    out = []
    head_pool = getattr(getattr(getattr(model, "head", None), "global_pool", None), "pool_type", None)
    pool = getattr(model, "global_pool", head_pool)
    if pool != "avg" or head_pool != "avg":
        out.append(f"global_pool={pool!r} (supported: 'avg')")
    for name in ("norm",):
        mod = getattr(model, name, None)
        if mod is not None and not supported_norm(mod):
            out.append(f"{name} of type {type(mod).__name__}")
    pe = getattr(model, "patch_embed", None)
    if pe is None:
        out.append("no patch_embed")
    for S, st in enumerate(_stages(model)):
        ds = getattr(st, "downsample", None)
        if ds is not None and not is_identity(ds):
            if not (hasattr(ds, "reduction") and hasattr(ds, "norm")):
                out.append(f"stages.{S}.downsample is a {type(ds).__name__} (not a patch merging)")
            elif getattr(ds.reduction, "bias", None) is not None:
                out.append(f"stages.{S}.downsample.reduction has a bias")
            elif not supported_norm(ds.norm):
                out.append(f"stages.{S}.downsample.norm of type {type(ds.norm).__name__}")
        for B, blk in enumerate(st.blocks):
            need = ("norm1", "attn", "norm2", "mlp", "window_size", "shift_size")
            if not all(hasattr(blk, n) for n in need):
                out.append(f"stages.{S}.blocks.{B} is a {type(blk).__name__} (not a Swin block)")
                return out
            if not all(hasattr(blk.attn, n) for n in ("proj", "num_heads")):
                out.append(f"stages.{S}.blocks.{B}.attn is a {type(blk.attn).__name__} without an output projection")
                return out
            if _is_v2(model) and not supported_norm(blk.norm1):
                out.append(f"stages.{S}.blocks.{B}.norm1 of type {type(blk.norm1).__name__}")
            n3 = getattr(blk, "norm3", None)  # SwinV2-Cr's norm on the main branch (extra_norm)
            if n3 is not None and not is_identity(n3):
                if not supported_norm(n3):
                    out.append(f"stages.{S}.blocks.{B}.norm3 of type {type(n3).__name__}")
                elif S != len(_stages(model)) - 1:
                    out.append(f"stages.{S}.blocks.{B}.norm3 (a norm on the main branch before a later patch "
                               f"merging: extra_norm_period / extra_norm_stage; supported in the last stage only)")
    return out


def _parse_start(model, start):
    """Global block index from an int, a (stage, block) pair or 'stages.S.blocks.B'."""
    depths = [len(st.blocks) for st in _stages(model)]
    total = sum(depths)
    if start is None:
        return 0
    if isinstance(start, str):
        m = re.fullmatch(r"(?:stages|layers)\.(\d+)\.blocks\.(\d+)", start)
        if not m:
            raise InputError(f"start={start!r}: use a global block index, a (stage, block) pair or 'stages.S.blocks.B'")
        start = (int(m.group(1)), int(m.group(2)))
    if isinstance(start, tuple):
        if len(start) != 2 or not all(isinstance(v, int) for v in start):
            raise InputError(f"start={start!r}: a (stage, block) pair of ints is expected")
        S, b = start
        if not (0 <= S < len(depths)) or not (0 <= b < depths[S]):
            raise InputError(f"start={start!r} is out of range: stage depths are {tuple(depths)}")
        return sum(depths[:S]) + b
    if not (0 <= start < total):
        raise InputError(f"start={start!r} is out of range: {type(model).__name__} has blocks 0..{total - 1}")
    return start


class TimmSwinAdapter(GraphAdapter):
    name = "timm-swin"
    families = ("Swin", "SwinV2", "SwinV2-Cr")

    def supports(self, model) -> bool:
        classes = _swin_classes()
        return bool(classes) and isinstance(model, classes)

    def explain(self, model) -> str:
        if not self.supports(model):
            return "not a timm SwinTransformer / SwinTransformerV2 / SwinTransformerV2Cr"
        probs = _problems(model)
        return f"timm {type(model).__name__}" + (f" with unsupported parts: {probs}" if probs else "")

    def middle_start(self, model):
        """The global index of the middle block (used by the conformance kit for ``start``)."""
        return sum(len(st.blocks) for st in _stages(model)) // 2

    # ---------------------------------------------------------------- input checks
    def validate(self, model, images):
        probs = _problems(model)
        if probs:
            raise UnsupportedModelError(
                f"{type(model).__name__} uses features the timm-swin adapter cannot decompose exactly: {', '.join(probs)}"
            )
        pe = model.patch_embed
        ph, pw = pe.patch_size
        H, W = images.shape[-2:]
        if getattr(pe, "strict_img_size", True) and getattr(pe, "img_size", None) is not None:
            if (H, W) != tuple(pe.img_size):
                raise InputError(
                    f"Image size {H}×{W} does not match the model's fixed input size {pe.img_size[0]}×{pe.img_size[1]} "
                    f"({type(model).__name__}); resize the images, or create the model with strict_img_size=False"
                )
        elif not getattr(pe, "dynamic_img_pad", False) and (H % ph or W % pw):
            raise InputError(
                f"Image size {H}×{W} is not divisible by the patch size {ph}×{pw} of {type(model).__name__}; "
                f"use a multiple of the patch size"
            )

    def representation(self, model, images):
        return model.forward_head(model.forward_features(images), pre_logits=True)

    def oracle_writes(self, model):
        """Where the conformance kit's attribution oracle finds the V2 branches' writes: the res-post-norm is inside
        the branch (``mlp`` is ``norm2``'s output; ``attn.bias`` is the projection's bias and ``norm1``'s β)."""
        if not _is_v2(model):
            return {}
        out = {}
        top = "stages" if _is_cr(model) else "layers"
        for S, st in enumerate(_stages(model)):
            for b in range(len(st.blocks)):
                p, q = f"stages.{S}.blocks.{b}", f"{top}.{S}.blocks.{b}"
                out[f"{p}.mlp"] = f"{q}.norm2"
                out[f"{p}.attn.bias"] = [f"{q}.attn.proj.bias", f"{q}.norm1.bias"]
        return out

    def readout(self, model):
        fc = getattr(getattr(model, "head", None), "fc", None)
        return fc if isinstance(fc, torch.nn.Linear) else None

    # ---------------------------------------------------------------- decomposition
    def describe(self, model, images):
        """One grid stream per stage (merges between them), window heads, MLP branches, final norm, mean pool."""
        v2, cr = _is_v2(model), _is_cr(model)
        pe = model.patch_embed
        ph, pw = pe.patch_size
        H, W = images.shape[-2:]
        up = (lambda a, b: -(-a // b)) if getattr(pe, "dynamic_img_pad", False) else (lambda a, b: a // b)
        h, w, scale = up(H, ph), up(W, pw), 1
        meta = {"adapter": self.name, "head_tokens": "query",  # heads sit at the rows they write (see above)
                "model": getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
                if hasattr(model, "default_cfg") else type(model).__name__}
        g = Graph(self.name, run=lambda x: self.representation(model, x), grid=TokenGrid(0, h, w, (ph, pw)), meta=meta)
        s, gi = None, 0
        for S, st in enumerate(_stages(model)):
            ds = getattr(st, "downsample", None)
            ds = None if ds is None or is_identity(ds) else ds
            if ds is not None:
                h, w, scale = -(-h // 2), -(-w // 2), scale * 2
            if s is None or ds is not None:
                prev = s
                s = g.stream(f"stages.{S}", h * w, grid=TokenGrid(0, h, w, (ph * scale, pw * scale)))
                if prev is None:  # the patch embedding with its norm, as the first stage reads it
                    g.embed(s, st, nchw=cr)  # SwinV2-Cr's stages read [B, C, h, w] maps
                else:
                    g.merge(prev, s, norm=ds.norm, reduction=ds.reduction, norm_first=cr or not v2,
                            name=f"stages.{S}.downsample.norm.bias", stage=S)
            for b, blk in enumerate(st.blocks):
                at = blk.attn
                with g.block(gi, f"stages.{S}.blocks.{b}", s, blk, stage=S):
                    src = WindowHeads(proj=at.proj, num_heads=at.num_heads, hw=(h, w),
                                      window=tuple(blk.window_size), shift=tuple(blk.shift_size))
                    g.heads(s, src, at.proj.weight, at.proj.bias, post_norm=blk.norm1 if v2 else None)
                    g.branch(s, blk.norm2 if v2 else blk.mlp, name="mlp", kind="mlp")
                gi += 1
                if cr:  # SwinV2-Cr: an optional norm on the main branch after the block (its final norm)
                    g.norm(s, blk.norm3, name=f"stages.{S}.blocks.{b}.norm3")
        if not cr:
            g.norm(s, model.norm, name="norm")
        g.output(g.pool(s, range(s.rows), [1.0 / s.rows] * s.rows))
        return g

    def decompose(self, model, images, options):
        start = _parse_start(model, options.start)
        return execute(self.describe(model, images), images, start=start or None, tokens=options.tokens == "source",
                       bias="paper" if options.bias == "paper" else "explicit")


@hookimpl
def register_adapters(register):
    register(TimmSwinAdapter())
