"""Hugging Face transformers Swin and SwinV2.

Supported (by class structure; subclasses included): ``SwinModel``, ``SwinForImageClassification``,
``Swinv2Model``, ``Swinv2ForImageClassification``, any attention implementation, at the configured
``image_size`` only (no ``interpolate_pos_encoding``; SwinV2's windows are fixed for that resolution).

Representation z: ``pooler_output``, the mean over final-stage positions after the final ``layernorm`` (the
classifier's input); ``last_hidden_state.mean(1)`` for a model built without its pooler.

Components, in forward order (``stages.S`` is ``encoder.layers[S]``; ``Component.stage`` is the grid a
component is on): ``embed`` (patch embedding, its norm, position embeddings); per block
``stages.S.blocks.B.attn.head.H``, ``stages.S.blocks.B.attn.bias`` (the output projection's bias; in V2 through
the frozen res-post-norm ``layernorm_before``, plus its β), ``stages.S.blocks.B.mlp`` (V2: ``layernorm_after``
included); ``stages.S.downsample.norm.bias`` (the patch merging at the end of stage S: its norm's β, V1 through
the reduction; on the grid of stage S+1, which it writes); ``layernorm.bias``. Spatial detail as for timm Swin:
each component on its own stage's grid (``dec.grid_of(name)``), heads at their query positions
(``meta["head_tokens"] = "query"``), the shifted-window roll undone.
"""

from __future__ import annotations

import torch

from vitdecomp import TokenGrid
from vitdecomp.errors import InputError, UnsupportedModelError
from vitdecomp.graph import Graph, GraphAdapter, WindowHeads

from ._common import _pair, hf_class

__all__ = ["HFSwinAdapter"]

_CLASSES = ("SwinModel", "SwinForImageClassification", "Swinv2Model", "Swinv2ForImageClassification")


def _base(model):
    cls = hf_class(model, _CLASSES)
    return cls, (model if cls in ("SwinModel", "Swinv2Model") else model.base_model)


def _parts(S, b, layer, v2):
    """(output projection, heads, post-norm or None, MLP branch module) of one layer."""
    try:
        if v2:
            return (layer.attention.output.dense, layer.attention.self.num_attention_heads, layer.layernorm_before,
                    layer.layernorm_after)
        return layer.attention.o_proj, layer.attention.num_attention_heads, None, layer.mlp
    except AttributeError as exc:
        raise UnsupportedModelError(f"stages.{S}.blocks.{b} ({type(layer).__name__}) does not have the layout the "
                                    f"transformers-swin adapter reads ({exc})") from exc


class HFSwinAdapter(GraphAdapter):
    name = "transformers-swin"
    families = ("Swin (transformers)", "SwinV2 (transformers)")

    def supports(self, model) -> bool:
        return hf_class(model, _CLASSES) is not None

    def explain(self, model) -> str:
        cls = hf_class(model, _CLASSES)
        return f"transformers {cls}: z = pooler_output" if cls else f"not one of the transformers classes {list(_CLASSES)}"

    def middle_start(self, model) -> int:
        return sum(len(st.blocks) for st in _base(model)[1].encoder.layers) // 2

    def validate(self, model, images):
        cls, base = _base(model)
        size = _pair(base.config.image_size)
        if tuple(images.shape[-2:]) != size:
            raise InputError(f"Image size {images.shape[-2]}×{images.shape[-1]} does not match the model's input size "
                             f"{size[0]}×{size[1]} (config.image_size); resize the images")
        for S, st in enumerate(base.encoder.layers):
            for b, layer in enumerate(st.blocks):
                _parts(S, b, layer, cls.startswith("Swinv2"))

    def readout(self, model):
        head = getattr(model, "classifier", None)
        return head if isinstance(head, torch.nn.Linear) else None

    def representation(self, model, images):
        base = _base(model)[1]
        out = base(pixel_values=images)
        return out.pooler_output if base.pooler is not None else out.last_hidden_state.mean(1)

    def oracle_writes(self, model):
        """The pack's names → the model's module paths, for the conformance kit's attribution oracle."""
        cls, base = _base(model)
        v2 = cls.startswith("Swinv2")
        pre = "" if base is model else f"{model.base_model_prefix}."
        out = {}
        for S, st in enumerate(base.encoder.layers):
            for b, layer in enumerate(st.blocks):
                p, q = f"stages.{S}.blocks.{b}", f"{pre}encoder.layers.{S}.blocks.{b}"
                out[f"{p}.mlp"] = f"{q}.layernorm_after" if v2 else f"{q}.mlp"
                out[f"{p}.attn"] = f"{q}.attention"
                out[f"{p}.attn.bias"] = ([f"{q}.attention.output.dense.bias", f"{q}.layernorm_before.bias"] if v2
                                         else [f"{q}.attention.o_proj.bias"])
            if st.downsample is not None:
                out[f"stages.{S}.downsample.norm.bias"] = [f"{pre}encoder.layers.{S}.downsample.norm.bias"]
        out["layernorm.bias"] = [f"{pre}layernorm.bias"]
        return out

    def describe(self, model, images):
        cls, base = _base(model)
        v2 = cls.startswith("Swinv2")
        ph, pw = _pair(base.config.patch_size)
        H, W = images.shape[-2:]
        h, w, scale = -(-H // ph), -(-W // pw), 1
        meta = {"adapter": self.name, "model": type(model).__name__, "head_tokens": "query",
                "checkpoint": getattr(base.config, "_name_or_path", "") or None}
        g = Graph(self.name, run=lambda x: self.representation(model, x), grid=TokenGrid(0, h, w, (ph, pw)), meta=meta)
        s = g.stream("stages.0", h * w, grid=TokenGrid(0, h, w, (ph, pw)))
        stages = base.encoder.layers
        g.embed(s, stages[0])
        gi = 0
        for S, st in enumerate(stages):
            for b, layer in enumerate(st.blocks):
                proj, nh, post, mlp = _parts(S, b, layer, v2)
                ws, shift = int(layer.window_size), int(layer.shift_size)
                if not v2 and min(h, w) <= ws:  # what SwinLayer.set_shift_and_window_size does in the forward
                    ws, shift = min(h, w), 0
                with g.block(gi, f"stages.{S}.blocks.{b}", s, layer, stage=S):
                    src = WindowHeads(proj=proj, num_heads=int(nh), hw=(h, w), window=(ws, ws), shift=(shift, shift),
                                      pad_first=True)
                    g.heads(s, src, proj.weight, proj.bias, post_norm=post)
                    g.branch(s, mlp, name="mlp", kind="mlp")
                gi += 1
            if st.downsample is not None:
                h, w, scale = -(-h // 2), -(-w // 2), scale * 2
                nxt = g.stream(f"stages.{S + 1}", h * w, grid=TokenGrid(0, h, w, (ph * scale, pw * scale)))
                g.merge(s, nxt, norm=st.downsample.norm, reduction=st.downsample.reduction, norm_first=not v2,
                        name=f"stages.{S}.downsample.norm.bias", stage=S + 1)
                s = nxt
        g.norm(s, base.layernorm, name="layernorm")
        g.output(g.pool(s, range(s.rows), [1.0 / s.rows] * s.rows))
        return g

