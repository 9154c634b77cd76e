"""The paper's component labels (Balasubramanian et al. 2024): attention layers numbered from the output."""

from __future__ import annotations

import re
from typing import Dict, Iterable, Union

__all__ = ["paper_names"]

_ATTN = re.compile(r"^(?P<prefix>.*)\.attn(?P<rest>\.head\.(?P<head>\d+)|\.bias)?$")


def paper_names(dec_or_names: Union["Decomposition", Iterable[str]]) -> Dict[str, str]:  # noqa: F821
    """vitdecomp component name → the paper's label, for every component of ``dec_or_names`` (a
    :class:`Decomposition` or component names in forward order).

    The paper numbers *attention layers* from the output: ``layer:00`` is the last attention in forward order
    (a ViT's last block; in MaxViT each block has two, so even numbers are grid attentions and odd numbers block
    attentions). ``<prefix>.attn.head.h`` → ``layer:NN.head:h``, ``<prefix>.attn`` → ``layer:NN``,
    ``<prefix>.attn.bias`` → ``layer:NN.bias``; the branch next to it, ``<prefix>.mlp`` → ``layer:NN.mlp``; a
    MaxViT MBConv ``<block>.conv`` → ``layer:NN.conv`` with NN its block attention's (odd) number. Everything else
    (``embed``, ``init``, ``stem``, norm offsets, CaiT's class-attention MLPs) keeps its name.
    """
    names = [c.name for c in dec_or_names.components] if hasattr(dec_or_names, "components") else list(dec_or_names)
    layers: list = []
    for n in names:
        m = _ATTN.match(n)
        if m and m["prefix"] not in layers:
            layers.append(m["prefix"])
    number = {p: f"layer:{len(layers) - 1 - i:02d}" for i, p in enumerate(layers)}
    out = {}
    for n in names:
        m = _ATTN.match(n)
        if m:
            lab = number[m["prefix"]]
            rest = m["rest"] or ""
            out[n] = lab + (f".head:{m['head']}" if m["head"] is not None else (".bias" if rest else ""))
        elif n.endswith(".mlp") and n[:-4] in number:
            out[n] = number[n[:-4]] + ".mlp"
        elif n.endswith(".conv") and n[:-5] + ".attn_block" in number:
            out[n] = number[n[:-5] + ".attn_block"] + ".conv"
        else:
            out[n] = n
    return out
