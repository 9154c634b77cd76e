"""Properties: named sets of text descriptions that CompAttribute scores components against.

A property P (``color``, ``texture``, ...) is a list of short descriptions T_P. Their text embeddings span the
subspace that :func:`vitdecomp.variance_attributed` projects aligned contributions onto (Balasubramanian et al.,
NeurIPS 2024, §3.3; METHOD.md §4):

    score_i(P) = (1/k) Σ_j corr_x(⟨a_i(x), b_j⟩, ⟨s(x), b_j⟩),   b_1..b_k an orthonormal basis of span(T_P).

The property sets the paper uses are built in. Plugins add more through the ``register_properties(register)``
hook; users load their own from TOML or JSON with :func:`load_properties`::

    # my_properties.toml            (or, equivalently, under a [properties] table)
    material = ["wooden object", "metal object", "plastic object"]
    weather  = ["sunny day", "rainy day", "snowy day", "foggy day"]

Shape descriptions follow the paper's code literally ("triangular shape", "rectangular shape", "circular shape",
"octagon"); location, person, animal, fabric, vehicle and the Waterbirds sets are bare words.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Mapping

import attrs

from .errors import InputError, PluginLoadError, UnknownPropertyError

__all__ = ["Property", "BUILTIN_PROPERTIES", "get_property", "list_properties", "load_properties"]


def _check_descriptions(instance, attribute, value):
    if not value:
        raise InputError(f"Property {instance.name!r} has no descriptions; give at least one")
    for d in value:
        if not isinstance(d, str) or not d.strip():
            raise InputError(f"Property {instance.name!r}: every description must be a non-empty string, got {d!r}")
    seen = set()
    for d in value:
        if d in seen:
            raise InputError(f"Property {instance.name!r} lists the description {d!r} twice")
        seen.add(d)


def _check_name(instance, attribute, value):
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"A property name must be a non-empty string, got {value!r}")


@attrs.frozen
class Property:
    """A named set of text descriptions.

    ``source`` says where it came from: ``"builtin"``, ``"plugin:<name>"`` or the file it was loaded from.
    """

    name: str = attrs.field(validator=_check_name)
    descriptions: tuple = attrs.field(converter=tuple, validator=_check_descriptions)
    source: str = "builtin"

    def __len__(self) -> int:
        return len(self.descriptions)

    def embed(self, encoder, **kwargs):
        """Text embeddings ``[k, d]`` of the descriptions (``encoder`` is a :class:`vitdecomp.TextEncoder`)."""
        return encoder.encode(list(self.descriptions), **kwargs)


def _suffix(words, suffix):
    return tuple(f"{w} {suffix}" for w in words)


#: The property sets of Balasubramanian et al. (2024), METHOD.md §4.
BUILTIN_PROPERTIES: Dict[str, Property] = {
    p.name: p
    for p in (
        Property("color", _suffix(["blue", "green", "red", "yellow", "black", "white"], "color")),
        Property("texture", _suffix(["rough", "smooth", "furry", "sleek", "slimy", "spiky", "glossy"], "texture")),
        Property("pattern", _suffix(["spotted", "striped", "polka dot", "plain", "checkered"], "pattern")),
        Property("shape", ("triangular shape", "rectangular shape", "circular shape", "octagon")),
        Property("location", ("sea", "beach", "forest", "desert", "city", "sky", "marsh")),
        Property("person", ("face", "head", "man", "woman", "human", "arms", "legs")),
        Property("animal", ("camel", "elephant", "giraffe", "cat", "dog", "zebra", "cheetah")),
        Property("fabric", ("linen", "velvet", "cotton", "silk", "chiffon")),
        Property("vehicle", ("car", "truck", "jeep", "van")),
        Property("waterbirds_spurious",
                 ("water", "ocean", "lake", "sky", "land", "forest", "trees", "bamboo", "leaves")),
        Property("waterbirds_core",
                 ("bird", "finch", "hummingbird", "crow", "sparrow", "swan", "albatross", "pelican")),
    )
}


def _registry_properties(registry) -> Dict[str, Property]:
    if registry is False:
        return {}
    if registry is None:
        from ._plugins import default_registry

        registry = default_registry()
    out = {}
    for name, reg in getattr(registry, "properties", {}).items():
        if name in BUILTIN_PROPERTIES:
            raise PluginLoadError(
                f"Plugin {reg.plugin!r} registered property {name!r}, which is a built-in property; "
                f"choose another name (built-ins: {sorted(BUILTIN_PROPERTIES)})"
            )
        out[name] = Property(name, reg.obj, source=f"plugin:{reg.plugin}")
    return out


def _all_properties(registry) -> Dict[str, Property]:
    return {**BUILTIN_PROPERTIES, **_registry_properties(registry)}


def list_properties(registry=None) -> List[str]:
    """Names of every known property: the built-ins, then those plugins registered (sorted within each group).

    ``registry``: a :class:`vitdecomp._plugins.Registry` (default: the installed plugins); ``False`` for the
    built-ins only.
    """
    plugin = _registry_properties(registry)
    return list(BUILTIN_PROPERTIES) + sorted(plugin)


def get_property(name: str, registry=None) -> Property:
    """The property called ``name`` (built-in or registered by a plugin).

    Raises :class:`UnknownPropertyError` listing the known names when there is none.
    """
    if isinstance(name, Property):
        return name
    if name in BUILTIN_PROPERTIES and registry is None:
        return BUILTIN_PROPERTIES[name]  # no need to load plugins for a built-in
    known = _all_properties(registry)
    try:
        return known[name]
    except KeyError:
        raise UnknownPropertyError(
            f"Unknown property {name!r}. Known properties: {', '.join(known)}. "
            "Define your own with load_properties('file.toml') or a plugin's register_properties hook."
        ) from None


def _parse_mapping(data, path: Path) -> Dict[str, Property]:
    if not isinstance(data, Mapping):
        raise InputError(f"{path}: expected a table/object mapping property names to lists of descriptions")
    if "properties" in data and isinstance(data["properties"], Mapping):
        data = data["properties"]
    out = {}
    for name, value in data.items():
        if isinstance(value, Mapping):  # [color] descriptions = [...]
            if "descriptions" not in value:
                raise InputError(f"{path}: property {name!r} is a table without a 'descriptions' list")
            value = value["descriptions"]
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise InputError(
                f"{path}: property {name!r} must be a list of description strings, got {type(value).__name__}"
            )
        out[name] = Property(name, value, source=str(path))
    if not out:
        raise InputError(f"{path}: no properties defined")
    return out


def load_properties(path) -> Dict[str, Property]:
    """Read user-defined properties from a TOML (``.toml``) or JSON (``.json``) file.

    Accepted layouts: ``name = ["desc", ...]`` at top level, the same under a ``[properties]`` table, or
    ``[name]`` tables with a ``descriptions`` list. Returns ``{name: Property}`` in file order.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"Property file {path} is a folder; give a .toml or .json file")
    if not path.is_file():
        raise InputError(f"Property file {path} does not exist (give a .toml or .json file)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib

            with open(path, "rb") as f:
                data = tomllib.load(f)
        elif suffix == ".json":
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        else:
            raise InputError(f"Property file {path}: unsupported extension {suffix!r}; use .toml or .json")
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"Property file {path} could not be parsed: {exc}") from exc
    return _parse_mapping(data, path)
