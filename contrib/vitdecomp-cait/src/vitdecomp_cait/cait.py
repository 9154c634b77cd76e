"""timm CaiT (``timm.models.cait.Cait``: ``cait_xxs24_224`` ... ``cait_m48_448``).

Two streams: the patch tokens, written by ``blocks.i`` (talking-heads self-attention and an MLP, both with
LayerScale), and the class token, written by ``blocks_token_only.j`` (class attention over the class token and
every patch token, then an MLP). z = ``forward_head(forward_features(x), pre_logits=True)``: the class token
after the final ``norm``.

Components: ``embed`` (patch + position embedding), ``blocks.i.attn.head.h`` / ``blocks.i.attn.bias`` /
``blocks.i.mlp``, ``cls_token``, ``blocks_token_only.j.attn.bias`` and ``blocks_token_only.j.mlp``, ``norm.bias``.
The patch stream reaches z only through the class-attention value paths, at the forward's attention weights, so a
patch-block component's contribution is what it sends to the class token that way; a class-attention branch
itself contributes only its constant (value/output biases and its norm's offset). Block indices are global:
class-attention block j is block ``depth + j``. Not supported: ``global_pool='avg'``.
"""

from __future__ import annotations

import sys

from vitdecomp import TokenGrid, hookimpl
from vitdecomp.errors import InputError, UnsupportedModelError
from vitdecomp.graph import Graph, GraphAdapter, ProjInput, TalkingHeads

__all__ = ["CaitAdapter"]


class CaitAdapter(GraphAdapter):
    name = "timm-cait"
    families = ("CaiT",)

    def supports(self, model) -> bool:
        return "timm" in sys.modules and type(model).__name__ == "Cait" and hasattr(model, "blocks_token_only")

    def validate(self, model, images):
        if model.global_pool != "token":
            raise UnsupportedModelError(f"CaiT with global_pool={model.global_pool!r}; supported: 'token'")
        if tuple(images.shape[-2:]) != tuple(model.patch_embed.img_size):
            raise InputError(f"Image size {tuple(images.shape[-2:])} does not match the model's input size "
                             f"{tuple(model.patch_embed.img_size)}")

    def representation(self, model, images):
        return model.forward_head(model.forward_features(images), pre_logits=True)

    def oracle_writes(self, model):
        # the conformance oracle's map of a class-attention constant: its norm's β and the value/output biases
        params = dict(model.named_parameters())
        parts = ("norm1.bias", "attn.q.bias", "attn.k.bias", "attn.v.bias", "attn.proj.bias")
        return {f"blocks_token_only.{j}.attn.bias": [p for p in (f"blocks_token_only.{j}.{q}" for q in parts)
                                                     if p in params] for j in range(len(model.blocks_token_only))}

    def describe(self, model, images) -> Graph:
        gh, gw = model.patch_embed.grid_size
        grid = TokenGrid(num_prefix=1, h=gh, w=gw, patch_size=tuple(model.patch_embed.patch_size))
        g = Graph(self.name, run=lambda x: self.representation(model, x), grid=grid,
                  meta={"adapter": self.name, "model": type(model).__name__})
        x = g.stream("patches", gh * gw, tokens=1)  # grid token 0 is the class token
        cls = g.stream("cls", 1, tokens=0)
        g.embed(x, model.blocks[0])
        for i, blk in enumerate(model.blocks):
            a = blk.attn
            with g.block(i, f"blocks.{i}", x, entry=blk):
                g.heads(x, ProjInput(a.proj, a.num_heads, TalkingHeads(a.qkv, a.proj_w)), a.proj.weight,
                        a.proj.bias, gamma=blk.gamma_1)
                g.branch(x, blk.mlp, name="mlp", gamma=blk.gamma_2)
        g.param(cls, model.cls_token, name="cls_token")
        for j, blk in enumerate(model.blocks_token_only):
            a = blk.attn
            with g.block(len(model.blocks) + j, f"blocks_token_only.{j}", cls, entry=blk, entry_arg=1):
                g.class_attention([cls, x], cls, norm=blk.norm1, q=a.q, k=a.k, v=a.v, proj=a.proj,
                                  num_heads=a.num_heads, scale=a.scale, gamma=blk.gamma_1)
                g.branch(cls, blk.mlp, name="mlp", gamma=blk.gamma_2)
        g.norm(cls, model.norm, name="norm")  # model.norm sees cat(cls, patches): the class token is row 0
        z = g.pool(cls, [0], [1.0])
        g.output(z)
        return g


@hookimpl
def register_adapters(register):
    register(CaitAdapter())
