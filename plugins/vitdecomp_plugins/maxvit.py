"""timm MaxViT family (``timm.models.maxxvit.MaxxVit`` built from ``MaxxVitBlock`` stages).

Supported (by structure): every stage made of ``MaxxVitBlock`` (MBConv + block attention + grid attention, each
attention a channels-last ``PartitionAttentionCl``), stride-2 shortcuts that are a 2×2 average pool and a 1×1 conv,
global average pooling, and either head timm uses for them:

* ``maxvit_{tiny,small,base,large,xlarge}_tf_{224,384,512}`` — ``NormMlpClassifierHead`` (pool → LayerNorm2d →
  Linear+tanh ``pre_logits`` → fc), TF-style relative position bias, interleaved qkv;
* ``maxvit_{pico,nano,tiny}_rw_*``, ``maxvit_rmlp_{pico,nano,tiny,small}_rw_*`` — LayerNorm2d per position
  (``model.norm``) then pool → fc, relative position bias or bias MLP, optional LayerScale;
* ``maxvit_rmlp_base_rw_*`` (``NormMlpClassifierHead`` like the tf models).

Representation z (what :func:`vitdecomp.representation` returns):

* ``NormMlpClassifierHead`` models: ``head.flatten(head.norm(head.global_pool(model.forward_features(x))))`` —
  the mean over the final-stage positions through the head's LayerNorm2d over channels, *before* the head's
  Linear+tanh ``pre_logits`` layer (not linear). :meth:`MaxViTAdapter.head_function` maps z to the logits.
* ``ClassifierHead`` models: ``model.forward_head(model.forward_features(x), pre_logits=True)`` — the mean over
  the final-stage positions of ``model.norm`` (LayerNorm2d per position); ``head.fc`` is linear
  (:meth:`MaxViTAdapter.readout`).
* The paper's z (Balasubramanian et al. 2024), ``model.forward_features(x).mean((-1, -2))``: pass
  ``adapter=MaxViTAdapter(readout="paper")`` to ``decompose`` / ``representation``. For ``NormMlpClassifierHead``
  models that is the pooled final stage *without* ``head.norm`` (no final norm, no ``head.norm.bias``
  component); for ``ClassifierHead`` models ``forward_features`` ends with ``model.norm`` and it equals the default.
* ``bias="paper"``: the paper's convention (the final norm centred by the stream's mean, its β, shortcut
  biases and b_O / H split over the leaves present; no ``const`` components), also with ``tokens="source"``.

The family is a description on the core's graph engine (:meth:`MaxViTAdapter.describe`): one grid stream per
level (the stem's map, then each stage), ``Graph.downsample`` for the stride-2 shortcuts (2×2 average pool +
1×1 conv), the MBConv branch as a write (``nchw``), block and grid attention as ``PartitionHeads`` with the row
maps ``window_rows`` / ``grid_rows``, LayerNorm2d final norms as ``Graph.norm(..., nchw=True)``.

Components, in forward order (``S`` stage, ``B`` block within the stage; ``Component.block`` is the global block
index, ``Component.stage`` = S, ``Component.branch`` = ``"block"`` / ``"grid"`` for the two partition branches):

* ``stem`` (embed) — or ``init`` (residual) for ``start=k``;
* ``stages.S.blocks.0.conv.shortcut.bias`` (const) — the stride-2 shortcut's 1×1 conv bias, when it has one;
* ``stages.S.blocks.B.conv`` (conv) — the whole MBConv branch output (its 1×1 output-conv bias included);
* ``stages.S.blocks.B.attn_block.attn.head.H`` (head), ``...attn_block.attn.bias`` (const: output projection bias
  × LayerScale), ``...attn_block.mlp`` (mlp, after LayerScale), and the same for ``attn_grid``;
* ``head.norm.bias`` (tf) or ``norm.bias`` (rw) — the final norm's β.

Names mirror timm's module paths, so ``group("branch")`` folds heads and bias into ``...attn_block.attn``.

Spatial detail (``tokens="source"``): ``dec.token_details[name]`` splits *every* component over the positions
where it writes, on the grid of the level it writes to (``dec.token_grids[name]``: the stem grid at stride 2,
stage s at stride ``2^(s+2)``; ``dec.grid`` is the final-stage grid). Attention heads are placed at their query
positions, un-partitioned from block windows / grid cells to their true (y, x). Convention at stage transitions:
a level-l component keeps its level-l positions; the share of a position is what flows from it through the later
2×2 average pools and 1×1 convs to z (exact; the parts sum to the component). The final norm's β is spread evenly
over the final grid (for rw heads that is exactly where it is added). The heads' split by the position they
*read* from is in ``dec.meta["source_tokens"][name]`` (same grid; see :func:`source_map`).

Declined (``supports`` is False, so dispatch falls back to the ``auto`` adapter, which decomposes CoAtNet
exactly; ``adapter="timm-maxvit"`` raises ``UnsupportedModelError`` naming the parts): CoAtNet-style configs
(``coatnet_*``, stages of 'C' MBConv or 'T' transformer blocks), MaxxViT (ConvNeXt conv blocks, ``maxxvit_*``),
parallel blocks (``maxvit_tiny_pm_*``), NCHW attention (``transformer_use_nchw_attn=True``), non-``avg2`` shortcut
pooling, and pooling other than ``avg``.
"""

