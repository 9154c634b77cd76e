"""Hugging Face transformers SigLIP vision tower.

Supported (by class structure; subclasses included): ``SiglipVisionModel``, ``SiglipModel`` (its vision side)
and ``SiglipForImageClassification``, with any attention implementation, at the configured ``image_size`` only
(no ``interpolate_pos_encoding``). No class token: the token grid is the patches alone.

Representation z:

* ``SiglipVisionModel`` with its head (``vision_use_head=True``, the default): ``pooler_output`` =
  ``head(post_layernorm(last_hidden_state))``, the multihead attention-pooling (MAP) head: a learned probe
  query attends over all patch rows (``nn.MultiheadAttention``), then ``p + mlp(layernorm(p))``.
  ``SiglipModel``: ``get_image_features(x).pooler_output``, the same vector (SigLIP has no projection).
* ``SiglipVisionModel`` without a head, and ``SiglipForImageClassification``: ``last_hidden_state.mean(1)``,
  the mean of the patch rows after ``post_layernorm`` (that model's classifier input); :meth:`readout` is the
  classifier.

Components: ``embed`` (patch + position embeddings), ``blocks.i.attn.head.h``, ``blocks.i.attn.bias``
(``out_proj`` bias), ``blocks.i.mlp``, ``post_layernorm.bias``; with the MAP head, the patch rows reach z through
its value path at the forward's attention weights (the probe's weights over the rows, per head), and the head
adds ``head.bias`` (value and output-projection biases) and ``head.mlp`` (its MLP residual, LayerNorm
included). Those two are written into the probe's row, which is no image position: with token detail they are
spread evenly over the patches (listed in ``meta["spread_tokens"]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitdecomp import hookimpl
from vitdecomp.errors import UnsupportedModelError

from ._common import HFAdapter, Layout, _pair, hf_class

__all__ = ["HFSiglipVisionAdapter"]

_CLASSES = ("SiglipVisionModel", "SiglipModel", "SiglipForImageClassification")


class _Tap(torch.nn.Module):
    """An identity the MAP head's queries and keys are passed through while the pack's forward runs, so the
    engine's attention-pool hooks see them as module outputs ``[B, H, rows, dh]`` (``nn.MultiheadAttention``
    computes them inside ``F.multi_head_attention_forward``)."""

    def forward(self, x):
        return x


def _map_head(base):
    """The head's ``nn.MultiheadAttention``, checked for the layout the description reads."""
    mha = base.head.attention
    if not isinstance(mha, torch.nn.MultiheadAttention) or mha.in_proj_weight is None or not mha.batch_first:
        raise UnsupportedModelError(
            f"{type(base).__name__}.head.attention is {type(mha).__name__} (batch_first="
            f"{getattr(mha, 'batch_first', None)}); expected a batch-first nn.MultiheadAttention with a packed "
            "in_proj_weight (SiglipMultiheadAttentionPoolingHead)")
    return mha


def _tapped_call(base, q_tap, k_tap):
    """``base(pixel_values=x)`` with the MAP head's per-head queries and keys fed through the taps."""
    mha = _map_head(base)
    D, H = mha.embed_dim, mha.num_heads
    dh = D // H

    def pre(mod, args, kwargs):
        query = args[0] if args else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs["key"]
        W, b = mod.in_proj_weight, mod.in_proj_bias
        q = F.linear(query, W[:D], None if b is None else b[:D])
        k = F.linear(key, W[D:2 * D], None if b is None else b[D:2 * D])
        q_tap(q.view(q.shape[0], q.shape[1], H, dh).transpose(1, 2))
        k_tap(k.view(k.shape[0], k.shape[1], H, dh).transpose(1, 2))

    def call(images):
        handle = mha.register_forward_pre_hook(pre, with_kwargs=True)
        try:
            return base(pixel_values=images)
        finally:
            handle.remove()

    return call


class HFSiglipVisionAdapter(HFAdapter):
    name = "transformers-siglip"
    families = ("SigLIP ViT (transformers)",)
    class_names = _CLASSES

    def layout(self, model) -> Layout:
        cls = hf_class(model, _CLASSES)
        base = model if cls == "SiglipVisionModel" else model.vision_model
        emb = base.embeddings
        use_head = cls != "SiglipForImageClassification" and bool(getattr(base, "use_head", False))
        call = tail = None
        if use_head:
            q_tap, k_tap = _Tap(), _Tap()
            call = _tapped_call(base, q_tap, k_tap)

            def tail(g, x):
                mha = _map_head(base)
                D, H = mha.embed_dim, mha.num_heads
                W, b = mha.in_proj_weight, mha.in_proj_bias
                p = g.attention_pool(x, range(x.rows), queries=1, q=q_tap, k=k_tap, v_weight=W[2 * D:],
                                     v_bias=None if b is None else b[2 * D:], proj=mha.out_proj, num_heads=H,
                                     scale=(D // H) ** -0.5, name="head")
                g.branch(p, base.head.mlp, name="head.mlp", kind="mlp")
                g.meta.setdefault("spread_tokens", []).extend(["head.bias", "head.mlp"])
                return g.pool(p, [0], [1.0])

            read, z_doc = (lambda out: out.pooler_output), "pooler_output (MAP head)"
            groups = None
        else:
            groups = lambda g: [[(j, 1.0 / (g.h * g.w)) for j in range(g.h * g.w)]]  # noqa: E731
            read, z_doc = (lambda out: out.last_hidden_state.mean(1)), "last_hidden_state.mean(1)"
        return Layout(
            base=base, layers=base.encoder.layers, num_prefix=0, groups=groups, norm=base.post_layernorm,
            norm_name="post_layernorm", proj=None, head=getattr(model, "classifier", None), read=read,
            image_size=_pair(emb.image_size), patch_size=_pair(emb.patch_size),
            num_channels=int(base.config.num_channels), dynamic=False, z_doc=z_doc, call=call, tail=tail,
        )

    def oracle_writes(self, model):
        """The MAP head's constant is its value and output-projection biases (the probe and the query/key biases
        reach z only through the frozen attention weights); named for the conformance kit's oracle."""
        cls = hf_class(model, _CLASSES)
        pre = "" if cls == "SiglipVisionModel" else "vision_model."
        if cls == "SiglipForImageClassification" or not getattr(self._layout(model).base, "use_head", False):
            return {}
        return {"head.bias": [f"{pre}head.attention.in_proj_bias", f"{pre}head.attention.out_proj.bias"],
                "head.mlp": f"{pre}head.mlp"}


@hookimpl
def register_adapters(register):
    register(HFSiglipVisionAdapter())
