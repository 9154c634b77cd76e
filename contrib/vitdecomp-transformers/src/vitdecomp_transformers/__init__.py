"""vitdecomp-transformers: a vitdecomp model pack for Hugging Face transformers vision transformers.

Plugins (entry points in group ``vitdecomp``): :mod:`.vit` (ViT, DeiT; it also registers :mod:`.swin`,
:mod:`.beit` (BEiT, Data2Vec-vision), :mod:`.siglip` (SigLIP vision tower) and :mod:`.vitmae` (ViT-MAE encoder)),
:mod:`.dinov2` (DINOv2, DINOv2 with registers), :mod:`.clip` (CLIP vision tower) and :mod:`.loading` (model
strings ``hf:<repo id or local dir>``).
Importing this package imports neither transformers nor any model.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
