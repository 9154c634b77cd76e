"""CompAttribute scores: planted signal, invariances, streaming == batch, merge, persistence."""

import pytest
import torch

from vitdecomp.errors import EmptyDatasetError, InputError, MismatchError, UnknownPropertyError
from vitdecomp.scores import (
    StreamingScores,
    orthonormal_basis,
    rank_components,
    score_properties,
    specificity,
    variance_attributed,
    variance_explained,
)

D = 24


def _planted(N=400, C=6, seed=0):
    """Component 2 varies along the 'color' directions, component 4 along the 'shape' ones; the rest is noise
    orthogonal to both."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    color, shape, rest = q[:, :3].T, q[:, 3:6].T, q[:, 6:].T  # [3, D], [3, D], [18, D]
    a = torch.randn(N, C, rest.shape[0], generator=g) @ rest  # noise outside both spans
    a[:, 2] += 3 * torch.randn(N, 3, generator=g) @ color
    a[:, 4] += 3 * torch.randn(N, 3, generator=g) @ shape
    # texts are not orthonormal: mix the directions with a random invertible matrix
    mix = torch.randn(3, 3, generator=g) + 3 * torch.eye(3)
    return a, mix @ color, mix @ shape


def test_planted_component_ranks_first():
    a, color, shape = _planted()
    names = [f"c{i}" for i in range(a.shape[1])]
    sc = variance_attributed(a, color)
    assert rank_components(sc, names)[0][0] == "c2"
    assert sc[2] > 0.9 and sc[[0, 1, 3, 4, 5]].abs().max() < 1e-12
    ve = variance_explained(a, color)
    assert ve[2] > 0.5 and ve[[0, 1, 3, 4, 5]].max() < 1e-10  # noise lies exactly outside the span
    spec = specificity(score_properties(a, {"color": color, "shape": shape}), "shape")
    assert int(torch.argmax(spec)) == 4


def test_basis_is_orthonormalised_inside():
    a, color, _ = _planted()
    mixed = torch.randn(3, 3, generator=torch.Generator().manual_seed(1)) @ color
    torch.testing.assert_close(variance_explained(a, color), variance_explained(a, mixed))
    torch.testing.assert_close(variance_attributed(a, color), variance_attributed(a, orthonormal_basis(color)))
    q = orthonormal_basis(color)
    torch.testing.assert_close(q @ q.T, torch.eye(3, dtype=torch.float64))
    # idempotent (positive-diagonal QR), which merge() relies on
    torch.testing.assert_close(orthonormal_basis(q), q, rtol=0, atol=1e-12)


def test_variance_attributed_against_definition():
    a, color, _ = _planted(N=50)
    q = orthonormal_basis(color)
    s = a.double().sum(1)
    expected = []
    for i in (2,):  # the component with variance along span(color)
        cs = []
        for j in range(q.shape[0]):
            x, y = a[:, i].double() @ q[j], s @ q[j]
            cs.append(torch.corrcoef(torch.stack([x, y]))[0, 1])
        expected.append(torch.stack(cs).mean())
    got = variance_attributed(a, color)
    torch.testing.assert_close(got[[2]], torch.stack(expected))
    assert (got[[0, 1, 3, 4, 5]] == 0).all()  # their projections on span(color) are pure round-off


def test_streaming_equals_batch_and_merge():
    a, color, shape = _planted(N=301)
    bases = {"color": color, "shape": shape}
    ref = score_properties(a, bases)
    st = StreamingScores(bases)
    for chunk in a.split(37):
        st.update(chunk)
    assert st.n == 301
    for name in bases:
        torch.testing.assert_close(st.variance_attributed(name), ref[name], rtol=0, atol=1e-10)
        torch.testing.assert_close(st.variance_explained(name), variance_explained(a, bases[name]), rtol=0, atol=1e-10)
    # two "processes" merged
    p1, p2 = StreamingScores(bases), StreamingScores(bases)
    p1.update(a[:100])
    for chunk in a[100:].split(50):
        p2.update(chunk)
    merged = p1.merge(p2).scores()
    for name in bases:
        torch.testing.assert_close(merged[name], ref[name], rtol=0, atol=1e-10)


def test_streaming_is_accurate_with_a_large_mean():
    a, color, _ = _planted(N=200)
    a = a + 1e6  # naive raw-moment accumulation would lose all digits here
    st = StreamingScores(color)
    for chunk in a.split(16):
        st.update(chunk)
    torch.testing.assert_close(st.variance_attributed(), variance_attributed(a, color), rtol=0, atol=1e-7)


def test_streaming_save_load_merge(tmp_path):
    a, color, _ = _planted(N=120)
    p1 = StreamingScores({"color": color}).update(a[:60])
    p1.save(tmp_path / "part1.safetensors")
    p2 = StreamingScores({"color": color}).update(a[60:])
    loaded = StreamingScores.load(tmp_path / "part1.safetensors")
    torch.testing.assert_close(loaded.merge(p2).variance_attributed("color"), variance_attributed(a, color),
                               rtol=0, atol=1e-10)


def test_total_argument_for_a_subset_of_components():
    a, color, _ = _planted()
    full = variance_attributed(a, color)
    total = a.double().sum(1)
    sub = variance_attributed(a[:, 1:4], color, total=total)
    torch.testing.assert_close(sub, full[1:4])
    st = StreamingScores(color)
    for i in range(0, a.shape[0], 64):
        st.update(a[i:i + 64, 1:4], total=total[i:i + 64])
    torch.testing.assert_close(st.variance_attributed(), sub, rtol=0, atol=1e-10)


def test_specificity_definition():
    s = {"p": torch.tensor([0.5, 0.2, -0.1]), "q": torch.tensor([0.1, 0.6, -0.3]), "r": torch.tensor([-0.2, 0.1, -0.5])}
    torch.testing.assert_close(specificity(s, "p"), torch.tensor([0.4, -0.4, -0.1]))
    torch.testing.assert_close(specificity({"p": s["p"]}, "p"), s["p"])
    with pytest.raises(UnknownPropertyError, match="'p', 'q', 'r'"):
        specificity(s, "texture")


def test_errors_name_the_problem():
    a, color, _ = _planted()
    with pytest.raises(MismatchError, match="d = 24 but the text basis has d = 8"):
        variance_attributed(a, torch.randn(3, 8))
    with pytest.raises(InputError, match=r"\[N, C, d\]"):
        variance_explained(a[0], color)
    with pytest.raises(EmptyDatasetError):
        variance_attributed(a[:1], color)
    st = StreamingScores(color)
    with pytest.raises(EmptyDatasetError, match="seen 0 images"):
        st.variance_attributed()
    st.update(a[:5])
    with pytest.raises(MismatchError, match="6"):
        st.update(a[:5, :3])
    with pytest.raises(MismatchError, match="different property bases"):
        st.merge(StreamingScores(color[:2]))
    with pytest.raises(MismatchError):
        rank_components(torch.zeros(3), ["a", "b"])


def test_constant_component_scores_zero():
    a, color, _ = _planted()
    a[:, 0] = 1.0  # no variance at all
    assert variance_attributed(a, color)[0] == 0
    assert variance_explained(a, color)[0] == 0
    st = StreamingScores(color)
    for chunk in a.split(7):
        st.update(chunk)
    assert st.variance_attributed()[0] == 0 and st.variance_explained()[0] == 0


def test_variance_attributed_is_a_deprecated_name_of_mean_correlation():
    """The score is a correlation (it can be negative), so it is named by what it computes; the old name works."""
    from vitdecomp.scores import StreamingScores, mean_correlation, variance_attributed

    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 4, 6, generator=g, dtype=torch.float64)
    a[:, 1] = -a[:, 0] * 3  # moves against component 0: negative correlation with the total
    basis = torch.randn(2, 6, generator=g, dtype=torch.float64)
    new = mean_correlation(a, basis)
    assert float(new.min()) < 0 and float(new.max()) <= 1
    with pytest.warns(DeprecationWarning, match="mean_correlation"):
        old = variance_attributed(a, basis)
    torch.testing.assert_close(old, new)
    acc = StreamingScores(basis).update(a)
    torch.testing.assert_close(acc.mean_correlation(), new)
    with pytest.warns(DeprecationWarning, match="mean_correlation"):
        torch.testing.assert_close(acc.variance_attributed(), new)
