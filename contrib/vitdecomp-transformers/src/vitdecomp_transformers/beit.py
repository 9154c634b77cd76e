"""Hugging Face transformers BEiT and Data2Vec-vision.

Supported (by class structure; subclasses included): ``BeitModel``, ``BeitForImageClassification``,
``Data2VecVisionModel``, ``Data2VecVisionForImageClassification``: relative position bias (per layer or
shared; it is inside the attention logits, so the attention weights carry it), absolute position embeddings or
none, LayerScale ``lambda_1``/``lambda_2`` (or none), any attention implementation, at the configured
``image_size`` only (no ``interpolate_pos_encoding``). The mask token is unused (no ``bool_masked_pos``).

Representation z:

* a model with a pooler and ``use_mean_pooling=True`` (the classifiers, BEiT's default ``BeitModel``):
  ``pooler_output`` = ``pooler.layernorm(last_hidden_state[:, 1:].mean(1))``, the mean of the patch tokens
  through the pooler's LayerNorm (the model's final ``layernorm`` is then Identity);
* a model with a pooler and ``use_mean_pooling=False``: ``pooler_output`` = ``last_hidden_state[:, 0]``, the
  CLS token after the final ``layernorm``;
* a model without a pooler (``add_pooling_layer=False``; ``Data2VecVisionModel``'s default):
  ``last_hidden_state[:, 0]``, the CLS token after the final ``layernorm`` (Identity with mean pooling).

:meth:`readout` is the classifier of the ``...ForImageClassification`` classes.

Components: ``embed`` (patch embedding, CLS, absolute position embeddings), ``blocks.i.attn.head.h`` and
``blocks.i.attn.bias`` (the output projection's bias; both times ``lambda_1``), ``blocks.i.mlp`` (times
``lambda_2``), then the final norm's offset: ``pooler.layernorm.bias`` (mean pooling) or ``layernorm.bias`` (CLS).
``blocks.i`` is BEiT's ``layers.i`` / Data2Vec's ``encoder.layer.i``. Token detail: heads split by the token they
read (attention rows with the relative position bias: the weights ``eager`` returns, or recomputed from the
queries, keys and the bias the layer adds for fused kernels).
"""

from __future__ import annotations

import math

import torch

from vitdecomp import hookimpl
from vitdecomp.errors import UnsupportedModelError
from vitdecomp.graph import SeparateQKV

from ._common import BlockParts, HFAdapter, Layout, _pair, block_parts, hf_class, layer_scale

__all__ = ["HFBeitAdapter"]

_CLASSES = ("BeitModel", "BeitForImageClassification", "Data2VecVisionModel", "Data2VecVisionForImageClassification")


def _beit_mask(args, kwargs):
    """BeitAttention(hidden_states, attention_mask=...): the relative position biases (and any mask) it adds."""
    return kwargs.get("attention_mask", args[1] if len(args) > 1 else None)


def _beit_parts(i, layer) -> BlockParts:
    bp = block_parts(i, layer)
    bp.detail = SeparateQKV(bp.q, bp.k, bp.v, bp.attention, bp.scaling, bias_arg=_beit_mask)
    return bp


def _d2v_shared(args, kwargs):
    """Data2VecVisionSelfAttention(hidden_states, output_attentions, relative_position_bias, ...): the shared bias."""
    return kwargs.get("relative_position_bias", args[2] if len(args) > 2 else None)


def _d2v_parts(i, layer) -> BlockParts:
    """Data2Vec-vision's layer: ``attention.attention.{query,key,value}``, ``attention.output.dense``, the MLP
    ``intermediate`` → ``output``, LayerScale ``lambda_1``/``lambda_2`` (None when off)."""
    where = f"blocks.{i} ({type(layer).__name__})"
    try:
        sa, o, mlp_out = layer.attention.attention, layer.attention.output.dense, layer.output
        q, k, v = sa.query, sa.key, sa.value
        H, dh = int(sa.num_attention_heads), int(sa.attention_head_size)
    except AttributeError as exc:
        raise UnsupportedModelError(f"{where} does not have the Data2Vec-vision layout the transformers-beit adapter "
                                    f"reads ({exc})") from exc
    if not all(isinstance(m, torch.nn.Linear) for m in (q, k, v, o)):
        raise UnsupportedModelError(f"{where}: attention projections are not Linear layers")
    like = o.bias if o.bias is not None else o.weight[:, 0]
    scale = 1.0 / math.sqrt(dh)
    detail = SeparateQKV(q, k, v, sa, scale, bias_arg=_d2v_shared,
                       bias_module=sa.relative_position_bias if getattr(sa, "has_relative_position_bias", False)
                       else None)
    return BlockParts(layer=layer, attention=sa, q=q, k=k, v=v, o=o, num_heads=H, scaling=scale,
                      gamma=layer_scale(layer.lambda_1, like, f"{where}.lambda_1"), mlp_out=mlp_out,
                      gamma2=layer_scale(layer.lambda_2, like, f"{where}.lambda_2"), detail=detail)


class HFBeitAdapter(HFAdapter):
    name = "transformers-beit"
    families = ("BEiT (transformers)", "Data2Vec-vision (transformers)")
    class_names = _CLASSES

    def layout(self, model) -> Layout:
        cls = hf_class(model, _CLASSES)
        base = model if cls.endswith("Model") else model.base_model
        d2v = cls.startswith("Data2Vec")
        emb = base.embeddings
        pooler = base.pooler
        mean_pool = pooler is not None and pooler.layernorm is not None
        if mean_pool:
            def groups(g):
                n = g.h * g.w
                return [[(1 + j, 1.0 / n) for j in range(n)]]

            norm, norm_name = pooler.layernorm, "pooler.layernorm"
            read = lambda out: out.pooler_output  # noqa: E731
            z_doc = "pooler_output = pooler.layernorm(last_hidden_state[:, 1:].mean(1))"
        else:
            groups = lambda g: [[(0, 1.0)]]  # noqa: E731
            norm, norm_name = base.layernorm, "layernorm"
            read = lambda out: out.last_hidden_state[:, 0]  # noqa: E731
            z_doc = ("pooler_output = " if pooler is not None else "") + "last_hidden_state[:, 0]"
        return Layout(
            base=base, layers=base.encoder.layer if d2v else base.layers, num_prefix=1, groups=groups, norm=norm,
            norm_name=norm_name, proj=None, head=getattr(model, "classifier", None), read=read,
            image_size=_pair(emb.patch_embeddings.image_size), patch_size=_pair(emb.patch_embeddings.patch_size),
            num_channels=int(base.config.num_channels), dynamic=False, z_doc=z_doc, norm_after_pool=mean_pool,
            parts=_d2v_parts if d2v else _beit_parts,
        )

    def oracle_writes(self, model):
        """Data2Vec's MLP write is the layer's ``output`` module (its ``attention.output.dense`` is the attention's
        projection): named for the conformance kit's attribution oracle."""
        cls = hf_class(model, _CLASSES)
        if not cls.startswith("Data2Vec"):
            return {}
        pre = "" if cls.endswith("Model") else f"{model.base_model_prefix}."
        out = {}
        for i, _ in enumerate(self._layout(model).layers):
            q = f"{pre}encoder.layer.{i}"
            out[f"blocks.{i}.mlp"] = f"{q}.output"
            out[f"blocks.{i}.attn"] = f"{q}.attention.attention"
            out[f"blocks.{i}.attn.bias"] = [f"{q}.attention.output.dense.bias"]
        return out


@hookimpl
def register_adapters(register):
    register(HFBeitAdapter())
