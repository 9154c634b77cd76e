"""timm VisionTransformer family.

Supported (by structure, any timm ``VisionTransformer`` or subclass whose blocks are pre-norm
``x + ls1(attn(norm1(x)))`` / ``x + ls2(mlp(norm2(x)))`` with timm's fused-qkv ``Attention``):

* DeiT (``deit_*``) and distilled DeiT (``deit_*_distilled_*``: z is the mean of the CLS and distillation tokens);
* DINO (``vit_*.dino``), DINOv2 (``vit_*_patch14_dinov2*``, LayerScale) and its register variants (``*_reg4_*``);
* plain ViT with CLS-token or average pooling, with or without ``fc_norm``, ``norm_pre`` (CLIP-style), and
  ``dynamic_img_size=True``.

Representation: ``model.forward_head(model.forward_features(x), pre_logits=True)``.
Not supported (raises :class:`vitdecomp.UnsupportedModelError`): max pooling, post-norm / parallel blocks,
rotary attention, attention ``scale_norm`` and gated attention. Attention-pool (MAP) heads (``global_pool="map"``,
SigLIP) are not claimed: dispatch leaves them to the ``auto`` adapter, which decomposes them.
"""

from __future__ import annotations

import sys

import torch

from vitdecomp import TokenGrid, hookimpl
from vitdecomp.engine import is_identity, supported_norm
from vitdecomp.errors import InputError, UnsupportedModelError

from vitdecomp.graph import FusedQKV, Graph, GraphAdapter, ProjInput

__all__ = ["TimmViTAdapter"]


def _is_timm_vit(model) -> bool:
    if "timm" not in sys.modules:
        return False
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def _problems(model) -> list:
    """Structural features this adapter cannot decompose exactly (empty list: fully supported)."""
    out = []
    if getattr(model, "attn_pool", None) is not None:
        out.append("attention-pool (MAP) head")
    if model.global_pool not in ("token", "avg"):
        out.append(f"global_pool={model.global_pool!r} (supported: 'token', 'avg')")
    for name in ("norm", "fc_norm", "norm_pre"):
        mod = getattr(model, name, None)
        if mod is not None and not supported_norm(mod):
            out.append(f"{name} of type {type(mod).__name__}")
    for i, blk in enumerate(model.blocks):
        need = ("norm1", "attn", "ls1", "norm2", "mlp", "ls2")
        if not all(hasattr(blk, n) for n in need):
            out.append(f"blocks.{i} is a {type(blk).__name__} (not a pre-norm Block)")
            break
        attn = blk.attn
        if not all(hasattr(attn, n) for n in ("qkv", "proj", "num_heads", "q_norm", "k_norm")):
            out.append(f"blocks.{i}.attn is a {type(attn).__name__} without fused qkv")
            break
        if not is_identity(getattr(attn, "norm", None)):
            out.append(f"blocks.{i}.attn.norm (scale_norm)")
            break
        if getattr(attn, "gate", None) is not None:
            out.append(f"blocks.{i}.attn.gate (gated attention)")
            break
    return out


