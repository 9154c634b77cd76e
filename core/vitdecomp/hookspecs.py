"""Hook specifications: the contract between vitdecomp and its model-family plugins.

A plugin is a module (or object) registered under the entry-point group ``vitdecomp``. It implements any of
the hooks below with :data:`vitdecomp.hookimpl`. Hooks only *register*; the core decides what to use.
"""

from __future__ import annotations

import pluggy

__all__ = ["hookspec", "hookimpl", "PROJECT"]

PROJECT = "vitdecomp"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_adapters(register):
    """Register decomposition adapters for the model families this plugin supports.

    :param register: call ``register(adapter)`` once per adapter. An adapter is an instance of
        :class:`vitdecomp.Adapter` (or any object with the same attributes): ``name`` (unique, e.g.
        ``"timm-vit"``), ``families`` (tuple of human-readable family names), ``supports(model) -> bool``
        (decided by structure, never by version strings, and without importing a framework just to say no),
        ``representation(model, images) -> Tensor [B, D]`` and
        ``decompose(model, images, options) -> Decomposition``.
    """


@hookspec
def register_model_loaders(register):
    """Register loaders for model strings such as ``timm:deit_base_patch16_224``.

    :param register: call ``register(prefix, loader)`` where ``prefix`` is the part before the first colon
        (``"timm"``, ``"open_clip"``, ``"hf"``) and ``loader(spec, *, pretrained, weights, random_init, device)``
        returns a :class:`vitdecomp.LoadedModel` (the model in eval mode and its preprocessing transform).
        ``spec`` is the part after the colon. A loader raises :class:`vitdecomp.UnknownModelError` for names it
        does not know and :class:`vitdecomp.WeightsUnavailableError` when weights cannot be obtained.
    """


@hookspec
def register_properties(register):
    """Register named properties (sets of text descriptions) for CompAttribute scoring.

    :param register: call ``register(name, descriptions)`` with a property name (``"color"``) and a list of
        short descriptions (``["blue color", "red color", ...]``). A name registered twice is an error.
    """
