"""Attrs records shared by the engine and the adapters."""

from __future__ import annotations

from typing import Optional

import attrs

from .errors import InputError

__all__ = ["Component", "TokenGrid", "KINDS", "group_key"]

#: Component kinds. ``embed``: patch/position embedding and prefix tokens (or a conv stem);
#: ``head``: one attention head; ``attn``: a whole attention branch; ``mlp``: an MLP branch;
#: ``conv``: a convolutional branch (MBConv); ``const``: a bias or norm offset;
#: ``residual``: the residual stream entering the first decomposed block (the papers' ``init``);
#: ``block`` / ``stage``: sums made by :meth:`Decomposition.group`.
KINDS = ("embed", "head", "attn", "mlp", "conv", "const", "residual", "block", "stage")


def _check_kind(instance, attribute, value):
    if value not in KINDS:
        raise ValueError(f"Component kind {value!r} is not one of {KINDS}")


@attrs.frozen
class Component:
    """One additive piece of the representation.

    ``name`` is a dotted path in forward order (``embed``, ``blocks.3.attn.head.7``, ``blocks.3.mlp``,
    ``norm.bias``). ``block`` is the global index of the block the component belongs to (None for embeddings
    and constants after the last block), ``stage`` the stage index for hierarchical models, ``head`` the head
    index for attention heads. ``branch`` names the sub-branch for blocks with several attention branches
    (MaxViT: ``block`` / ``grid``).
    """

    name: str
    kind: str = attrs.field(validator=_check_kind)
    block: Optional[int] = None
    stage: Optional[int] = None
    head: Optional[int] = None
    branch: Optional[str] = None

    @property
    def parent(self) -> str:
        """The name one level up the tree (``blocks.3.attn.head.7`` → ``blocks.3.attn``): the branch it sums into."""
        return group_key(self, "branch")


@attrs.frozen
class TokenGrid:
    """Where token-level contributions live on the image.

    ``num_prefix`` tokens (CLS, distillation, registers) come first, then ``h × w`` patch tokens in row-major
    order, each covering ``patch_size`` pixels (``(ph, pw)``) of the input image.
    """

    num_prefix: int
    h: int
    w: int
    patch_size: tuple = attrs.field(converter=tuple)

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.h * self.w


def group_key(comp: "Component", level: str) -> str:
    """The name of the group ``comp`` belongs to at ``level`` (see :meth:`Decomposition.group`)."""
    name = comp.name
    if level in ("component", "leaf"):
        return name
    if level in ("branch", "attn"):
        if comp.kind == "head":
            return name.rsplit(".head.", 1)[0]
        if comp.kind == "const" and name.endswith(".bias"):
            owner = name[: -len(".bias")]
            if owner.endswith("attn"):
                return owner
        return name
    if level == "block":
        if comp.block is None:
            return name
        parts = name.split(".")
        # "blocks.3.xxx" or "stages.2.blocks.1.xxx": keep the path up to the block index
        for i, p in enumerate(parts):
            if p == "blocks" and i + 1 < len(parts):
                return ".".join(parts[: i + 2])
        return name
    if level == "stage":
        if comp.stage is None:
            return group_key(comp, "block")
        return f"stages.{comp.stage}"
    if level == "kind":
        return comp.kind
    raise InputError(f"Unknown grouping level {level!r}; use 'component', 'branch', 'block', 'stage' or 'kind'")
