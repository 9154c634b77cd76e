"""Mean ablation and spurious-correlation repair (METHOD.md §6)."""

import pytest
import timm
import torch

import vitdecomp
from vitdecomp.ablation import (ablation_curve, component_means, direct_effects, execution_order, group_accuracies,
                                mean_ablate, predict, prediction_head, read_group_folders, read_waterbirds,
                                repair_spurious, score_order, spurious_ranking)
from vitdecomp.errors import EmptyDatasetError, InputError, MismatchError


@pytest.fixture(scope="module")
def vit_and_decs():
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8,
                          num_classes=10).eval()
    from skimage import data

    def photos(names):
        out = []
        for n in names:
            a = torch.as_tensor(getattr(data, n)()).permute(2, 0, 1).float() / 255.0
            a = torch.nn.functional.interpolate(a[None], size=(32, 32), mode="bilinear", antialias=True)[0]
            out.append((a - 0.5) / 0.25)
        return torch.stack(out)

    x = photos(("astronaut", "coffee", "chelsea", "rocket"))
    held = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return m, x, vitdecomp.decompose(m, x), vitdecomp.decompose(m, held)


def test_nothing_ablated_equals_the_model_exactly(vit_and_decs):
    m, x, dec, held = vit_and_decs
    head = prediction_head(m)
    assert head is m.head
    means = component_means(held)
    z0 = mean_ablate(dec.contributions, means, [], representation=dec.representation)
    assert z0 is dec.representation
    with torch.no_grad():
        own = m(x)
    logits = predict(head, z0)
    assert torch.equal(logits.argmax(-1), own.argmax(-1))
    torch.testing.assert_close(logits, own, rtol=1e-5, atol=1e-5)
    labels = torch.tensor([own.argmax(-1)[0], 3, own.argmax(-1)[2], 7])
    curve = ablation_curve(dec, labels, head, means, execution_order(dec.names))
    assert curve.accuracy[0].item() == float((own.argmax(-1) == labels).double().mean())
    # everything ablated: every image gets head(Σ μ_i)
    assert mean_ablate(dec, means) is dec.representation
    allz = mean_ablate(dec, means, dec.names)
    torch.testing.assert_close(allz, means.sum(0).expand(4, -1), rtol=1e-5, atol=1e-5)
    pred_all = predict(head, means.sum(0, keepdim=True)).argmax(-1)
    assert curve.accuracy[-1].item() == float((labels == pred_all).double().mean())
    assert len(curve.accuracy) == len(dec) + 1 and curve.order == dec.names


def test_mean_ablate_matches_manual_replacement():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(5, 4, 3, generator=g, dtype=torch.float64)
    mu = torch.randn(4, 3, generator=g, dtype=torch.float64)
    names = ["a", "b", "c", "d"]
    want = c.clone()
    want[:, [1, 3]] = mu[[1, 3]]
    torch.testing.assert_close(mean_ablate(c, mu, ["b", "d"], names=names), want.sum(1))
    torch.testing.assert_close(mean_ablate(c, mu, torch.tensor([False, True, False, True])), want.sum(1))
    torch.testing.assert_close(mean_ablate(c, mu, [1, -1]), want.sum(1))
    with pytest.raises(MismatchError, match=r"\[C, D\]"):
        mean_ablate(c, mu[:3], [0])
    with pytest.raises(InputError, match="no component named 'x'"):
        mean_ablate(c, mu, ["x"], names=names)
    with pytest.raises(InputError, match="pass names="):
        mean_ablate(c, mu, ["a"])


def test_curve_steps_score_order_and_direct_effects():
    g = torch.Generator().manual_seed(0)
    N, C, D = 40, 4, 3
    y = torch.randint(0, 3, (N,), generator=g)
    c = torch.randn(N, C, D, generator=g) * 0.1
    c[:, 2] += torch.nn.functional.one_hot(y, 3).float() * 3  # component 2 carries the class
    head = torch.nn.Linear(D, 3)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3))
        head.bias.zero_()
    means = component_means(c)
    eff = direct_effects(c, y, head, means)
    assert int(eff.argmax()) == 2 and eff[2] > 1
    names = ["a", "b", "c", "d"]
    order = score_order(eff, names)
    assert order[-1] == "c"
    curve = ablation_curve(c, y, head, means, order, names=names, steps=[0, 3, 4])
    assert curve.num_ablated.tolist() == [0, 3, 4]
    assert curve.accuracy[0] == 1.0 and curve.accuracy[1] == 1.0 and curve.accuracy[2] < 0.6
    # a nonlinear head goes through the per-component path
    nl = torch.nn.Sequential(torch.nn.Identity(), head)
    torch.testing.assert_close(direct_effects(c, y, nl, means), eff, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="steps"):
        ablation_curve(c, y, head, means, order, names=names, steps=[5])
    with pytest.raises(MismatchError, match="labels"):
        ablation_curve(c, y[:3], head, means, order, names=names)


