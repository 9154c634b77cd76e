"""Small transformers models with random weights: real architectures from small configs, never mocks."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vitdecomp import testing  # noqa: E402

torch.set_num_threads(1)

SIZE = 32
COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=SIZE, patch_size=8)


def vit_config(attn="sdpa", **kw):
    return transformers.ViTConfig(intermediate_size=64, attn_implementation=attn, **{**COMMON, **kw})


def deit_config(attn="sdpa", **kw):
    return transformers.DeiTConfig(intermediate_size=64, attn_implementation=attn, **{**COMMON, **kw})


def dinov2_config(attn="sdpa", **kw):
    return transformers.Dinov2Config(mlp_ratio=2, layerscale_value=0.5, attn_implementation=attn, **{**COMMON, **kw})


def dinov2_reg_config(attn="sdpa", **kw):
    return transformers.Dinov2WithRegistersConfig(mlp_ratio=2, layerscale_value=0.5, num_register_tokens=3,
                                                  attn_implementation=attn, **{**COMMON, **kw})


def clip_vision_config(attn="sdpa", **kw):
    return transformers.CLIPVisionConfig(intermediate_size=64, projection_dim=24, attn_implementation=attn,
                                         **{**COMMON, **kw})


def clip_config(attn="sdpa"):
    text = dict(vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16)
    vision = dict(intermediate_size=64, **COMMON)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24, attn_implementation=attn)


def build(cls_name, config, seed=0, **kw):
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config, **kw).eval()
    testing.perturb_parameters(model, seed=seed)
    return model


def beit_config(attn="sdpa", **kw):
    """Relative position bias per layer, absolute position embeddings, LayerScale; mean pooling by default."""
    kw = {"use_relative_position_bias": True, "use_absolute_position_embeddings": True, "layer_scale_init_value": 0.5,
          **kw}
    return transformers.BeitConfig(intermediate_size=64, attn_implementation=attn, **{**COMMON, **kw})


def data2vec_vision_config(attn="sdpa", **kw):
    kw = {"use_relative_position_bias": True, "layer_scale_init_value": 0.5, **kw}
    return transformers.Data2VecVisionConfig(intermediate_size=64, attn_implementation=attn, **{**COMMON, **kw})


def siglip_vision_config(attn="sdpa", **kw):
    return transformers.SiglipVisionConfig(intermediate_size=64, attn_implementation=attn, **{**COMMON, **kw})


def siglip_config(attn="sdpa", **vision):
    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16)
    return transformers.SiglipConfig(text_config=text, vision_config=dict(intermediate_size=64, **COMMON, **vision),
                                     attn_implementation=attn)


def vitmae_config(attn="sdpa", **kw):
    return transformers.ViTMAEConfig(intermediate_size=64, attn_implementation=attn,
                                     **{**COMMON, "mask_ratio": 0.0, **kw})
