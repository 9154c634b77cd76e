"""The adapter base shared by the family modules: dispatch by class structure, input checks, block discovery."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import attrs
import torch

from vitdecomp import TokenGrid
from vitdecomp.engine import is_identity, supported_norm
from vitdecomp.errors import InputError, UnsupportedModelError
from vitdecomp.graph import Graph, GraphAdapter, ProjInput, SeparateQKV

__all__ = ["HFAdapter", "Layout", "hf_class", "block_parts"]


def hf_class(model, names: Sequence[str]) -> Optional[str]:
    """The first class name of ``names`` that ``type(model)`` is or derives from, looking only at classes
    defined in ``transformers.models.*`` (no import of transformers: a model of another library says no)."""
    for cls in type(model).__mro__:
        if cls.__name__ in names and cls.__module__.startswith("transformers.models."):
            return cls.__name__
    return None


def _pair(v) -> Tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


@attrs.define(eq=False)
class BlockParts:
    """One pre-norm layer ``x + γ1·o_proj(attn(norm1(x)))``, ``x + mlp_branch(norm2(x))``: ``attention`` returns
    ``(output, weights_or_None)``; ``mlp_out`` is the module whose output is the whole MLP branch."""

    layer: torch.nn.Module
    attention: torch.nn.Module
    q: torch.nn.Linear
    k: torch.nn.Linear
    v: torch.nn.Linear
    o: torch.nn.Linear
    num_heads: int
    scaling: float
    gamma: Optional[torch.Tensor]
    mlp_out: torch.nn.Module
    gamma2: Optional[torch.Tensor] = None  # LayerScale of the MLP branch when ``mlp_out`` does not apply it (BEiT)
    detail: Optional[object] = None  # token-detail attention source; None: SeparateQKV(q, k, v, attention, scaling)


def layer_scale(value, like: torch.Tensor, where: str) -> Optional[torch.Tensor]:
    """A LayerScale factor as a vector like ``like`` (``[D]``), or None when it is absent or the number 1 (BEiT
    stores ``1.0`` when ``layer_scale_init_value`` is 0)."""
    if value is None or (isinstance(value, torch.nn.Module) and is_identity(value)):
        return None
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (int, float)):
        return None if float(value) == 1.0 else torch.full((like.shape[0],), float(value), dtype=like.dtype,
                                                           device=like.device)
    raise UnsupportedModelError(f"{where}: LayerScale of type {type(value).__name__}; expected a tensor or a number")


def block_parts(i: int, layer) -> BlockParts:
    """Read one transformers-5 pre-norm layer (ViTLayer, DeiTLayer, Dinov2Layer, CLIPEncoderLayer, ...)."""
    attn = getattr(layer, "attention", None) or getattr(layer, "self_attn", None)
    where = f"blocks.{i} ({type(layer).__name__})"
    if attn is None:
        raise UnsupportedModelError(f"{where} has no 'attention' / 'self_attn' submodule")
    q, k, v = (getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj"))
    o = getattr(attn, "o_proj", None) or getattr(attn, "out_proj", None)
    if not all(isinstance(m, torch.nn.Linear) for m in (q, k, v, o)):
        raise UnsupportedModelError(
            f"{where}: attention {type(attn).__name__} lacks Linear q_proj/k_proj/v_proj/o_proj (this pack reads the "
            "transformers>=5 layout; older layouts with attention.attention.query are not supported)")
    H = getattr(attn, "num_attention_heads", None) or getattr(attn, "num_heads", None)
    dh = getattr(attn, "head_dim", None) or (q.out_features // H)
    scaling = getattr(attn, "scaling", None) or getattr(attn, "scale", None) or dh ** -0.5
    ls1, ls2 = getattr(layer, "layer_scale1", None), getattr(layer, "layer_scale2", None)
    gamma = None if ls1 is None or is_identity(ls1) else ls1.lambda1
    mlp_out = ls2 if ls2 is not None and not is_identity(ls2) else getattr(layer, "mlp", None)
    if mlp_out is None:
        raise UnsupportedModelError(f"{where} has no 'mlp' submodule")
    gamma2 = None
    if hasattr(layer, "lambda_1"):  # BEiT: the layer multiplies each branch output by lambda_1 / lambda_2
        gamma = layer_scale(layer.lambda_1, o.bias if o.bias is not None else o.weight[:, 0], f"{where}.lambda_1")
        gamma2 = layer_scale(layer.lambda_2, o.bias if o.bias is not None else o.weight[:, 0], f"{where}.lambda_2")
    return BlockParts(layer=layer, attention=attn, q=q, k=k, v=v, o=o, num_heads=int(H), scaling=float(scaling),
                      gamma=gamma, mlp_out=mlp_out, gamma2=gamma2)


@attrs.define(eq=False)
class Layout:
    """What a family module tells the base adapter about one model.

    ``base``: the module whose forward embeds and runs the layers; ``layers``: its blocks in order;
    ``num_prefix``: CLS + distillation + register tokens; ``groups(grid)``: readout groups, each a list of
    ``(token index, weight)`` pairs pooled into one vector, z concatenating the groups; ``norm``/``norm_name``:
    the final norm z is read after (None: before any norm), applied per token or, with ``norm_after_pool``, to
    the pooled vector; ``proj``: a projection matrix ``[G·D, d]`` or None; ``head``: the linear
    classifier on z or None; ``read(outputs)``: z from the base model's output; ``dynamic``: accepts any
    multiple of the patch size (position embeddings are interpolated) instead of only ``image_size``.
    ``parts(i, layer)``: reads one layer (default :func:`block_parts`); ``call(images)``: the base model's
    outputs (default ``base(pixel_values=images)``); ``tail(graph, stream)``: the readout after the per-token
    norm when it is not a weighted pooling (SigLIP's attention-pool head), returning z's one-row stream.
    """

    base: torch.nn.Module
    layers: Sequence[torch.nn.Module]
    num_prefix: int
    groups: object
    norm: Optional[torch.nn.Module]
    norm_name: str
    proj: Optional[torch.Tensor]
    head: Optional[torch.nn.Module]
    read: object
    image_size: Tuple[int, int]
    patch_size: Tuple[int, int]
    num_channels: int = 3
    dynamic: bool = False
    z_doc: str = ""
    norm_after_pool: bool = False
    parts: Callable = None
    call: Optional[Callable] = None
    tail: Optional[Callable] = None

    def __attrs_post_init__(self):
        if self.parts is None:
            self.parts = block_parts
        if self.call is None:
            self.call = lambda images: self.base(pixel_values=images)


class HFAdapter(GraphAdapter):
    """Base class: subclasses set ``name``, ``families``, ``class_names`` and implement :meth:`layout`."""

    class_names: Tuple[str, ...] = ()

    def supports(self, model) -> bool:
        return hf_class(model, self.class_names) is not None

    def explain(self, model) -> str:
        cls = hf_class(model, self.class_names)
        if cls is None:
            return f"not one of the transformers classes {list(self.class_names)}"
        try:
            return f"transformers {cls}: z = {self._layout(model).z_doc}"
        except UnsupportedModelError as exc:
            return f"transformers {cls} with unsupported parts: {exc}"

    def layout(self, model) -> Layout:  # pragma: no cover - interface
        raise NotImplementedError

    def _layout(self, model) -> Layout:
        try:
            return self.layout(model)
        except AttributeError as exc:
            raise UnsupportedModelError(
                f"{type(model).__name__} does not have the module layout {self.name} reads ({exc}); this pack "
                "supports the transformers>=5 layout (layers with q_proj/k_proj/v_proj/o_proj attention)") from exc

    # ---------------------------------------------------------------- checks
    def in_channels(self, model) -> int:
        return self._layout(model).num_channels

    def middle_start(self, model) -> int:
        return len(self._layout(model).layers) // 2

    def grid(self, lay: Layout, images: torch.Tensor) -> TokenGrid:
        H, W = images.shape[-2:]
        ph, pw = lay.patch_size
        if lay.dynamic:
            if H % ph or W % pw:
                raise InputError(f"Image size {H}×{W} is not divisible by the patch size {ph}×{pw} of "
                                 f"{type(lay.base).__name__}; use a multiple of the patch size")
        elif (H, W) != lay.image_size:
            raise InputError(f"Image size {H}×{W} does not match the model's input size "
                             f"{lay.image_size[0]}×{lay.image_size[1]} (config.image_size); resize the images")
        return TokenGrid(num_prefix=lay.num_prefix, h=H // ph, w=W // pw, patch_size=(ph, pw))

    def validate(self, model, images):
        lay = self._layout(model)
        if lay.norm is not None and not supported_norm(lay.norm):
            raise UnsupportedModelError(f"final norm {lay.norm_name} of type {type(lay.norm).__name__}")
        for i, layer in enumerate(lay.layers):
            lay.parts(i, layer)
        self.grid(lay, images)

    def readout(self, model):
        head = self._layout(model).head
        return head if isinstance(head, torch.nn.Linear) else None

    # ---------------------------------------------------------------- z and its decomposition
    def representation(self, model, images):
        lay = self._layout(model)
        return lay.read(lay.call(images))

    def describe(self, model, images) -> Graph:
        lay = self._layout(model)
        grid = self.grid(lay, images)
        meta = {"adapter": self.name, "model": type(model).__name__,
                "checkpoint": getattr(getattr(model, "config", None), "_name_or_path", "") or None,
                "attn_implementation": getattr(getattr(lay.base, "config", None), "_attn_implementation", None)}
        g = Graph(self.name, run=lambda x: lay.read(lay.call(x)), grid=grid, meta=meta)
        x = g.stream("tokens", grid.num_tokens)
        g.embed(x, lay.layers[0])
        for i, layer in enumerate(lay.layers):
            bp = lay.parts(i, layer)
            with g.block(i, f"blocks.{i}", x, entry=layer):
                detail = bp.detail or SeparateQKV(bp.q, bp.k, bp.v, bp.attention, bp.scaling)
                g.heads(x, ProjInput(bp.o, bp.num_heads, detail), bp.o.weight, bp.o.bias, gamma=bp.gamma)
                g.branch(x, bp.mlp_out, name="mlp", gamma=bp.gamma2)
        if lay.tail is not None:
            g.norm(x, lay.norm, name=lay.norm_name)
            g.output(lay.tail(g, x))
            return g
        if not lay.norm_after_pool:
            g.norm(x, lay.norm, name=lay.norm_name)
        groups = lay.groups(grid)
        pooled = [g.pool(x, [r for r, _ in grp], [w for _, w in grp], name=f"pool{j}") for j, grp in enumerate(groups)]
        z = pooled[0] if len(pooled) == 1 else g.concat(pooled, [x_width(lay)] * len(pooled))
        if lay.norm_after_pool:
            g.norm(z, lay.norm, name=lay.norm_name)
        g.project(z, lay.proj)
        g.output(z)
        return g


def x_width(lay: Layout) -> int:
    """The hidden size of the layers' stream."""
    return int(lay.base.config.hidden_size)
