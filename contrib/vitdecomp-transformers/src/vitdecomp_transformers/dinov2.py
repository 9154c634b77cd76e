"""Hugging Face transformers DINOv2, with and without registers.

Supported (by class structure; subclasses included): ``Dinov2Model``, ``Dinov2ForImageClassification``,
``Dinov2WithRegistersModel``, ``Dinov2WithRegistersForImageClassification`` (LayerScale, MLP or SwiGLU FFN),
any attention implementation, and any image size that is a multiple of the patch size (the model
interpolates its position embeddings).

Representation z:

* ``Dinov2Model``, ``Dinov2WithRegistersModel``: ``pooler_output`` = ``last_hidden_state[:, 0]``, the CLS
  token after the final ``layernorm`` (timm's DINOv2 pre-logits).
* ``...ForImageClassification``: the classifier's input ``cat([h[:, 0], h[:, 1 + R:].mean(1)])`` (R register
  tokens, ``h = last_hidden_state``), a 2·D vector: the first half is the CLS readout, the second the mean
  of the patch tokens. :meth:`readout` is the classifier.

Token grid: CLS, then the R register tokens (prefix tokens), then the patches. Components: ``embed``
(patch + position embeddings, CLS and register tokens), ``blocks.i.attn.head.h`` (after LayerScale),
``blocks.i.attn.bias`` (``o_proj`` bias × LayerScale), ``blocks.i.mlp`` (after LayerScale), ``layernorm.bias``.
"""

from __future__ import annotations

import torch

from vitdecomp import hookimpl

from ._common import HFAdapter, Layout, _pair, hf_class

__all__ = ["HFDinov2Adapter"]

_CLASSES = ("Dinov2Model", "Dinov2ForImageClassification", "Dinov2WithRegistersModel",
            "Dinov2WithRegistersForImageClassification")


class HFDinov2Adapter(HFAdapter):
    name = "transformers-dinov2"
    families = ("DINOv2 (transformers)", "DINOv2-reg (transformers)")
    class_names = _CLASSES

    def layout(self, model) -> Layout:
        cls = hf_class(model, _CLASSES)
        base = model if cls.endswith("Model") else model.base_model
        emb = base.embeddings
        reg = getattr(emb, "register_tokens", None)
        npre = 1 + (int(reg.shape[1]) if reg is not None else 0)
        if cls.endswith("Model"):
            groups, read, head = (lambda g: [[(0, 1.0)]]), (lambda out: out.last_hidden_state[:, 0]), None
            z_doc = "pooler_output = last_hidden_state[:, 0]"
        else:
            def groups(g):
                n = g.h * g.w
                return [[(0, 1.0)], [(npre + j, 1.0 / n) for j in range(n)]]

            def read(out):
                h = out.last_hidden_state
                return torch.cat([h[:, 0], h[:, npre:].mean(1)], dim=1)

            head = getattr(model, "classifier", None)
            z_doc = f"cat([last_hidden_state[:, 0], last_hidden_state[:, {npre}:].mean(1)])"
        return Layout(
            base=base, layers=base.encoder.layer, num_prefix=npre, groups=groups,
            norm=base.layernorm, norm_name="layernorm", proj=None, head=head, read=read,
            image_size=_pair(emb.patch_embeddings.image_size), patch_size=_pair(emb.patch_embeddings.patch_size),
            num_channels=int(base.config.num_channels), dynamic=True, z_doc=z_doc,
        )


@hookimpl
def register_adapters(register):
    register(HFDinov2Adapter())