class TimmViTAdapter(GraphAdapter):
    name = "timm-vit"
    families = ("ViT", "DeiT", "DeiT-distilled", "DINO", "DINOv2", "DINOv2-reg")

    def supports(self, model) -> bool:
        return _is_timm_vit(model) and getattr(model, "attn_pool", None) is None

    def explain(self, model) -> str:
        if not _is_timm_vit(model):
            return "not a timm VisionTransformer"
        if getattr(model, "attn_pool", None) is not None:
            return "timm VisionTransformer with an attention-pool (MAP) head: left to the auto adapter"
        probs = _problems(model)
        return "timm VisionTransformer" + (f" with unsupported parts: {probs}" if probs else "")

    # ---------------------------------------------------------------- input checks
    def grid(self, model, images: torch.Tensor) -> TokenGrid:
        pe = model.patch_embed
        ph, pw = pe.patch_size
        H, W = images.shape[-2:]
        if getattr(model, "dynamic_img_size", False) or not getattr(pe, "strict_img_size", True):
            if not getattr(pe, "dynamic_img_pad", False) and (H % ph or W % pw):
                raise InputError(
                    f"Image size {H}×{W} is not divisible by the patch size {ph}×{pw} of {type(model).__name__}; "
                    f"use a multiple of the patch size"
                )
            gh, gw = pe.dynamic_feat_size((H, W))
        else:
            if (H, W) != tuple(pe.img_size):
                raise InputError(
                    f"Image size {H}×{W} does not match the model's fixed input size {pe.img_size[0]}×{pe.img_size[1]}; "
                    f"resize the images, or create the model with dynamic_img_size=True"
                )
            gh, gw = pe.grid_size
        return TokenGrid(num_prefix=model.num_prefix_tokens, h=int(gh), w=int(gw), patch_size=(ph, pw))

    def validate(self, model, images):
        probs = _problems(model)
        if probs:
            raise UnsupportedModelError(
                f"{type(model).__name__} uses features the timm-vit adapter cannot decompose exactly: {', '.join(probs)}"
            )
        self.grid(model, images)

    def representation(self, model, images):
        return model.forward_head(model.forward_features(images), pre_logits=True)

    def readout(self, model):
        """The linear classifier on z, or None. Distilled DeiT returns None: its logits average two heads
        applied to the CLS and distillation tokens separately, which is not a function of their mean z."""
        if getattr(model, "dist_token", None) is not None:
            return None
        head = getattr(model, "head", None)
        return head if isinstance(head, torch.nn.Linear) else None

    # ---------------------------------------------------------------- decomposition
    def describe(self, model, images) -> Graph:
        grid = self.grid(model, images)
        meta = {"adapter": self.name, "model": getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
                if hasattr(model, "default_cfg") else type(model).__name__}
        g = Graph(self.name, run=lambda x: self.representation(model, x), grid=grid, meta=meta)
        x = g.stream("tokens", grid.num_tokens)
        g.embed(x, model.blocks[0])
        for i, blk in enumerate(model.blocks):
            at = blk.attn
            with g.block(i, f"blocks.{i}", x, entry=blk):
                attention = FusedQKV(at.qkv, at.q_norm, at.k_norm, getattr(at, "scale", at.head_dim ** -0.5))
                g.heads(x, ProjInput(at.proj, at.num_heads, attention), at.proj.weight, at.proj.bias,
                        gamma=None if is_identity(blk.ls1) else blk.ls1.gamma)
                g.branch(x, blk.ls2, name="mlp")
        npre, N = model.num_prefix_tokens, grid.num_tokens
        post = model.fc_norm
        if getattr(model, "dist_token", None) is not None:  # distilled DeiT: mean of the CLS and distillation tokens
            rows, weights, post = [0, 1], [0.5, 0.5], None
        elif model.global_pool == "token":
            rows, weights = [0], [1.0]
        else:  # avg
            rows = list(range(0 if getattr(model, "pool_include_prefix", False) else npre, N))
            weights = [1.0 / len(rows)] * len(rows)
        g.norm(x, model.norm, name="norm")
        pooled = g.pool(x, rows, weights)
        g.norm(pooled, post, name="fc_norm")
        g.output(pooled)
        return g


def _load_timm(spec, *, pretrained=True, weights=None, random_init=False, device="cpu", **kwargs):
    from ._loading import load_timm

    return load_timm(spec, pretrained=pretrained, weights=weights, random_init=random_init, device=device, **kwargs)


@hookimpl
def register_adapters(register):
    from vitdecomp.graph.auto import AutoAdapter

    register(TimmViTAdapter())
    register(AutoAdapter())  # fallback: used only when no family adapter claims a timm model, or as adapter="auto"


@hookimpl
def register_model_loaders(register):
    register("timm", _load_timm)
