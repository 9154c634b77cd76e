"""timm VisionTransformer family.

Supported (by structure, any timm ``VisionTransformer`` or subclass whose blocks are pre-norm
``x + ls1(attn(norm1(x)))`` / ``x + ls2(mlp(norm2(x)))`` with timm's fused-qkv ``Attention``):

* DeiT (``deit_*``) and distilled DeiT (``deit_*_distilled_*``: z is the mean of the CLS and distillation tokens);
* DINO (``vit_*.dino``), DINOv2 (``vit_*_patch14_dinov2*``, LayerScale) and its register variants (``*_reg4_*``);
* plain ViT with CLS-token or average pooling, with or without ``fc_norm``, ``norm_pre`` (CLIP-style), and
  ``dynamic_img_size=True``.

Representation: ``model.forward_head(model.forward_features(x), pre_logits=True)``.
Not supported (raises :class:`vitdecomp.UnsupportedModelError`): attention-pool (MAP) heads, max pooling,
post-norm / parallel blocks, rotary attention, attention ``scale_norm`` and gated attention.
"""

from __future__ import annotations

import sys

import torch

from vitdecomp import Adapter, TokenGrid, hookimpl
from vitdecomp.engine import is_identity, supported_norm
from vitdecomp.errors import InputError, UnsupportedModelError

from ._sequence import AttentionSpec, BlockSpec, ReadoutSpec, run_sequence

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


class TimmViTAdapter(Adapter):
    name = "timm-vit"
    families = ("ViT", "DeiT", "DeiT-distilled", "DINO", "DINOv2", "DINOv2-reg")

    def supports(self, model) -> bool:
        return _is_timm_vit(model)

    def explain(self, model) -> str:
        if not _is_timm_vit(model):
            return "not a timm VisionTransformer"
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
    def decompose(self, model, images, options):
        grid = self.grid(model, images)
        n_blocks = len(model.blocks)
        start = options.start or 0
        if not isinstance(start, int) or not (0 <= start < n_blocks):
            raise InputError(f"start={options.start!r} is out of range: {type(model).__name__} has blocks 0..{n_blocks - 1}")
        blocks = []
        for i, blk in enumerate(model.blocks):
            at = blk.attn
            H = at.num_heads
            dh = getattr(at, "head_dim", at.qkv.out_features // (3 * H))
            spec = AttentionSpec(
                module=at, style="timm", num_heads=H, head_dim=dh,
                out_weight=at.proj.weight.detach(), out_bias=None if at.proj.bias is None else at.proj.bias.detach(),
                scale=getattr(at, "scale", dh ** -0.5),
            )
            gamma = None if is_identity(blk.ls1) else blk.ls1.gamma.detach()
            blocks.append(BlockSpec(prefix=f"blocks.{i}", module=blk, attn=spec, attn_gamma=gamma, mlp_out=blk.ls2))

        distilled = getattr(model, "dist_token", None) is not None
        npre = model.num_prefix_tokens
        N = grid.num_tokens
        if distilled:
            rows, weights = [0, 1], torch.tensor([0.5, 0.5])
            post = None
        elif model.global_pool == "token":
            rows, weights = [0], torch.tensor([1.0])
            post = model.fc_norm
        else:  # avg
            first = 0 if getattr(model, "pool_include_prefix", False) else npre
            rows = list(range(first, N))
            weights = torch.full((len(rows),), 1.0 / len(rows), dtype=torch.float64)
            post = model.fc_norm
        readout = ReadoutSpec(
            rows=rows, weights=weights, norm=model.norm, norm_name="norm",
            post_norm=None if is_identity(post) else post, post_norm_name="fc_norm", proj=None,
            run=lambda x: self.representation(model, x),
        )
        meta = {"adapter": self.name, "model": getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
                if hasattr(model, "default_cfg") else type(model).__name__}
        return run_sequence(
            images, blocks, readout, embed_name="embed", start=start, tokens=options.tokens == "source",
            grid=grid, meta=meta, input_module_of_block=lambda k: model.blocks[k],
        )


def _load_timm(spec, *, pretrained=True, weights=None, random_init=False, device="cpu", **kwargs):
    from ._loading import load_timm

    return load_timm(spec, pretrained=pretrained, weights=weights, random_init=random_init, device=device, **kwargs)


@hookimpl
def register_adapters(register):
    register(TimmViTAdapter())


@hookimpl
def register_model_loaders(register):
    register("timm", _load_timm)
