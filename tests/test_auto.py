"""The auto adapter: contribution graphs derived from a torch.fx trace of timm residual-block models."""

import pytest
import timm
import torch

import vitdecomp
from vitdecomp import UnsupportedModelError, testing

SMALL = dict(pretrained=False, img_size=32, patch_size=8, depth=2)


def build(name, **extra):
    return testing.perturb_parameters(timm.create_model(name, **{**SMALL, **extra}).eval())


def images(dtype=torch.float64, n=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=dtype)


def test_distilled_deit_readout_equals_the_builtin_plugin():  # z = (x[:, 0] + x[:, 1]) / 2 after the norm
    model = build("deit_tiny_distilled_patch16_224").double()
    auto = vitdecomp.decompose(model, images(), adapter="auto")
    ref = vitdecomp.decompose(model, images(), adapter="timm-vit")
    assert auto.names == ref.names and (auto.contributions - ref.contributions).abs().max() <= 1e-10


def test_plain_vit_equals_the_builtin_plugin():
    model = build("vit_tiny_patch16_224").double()
    x = images()
    for kw in ({}, {"start": 1}, {"heads": False}):
        auto = vitdecomp.decompose(model, x, adapter="auto", **kw)
        ref = vitdecomp.decompose(model, x, adapter="timm-vit", **kw)
        assert auto.names == ref.names and auto.meta["adapter"] == "auto"
        assert (auto.contributions - ref.contributions).abs().max() <= 1e-10
    assert auto.error <= 1e-10
    tok = vitdecomp.decompose(model, x, adapter="auto", tokens="source")
    ref = vitdecomp.decompose(model, x, adapter="timm-vit", tokens="source")
    for name in ("blocks.1.attn.head.2", "blocks.0.mlp"):
        assert torch.allclose(tok.token_contributions(name), ref.token_contributions(name), atol=1e-10)


OTHERS = [
    ("deit3_small_patch16_224", {}),                                    # LayerScale module
    ("beit_base_patch16_224", {"embed_dim": 48, "num_heads": 2}),       # gamma_1 * attn(...), rel-pos bias
    ("eva02_tiny_patch14_224", {}),                                     # rotary attention, SwiGLU
    ("vit_relpos_small_patch16_224", {}),                               # relative-position attention
]


@pytest.mark.parametrize("name,extra", OTHERS)
def test_other_timm_modules_exact_with_module_path_names(name, extra):
    model = build(name, **extra).double()
    dec = vitdecomp.decompose(model, images(), adapter="auto")
    assert dec.error <= 1e-10
    assert {"embed", "blocks.1.attn.head.0", "blocks.1.attn.head.1", "blocks.1.attn.bias", "blocks.1.mlp"} <= set(dec.names)
    f32 = vitdecomp.decompose(build(name, **extra), images(torch.float32), adapter="auto")
    assert f32.error <= 1e-5
    # token mode: heads without an attention source are block-level writes placed where they write
    tok = vitdecomp.decompose(model, images(), adapter="auto", tokens="source")
    assert tok.error <= 1e-10 and ("blocks.1.attn" in tok.names) != ("blocks.1.attn.head.0" in tok.names)


@pytest.mark.parametrize("name,extra", OTHERS[1:])
def test_head_splits_match_the_attribution_oracle(name, extra):
    # per-head exactness is not implied by the sum: the kit's oracle removes each write with everything else
    # frozen (autograd through the model's own forward) and compares
    res = testing.check_attributions(build(name, **extra), images(torch.float32, 1), adapter="auto", tokens=False)
    assert res and all(err <= 1e-6 for _, err, _ in res), res


def test_fallback_dispatch_uses_auto_only_when_no_family_claims():
    beit = build("beit_base_patch16_224", embed_dim=48, num_heads=2)
    choice = vitdecomp.choose_adapter(beit)
    assert (choice.name, choice.how) == ("auto", "fallback")
    assert vitdecomp.decompose(beit, images(torch.float32)).meta["adapter"] == "auto"
    assert vitdecomp.choose_adapter(build("vit_tiny_patch16_224")).name == "timm-vit"


def test_refusals_name_the_operation_module_and_source_line():
    cait = build("cait_xxs24_224")
    with pytest.raises(UnsupportedModelError) as exc:
        vitdecomp.decompose(cait, images(torch.float32), adapter="auto")
    msg = str(exc.value)
    assert "module model.blocks_token_only.0" in msg and "cait.py" in msg and "cls_tokens = blk(x, cls_tokens)" in msg

    class PostNorm(torch.nn.Module):  # x = norm(x + mlp(x)): the norm sits on the stream's own path
        def __init__(self, d):
            super().__init__()
            self.mlp, self.norm = torch.nn.Linear(d, d), torch.nn.LayerNorm(d)

        def forward(self, x):
            return self.norm(x + self.mlp(x))

    model = build("vit_tiny_patch16_224")
    vitdecomp.decompose(model, images(torch.float32), adapter="auto")  # derived and cached ...
    model.blocks[1] = PostNorm(model.embed_dim).eval()  # ... and re-derived once a block is replaced
    with pytest.raises(UnsupportedModelError) as exc:
        vitdecomp.decompose(model, images(torch.float32), adapter="auto")
    msg = str(exc.value)
    assert "blocks.1" in msg and "module blocks.1.norm" in msg and "test_auto.py" in msg
    assert "return self.norm(x + self.mlp(x))" in msg

    for pool, needle in (("max", "amax"), ("map", "module model.attn_pool")):  # non-linear readouts
        with pytest.raises(UnsupportedModelError) as exc:
            vitdecomp.decompose(build("vit_tiny_patch16_224", global_pool=pool), images(torch.float32), adapter="auto")
        assert needle in str(exc.value) and "vision_transformer.py" in str(exc.value), str(exc.value)


@pytest.mark.parametrize("name,extra", [("vit_tiny_patch16_224", {}), OTHERS[1]])
def test_conformance_kit_on_auto(name, extra):
    model = build(name, **extra)
    results = testing.run_conformance(model, (32, 32), adapter="auto",
                                      reference=lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True))
    worst = {dt: max(e for d, _, e in results if d == dt) for dt in (torch.float32, torch.float64)}
    assert worst[torch.float32] <= 1e-5 and worst[torch.float64] <= 1e-10, worst


def test_cli_check_with_adapter_override(capsys):
    from vitdecomp.cli import main

    rc = main(["check", "timm:vit_tiny_patch16_224", "--random-init", "--batch", "1", "--img-size", "32",
               "--adapter", "auto"])
    out = capsys.readouterr().out
    assert rc == 0 and "adapter    'auto'" in out and "(override): adapter='auto' was passed" in out
    assert "blocks.0.attn.head.0" in out and "(tolerance 1e-05: OK)" in out