def _spurious_problem(n, g, *, balanced):
    """y: class, p: place. Component 0 is core (±1·e0), component 1 spurious (±3·e1), 2-4 noise."""
    y = torch.randint(0, 2, (n,), generator=g)
    if balanced:  # places balanced and independent of the class
        p = (torch.arange(n) % 2)[torch.randperm(n, generator=g)]
    else:  # test set with every group present
        p = torch.arange(n) % 2
        y = (torch.arange(n) // 2) % 2
    C, D = 5, 6
    c = torch.randn(n, C, D, generator=g) * 0.05
    c[:, 0, 0] += (2 * y - 1).float()
    c[:, 1, 1] += 3 * (2 * p - 1).float()
    for i in range(2, 5):
        c[:, i, i] += torch.randn(n, generator=g)
    return c, y, p


def test_spurious_component_ablation_restores_worst_group():
    g = torch.Generator().manual_seed(0)
    held, _, _ = _spurious_problem(200, g, balanced=True)
    test, y, p = _spurious_problem(400, g, balanced=False)
    head = torch.nn.Linear(6, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[-1.0, -1, 0, 0, 0, 0], [1.0, 1, 0, 0, 0, 0]]))
        head.bias.zero_()
    names = ["core", "spur", "n2", "n3", "n4"]
    e = torch.eye(6)
    # CompAttribute scores on the held-out split; the aligned space is the model's own (identity aligner)
    s_sp = vitdecomp.variance_attributed(held, e[[1]])
    s_co = vitdecomp.variance_attributed(held, e[[0]])
    assert spurious_ranking(s_sp, s_co, names, 1)[0][0] == "spur"
    res = repair_spurious(test, y, p, held, head, s_sp, s_co, k=1, names=names)
    assert res.components == ("spur",)
    assert res.before.worst < 0.2 and res.after.worst > 0.9
    assert res.after.average > res.before.average
    assert set(res.before.groups) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert "worst group" in res.summary() and res.as_dict()["after"]["worst"] == res.after.worst
    with pytest.raises(InputError, match="held-out"):
        repair_spurious(test, y, p, test, head, s_sp, s_co, k=1, names=names)


def test_group_accuracies_by_hand():
    ga = group_accuracies([1, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0])
    assert ga.groups == {(0, 0): 1.0, (0, 1): 0.5, (1, 0): 0.5, (1, 1): 1.0}
    assert ga.counts[(0, 1)] == 2 and ga.worst == 0.5 and ga.average == 0.75
    assert ga.overall == pytest.approx(4 / 6)
    with pytest.raises(EmptyDatasetError):
        group_accuracies([], [], [])


def test_read_waterbirds_and_group_folders(tmp_path):
    wb = tmp_path / "wb"
    wb.mkdir()
    (wb / "metadata.csv").write_text("img_id,img_filename,y,split,place,place_filename\n"
                                     "1,001.A/a.jpg,0,0,1,x\n2,002.B/b.jpg,1,2,0,y\n3,002.B/c.jpg,1,1,1,z\n")
    d = read_waterbirds(wb)
    assert d.files == ["001.A/a.jpg", "002.B/b.jpg", "002.B/c.jpg"] and d.splits == ["train", "test", "val"]
    assert d.subset("test").labels == [1] and d.subset("val").places == [1]
    with pytest.raises(EmptyDatasetError, match="split 'x'"):
        d.subset("x")
    root = tmp_path / "groups"
    for split in ("val", "test"):
        for grp in ("landbird_land", "waterbird_water", "waterbird_land"):
            (root / split / grp).mkdir(parents=True)
            (root / split / grp / "i.png").write_bytes(b"")
    gf = read_group_folders(root)
    assert gf.class_names == ["landbird", "waterbird"] and gf.place_names == ["land", "water"]
    t = gf.subset("test")
    assert list(zip(t.labels, t.places)) == [(0, 0), (1, 0), (1, 1)]
    (root / "test" / "oops").mkdir()
    with pytest.raises(InputError, match="<class>_<place>"):
        read_group_folders(root)
    with pytest.raises(InputError, match="metadata.csv"):
        read_waterbirds(root)


def test_no_ablation_identity_from_a_float16_cache(tmp_path):
    """The cache stores the model's own z: with nothing ablated the logits are the model's, even when the
    contributions are stored in float16."""
    import timm

    import vitdecomp
    from vitdecomp.ablation import ablation_curve, component_means, prediction_head

    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8,
                          num_classes=5).eval()
    x = torch.randn(6, 3, 32, 32)
    data = torch.utils.data.TensorDataset(x, torch.arange(6) % 5)
    cache = vitdecomp.extract(m, data, tmp_path / "c", batch_size=3, shard_size=3, progress=False, model_name="t")
    assert cache.dtype == torch.float16 and cache.has_representation
    torch.testing.assert_close(cache.representation(), vitdecomp.representation(m, x))
    head = prediction_head(m)
    torch.testing.assert_close(head(cache.representation()), m(x), rtol=1e-5, atol=1e-5)
    labels = torch.arange(6) % 5
    curve = ablation_curve(cache, labels, head, component_means(cache), list(cache.names[:2]))
    assert float(curve.accuracy[0]) == float((m(x).argmax(-1) == labels).double().mean())