from __future__ import annotations

import sys

import torch

from vitdecomp import TokenGrid, hookimpl
from vitdecomp.engine import is_identity
from vitdecomp.errors import InputError, UnsupportedModelError
from vitdecomp.graph import Graph, GraphAdapter, PartitionHeads, execute, grid_rows, window_rows

__all__ = ["MaxViTAdapter", "source_map"]


def _is_maxxvit(model) -> bool:
    if "timm" not in sys.modules:
        return False
    from timm.models.maxxvit import MaxxVit

    return isinstance(model, MaxxVit)


def _is_avg2(pool) -> bool:
    if not isinstance(pool, torch.nn.AvgPool2d):
        return False
    ks = pool.kernel_size if isinstance(pool.kernel_size, tuple) else (pool.kernel_size,) * 2
    st = pool.stride if isinstance(pool.stride, tuple) else (pool.stride,) * 2
    pad = pool.padding if isinstance(pool.padding, tuple) else (pool.padding,) * 2
    return tuple(ks) == (2, 2) and tuple(st) == (2, 2) and tuple(pad) == (0, 0) and not pool.ceil_mode


def _problems(model) -> list:
    """Structural features this adapter cannot decompose exactly (empty list: fully supported)."""
    from timm.layers import ClassifierHead, NormMlpClassifierHead
    from timm.models.maxxvit import MaxxVitBlock, MbConvBlock, PartitionAttentionCl

    out = []
    if getattr(model, "global_pool", "avg") != "avg":
        out.append(f"global_pool={model.global_pool!r} (supported: 'avg')")
    for s, stage in enumerate(model.stages):
        for j, blk in enumerate(stage.blocks):
            where = f"stages.{s}.blocks.{j}"
            if not isinstance(blk, MaxxVitBlock):
                kind = type(blk).__name__
                hint = " (CoAtNet-style stage)" if kind in ("MbConvBlock", "TransformerBlock2d", "ConvNeXtBlock") else ""
                out.append(f"{where} is a {kind}{hint}, not a MaxxVitBlock")
                return out
            if not isinstance(blk.conv, MbConvBlock):
                out.append(f"{where}.conv is a {type(blk.conv).__name__} (MaxxViT), not an MbConvBlock")
                return out
            for attr in ("attn_block", "attn_grid"):
                pm = getattr(blk, attr)
                if pm is None and attr == "attn_block":
                    continue
                if not isinstance(pm, PartitionAttentionCl):
                    out.append(f"{where}.{attr} is a {type(pm).__name__} (NCHW attention)")
                    return out
            sc = blk.conv.shortcut
            if j == 0:
                if is_identity(sc) or not _is_avg2(getattr(sc, "pool", None)):
                    out.append(f"{where}.conv.shortcut is not a 2×2 average pool + 1×1 conv")
            elif not is_identity(sc):
                out.append(f"{where}.conv.shortcut is not the identity")
    head = model.head
    if isinstance(head, NormMlpClassifierHead):
        if not is_identity(model.norm):
            out.append("both model.norm and head.norm are set")
        if type(head.norm).__name__ != "LayerNorm2d":
            out.append(f"head.norm is a {type(head.norm).__name__} (expected LayerNorm2d)")
    elif isinstance(head, ClassifierHead):
        if type(model.norm).__name__ != "LayerNorm2d":
            out.append(f"model.norm is a {type(model.norm).__name__} (expected LayerNorm2d)")
    else:
        out.append(f"head is a {type(head).__name__}")
    return out


