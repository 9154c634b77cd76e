"""CompAlign: recovery of planted maps, penalty side, persistence, identity, mismatch errors."""

import math

import pytest
import torch

from vitdecomp.compalign import AlignConfig, Aligner, _penalty, fit_aligner
from vitdecomp.errors import EmptyDatasetError, InputError, MismatchError


def _planted(N, C, D, d, seed=0):
    """Contributions with different scales and offsets; targets made by known maps with orthonormal
    columns (D ≥ d) or rows (D < d) and a bias."""
    g = torch.Generator().manual_seed(seed)
    k = max(D, d)
    maps = torch.stack([torch.linalg.qr(torch.randn(k, k, generator=g))[0][:D, :d] for _ in range(C)])
    c = torch.randn(N, C, D, generator=g) * torch.linspace(0.5, 2.0, C)[None, :, None] + 0.3 * torch.randn(C, D, generator=g)
    bias = 0.2 * torch.randn(d, generator=g)
    t = torch.einsum("ncD,cDd->nd", c, maps) + bias
    return c, t, maps


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These problems are tiny; intra-op threads only add contention on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fitted(_one_thread):
    c, t, maps = _planted(N=1000, C=3, D=12, d=8)
    names = [f"blocks.{i}.mlp" for i in range(3)]
    al = fit_aligner(c, t, names=names, model_name="planted", clip_model="planted-clip", batch_size=64,
                     progress=False)
    return c, t, maps, al


def test_recovers_planted_maps(fitted):
    c, t, maps, al = fitted
    assert al.held_out_cosine >= 0.98
    assert al.held_out_cosine > al.init_cosine  # Adam improved on the shared closed-form start
    rel = (al.weight - maps).norm(dim=(1, 2)) / maps.norm(dim=(1, 2))
    assert rel.max() < 0.1
    assert al.penalty_side == "WtW"
    # the aligned components sum to f(x) and point where the targets do
    a = al(c[:50])
    assert a.shape == (50, 3, 8)
    torch.testing.assert_close(a.sum(1), al.total(c[:50]), rtol=1e-5, atol=1e-5)
    assert al.cosine(c, t).mean() > 0.98


def test_wide_target_uses_the_achievable_side():
    c, t, maps = _planted(N=800, C=3, D=6, d=10)
    al = fit_aligner(c, t, batch_size=64, progress=False)
    assert al.penalty_side == "WWt" and al.config["penalty_side"] == "WWt"
    assert al.held_out_cosine >= 0.98
    gram = al.weight @ al.weight.transpose(1, 2)  # rows close to orthonormal
    assert (gram - torch.eye(6)).abs().max() < 0.05


def test_square_maps_with_the_penalty_ramp():
    """D = d: isometries form two disconnected sets (det ±1); the λ ramp lets each map reach the right one."""
    c, t, maps = _planted(N=1000, C=4, D=8, d=8, seed=3)
    al = fit_aligner(c, t, batch_size=64, progress=False)
    assert al.held_out_cosine >= 0.98
    assert al.history[1]["lam"] == pytest.approx(1 / 20) and al.history[20]["lam"] == 1.0
    assert ((al.weight - maps).norm(dim=(1, 2)) / maps.norm(dim=(1, 2))).median() < 0.1


def test_penalty_exact_and_probe_estimate():
    W = torch.randn(3, 10, 6)
    exact = _penalty(W)
    manual = sum(((w.T @ w - torch.eye(6)) ** 2).sum() for w in W) / (3 * 6)
    torch.testing.assert_close(exact, manual)
    g = torch.Generator().manual_seed(0)
    est = torch.stack([_penalty(W, probes=64, gen=g) for _ in range(200)]).mean()
    assert abs(float(est) / float(exact) - 1) < 0.05  # unbiased
    q = torch.linalg.qr(torch.randn(10, 10))[0][:, :6]
    assert float(_penalty(q.expand(3, 10, 6))) < 1e-10


def test_align_components_matches_call(fitted):
    c, t, maps, al = fitted
    part = al.align_components(c[:30], ["blocks.2.mlp", "blocks.0.mlp"], batch_size=7)
    torch.testing.assert_close(part, al(c[:30])[:, [2, 0]])
    with pytest.raises(MismatchError, match="unknown components"):
        al.align_components(c[:3], ["blocks.9.mlp"])


def test_save_load_round_trip(tmp_path, fitted):
    c, t, maps, al = fitted
    path = tmp_path / "aligner.safetensors"
    al.save(path)
    back = Aligner.load(path)
    torch.testing.assert_close(back(c[:10]), al(c[:10]), rtol=0, atol=0)
    assert back.names == al.names and back.model_name == "planted" and back.clip_model == "planted-clip"
    assert back.held_out_cosine == pytest.approx(al.held_out_cosine)
    assert back.config["lam"] == 1.0 and back.config["penalty_side"] == "WtW"
    assert len(back.history) == len(al.history)


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(MismatchError, match="not a vitdecomp aligner"):
        Aligner.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(InputError, match="Could not read aligner"):
        Aligner.load(tmp_path / "junk.safetensors")


def test_identity(tmp_path):
    names = ["embed", "blocks.0.attn", "blocks.0.mlp"]
    al = Aligner.identity(names, 8, model_name="open_clip:ViT-B-16")
    x = torch.randn(5, 3, 8)
    torch.testing.assert_close(al(x), x)
    al.save(tmp_path / "id.safetensors")
    back = Aligner.load(tmp_path / "id.safetensors")
    assert back.is_identity and back.names == tuple(names)
    torch.testing.assert_close(back(x), x)


def test_decomposition_input_and_mismatch(fitted):
    from vitdecomp._records import Component
    from vitdecomp.decomposition import Decomposition

    c, t, maps, al = fitted
    comps = tuple(Component(n, "mlp", block=i) for i, n in enumerate(al.names))
    dec = Decomposition(contributions=c[:4], components=comps, representation=c[:4].sum(1))
    torch.testing.assert_close(al(dec), al(c[:4]))
    other = comps[:2] + (Component("blocks.2.attn", "attn", block=2),)
    bad = Decomposition(contributions=c[:4], components=other, representation=c[:4].sum(1))
    with pytest.raises(MismatchError, match="position 2: given 'blocks.2.attn', aligner expects 'blocks.2.mlp'"):
        al(bad)
    with pytest.raises(MismatchError, match="C = 3, D = 12"):
        al(torch.randn(2, 4, 12))


def test_config_validation_and_inputs():
    with pytest.raises(InputError, match="val_fraction"):
        AlignConfig(val_fraction=1.0)
    with pytest.raises(InputError, match="batch_size"):
        AlignConfig(batch_size=0)
    c, t, _ = _planted(N=20, C=2, D=4, d=4)
    with pytest.raises(MismatchError, match="N = 20"):
        fit_aligner(c, t[:10], progress=False)
    with pytest.raises(EmptyDatasetError):
        fit_aligner(c[:1], t[:1], progress=False)
    with pytest.raises(MismatchError, match="3 names for 2 components"):
        fit_aligner(c, t, names=["a", "b", "c"], progress=False)


def test_no_validation_split_and_determinism():
    c, t, _ = _planted(N=300, C=2, D=6, d=6)
    a1 = fit_aligner(c, t, val_fraction=0.0, max_epochs=3, progress=False)
    a2 = fit_aligner(c, t, val_fraction=0.0, max_epochs=3, progress=False)
    assert a1.held_out_cosine is None and len(a1.history) == 4
    torch.testing.assert_close(a1.weight, a2.weight, rtol=0, atol=0)
    assert math.isfinite(a1.history[-1]["train_loss"])
