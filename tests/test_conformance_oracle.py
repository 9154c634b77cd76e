"""The conformance kit's attribution oracle: it passes correct adapters and rejects wrong attributions that keep
the sum right.

Each broken adapter wraps the real timm ViT adapter and moves contributions around so that Σ c_i = z still holds
(the reconstruction checks pass, asserted below); the oracle must name what is wrong. The oracle runs on every
built-in family through ``run_conformance`` in the families' own test files; here it is exercised directly.
"""

from __future__ import annotations

import pytest
import timm
import torch

import vitdecomp
from vitdecomp import Adapter, Decomposition, testing
from vitdecomp.decomposition import DenseTokens, RowTokens

SMALL = dict(depth=2, img_size=32, patch_size=8, embed_dim=48, num_heads=3)


def vit(**extra):
    torch.manual_seed(0)
    return testing.perturb_parameters(timm.create_model("deit_tiny_patch16_224", **{**SMALL, **extra}).eval())


class Broken(Adapter):
    """A correct adapter whose decompositions go through ``mutate`` (which must keep the sum)."""

    name = "broken"

    def __init__(self, inner, mutate):
        self.inner, self.mutate = inner, mutate

    def __getattr__(self, key):  # middle_start, oracle_writes, ... as the real adapter has them
        if key in ("inner", "mutate"):
            raise AttributeError(key)
        return getattr(self.inner, key)

    def supports(self, model):
        return self.inner.supports(model)

    def unwrap(self, model):
        return self.inner.unwrap(model)

    def validate(self, model, images):
        self.inner.validate(model, images)

    def representation(self, model, images):
        return self.inner.representation(model, images)

    def decompose(self, model, images, options):
        return self.mutate(self.inner.decompose(model, images, options))


def rebuild(dec, rows=None, details=None, names=None):
    """``dec`` with contribution rows replaced (``rows``: {name: [B, D]}), token details replaced and names changed."""
    c = dec.contributions.clone()
    for name, v in (rows or {}).items():
        c[:, dec.index(name)] = v
    comps = dec.components
    if names:
        import attrs

        comps = tuple(attrs.evolve(k, name=names.get(k.name, k.name)) for k in comps)
    td = dict(dec.token_details)
    td.update(details or {})
    if names:
        td = {names.get(k, k): v for k, v in td.items()}
    return Decomposition(contributions=c, components=comps, representation=dec.representation, grid=dec.grid,
                         token_details=td, token_grids=dict(dec.token_grids), meta=dict(dec.meta))


def broken(model, mutate):
    return Broken(vitdecomp.find_adapter(model), mutate)


def swap_heads(dec):
    """Head labels swapped consistently in every block (values and token splits): a labelling bug."""
    rows, details = {}, {}
    for blk in range(SMALL["depth"]):
        a, b = f"blocks.{blk}.attn.head.0", f"blocks.{blk}.attn.head.1"
        rows[a], rows[b] = dec[b], dec[a]
        if dec.token_details:
            details[a], details[b] = dec.token_details[b], dec.token_details[a]
    return rebuild(dec, rows, details)


def move(dec, source, target):
    """``source``'s contribution (and token split) added to ``target``; ``source`` left at zero."""
    details = {}
    if dec.token_details:
        a, b = dec.token_contributions(source), dec.token_contributions(target)
        details = {target: DenseTokens(a + b), source: DenseTokens(torch.zeros_like(a))}
    return rebuild(dec, {target: dec[target] + dec[source], source: torch.zeros_like(dec[source])}, details)


def residual_into_constant(dec):
    """The embedding's contribution dumped into the final norm's offset."""
    return move(dec, "embed", "norm.bias")


def bias_into_branch(dec):
    """An attention bias folded into the MLP next to it (invisible while timm's zero-initialised biases stay zero)."""
    return move(dec, "blocks.0.attn.bias", "blocks.0.mlp")


def heads_by_written_row(dec):
    """Every head's token split placed at the row it writes (the CLS row) instead of the tokens it reads."""
    if not dec.token_details:
        return dec
    zero = torch.zeros(1, dtype=torch.long)
    details = {c.name: RowTokens(rows=zero, values=dec[c.name].unsqueeze(1)) for c in dec.components if c.kind == "head"}
    return rebuild(dec, details=details)


BROKEN = {
    "swapped head labels": (swap_heads, "blocks.0.attn.head.0"),
    "residual dumped into a constant": (residual_into_constant, "embed"),
    "bias folded into a branch": (bias_into_branch, "blocks.0.attn.bias"),
    "head split by the row it writes": (heads_by_written_row, "token split"),
}


def test_the_correct_adapter_passes_and_the_oracle_is_exact():
    model = vit()
    x = torch.randn(1, 3, 32, 32)
    res = testing.check_attributions(model, x)
    assert [o for o, _, _ in res] == [{"heads": True, "tokens": "source"}, {"heads": False},
                                      {"heads": True, "start": 1, "tokens": "source"}]
    assert all(w < 1e-12 for _, w, _ in res)
    assert res[0][2] == 2 * 3 + 2 + 1  # token splits checked: 6 heads, 2 MLPs, the embedding
    # the oracle alone: its values add up to z, and every head of a block differs (labels are meaningful)
    m = model.double()
    xd = x.double()
    dec = vitdecomp.decompose(m, xd, tokens="source")
    orc = testing.attribution_oracle(m, xd, dec)
    torch.testing.assert_close(sum(orc.contributions.values()), orc.z, rtol=1e-12, atol=1e-12)
    h = [orc.contributions[f"blocks.1.attn.head.{i}"] for i in range(3)]
    assert min(float((h[i] - h[j]).norm()) for i in range(3) for j in range(i)) > 1e-3
    assert float(orc.contributions["blocks.0.attn.bias"].norm()) > 1e-3  # biases are perturbed away from zero