def source_map(dec, name: str) -> torch.Tensor:
    """Attention head ``name`` split by the position it reads from, as an image-shaped map ``[B, h, w, D]``.

    Available when the decomposition was made with ``tokens="source"`` and ``heads=True``; the grid is
    ``dec.grid_of(name)``, and the map sums over positions to ``dec[name]``.
    """
    src = dec.meta.get("source_tokens") or {}
    if name not in src:
        raise KeyError(f"No source-token split for {name!r}: decompose with tokens='source' and heads=True "
                       f"({len(src)} heads have one)")
    g = dec.grid_of(name)
    tok = src[name].materialize(g.num_tokens)
    return tok.reshape(tok.shape[0], g.h, g.w, tok.shape[-1])


class MaxViTAdapter(GraphAdapter):
    """:param readout: ``"default"`` (z as timm's head reads it, see the module docstring) or ``"paper"``
        (``forward_features(x).mean((-1, -2))``, the paper's z)."""

    name = "timm-maxvit"
    families = ("MaxViT",)
    paper_bias = True
    READOUTS = ("default", "paper")

    def __init__(self, readout: str = "default"):
        if readout not in self.READOUTS:
            raise InputError(f"MaxViTAdapter(readout={readout!r}): expected one of {self.READOUTS}")
        self.readout_mode = readout

    def supports(self, model) -> bool:
        # a MaxxVit with stages this adapter cannot follow (CoAtNet, MaxxViT-ConvNeXt) is declined, so dispatch
        # falls back to the auto adapter (CoAtNet is exact there); adapter="timm-maxvit" still names the parts
        return _is_maxxvit(model) and not _problems(model)

    def explain(self, model) -> str:
        if not _is_maxxvit(model):
            return "not a timm MaxxVit"
        probs = _problems(model)
        return "timm MaxxVit" + (f" with unsupported parts (declined, left to the auto adapter): {probs}"
                                 if probs else "")

    # ---------------------------------------------------------------- input checks
    def validate(self, model, images):
        probs = _problems(model)
        if probs:
            raise UnsupportedModelError(
                f"{type(model).__name__} uses features the timm-maxvit adapter cannot decompose exactly: "
                + ", ".join(probs)
            )
        H, W = images.shape[-2:]
        eh, ew = tuple(model.img_size)
        if (H, W) != (eh, ew):
            raise InputError(
                f"Image size {H}×{W} does not match the model's input size {eh}×{ew} ({type(model).__name__}: its "
                f"window / grid partitions and relative position tables are built for it); resize the images, or "
                f"call model.set_input_size(({H}, {W}))"
            )
        red = 2 ** (len(model.stages) + 1) * 1
        if H % red or W % red:
            raise InputError(f"Image size {H}×{W} is not divisible by the total stride {red} of {type(model).__name__}")

    def middle_start(self, model) -> int:
        """A global block index in the middle of the network (the first block of the middle stage)."""
        firsts, g = [], 0
        for stage in model.stages:
            firsts.append(g)
            g += len(stage.blocks)
        return firsts[len(firsts) // 2]

    # ---------------------------------------------------------------- readout
    def representation(self, model, images):
        from timm.layers import NormMlpClassifierHead

        feats = model.forward_features(images)
        if self.readout_mode == "paper":
            return feats.mean((-1, -2))
        head = model.head
        if isinstance(head, NormMlpClassifierHead):
            return head.flatten(head.norm(head.global_pool(feats)))
        return model.forward_head(feats, pre_logits=True)

    def readout(self, model):
        """``head.fc`` for ``ClassifierHead`` models (linear on z); None for ``NormMlpClassifierHead`` models,
        whose head is Linear+tanh then fc (see :meth:`head_function`)."""
        from timm.layers import NormMlpClassifierHead

        if isinstance(model.head, NormMlpClassifierHead):
            return None
        fc = model.head.fc
        return fc if isinstance(fc, torch.nn.Linear) else None

    def head_function(self, model) -> torch.nn.Module:
        """A module mapping z ``[B, D]`` to the model's logits (``pre_logits`` Linear+tanh, then ``fc``, for
        ``NormMlpClassifierHead``; ``fc`` alone otherwise). It shares the model's parameters. With
        ``readout="paper"`` on a ``NormMlpClassifierHead`` model, ``head.norm`` comes first."""
        from timm.layers import NormMlpClassifierHead

        head = model.head
        if isinstance(head, NormMlpClassifierHead):
            if self.readout_mode == "paper":
                return torch.nn.Sequential(_Channels(head.norm), head.pre_logits, head.drop, head.fc)
            return torch.nn.Sequential(head.pre_logits, head.drop, head.fc)
        return torch.nn.Sequential(head.drop, head.fc)

    # ---------------------------------------------------------------- decomposition
    def _start_index(self, model, start) -> int:
        depths = [len(s.blocks) for s in model.stages]
        total = sum(depths)
        if start is None:
            return 0
        if isinstance(start, str):
            parts = start.split(".")
            if len(parts) == 4 and parts[0] == "stages" and parts[2] == "blocks" and parts[1].isdigit() and parts[3].isdigit():
                start = (int(parts[1]), int(parts[3]))
            else:
                raise InputError(f"start={start!r} is not a block name like 'stages.2.blocks.0'")
        if isinstance(start, tuple):
            if len(start) != 2 or not all(isinstance(i, int) for i in start):
                raise InputError(f"start={start!r}: expected a (stage, block) pair of ints")
            s, b = start
            if not (0 <= s < len(depths)) or not (0 <= b < depths[s]):
                raise InputError(f"start={start!r} is out of range: {type(model).__name__} has stages 0..{len(depths) - 1} "
                                 f"with {depths} blocks")
            return sum(depths[:s]) + b
        if not (0 <= start < total):
            raise InputError(f"start={start!r} is out of range: {type(model).__name__} has blocks 0..{total - 1}")
        return int(start)

    def describe(self, model, images, sources: bool = False):
        """One grid stream per level (stem, stages), shortcuts between them, MBConv / partition heads / MLP writes,
        the final norm and the mean (``sources``: heads also split by the position they read)."""
        from timm.layers import NormMlpClassifierHead

        Hi, Wi = images.shape[-2:]
        stride = int(getattr(model.stem, "stride", 2))
        h, w = Hi // stride, Wi // stride

        def grid(h, w):
            return TokenGrid(num_prefix=0, h=h, w=w, patch_size=(Hi // h, Wi // w))

        final = grid(Hi // 2 ** (len(model.stages) + 1), Wi // 2 ** (len(model.stages) + 1))
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        meta = {"adapter": self.name, "model": cfg.get("architecture", type(model).__name__), "head_tokens": "query",
                "readout": self.readout_mode, "levels": {"-1": [h, w]}}
        g = Graph(self.name, run=lambda x: self.representation(model, x), grid=final, meta=meta, entry_grid=False)
        s = g.stream("stem", h * w, grid=grid(h, w))
        g.embed(s, model.stages[0].blocks[0], name="stem", nchw=True)
        gi = 0
        for S, stage in enumerate(model.stages):
            for b, blk in enumerate(stage.blocks):
                with g.block(gi, f"stages.{S}.blocks.{b}", s, blk, stage=S, nchw=True):
                    if b == 0:  # the stride-2 shortcut: 2×2 average pool, 1×1 conv
                        h, w = h // 2, w // 2
                        meta["levels"][str(S)] = [h, w]
                        prev, s = s, g.stream(f"stages.{S}", h * w, grid=grid(h, w))
                        ex = blk.conv.shortcut.expand
                        idt = is_identity(ex)
                        g.downsample(prev, s, weight=None if idt else ex.weight.detach(),
                                     channels=blk.conv.conv3_1x1.out_channels, bias=None if idt else ex.bias,
                                     name="conv.shortcut.bias")
                    g.branch(s, blk.conv.conv3_1x1, name="conv", kind="conv", nchw=True)
                    for attr, branch, rows in (("attn_block", "block", window_rows), ("attn_grid", "grid", grid_rows)):
                        pm = getattr(blk, attr, None)
                        if pm is None:
                            continue
                        at = pm.attn
                        src = PartitionHeads(proj=at.proj, num_heads=at.num_heads,
                                             rows=rows(h, w, tuple(pm.partition_size)),
                                             attention=_Attention(at) if sources else None)
                        g.heads(s, src, at.proj.weight, at.proj.bias, name=f"{attr}.attn", branch=branch,
                                gamma=None if is_identity(pm.ls1) else pm.ls1.gamma)
                        g.branch(s, pm.ls2, name=f"{attr}.mlp", kind="mlp", branch=branch)
                gi += 1
        if isinstance(model.head, NormMlpClassifierHead):  # pooled, then head.norm (unless the paper's z)
            z = g.pool(s, range(s.rows), [1.0 / s.rows] * s.rows)
            if self.readout_mode != "paper":
                g.norm(z, model.head.norm, name="head.norm", nchw=True)
        else:  # LayerNorm2d per position, then pooled
            g.norm(s, model.norm, name="norm", nchw=True)
            z = g.pool(s, range(s.rows), [1.0 / s.rows] * s.rows)
        g.output(z)
        return g

    def decompose(self, model, images, options):
        start = self._start_index(model, options.start)
        tokens = options.tokens == "source"
        graph = self.describe(model, images, sources=tokens and options.heads)
        return execute(graph, images, start=start or None, tokens=tokens,
                       bias="paper" if options.bias == "paper" else "explicit")


class _Attention:
    """Token detail of a MaxViT partition attention (``AttentionCl``): the attention of each partition recomputed
    from the fused ``qkv`` output as the forward computes it (scale, relative position bias), and its values."""

    def __init__(self, at):
        self.at = at

    def install(self, hooks, rec, H):
        at = self.at

        def on_qkv(t):
            Bp = t.shape[0]
            t = t.reshape(Bp, -1, t.shape[-1])
            N, dh = t.shape[1], at.dim_head
            if at.head_first:
                q, k, v = t.view(Bp, N, H, 3 * dh).transpose(1, 2).chunk(3, dim=3)
            else:
                q, k, v = t.reshape(Bp, N, 3, H, dh).transpose(1, 3).unbind(2)
            logits = (q * at.scale) @ k.transpose(-2, -1)
            if at.rel_pos is not None:
                logits = at.rel_pos(logits)
            rec.attn, rec.v = logits.softmax(-1), v.contiguous()

        hooks.post(at.qkv, on_qkv)


class _Channels(torch.nn.Module):
    """A LayerNorm2d applied to a pooled ``[B, C]`` vector (as a 1×1 map)."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, z):
        return self.norm(z[:, :, None, None]).flatten(1)


@hookimpl
def register_adapters(register):
    register(MaxViTAdapter())
