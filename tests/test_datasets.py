"""The concept-world generator: determinism, factors that match captions and pixels, the spurious split."""

import numpy as np
import pytest
import torch

from vitdecomp import datasets as D


def test_items_depend_only_on_seed_and_index():
    a = D.ConceptWorld(6, seed=5)
    b = D.ConceptWorld(9, seed=5)
    for i in range(6):
        assert a.factors(i) == b.factors(i)
        assert np.array_equal(a.array(i), b.array(i))
    # random access in any order gives the same pixels
    assert np.array_equal(a.array(4), D.ConceptWorld(6, seed=5).array(4))
    c = D.ConceptWorld(6, seed=6)
    assert any(a.factors(i) != c.factors(i) for i in range(6))


def test_item_is_normalised_tensor_with_factor_labels():
    ds = D.ConceptWorld(3, seed=0)
    x, y = ds[1]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    f = ds.factors(1)
    assert y.tolist() == [D.FACTORS[k].index(f[k]) for k in D.FACTOR_NAMES]
    assert torch.equal(ds.tensors([1])[0], x)
    assert torch.allclose(D.denormalize(D.normalize(torch.from_numpy(ds.array(1)).permute(2, 0, 1))),
                          torch.from_numpy(ds.array(1)).permute(2, 0, 1).float() / 255)
    assert D.ConceptWorld(3, seed=0, target="shape")[1][1] == D.FACTORS["shape"].index(f["shape"])
    assert D.ConceptWorld(3, seed=0, target="caption")[1][1] == ds.caption(1)
    with pytest.raises(IndexError):
        ds[3]


def test_captions_name_every_factor():
    ds = D.ConceptWorld(40, seed=1)
    for i in range(40):
        f, cap = ds.factors(i), ds.caption(i)
        for k in ("shape", "color", "pattern", "size", "background"):
            assert f" {f[k]}" in cap
        assert D.caption(f, ["position"]).endswith(
            {"center": "in the center"}.get(f["position"], f"at the {f['position']}"))
    assert D.caption({"color": "orange"}, ["color"]) == "an orange shape"
    assert D.factor_phrase("background", "snow") == "a shape on snow"
    assert D.factor_phrase("shape", "cross") == "a cross"
    with pytest.raises(ValueError):
        D.caption(ds.factors(0), ["colour"])


def test_factor_table_and_uniform_sampling():
    ds = D.ConceptWorld(1200, seed=2)
    table = ds.factor_table()
    assert table.shape == (1200, 6)
    for k, f in enumerate(D.FACTOR_NAMES):
        counts = torch.bincount(table[:, k], minlength=len(D.FACTORS[f])).double() / 1200
        assert float((counts - 1 / len(D.FACTORS[f])).abs().max()) < 0.06, f
    assert torch.equal(table[:, 1], ds.labels("color"))


def _object_mask(f, size=64):
    """Pixels where the object's own colour (or its dark pattern shade) is drawn."""
    arr = D.render(f, size, np.random.default_rng(0), jitter=False).astype(float)
    base = np.array(D._RGB[f["color"]], float)
    return (np.abs(arr - base).max(-1) < 30) | (np.abs(arr - 0.3 * base).max(-1) < 12)


@pytest.mark.parametrize("position", D.FACTORS["position"])
def test_pixels_follow_position_and_size(position):
    f = dict(shape="square", color="red", pattern="plain", position=position, size="large", background="snow")
    m = _object_mask(f)
    ys, xs = np.nonzero(m)
    cx, cy = D._CENTERS[position]
    assert abs(xs.mean() / 64 - cx) < 0.03 and abs(ys.mean() / 64 - cy) < 0.03
    small = _object_mask({**f, "size": "small"}).sum()
    assert m.sum() > 2 * small > 0


def test_pixels_follow_color_shape_pattern():
    base = dict(shape="circle", color="blue", pattern="plain", position="center", size="large", background="sand")
    rgb = D.render(base, 64, np.random.default_rng(0), jitter=False)
    assert tuple(rgb[32, 32]) == D._RGB["blue"]
    # areas in units of r²: circle π, square 1.7² = 2.89, cross 2.22, triangle 3√3/4 = 1.30
    areas = {s: _object_mask({**base, "shape": s}).sum() for s in D.FACTORS["shape"]}
    assert areas["circle"] > areas["square"] > areas["cross"] > areas["triangle"]
    plain = D.render(base, 64, np.random.default_rng(0), jitter=False).astype(int)
    for p in ("striped", "dotted", "checkered"):
        other = D.render({**base, "pattern": p}, 64, np.random.default_rng(0), jitter=False).astype(int)
        assert (np.abs(other - plain).sum(-1) > 60).mean() > 0.02, p
    # backgrounds differ in mean colour
    means = {b: D.render({**base, "background": b}, 64, np.random.default_rng(0))[:8, :8].reshape(-1, 3).mean(0)
             for b in D.FACTORS["background"]}
    assert min(np.abs(means[a] - means[b]).max() for a in means for b in means if a < b) > 20


def test_fixed_factors_and_errors():
    ds = D.ConceptWorld(20, seed=0, color="red", shape="cross")
    assert all(ds.factors(i)["color"] == "red" and ds.factors(i)["shape"] == "cross" for i in range(20))
    with pytest.raises(ValueError):
        D.ConceptWorld(2, color="pink")
    with pytest.raises(ValueError):
        D.ConceptWorld(2, target="hue")


def test_spurious_split_statistics():
    train = D.SpuriousConceptWorld(2000, seed=0, split="train", correlation=0.9)
    g = torch.bincount(train.groups(), minlength=4).double() / 2000
    # groups: small/water, small/grass, large/water, large/grass
    agree = float(g[0] + g[3])
    assert abs(agree - 0.9) < 0.03
    assert abs(float(g[0] + g[1]) - 0.5) < 0.04  # labels balanced
    y = train.labels("label")
    assert set(y.tolist()) == {0, 1}
    assert all(train.factors(i)["size"] == D.SPURIOUS_LABELS[int(y[i])] for i in range(50))
    assert all(train.factors(i)["background"] in D.SPURIOUS_BACKGROUNDS for i in range(50))
    assert train[0][1] == int(y[0])
    for split in ("val", "test"):
        s = D.SpuriousConceptWorld(400, seed=0, split=split)
        assert torch.bincount(s.groups(), minlength=4).tolist() == [100, 100, 100, 100]
        # background independent of label
        yy, bb = s.labels("label"), s.groups() % 2
        assert abs(float(((yy == bb).double()).mean()) - 0.5) < 1e-9
    # splits never share images
    a = D.SpuriousConceptWorld(4, seed=0, split="val").array(0)
    b = D.SpuriousConceptWorld(4, seed=0, split="test").array(0)
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError):
        D.SpuriousConceptWorld(4, split="dev")


def test_word_tokenizer():
    tok = D.WordTokenizer(context_length=8)
    ids = tok(["A red shape.", "a zebra"])
    assert ids.shape == (2, 8)
    assert ids[0, 0] == tok.SOT and ids[0].argmax() == 4 and int(ids[0].max()) == tok.eot
    assert ids[1, 2] == tok.UNK
    long = tok("a large red striped triangle at the top left on water")
    assert long[0, -1] == tok.eot  # truncated, end token kept
    every = " ".join(D.caption(D.ConceptWorld(1, seed=s).factors(0)) for s in range(30))
    assert tok.UNK not in tok(every, context_length=400)[0].tolist()
