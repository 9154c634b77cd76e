"""The plugin system: discovery, dispatch, errors, hook documentation."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch

import vitdecomp
from vitdecomp import hookspecs
from vitdecomp._plugins import Registry

ROOT = Path(__file__).resolve().parents[1]


def tiny_vit():
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8).eval()


def test_import_loads_no_plugin_and_no_framework():
    code = "import sys, vitdecomp; print(any(m in sys.modules for m in ('timm', 'open_clip', 'transformers', 'vitdecomp_plugins')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_builtins_are_entry_points_of_the_distribution():
    infos = {i.name: i for i in vitdecomp.list_plugins()}
    for name in ("timm_vit", "open_clip_vit", "swin", "maxvit"):
        assert infos[name].builtin and infos[name].distribution == "vitdecomp"
    assert "timm-vit" in infos["timm_vit"].adapters and "timm" in infos["timm_vit"].loaders


def test_core_works_with_zero_plugins():
    reg = Registry.from_plugins([])
    with pytest.raises(vitdecomp.NoAdapterError) as exc:
        vitdecomp.decompose(tiny_vit(), torch.randn(1, 3, 32, 32), registry=reg)
    msg = str(exc.value)
    assert "timm.models.vision_transformer.VisionTransformer" in msg and "none" in msg


def test_no_adapter_names_model_class_and_registered_adapters():
    model = timm.create_model("resnet18", pretrained=False).eval()
    with pytest.raises(vitdecomp.NoAdapterError) as exc:
        vitdecomp.decompose(model, torch.randn(1, 3, 32, 32))
    assert "ResNet" in str(exc.value) and "timm-vit" in str(exc.value)


class _Claimer(vitdecomp.Adapter):
    families = ("anything",)

    def __init__(self, name):
        self.name = name

    def supports(self, model):
        return True


class _TwoClaimers:
    @vitdecomp.hookimpl
    def register_adapters(self, register):
        register(_Claimer("first"))
        register(_Claimer("second"))


def test_ambiguous_adapters_listed_with_override():
    import vitdecomp_plugins.timm_vit as timm_plugin

    reg = Registry.from_plugins([_TwoClaimers(), timm_plugin])
    model = tiny_vit()
    with pytest.raises(vitdecomp.AmbiguousAdapterError) as exc:
        vitdecomp.decompose(model, torch.randn(1, 3, 32, 32), registry=reg)
    assert "first" in str(exc.value) and "second" in str(exc.value) and "adapter=" in str(exc.value)
    dec = vitdecomp.decompose(model, torch.randn(1, 3, 32, 32), registry=reg, adapter="timm-vit")
    assert dec.error < 1e-5


def test_misspelled_hook_fails_early():
    class Bad:
        @vitdecomp.hookimpl
        def register_adaptors(self, register):  # typo
            pass

    with pytest.raises(Exception, match="register_adaptors"):
        Registry.from_plugins([Bad()])


def _fake_distribution(tmp_path, module_body, ep_value="broken_pack_mod"):
    (tmp_path / "broken_pack_mod.py").write_text(textwrap.dedent(module_body))
    info = tmp_path / "broken_pack-9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-pack\nVersion: 9.9\n")
    (info / "entry_points.txt").write_text(f"[vitdecomp]\nbroken = {ep_value}\n")
    return tmp_path


def test_broken_pack_raises_plugin_load_error_or_is_skipped_leniently(tmp_path, monkeypatch):
    path = _fake_distribution(tmp_path, "raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(path))
    with pytest.raises(vitdecomp.PluginLoadError) as exc:
        Registry.from_entry_points()
    msg = str(exc.value)
    assert "broken-pack" in msg and "9.9" in msg and "broken_pack_mod" in msg and "boom at import" in msg
    assert isinstance(exc.value.__cause__, RuntimeError)
    with pytest.warns(RuntimeWarning, match="broken-pack"):
        reg = Registry.from_entry_points(lenient=True)
    assert "timm-vit" in [r.obj.name for r in reg.adapters]  # the others survive
    monkeypatch.setenv("VITDECOMP_DISABLE_PLUGINS", "broken")
    reg = Registry.from_entry_points()
    assert "broken" not in [i.name for i in reg.plugins()]


def test_disable_by_argument():
    reg = Registry.from_entry_points(disabled=["open_clip_vit"])
    assert "open_clip_vit" not in [i.name for i in reg.plugins()]
    assert "timm_vit" in [i.name for i in reg.plugins()]


def test_trace_shows_which_adapter_claimed(capsys):
    reg = Registry.from_entry_points()
    reg.find_adapter(tiny_vit(), trace=True)
    err = capsys.readouterr().err
    assert "timm_vit:timm-vit -> True" in err and "open_clip-vit -> False" in err


def test_every_hook_is_documented():
    """Each hookspec has a contract docstring and is described in CONTRIBUTING.md (datasette-style)."""
    specs = [n for n in dir(hookspecs) if n.startswith("register_")]
    assert specs, "no hookspecs found"
    guide = (ROOT / "CONTRIBUTING.md").read_text()
    for name in specs:
        doc = getattr(hookspecs, name).__doc__ or ""
        assert ":param register:" in doc, f"hookspec {name} lacks a :param: contract"
        assert re.search(rf"`{name}\(", guide), f"hook {name} is not documented in CONTRIBUTING.md"


def test_every_public_name_resolves():
    for name in vitdecomp.__all__:
        assert getattr(vitdecomp, name) is not None, name


class _Fallback(_Claimer):
    fallback = True

    def explain(self, model):
        return "claims anything"


class _FallbackPlugin:
    @vitdecomp.hookimpl
    def register_adapters(self, register):
        register(_Fallback("fallback-any"))


def test_choice_says_which_adapter_and_why():
    import vitdecomp_plugins.timm_vit as timm_plugin

    reg = Registry.from_plugins([_FallbackPlugin(), timm_plugin])
    vit, other = tiny_vit(), torch.nn.Linear(2, 2)
    choice = reg.choose(vit)  # a family adapter claims it: the fallback is asked but not used
    assert (choice.name, choice.how) == ("timm-vit", "claimed") and choice.reason == "timm VisionTransformer"
    claims = [(c[0], c[2]) for c in choice.claims]
    assert claims[0] == ("timm-vit", True) and {("fallback-any", True), ("auto", True)} <= set(claims[1:])
    assert "timm-vit" in choice.lines()[0] and "claimed" in choice.lines()[0]
    choice = reg.choose(other)  # nobody else claims it: the fallback does
    assert (choice.name, choice.how) == ("fallback-any", "fallback")
    assert "no family adapter claims Linear" in choice.reason and "claims anything" in choice.reason
    choice = reg.choose(vit, "fallback-any")  # an override asks nobody
    assert (choice.name, choice.how, choice.claims) == ("fallback-any", "override", ())
    assert "adapter='fallback-any' was passed" in choice.reason
    assert vitdecomp.choose_adapter(vit, registry=reg).name == "timm-vit"


def test_cli_check_reports_the_adapter(capsys):
    from vitdecomp.cli import main

    rc = main(["check", "timm:deit_tiny_patch16_224", "--random-init", "--batch", "1", "--img-size", "32"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "adapter    'timm-vit' [plugin 'timm_vit' (vitdecomp 0.1.0, built-in)] (claimed): timm VisionTransformer" in out
    assert "CLAIMS  timm-vit" in out and "no      open_clip-vit" in out
