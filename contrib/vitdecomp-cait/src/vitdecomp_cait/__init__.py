"""vitdecomp model pack for timm's CaiT, written only against the public description API (vitdecomp.graph)."""

from .cait import CaitAdapter

__all__ = ["CaitAdapter"]
