"""The exception hierarchy: one base, specific subclasses, messages that name things."""

from __future__ import annotations

__all__ = [
    "VitDecompError",
    "NoAdapterError",
    "AmbiguousAdapterError",
    "PluginLoadError",
    "UnsupportedModelError",
    "InputError",
    "UnknownModelError",
    "WeightsUnavailableError",
    "ReconstructionError",
    "MismatchError",
    "UnknownPropertyError",
    "EmptyDatasetError",
    "CorruptCacheError",
    "OutputError",
    "AdapterError",
]


class VitDecompError(Exception):
    """Base class of every error vitdecomp raises on purpose."""


class NoAdapterError(VitDecompError, TypeError):
    """No registered adapter supports the given model."""


class AmbiguousAdapterError(VitDecompError, TypeError):
    """Several adapters claim the model; pass ``adapter=`` to choose one."""


class PluginLoadError(VitDecompError, ImportError):
    """A plugin distribution failed to import or register."""


class UnsupportedModelError(VitDecompError, TypeError):
    """The adapter recognises the family but not a feature this model uses."""


class InputError(VitDecompError, ValueError):
    """Images (or other inputs) of the wrong shape, dtype or size."""


class UnknownModelError(VitDecompError, ValueError):
    """A model string that no loader understands."""


class WeightsUnavailableError(VitDecompError, RuntimeError):
    """Pretrained weights could not be obtained (offline, missing file)."""


class ReconstructionError(VitDecompError, ArithmeticError):
    """The contributions do not sum to the representation within tolerance."""


class MismatchError(VitDecompError, ValueError):
    """An artefact (aligner, cache) was made for another model or other settings."""


class UnknownPropertyError(VitDecompError, KeyError):
    """A property name that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class EmptyDatasetError(VitDecompError, ValueError):
    """A dataset, folder or cache with no images in it."""


class CorruptCacheError(VitDecompError, ValueError):
    """A cache file that is truncated, altered or misplaced (its checksum or its header does not match)."""


class OutputError(VitDecompError, OSError):
    """An output path that cannot be written (missing, read-only, not empty and not ours, disk full)."""


class AdapterError(VitDecompError, RuntimeError):
    """An adapter that claimed a model failed on it with an error of its own; names the adapter and its plugin."""
