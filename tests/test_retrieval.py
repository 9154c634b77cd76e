"""Retrieval by text and by reference image w.r.t. a property (METHOD.md §6)."""

import numpy as np
import pytest
import torch
from PIL import Image

import vitdecomp
from vitdecomp.compalign import Aligner
from vitdecomp.errors import InputError, MismatchError
from vitdecomp.plotting import contact_sheet
from vitdecomp.retrieval import (component_projections, property_scores, retrieve_by_image, retrieve_by_text,
                                 top_components)


def _aligned(seed=0, N=12, C=5, d=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, C, d, generator=g, dtype=torch.float64)


def test_text_retrieval_on_aligned_tensor():
    a = _aligned()
    t = torch.nn.functional.normalize(torch.randn(4, generator=torch.Generator().manual_seed(1), dtype=torch.float64), dim=0)
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, -0.2])
    res = retrieve_by_text(a, t, component_scores=scores, k=2, query="x", ids=[f"img{i}" for i in range(12)])
    assert res.components == ("1", "3")
    want = (a[:, [1, 3]].sum(1) @ t)
    torch.testing.assert_close(res.scores, want)
    torch.testing.assert_close(res.baseline_scores, a.sum(1) @ t)
    assert res.order == torch.argsort(want, descending=True).tolist()
    top = res.ranked(3)
    assert top[0] == (f"img{res.order[0]}", pytest.approx(float(want.max())))
    assert res.ranked(2, baseline=True)[0][0] == f"img{int((a.sum(1) @ t).argmax())}"
    named = retrieve_by_text(a, t, components=["c1"], names=["c0", "c1", "c2", "c3", "c4"])
    torch.testing.assert_close(named.scores, a[:, 1] @ t)
    with pytest.raises(InputError, match="component_scores"):
        retrieve_by_text(a, t)
    with pytest.raises(MismatchError, match="aligner"):
        retrieve_by_text(a, torch.randn(7), component_scores=scores)


def test_text_retrieval_through_an_aligner_equals_explicit_alignment():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(10, 3, 6, generator=g)
    al = Aligner(torch.randn(3, 6, 4, generator=g), torch.randn(4, generator=g), ["a", "b", "c"])
    t = torch.randn(4, generator=g)
    P = component_projections(c, t, aligner=al)
    torch.testing.assert_close(P, (al(c) @ t).double(), rtol=1e-5, atol=1e-5)
    res = retrieve_by_text(c, t, aligner=al, component_scores=torch.tensor([0.0, 1.0, 0.5]), k=1)
    torch.testing.assert_close(res.baseline_scores, (al.total(c) @ t).double(), rtol=1e-5, atol=1e-5)
    assert res.components == ("b",)
    with pytest.raises(MismatchError, match="d = 4"):
        component_projections(c, torch.randn(5), aligner=al)


def test_image_retrieval_cosines_and_reference_forms():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(8, 4, 5, generator=g, dtype=torch.float64)
    spec = torch.tensor([0.5, -1.0, 0.7, 0.0])
    res = retrieve_by_image(c, 2, component_scores=spec, k=2)
    assert res.components == ("2", "0") and res.excluded == 2
    want = torch.nn.functional.cosine_similarity(c[:, [0, 2]].sum(1), c[2, [0, 2]].sum(0)[None], dim=-1)
    torch.testing.assert_close(res.scores, want)
    assert 2 not in res.order and len(res.order) == 7
    assert res.scores[2] == pytest.approx(1.0)
    outside = retrieve_by_image(c, c[2], component_scores=spec, k=2)
    assert outside.excluded is None and outside.order[0] == 2
    torch.testing.assert_close(outside.baseline_scores,
                               torch.nn.functional.cosine_similarity(c.sum(1), c[2].sum(0)[None], dim=-1))
    with pytest.raises(InputError, match="out of range"):
        retrieve_by_image(c, 9, component_scores=spec)


def test_cache_and_streamed_scores(tmp_path):
    from skimage import data

    folder = tmp_path / "imgs"
    folder.mkdir()
    names = ("astronaut", "coffee", "chelsea", "rocket", "camera", "horse")
    for n in names:
        arr = getattr(data, n)()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        Image.fromarray(arr).resize((40, 40)).save(folder / f"{n}.png")
    loaded = vitdecomp.load_model("timm:deit_tiny_patch16_224", random_init=True, img_size=32, depth=2, patch_size=8)
    cache = vitdecomp.extract(loaded, folder, tmp_path / "cache", dtype=torch.float32, progress=False, batch_size=3,
                              shard_size=4)
    g = torch.Generator().manual_seed(0)
    C = len(cache.names)
    al = Aligner(torch.randn(C, 192, 8, generator=g) / 14, torch.zeros(8), cache.names)
    basis = torch.randn(3, 8, generator=g)
    acc = property_scores(cache, {"p": basis, "q": torch.randn(2, 8, generator=g)}, aligner=al, batch_size=4)
    aligned = al(cache.contributions())
    torch.testing.assert_close(acc.variance_attributed("p"), vitdecomp.variance_attributed(aligned, basis),
                               rtol=1e-6, atol=1e-6)
    t = torch.randn(8, generator=g)
    res = retrieve_by_text(cache, t, aligner=al, component_scores=acc.variance_attributed("p"), k=3)
    ref = retrieve_by_text(cache.contributions(), t, aligner=al, component_scores=acc.variance_attributed("p"), k=3)
    torch.testing.assert_close(res.scores, ref.scores)
    assert res.ids == cache.paths() and res.components == top_components(acc.variance_attributed("p"), cache.names, 3)
    spec = vitdecomp.specificity(acc.scores(), "p")
    ref_index = cache.paths().index("chelsea.png")
    img = retrieve_by_image(cache, ref_index, component_scores=spec, k=3)
    assert "chelsea.png" not in [i for i, _ in img.ranked(None)]  # the reference is left out
    assert "chelsea.png" in [i for i, _ in img.ranked(None, baseline=False)] or img.excluded == ref_index
    out = contact_sheet(None, tmp_path / "sheet.png", rows={"top": [folder / i for i, _ in img.ranked(3)],
                                                            "whole": [folder / i for i, _ in img.ranked(3, baseline=True)]})
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100
