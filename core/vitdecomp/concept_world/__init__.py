"""The concept world: small models trained here on procedural images with known factors, shipped with vitdecomp.

* :mod:`vitdecomp.datasets` draws the images (shape, color, pattern, position, size, background) and captions;
* :mod:`.models` builds the architectures and loads the shipped weights (``data/concept_world/*.safetensors``);
* :mod:`.train` is the script that produced those weights (``python -m vitdecomp.concept_world.train``);
* :mod:`.evaluate` measures whether CompAttribute and TextSpan find the components that really carry a factor.

Importing this package loads no model.
"""

from .models import FACTOR_SLICES, SPURIOUS, TARGETS, build, input_size, load, load_clip, manifest, prepare, tokenizer

__all__ = ["FACTOR_SLICES", "SPURIOUS", "TARGETS", "build", "input_size", "load", "load_clip", "manifest", "prepare",
           "tokenizer"]
