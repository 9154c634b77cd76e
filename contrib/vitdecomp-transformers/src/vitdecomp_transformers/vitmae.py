"""Hugging Face transformers ViT-MAE encoder.

Supported (by class structure; subclasses included): ``ViTMAEModel`` (the encoder; ``ViTMAEForPreTraining``'s
``.vit``), any attention implementation, at the configured ``image_size`` only, and only with
``config.mask_ratio == 0``.

ViTMAE's forward drops ``mask_ratio`` of the patches at random and shuffles the rest by ``argsort(noise)``
(fresh random noise on every call unless ``noise`` is given). With ``mask_ratio > 0`` the output is not a
function of the image, so it is refused (``UnsupportedModelError``): set ``model.config.mask_ratio = 0`` to use
the encoder as a feature extractor (the ``hf:`` loader does this for ViTMAE checkpoints).

Representation z (``mask_ratio == 0``): ``last_hidden_state[:, 0]``, the CLS token after the final
``layernorm``, of the forward with ``noise = arange(num_patches)`` for every image, i.e. every patch kept in its
natural row-major order (so token detail lies on the patch grid). With every patch kept, the CLS output does not
depend on the order (attention is permutation-equivariant and the position embeddings are added before the
shuffle), so z equals the model's own CLS output for any noise, up to rounding.

Components: ``embed`` (patch + fixed sin-cos position embeddings, CLS), ``blocks.i.attn.head.h``,
``blocks.i.attn.bias`` (``o_proj`` bias), ``blocks.i.mlp``, ``layernorm.bias``.
"""

from __future__ import annotations

import torch

from vitdecomp import hookimpl
from vitdecomp.errors import UnsupportedModelError

from ._common import HFAdapter, Layout, _pair

__all__ = ["HFViTMAEAdapter"]

_CLASSES = ("ViTMAEModel",)


def natural_order_noise(images: torch.Tensor, num_patches: int) -> torch.Tensor:
    """The ``noise`` whose ``argsort`` keeps the patches in their natural order: ``arange`` for every image."""
    return torch.arange(num_patches, device=images.device, dtype=torch.float32).expand(images.shape[0], num_patches)


class HFViTMAEAdapter(HFAdapter):
    name = "transformers-vitmae"
    families = ("ViT-MAE encoder (transformers)",)
    class_names = _CLASSES

    def layout(self, model) -> Layout:
        base = model
        ratio = float(base.config.mask_ratio)
        if ratio != 0.0:
            raise UnsupportedModelError(
                f"{type(model).__name__} has config.mask_ratio={ratio}: its forward drops that fraction of the "
                "patches at random on every call, so its output is not a function of the image and has no exact "
                "decomposition; set model.config.mask_ratio = 0 to keep every patch (the encoder as a feature "
                "extractor; z is then the CLS token of last_hidden_state)")
        pe = base.embeddings.patch_embeddings
        n = int(pe.num_patches)
        return Layout(
            base=base, layers=base.layers, num_prefix=1, groups=lambda g: [[(0, 1.0)]], norm=base.layernorm,
            norm_name="layernorm", proj=None, head=None, read=lambda out: out.last_hidden_state[:, 0],
            image_size=_pair(pe.image_size), patch_size=_pair(pe.patch_size),
            num_channels=int(base.config.num_channels), dynamic=False,
            z_doc="last_hidden_state[:, 0] with mask_ratio 0 and the patches in natural order",
            call=lambda images: base(pixel_values=images, noise=natural_order_noise(images, n)),
        )


@hookimpl
def register_adapters(register):
    register(HFViTMAEAdapter())
