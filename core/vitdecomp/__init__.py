"""vitdecomp: exact decomposition of vision-transformer representations and their interpretation via text.

Importing this package loads no plugin and no model; the plugin registry is built on first use.
"""

from __future__ import annotations

import importlib

from ._records import Component, TokenGrid
from .adapter import Adapter, DecomposeOptions
from .decomposition import Decomposition
from .errors import (
    AdapterError,
    AmbiguousAdapterError,
    CorruptCacheError,
    EmptyDatasetError,
    InputError,
    MismatchError,
    NoAdapterError,
    OutputError,
    PluginLoadError,
    ReconstructionError,
    UnknownModelError,
    UnknownPropertyError,
    UnsupportedModelError,
    VitDecompError,
    WeightsUnavailableError,
)
from .hookspecs import hookimpl

__version__ = "0.1.0"

# Names provided by submodules that import heavier dependencies; resolved lazily on first access.
_LAZY = {
    "decompose": "api", "representation": "api", "load_model": "api", "LoadedModel": "api", "find_adapter": "api",
    "choose_adapter": "api", "AdapterChoice": "_plugins",
    "list_plugins": "_plugins", "Registry": "_plugins", "default_registry": "_plugins",
    "TextEncoder": "text", "load_text_pool": "text",
    "Property": "properties", "get_property": "properties", "list_properties": "properties", "load_properties": "properties",
    "fit_aligner": "compalign", "Aligner": "compalign",
    "mean_correlation": "scores", "variance_attributed": "scores", "variance_explained": "scores",
    "specificity": "scores", "StreamingScores": "scores",
    "rank_components": "scores", "score_properties": "scores", "orthonormal_basis": "scores",
    "AlignConfig": "compalign", "SpanText": "spans", "CacheBatch": "extraction",
    "textspan": "spans", "textspan_all": "spans",
    "extract": "extraction", "ExtractionCache": "extraction",
    "weights_fingerprint": "_fingerprint",
    "retrieve_by_text": "retrieval", "retrieve_by_image": "retrieval", "property_scores": "retrieval",
    "RetrievalResult": "retrieval",
    "token_heatmap": "heatmap", "Heatmap": "heatmap", "resample_to_image": "heatmap",
    "segment": "segmentation", "saliency_maps": "segmentation", "class_directions": "segmentation",
    "evaluate_segmentation": "segmentation", "SegmentationMeter": "segmentation",
    "SegmentationMetrics": "segmentation", "average_precision": "segmentation",
    "prediction_head": "ablation", "component_means": "ablation", "mean_ablate": "ablation",
    "ablation_curve": "ablation", "AblationCurve": "ablation", "direct_effects": "ablation",
    "repair_spurious": "ablation", "SpuriousRepair": "ablation", "group_accuracies": "ablation",
    "read_waterbirds": "ablation", "read_group_folders": "ablation",
    "contact_sheet": "plotting", "overlay": "plotting", "plot_curves": "plotting",
    "atlas": "_atlas", "AtlasResult": "_atlas", "component_layout": "_atlas",
    "paper_names": "_paper",
}

__all__ = [
    "Adapter", "Component", "DecomposeOptions", "Decomposition", "TokenGrid", "hookimpl",
    "VitDecompError", "NoAdapterError", "AmbiguousAdapterError", "PluginLoadError", "UnsupportedModelError",
    "InputError", "UnknownModelError", "WeightsUnavailableError", "ReconstructionError", "MismatchError",
    "UnknownPropertyError", "EmptyDatasetError", "CorruptCacheError", "OutputError",
    "AdapterError",
    *_LAZY,
]


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'vitdecomp' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
