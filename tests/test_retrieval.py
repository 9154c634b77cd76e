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


def test_constants_and_zero_variance_components_are_never_chosen_by_score():
    """A constant's score of exactly 0 beats negative scores; it must still not be chosen (issue #16)."""
    g = torch.Generator().manual_seed(3)
    N, D = 16, 6
    names = ["embed", "blocks.0.attn.bias", "blocks.0.mlp", "frozen", "norm.bias"]
    c = torch.randn(N, 5, D, generator=g, dtype=torch.float64)
    c[:, 1] = torch.randn(D, generator=g, dtype=torch.float64)  # a bias: the same for every image
    c[:, 3] = torch.randn(D, generator=g, dtype=torch.float64)  # not named a bias, but constant over the images
    c[:, 4] = torch.randn(D, generator=g, dtype=torch.float64)
    spec = torch.tensor([-0.3, 0.0, -0.1, 0.0, 0.0], dtype=torch.float64)
    res = retrieve_by_image(c, 0, component_scores=spec, k=2, names=names)
    assert res.components == ("blocks.0.mlp", "embed")
    assert res.component_scores == pytest.approx((-0.1, -0.3))
    assert set(res.skipped) == {"blocks.0.attn.bias", "frozen", "norm.bias"}
    want = torch.nn.functional.cosine_similarity(c[:, [0, 2]].sum(1), c[0, [0, 2]].sum(0)[None], dim=-1)
    torch.testing.assert_close(res.scores, want)
    var = vitdecomp.retrieval.component_variance(c)
    assert res.variance_share == pytest.approx(float(var[[0, 2]].sum() / var.sum()))
    assert var[1] == 0 and var[3] == 0 and var[0] > 0
    with pytest.warns(vitdecomp.retrieval.RetrievalWarning, match="0% of the components' variance"):
        allowed = retrieve_by_image(c, 0, component_scores=spec, k=2, names=names, include_constant=True)
    assert allowed.components == ("blocks.0.attn.bias", "frozen")  # the old behaviour, on request only
    t = torch.randn(D, generator=g, dtype=torch.float64)
    by_text = retrieve_by_text(c, t, component_scores=spec, k=3, names=names)
    assert by_text.components == ("blocks.0.mlp", "embed") and by_text.skipped == res.skipped
    torch.testing.assert_close(by_text.scores, c[:, [0, 2]].sum(1) @ t)
    # given components are used as given, constants included
    assert retrieve_by_text(c, t, components=["norm.bias"], names=names).components == ("norm.bias",)
    with pytest.raises(InputError, match="no component is eligible"):
        retrieve_by_text(c[:, [1, 3, 4]], t, component_scores=spec[[1, 3, 4]], names=[names[i] for i in (1, 3, 4)])


def test_constants_are_recognised_by_kind_in_a_decomposition():
    model = vitdecomp.load_model("timm:deit_tiny_patch16_224", random_init=True, img_size=32, depth=2,
                                 patch_size=8).model
    dec = vitdecomp.decompose(model, torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    kinds = [c.kind for c in dec.components]
    spec = torch.tensor([0.0 if k == "const" else -1.0 - i for i, k in enumerate(kinds)], dtype=torch.float64)
    res = retrieve_by_image(dec, 0, component_scores=spec, k=3)
    assert all(dec.components[dec.index(n)].kind != "const" for n in res.components)
    assert set(res.skipped) >= {c.name for c in dec.components if c.kind == "const"}


def test_a_selection_carrying_almost_no_variance_says_so():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(20, 3, 4, generator=g, dtype=torch.float64)
    c[:, 2] *= 1e-3  # varies, but a millionth of the others' variance
    with pytest.warns(vitdecomp.retrieval.RetrievalWarning, match="carry"):
        res = retrieve_by_image(c, 0, component_scores=torch.tensor([0.0, 0.1, 0.9]), k=1)
    assert res.components == ("2",) and res.variance_share < 1e-5 and "says little" in res.notes[0]
    assert res.as_dict()["notes"] == list(res.notes)