@pytest.mark.parametrize("bug", sorted(BROKEN))
def test_broken_attributions_keep_the_sum_but_fail_the_oracle(bug):
    mutate, needle = BROKEN[bug]
    model = vit()
    ad = broken(model, mutate)
    x = torch.randn(1, 3, 32, 32)
    # the sum-only checks cannot see it ...
    testing.check_reconstruction(model, x, adapter=ad, granularities=({"heads": True}, {"heads": True, "tokens": "source"}))
    # ... the oracle does, and names the component
    with pytest.raises(AssertionError, match="attribution oracle") as exc:
        testing.check_attributions(model, x, adapter=ad)
    assert needle in str(exc.value)


def test_a_small_component_is_judged_on_its_own_scale():
    """LayerScale at 1e-4: a component 10^4× too large (its excess taken from the embedding) fails, and so does
    an error of 1e-3 of its own size, which is 1e-8 of z — far below any tolerance relative to z."""
    model = vit(init_values=1e-4)
    for blk in model.blocks:
        assert float(blk.ls2.gamma.detach().abs().max()) > 0.05  # perturbed; shrink it back to LayerScale's small scale
        blk.ls2.gamma.data.mul_(1e-4)
    x = torch.randn(1, 3, 32, 32)
    dec = vitdecomp.decompose(model.double(), x.double())
    assert float(dec["blocks.1.mlp"].norm() / dec.representation.norm()) < 1e-3

    def rescale(factor):
        def mutate(d):
            excess = d["blocks.1.mlp"] * (factor - 1)
            return rebuild(d, {"blocks.1.mlp": d["blocks.1.mlp"] + excess, "embed": d["embed"] - excess})
        return mutate

    for factor in (1e4, 1 + 1e-3):
        ad = broken(model, rescale(factor))
        testing.check_reconstruction(model, x, adapter=ad, granularities=({"heads": True},))
        with pytest.raises(AssertionError, match="'blocks.1.mlp' differs from the attribution oracle"):
            testing.check_attributions(model, x, adapter=ad, tokens=False, start=None)


def test_bias_free_attention_passes_the_whole_kit():
    """timm ViT with ``proj_bias=False``: no ``attn.bias`` component, so heads=False groups heads alone — into
    an ``attn`` branch, which the name check accepts."""
    model = vit(proj_bias=False)
    assert model.blocks[0].attn.proj.bias is None
    dec = vitdecomp.decompose(model, torch.randn(1, 3, 32, 32), heads=False)
    comp = dec.components[dec.index("blocks.0.attn")]
    assert comp.kind == "attn" and "blocks.0.attn.bias" not in dec.names
    testing.run_conformance(model, (32, 32), reference=lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True),
                            cuda_placement=False)


def test_group_of_heads_only_is_an_attention_branch():
    model = vit(proj_bias=False)
    dec = vitdecomp.decompose(model, torch.randn(1, 3, 32, 32))
    kinds = {c.name: c.kind for c in dec.group("branch").components}
    assert kinds["blocks.1.attn"] == "attn" and kinds["blocks.1.mlp"] == "mlp"
    assert {c.name: c.kind for c in dec.group("kind").components}["head"] == "head"


def test_perturb_parameters_moves_biases_and_prefix_tokens():
    model = timm.create_model("deit_tiny_patch16_224", **SMALL).eval()
    assert float(model.blocks[0].attn.proj.bias.detach().abs().max()) == 0.0  # timm's init
    testing.perturb_parameters(model)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert float(p.detach().abs().min()) > 0, name
    assert float(model.blocks[0].mlp.fc2.bias.detach().abs().mean()) > 0.05


def test_unlocatable_component_is_named_and_writes_override_it():
    model = vit()
    ad = broken(model, lambda d: rebuild(d, names={"blocks.0.mlp": "blocks.0.ffn"}))
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(testing.OracleError, match="'blocks.0.ffn'.*writes="):
        testing.check_attributions(model, x, adapter=ad, tokens=False, start=None)
    testing.check_attributions(model, x, adapter=ad, tokens=False, start=None, writes={"blocks.0.ffn": "blocks.0.mlp"})


def test_a_displaced_spatial_map_fails():
    """Swin: an MLP's map shifted by one row (a roll not undone) still sums to the component; the oracle places
    positions through the model's own roll / pad / partition and rejects it."""
    torch.manual_seed(0)
    model = testing.perturb_parameters(timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=(32, 40), window_size=2, embed_dim=16, depths=(2, 2),
        num_heads=(2, 2), num_classes=0).eval())
    name = "stages.0.blocks.1.mlp"

    def roll(dec):
        if not dec.token_details:
            return dec
        g = dec.grid_of(name)
        tok = dec.token_contributions(name)
        moved = tok.reshape(tok.shape[0], g.h, g.w, -1).roll(1, dims=1).reshape(tok.shape)
        return rebuild(dec, details={name: DenseTokens(moved)})

    x = torch.randn(1, 3, 32, 40)
    assert testing.check_attributions(model, x, start=None)[0][2] > 0
    ad = broken(model, roll)
    testing.check_reconstruction(model, x, adapter=ad, granularities=({"heads": True, "tokens": "source"},))
    with pytest.raises(AssertionError, match=f"token split \\(written positions\\) of '{name}'"):
        testing.check_attributions(model, x, adapter=ad, start=None)
