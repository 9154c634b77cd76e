"""open_clip CLIP vision transformers.

Supported: ``open_clip.transformer.VisionTransformer`` (pass the whole CLIP model or its ``.visual``), with
either ``nn.MultiheadAttention`` blocks (``ResidualAttentionBlock``) or open_clip's own ``Attention``
(``CustomResidualAttentionBlock``, including scaled-cosine attention and head scaling), detected by structure;
CLS-token or average pooling; ``ln_post`` before or after pooling; LayerScale.

Representation: ``encode_image(x)`` (unnormalised), i.e. ``ln_post`` on the pooled token, then ``proj``.
Component names use ``blocks.i`` for ``transformer.resblocks.i``; ``embed`` is the stream entering block 0
(class + patch + positional embedding after ``ln_pre``); ``ln_post.bias`` is the final norm's offset (the
projection has no bias).

Not supported (clear error): attentional pooling (CoCa), ``pool_type='none'``, inner attention norms
(``ln_inner``/``ln_attn``), attention with ``bias_k``/``add_zero_attn``, timm-backbone CLIP towers.
"""

from __future__ import annotations

import sys

import torch

from vitdecomp import TokenGrid, hookimpl
from vitdecomp.engine import is_identity, supported_norm
from vitdecomp.errors import InputError, UnsupportedModelError

from vitdecomp.graph import Graph, GraphAdapter, InProj

__all__ = ["OpenClipViTAdapter"]


def _visual(model):
    if "open_clip" not in sys.modules:
        return None
    from open_clip.transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return model
    vis = getattr(model, "visual", None)
    if isinstance(vis, VisionTransformer) and hasattr(model, "encode_image"):
        return vis
    return None


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _head_source(attn) -> InProj:
    H = attn.num_heads
    if isinstance(attn, torch.nn.MultiheadAttention):
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            raise UnsupportedModelError("nn.MultiheadAttention with separate k/v dims, bias_k or add_zero_attn")
        return InProj(attn, H, scale=(attn.embed_dim // H) ** -0.5, batch_first=attn.batch_first)
    # open_clip's own Attention
    if not is_identity(getattr(attn, "ln_inner", None)):
        raise UnsupportedModelError("open_clip Attention with an inner norm (ln_inner) before the output projection")
    return InProj(
        attn, H, scale=attn.scale, batch_first=True,
        logit_scale=None if attn.logit_scale is None else attn.logit_scale.detach(),
        logit_scale_max=float(getattr(attn, "logit_scale_max", 0.0)),
        head_scale=None if attn.head_scale is None else attn.head_scale.detach(),
        q_norm=None if is_identity(attn.ln_q) else attn.ln_q, k_norm=None if is_identity(attn.ln_k) else attn.ln_k,
    )


class OpenClipViTAdapter(GraphAdapter):
    name = "open_clip-vit"
    families = ("CLIP ViT (open_clip)",)

    def supports(self, model) -> bool:
        return _visual(model) is not None

    def unwrap(self, model):
        return _visual(model)

    def explain(self, model) -> str:
        return "open_clip VisionTransformer" if self.supports(model) else "not an open_clip VisionTransformer or CLIP model"

    def _problems(self, v):
        out = []
        if v.attn_pool is not None:
            out.append("attentional pooling (attn_pool)")
        if v.pool_type not in ("tok", "avg"):
            out.append(f"pool_type={v.pool_type!r}")
        for name in ("ln_pre", "ln_post"):
            if not supported_norm(getattr(v, name)):
                out.append(f"{name} of type {type(getattr(v, name)).__name__}")
        for i, blk in enumerate(v.transformer.resblocks):
            if not all(hasattr(blk, n) for n in ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2")):
                out.append(f"blocks.{i} is a {type(blk).__name__}")
                break
            if not is_identity(getattr(blk, "ln_attn", None)):
                out.append(f"blocks.{i}.ln_attn")
                break
            if hasattr(blk, "ln_1_kv"):
                out.append(f"blocks.{i} is a cross-attention block")
                break
        return out

    def grid(self, v, images) -> TokenGrid:
        H, W = images.shape[-2:]
        size = _pair(v.image_size)
        if (H, W) != size:
            raise InputError(f"Image size {H}×{W} does not match the CLIP model's input size {size[0]}×{size[1]}")
        ph, pw = _pair(v.patch_size)
        gh, gw = _pair(v.grid_size)
        return TokenGrid(num_prefix=1, h=gh, w=gw, patch_size=(ph, pw))

    def validate(self, v, images):
        probs = self._problems(v)
        if probs:
            raise UnsupportedModelError(f"open_clip VisionTransformer with unsupported parts: {', '.join(probs)}")
        self.grid(v, images)

    def _run(self, v, x):
        out = v(x)
        return out[0] if isinstance(out, tuple) else out

    def representation(self, model, images):
        return self._run(model, images)

    def describe(self, v, images) -> Graph:
        grid = self.grid(v, images)
        g = Graph(self.name, run=lambda x: self._run(v, x), grid=grid, meta={"adapter": self.name, "model": type(v).__name__})
        resblocks = v.transformer.resblocks
        x = g.stream("tokens", grid.num_tokens, seq_first=not getattr(v.transformer, "batch_first", True))
        g.embed(x, resblocks[0])
        for i, blk in enumerate(resblocks):
            with g.block(i, f"blocks.{i}", x, entry=blk):
                g.heads(x, _head_source(blk.attn), blk.attn.out_proj.weight, blk.attn.out_proj.bias,
                        gamma=None if is_identity(blk.ls_1) else blk.ls_1.gamma)
                g.branch(x, blk.ls_2, name="mlp")
        N = grid.num_tokens
        rows, weights = ([0], [1.0]) if v.pool_type == "tok" else (list(range(1, N)), [1.0 / (N - 1)] * (N - 1))
        after = bool(getattr(v, "final_ln_after_pool", False))
        if not after:
            g.norm(x, v.ln_post, name="ln_post")
        pooled = g.pool(x, rows, weights)
        if after:
            g.norm(pooled, v.ln_post, name="ln_post")
        g.project(pooled, v.proj)
        g.output(pooled)
        return g


@hookimpl
def register_adapters(register):
    register(OpenClipViTAdapter())


@hookimpl
def register_model_loaders(register):
    from ._loading import load_open_clip

    register("open_clip", load_open_clip)
