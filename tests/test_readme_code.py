"""Every ```python block of README.md, CONTRIBUTING.md and contrib/*/README.md runs as written.

The blocks of one file run in order in one namespace (later blocks use what earlier ones defined, as a reader
would), with the working directory set to a temporary folder that holds what the examples read: ``photo.jpg``
(a real photograph, scikit-image's ``chelsea``) and ``images/`` (real photographs in two class folders).

Pretrained weights cannot be downloaded here, so model loading is substituted, and only that:

* ``pretrained=True`` (timm.create_model, vitdecomp.load_model) builds the same architecture with random
  weights (``load_model(..., random_init=True)``, seeded);
* to keep the test fast, three big models are replaced by small stand-ins of the same family: timm
  ``deit_base_patch16_224`` keeps its 12 blocks × 12 heads at 224 px but has width 96 instead of 768;
  open_clip ``ViT-L-14`` is the test suite's tiny CLIP (``tiny_clip_name``: width 48, d = 24); ``hf:<repo>``
  is a small random ``Dinov2Model`` saved to a local folder (the hub config cannot be fetched offline).

Nothing else is changed: a block that fails here fails for a reader too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted(ROOT.glob("contrib/*/README.md"))]
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(path: Path):
    """``[(first line number, code), ...]`` of the ```python blocks of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in _BLOCK.finditer(text)]


def test_blocks_are_found():
    assert len(python_blocks(ROOT / "README.md")) >= 3


@pytest.fixture
def stand_ins(monkeypatch, tmp_path, tiny_clip_name):
    """The substitutions of the module docstring, and a working folder with photo.jpg and images/."""
    import numpy as np
    import timm
    import torch
    from PIL import Image
    from skimage import data

    import vitdecomp
    from vitdecomp import api

    Image.fromarray(data.chelsea()).save(tmp_path / "photo.jpg")
    for label, names in {"animals": ("chelsea", "cat"), "things": ("coffee", "rocket")}.items():
        (tmp_path / "images" / label).mkdir(parents=True)
        for n in names:
            arr = getattr(data, n)()
            arr = np.stack([arr] * 3, -1) if arr.ndim == 2 else arr
            for k, angle in enumerate((0, 90)):
                Image.fromarray(arr).rotate(angle).save(tmp_path / "images" / label / f"{n}_{k}.jpg")
    monkeypatch.chdir(tmp_path)

    small = {"deit_base_patch16_224": {"embed_dim": 96}}
    create = timm.create_model

    def create_model(name, pretrained=False, **kw):
        return create(name, pretrained=False, **{**small.get(name.split(".")[0], {}), **kw})

    monkeypatch.setattr(timm, "create_model", create_model)

    hf_dir = tmp_path / "_hf_dinov2"
    load = api.load_model

    def load_model(spec, *, pretrained=True, weights=None, random_init=False, **kw):
        prefix, name = spec.split(":", 1)
        if prefix == "timm":
            kw = {**small.get(name.split(".")[0], {}), **kw}
        elif prefix == "open_clip" and name.split("/")[0] == "ViT-L-14":
            spec = f"open_clip:{tiny_clip_name}"
        elif prefix == "hf" and not Path(name).exists():
            if not hf_dir.exists():
                import transformers

                cfg = transformers.Dinov2Config(image_size=56, patch_size=14, hidden_size=48, num_hidden_layers=12,
                                                num_attention_heads=4, intermediate_size=96)
                torch.manual_seed(0)
                transformers.Dinov2Model(cfg).save_pretrained(hf_dir)
                transformers.BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                                               do_center_crop=True).save_pretrained(hf_dir)
            spec, weights = f"hf:{hf_dir}", None
        if weights is None:
            random_init = True
        return load(spec, pretrained=pretrained, weights=weights, random_init=random_init, **kw)

    monkeypatch.setattr(api, "load_model", load_model)
    monkeypatch.setattr(vitdecomp, "load_model", load_model, raising=False)
    return tmp_path


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_python_blocks_run_as_written(path, stand_ins):
    import torch

    torch.manual_seed(0)
    namespace = {"__name__": f"readme_{path.stem}"}
    for line, code in python_blocks(path):
        try:
            exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), namespace)
        except Exception as exc:  # noqa: BLE001 - name the block that failed
            raise AssertionError(f"the python block at {path.relative_to(ROOT)} line {line} fails: "
                                 f"{type(exc).__name__}: {exc}") from exc
