"""Hugging Face transformers ViT and DeiT.

Supported (by class structure; subclasses included): ``ViTModel``, ``ViTForImageClassification``,
``DeiTModel``, ``DeiTForImageClassification``, ``DeiTForImageClassificationWithTeacher``, with any attention
implementation (eager, sdpa, ...), at the configured ``image_size`` only (no ``interpolate_pos_encoding``).

Representation z (the analogue of timm's ``forward_head(forward_features(x), pre_logits=True)``):

* ``ViTModel``, ``ViTForImageClassification``, ``DeiTModel``, ``DeiTForImageClassification``:
  ``last_hidden_state[:, 0]``, the CLS token after the final ``layernorm`` (the classifier's input). Not
  ``pooler_output``: ViT's pooler is ``tanh(dense(·))``, which is not linear.
* ``DeiTForImageClassificationWithTeacher``: ``last_hidden_state[:, :2].mean(1)``, the mean of the CLS and
  distillation tokens after ``layernorm`` (timm's pre-logits of distilled DeiT). This model's logits average
  two heads on different tokens, so :meth:`readout` is None for it.

Components: ``embed`` (patch + position embeddings and the CLS/distillation tokens), per layer ``i`` of
``layers``: ``blocks.i.attn.head.h``, ``blocks.i.attn.bias`` (``o_proj`` bias), ``blocks.i.mlp``; and
``layernorm.bias`` (β of the final norm).
"""

from __future__ import annotations

from vitdecomp import hookimpl

from ._common import HFAdapter, Layout, _pair, hf_class

__all__ = ["HFViTAdapter"]

_CLASSES = ("ViTModel", "ViTForImageClassification", "DeiTModel", "DeiTForImageClassification",
            "DeiTForImageClassificationWithTeacher")


class HFViTAdapter(HFAdapter):
    name = "transformers-vit"
    families = ("ViT (transformers)", "DeiT (transformers)")
    class_names = _CLASSES

    def layout(self, model) -> Layout:
        cls = hf_class(model, _CLASSES)
        base = model if cls in ("ViTModel", "DeiTModel") else model.base_model
        cfg = base.config
        emb = base.embeddings
        distilled = getattr(emb, "distillation_token", None) is not None
        if cls == "DeiTForImageClassificationWithTeacher":
            groups, read, head = (lambda g: [[(0, 0.5), (1, 0.5)]]), (lambda out: out.last_hidden_state[:, :2].mean(1)), None
            z_doc = "last_hidden_state[:, :2].mean(1)"
        else:
            groups, read = (lambda g: [[(0, 1.0)]]), (lambda out: out.last_hidden_state[:, 0])
            head = getattr(model, "classifier", None)
            z_doc = "last_hidden_state[:, 0]"
        return Layout(
            base=base, layers=base.layers, num_prefix=2 if distilled else 1, groups=groups,
            norm=base.layernorm, norm_name="layernorm", proj=None, head=head, read=read,
            image_size=_pair(emb.patch_embeddings.image_size), patch_size=_pair(emb.patch_embeddings.patch_size),
            num_channels=int(cfg.num_channels), dynamic=False, z_doc=z_doc,
        )


@hookimpl
def register_adapters(register):
    # the installed entry points are fixed: Swin, BEiT / Data2Vec-vision, SigLIP and ViT-MAE register from here
    from .beit import HFBeitAdapter
    from .siglip import HFSiglipVisionAdapter
    from .swin import HFSwinAdapter
    from .vitmae import HFViTMAEAdapter

    register(HFViTAdapter())
    register(HFSwinAdapter())
    register(HFBeitAdapter())
    register(HFSiglipVisionAdapter())
    register(HFViTMAEAdapter())
