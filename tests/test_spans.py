"""TextSpan picks the texts whose directions were mixed into a component."""

import pytest
import torch

from vitdecomp.errors import EmptyDatasetError, MismatchError
from vitdecomp.spans import SpanText, textspan, textspan_all

d = 32


def _pool(P=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    texts = torch.nn.functional.normalize(torch.randn(P, d, generator=g), dim=-1)
    return texts, [f"text {i}" for i in range(P)]


def _component(texts, picks, stds, N=500, noise=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    coef = torch.randn(N, len(picks), generator=g) * torch.tensor(stds)
    return coef @ texts[picks] + noise * torch.randn(N, d, generator=g) + 5.0  # offset: TextSpan centres


def test_textspan_recovers_planted_texts_in_order():
    texts, labels = _pool()
    X = _component(texts, [7, 31, 50], [4.0, 2.0, 1.0])
    out = textspan(X, texts, labels, iters=5, rank=16)
    assert isinstance(out[0], SpanText)
    assert [t for t, _ in out[:3]] == ["text 7", "text 31", "text 50"]
    shares = [v for _, v in out]
    assert shares[0] > shares[1] > shares[2] > shares[3]
    assert 0.97 < sum(shares[:3]) <= 1.0 and sum(shares) <= 1.0 + 1e-9


def test_textspan_no_repeats_and_iteration_clip():
    texts, labels = _pool(P=5)
    X = _component(texts, [0, 1], [3.0, 1.0])
    out = textspan(X, texts, labels, iters=10, rank=80)
    assert len(out) <= 5 and len({t for t, _ in out}) == len(out)


def test_textspan_all_per_component():
    texts, labels = _pool()
    a = torch.stack([_component(texts, [3], [2.0], seed=2), _component(texts, [42], [2.0], seed=3)], 1)
    res = textspan_all(a, ["blocks.0.attn", "blocks.1.mlp"], texts, labels, iters=2, progress=False)
    assert res["blocks.0.attn"][0].text == "text 3"
    assert res["blocks.1.mlp"][0].text == "text 42"
    only = textspan_all(a, ["x", "y"], texts, labels, iters=1, components=["y"], progress=False)
    assert list(only) == ["y"]


def test_textspan_errors():
    texts, labels = _pool()
    with pytest.raises(MismatchError, match="d = 16 but text embeddings d = 32"):
        textspan(torch.randn(10, 16), texts, labels)
    with pytest.raises(MismatchError, match="labels"):
        textspan(torch.randn(10, d), texts, labels[:-1])
    with pytest.raises(EmptyDatasetError):
        textspan(torch.randn(1, d), texts, labels)
    with pytest.raises(MismatchError, match="unknown component"):
        textspan_all(torch.randn(4, 2, d), ["a", "b"], texts, labels, components=["c"], progress=False)
