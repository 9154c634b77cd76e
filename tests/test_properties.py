"""Property sets: the paper's built-ins, plugin registration, user files, clear errors."""

import json

import pytest

from vitdecomp._plugins import Registry
from vitdecomp.errors import InputError, PluginLoadError, UnknownPropertyError
from vitdecomp.hookspecs import hookimpl
from vitdecomp.properties import BUILTIN_PROPERTIES, Property, get_property, list_properties, load_properties


class _Materials:
    @hookimpl
    def register_properties(register):
        register("material", ["wooden object", "metal object", "glass object"])


class _Clash:
    @hookimpl
    def register_properties(register):
        register("color", ["mauve color"])


def test_builtins_match_the_paper():
    assert list(BUILTIN_PROPERTIES) == [
        "color", "texture", "pattern", "shape", "location", "person", "animal", "fabric", "vehicle",
        "waterbirds_spurious", "waterbirds_core",
    ]
    assert get_property("color").descriptions == (
        "blue color", "green color", "red color", "yellow color", "black color", "white color")
    assert get_property("pattern").descriptions[2] == "polka dot pattern"
    assert get_property("texture").descriptions[-1] == "glossy texture"
    assert get_property("vehicle").descriptions == ("car", "truck", "jeep", "van")
    assert len(get_property("waterbirds_spurious")) == 9 and len(get_property("waterbirds_core")) == 8
    assert get_property("shape").source == "builtin"


def test_plugin_properties_are_merged():
    reg = Registry.from_plugins([_Materials])
    assert list_properties(reg)[-1] == "material"
    p = get_property("material", reg)
    assert p.descriptions == ("wooden object", "metal object", "glass object")
    assert p.source == "plugin:" + reg.properties["material"].plugin
    assert "material" not in list_properties(Registry.from_plugins([]))


def test_plugin_may_not_shadow_a_builtin():
    with pytest.raises(PluginLoadError, match="'color', which is a built-in"):
        list_properties(Registry.from_plugins([_Clash]))


def test_unknown_property_lists_the_known_ones():
    with pytest.raises(UnknownPropertyError) as err:
        get_property("colour", Registry.from_plugins([_Materials]))
    msg = str(err.value)
    assert "'colour'" in msg and "color" in msg and "material" in msg and "load_properties" in msg
    assert isinstance(err.value, KeyError)


def test_load_toml_layouts(tmp_path):
    f = tmp_path / "props.toml"
    f.write_text('material = ["wooden object", "metal object"]\n\n[weather]\ndescriptions = ["sunny day", "rainy day"]\n')
    props = load_properties(f)
    assert list(props) == ["material", "weather"]
    assert props["weather"].descriptions == ("sunny day", "rainy day") and props["weather"].source == str(f)
    g = tmp_path / "nested.toml"
    g.write_text('[properties]\nmood = ["happy", "sad"]\n')
    assert load_properties(g)["mood"].descriptions == ("happy", "sad")


def test_load_json(tmp_path):
    f = tmp_path / "props.json"
    f.write_text(json.dumps({"properties": {"size": ["tiny object", "huge object"]}}))
    assert load_properties(f)["size"] == Property("size", ["tiny object", "huge object"], source=str(f))


@pytest.mark.parametrize("content, match", [
    ('material = "wood"', "must be a list"),
    ('material = ["wood", ""]', "non-empty string"),
    ('material = ["wood", "wood"]', "twice"),
    ('material = []', "no descriptions"),
    ('[material]\nwords = ["a"]', "without a 'descriptions'"),
    ('material = [', "could not be parsed"),
    ('', "no properties"),
])
def test_load_errors_name_the_problem(tmp_path, content, match):
    f = tmp_path / "bad.toml"
    f.write_text(content)
    with pytest.raises(InputError, match=match):
        load_properties(f)


def test_load_missing_and_unsupported(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_properties(tmp_path / "nope.toml")
    (tmp_path / "p.yaml").write_text("a: [b]")
    with pytest.raises(InputError, match="use .toml or .json"):
        load_properties(tmp_path / "p.yaml")
