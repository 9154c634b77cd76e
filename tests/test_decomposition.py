"""The Decomposition record: coarsening, selection, persistence."""

import pytest
import timm
import torch

import vitdecomp
from vitdecomp import testing


@pytest.fixture(scope="module")
def dec():
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8).eval()
    testing.perturb_parameters(m)
    return vitdecomp.decompose(m.double(), torch.randn(2, 3, 32, 32, dtype=torch.float64), tokens="source")


def test_group_levels_preserve_the_sum(dec):
    for level in ("branch", "block", "kind"):
        g = dec.group(level)
        assert g.error <= 1e-10, level
    blocks = dec.group("block")
    assert blocks.names == ("embed", "blocks.0", "blocks.1", "norm.bias")
    kinds = dec.group("kind")
    assert set(kinds.names) == {"embed", "head", "const", "mlp"}


def test_group_keeps_token_detail(dec):
    br = dec.group("branch")
    tok = br.token_contributions("blocks.1.attn")
    torch.testing.assert_close(tok.sum(1), br["blocks.1.attn"], rtol=1e-10, atol=1e-12)


def test_select_is_partial(dec):
    heads = dec.select(kind="head")
    assert heads.partial and all(c.kind == "head" for c in heads.components)
    assert len(heads) == 2 * 3
    with pytest.raises(vitdecomp.ReconstructionError):
        heads.check()
    one = dec.select(names=["blocks.0.mlp"])
    torch.testing.assert_close(one.total(), dec["blocks.0.mlp"])
    with pytest.raises(KeyError, match="nope"):
        dec.select(names=["nope"])


def test_unknown_name(dec):
    with pytest.raises(KeyError, match="No component named 'blocks.9.mlp'"):
        dec["blocks.9.mlp"]


def test_save_load_roundtrip(dec, tmp_path):
    path = tmp_path / "dec.safetensors"
    dec.save(path, tokens=True)
    back = vitdecomp.Decomposition.load(path)
    assert back.names == dec.names and back.components == dec.components and back.grid == dec.grid
    torch.testing.assert_close(back.contributions, dec.contributions)
    torch.testing.assert_close(back.token_contributions("blocks.0.attn.head.1"), dec.token_contributions("blocks.0.attn.head.1"))
    assert abs(back.error - dec.error) < 1e-15


def test_index_table_follows_the_components(dec):
    # the name → position table is built once per components tuple; a replaced tuple gets a new one
    for i, name in enumerate(dec.names):
        assert dec.index(name) == i
        assert torch.equal(dec[name], dec.contributions[:, i])
    with pytest.raises(KeyError, match="No component named"):
        dec.index(["not", "hashable"])
    comps = dec.components
    dec.components = tuple(reversed(comps))
    try:
        assert dec.index(comps[0].name) == len(comps) - 1
    finally:
        dec.components = comps
    assert dec.index(comps[0].name) == 0
