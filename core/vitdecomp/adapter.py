"""The adapter base class that family plugins subclass, and the decomposition options record."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import attrs
import torch

from .errors import InputError

__all__ = ["Adapter", "DecomposeOptions", "BIAS_POLICIES"]

#: ``explicit``: biases and norm offsets are components of their own (default).
#: ``paper``: the paper's own RepDecompose convention, reproduced exactly (METHOD.md §1; adapters with
#: ``paper_bias = True``, i.e. every family on the graph engine).
#: ``even``: the explicit decomposition with all constants summed and split evenly over the other components
#: at head level (a simple constant-free view; not the paper's numbers).
BIAS_POLICIES = ("explicit", "paper", "even")
TOKEN_MODES = (None, "source")


def _check_start(instance, attribute, value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, tuple, str)):
        raise InputError(f"start must be a block index (int), a (stage, block) pair or a name; got {value!r}")


def _check_heads(instance, attribute, value):
    if not isinstance(value, bool):
        raise InputError(f"heads must be True (split attention into heads) or False (whole attention branches); "
                         f"got {value!r}")


def _check_tokens(instance, attribute, value):
    if value not in TOKEN_MODES or isinstance(value, bool):
        raise InputError(f"tokens must be None or 'source' (split heads by the token they read from); got {value!r}")


def _check_bias(instance, attribute, value):
    if not isinstance(value, str) or value not in BIAS_POLICIES:
        raise InputError(f"bias must be one of {BIAS_POLICIES} ('explicit': biases and norm offsets are "
                         f"components; 'paper': the paper's RepDecompose convention; 'even': constants split "
                         f"evenly over the other components); got {value!r}")


@attrs.frozen
class DecomposeOptions:
    """What granularity to decompose at.

    ``heads``: split attention branches into heads. ``start``: decompose blocks ``start..`` only; the residual
    stream entering that block becomes one component named ``init`` (an int counts blocks globally; adapters
    of hierarchical models also accept ``(stage, block)``). ``tokens``: ``"source"`` splits attention heads by
    the token they read from (other components sit where they write). ``bias``: one of :data:`BIAS_POLICIES`.
    """

    heads: bool = attrs.field(default=True, validator=_check_heads)
    start: Optional[Union[int, Tuple[int, int]]] = attrs.field(default=None, validator=_check_start)
    tokens: Optional[str] = attrs.field(default=None, validator=_check_tokens)
    bias: str = attrs.field(default="explicit", validator=_check_bias)


class Adapter:
    """Base class for a model-family adapter. Subclasses set ``name`` and ``families`` and implement
    :meth:`supports`, :meth:`representation` and :meth:`decompose`.

    The core validates generic input (a 4-D floating tensor with 3 channels, eval mode) before calling
    :meth:`validate`, which checks what only the family knows (image size, patch divisibility).
    """

    name: str = "adapter"
    families: Tuple[str, ...] = ()
    #: True if :meth:`decompose` implements ``options.bias == "paper"`` (the paper's convention).
    paper_bias: bool = False

    def supports(self, model) -> bool:
        """True if this adapter can decompose ``model`` (decided by structure)."""
        raise NotImplementedError

    def unwrap(self, model):
        """The module that is actually decomposed (e.g. a CLIP model's ``.visual``)."""
        return model

    def explain(self, model) -> str:
        """One line saying why ``supports`` answered as it did (for tracing)."""
        return f"{self.name}: supports={self.supports(model)}"

    def validate(self, model, images: torch.Tensor) -> None:
        """Raise :class:`vitdecomp.InputError` for images this model cannot take."""

    def representation(self, model, images: torch.Tensor) -> torch.Tensor:
        """The family's final representation z, ``[B, D]``."""
        raise NotImplementedError

    def decompose(self, model, images: torch.Tensor, options: DecomposeOptions):
        """Return a :class:`vitdecomp.Decomposition` whose contributions sum to the representation."""
        raise NotImplementedError

    def readout(self, model):
        """Optional: the linear prediction head on top of the representation (``Linear`` or ``None``)."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
