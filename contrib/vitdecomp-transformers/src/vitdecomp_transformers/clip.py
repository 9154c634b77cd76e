"""Hugging Face transformers CLIP vision tower.

Supported (by class structure; subclasses included): ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``,
``CLIPModel`` (its vision side) and ``CLIPForImageClassification``, with any attention implementation, at
the configured ``image_size`` only.

Representation z:

* ``CLIPVisionModel``: ``pooler_output`` = ``post_layernorm(last_hidden_state[:, 0])``.
* ``CLIPVisionModelWithProjection``: ``image_embeds`` = ``visual_projection(pooler_output)``; ``CLIPModel``:
  ``get_image_features(x)``, the same vector. Both are unnormalised (open_clip's ``encode_image`` analogue).
* ``CLIPForImageClassification``: ``last_hidden_state[:, 1:].mean(1)``, the mean of the patch tokens *before*
  ``post_layernorm`` (that model's classifier input); :meth:`readout` is the classifier.

Components: ``embed`` is the stream entering layer 0 (class + patch + position embeddings after
``pre_layrnorm``, as the built-in open_clip adapter's ``embed`` is after ``ln_pre``), ``blocks.i.attn.head.h``,
``blocks.i.attn.bias`` (``out_proj`` bias), ``blocks.i.mlp``, ``post_layernorm.bias`` (the projection has no bias).
"""

from __future__ import annotations

from vitdecomp import hookimpl
from vitdecomp.errors import UnsupportedModelError

from ._common import HFAdapter, Layout, _pair, hf_class

__all__ = ["HFCLIPVisionAdapter"]

_CLASSES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel", "CLIPForImageClassification")



def _class_token(g):
    """Readout groups: z reads the class token alone."""
    return [[(0, 1.0)]]


def _patch_mean(g):
    """Readout groups: z is the mean of the patch tokens (the class token excluded)."""
    n = g.h * g.w
    return [[(1 + j, 1.0 / n) for j in range(n)]]

class HFCLIPVisionAdapter(HFAdapter):
    name = "transformers-clip"
    families = ("CLIP ViT (transformers)",)
    class_names = _CLASSES

    def layout(self, model) -> Layout:
        cls = hf_class(model, _CLASSES)
        base = model if cls == "CLIPVisionModel" else model.vision_model
        emb = base.embeddings
        proj, head, norm = None, None, base.post_layernorm
        groups = _class_token
        if cls == "CLIPVisionModel":
            read, z_doc = (lambda out: out.pooler_output), "pooler_output"
        elif cls in ("CLIPVisionModelWithProjection", "CLIPModel"):
            vp = model.visual_projection
            if vp.bias is not None:
                raise UnsupportedModelError(f"{cls}.visual_projection has a bias (CLIP's has none)")
            proj = vp.weight.detach().T
            read = lambda out: vp(out.pooler_output)  # noqa: E731
            z_doc = "visual_projection(pooler_output) (image_embeds / get_image_features)"
        else:
            norm, head = None, getattr(model, "classifier", None)
            groups = _patch_mean
            read, z_doc = (lambda out: out.last_hidden_state[:, 1:].mean(1)), "last_hidden_state[:, 1:].mean(1)"
        return Layout(
            base=base, layers=base.encoder.layers, num_prefix=1, groups=groups, norm=norm,
            norm_name="post_layernorm", proj=proj, head=head, read=read, image_size=_pair(emb.image_size),
            patch_size=_pair(emb.patch_size), num_channels=int(base.config.num_channels), dynamic=False, z_doc=z_doc,
            norm_after_pool=norm is not None,  # post_layernorm is applied to the pooled class token
        )


@hookimpl
def register_adapters(register):
    register(HFCLIPVisionAdapter())
