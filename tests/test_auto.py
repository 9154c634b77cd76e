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
    for kw in ({}, {"start": 1}, {"heads": False}, {"bias": "paper"}):
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
    # token mode keeps the heads split (their attention rows and values recorded as the attention runs)
    tok = vitdecomp.decompose(model, images(), adapter="auto", tokens="source")
    assert tok.error <= 1e-10 and "blocks.1.attn.head.0" in tok.names
    head = tok.token_contributions("blocks.1.attn.head.0")
    assert torch.allclose(head.sum(1), tok["blocks.1.attn.head.0"], atol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name,extra", OTHERS[1:])
def test_head_splits_match_the_attribution_oracle(name, extra, fused):
    # per-head exactness is not implied by the sum: the kit's oracle removes each write with everything else
    # frozen (autograd through the model's own forward) and compares, heads' token splits by source included;
    # fused: the attention product is F.scaled_dot_product_attention, else softmax then weights @ values
    model = build(name, **extra)
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    res = testing.check_attributions(model, images(torch.float32, 1), adapter="auto")
    assert res and all(err <= 1e-6 for _, err, _ in res), res
    assert res[0][2] > len(model.blocks) * model.blocks[0].attn.num_heads  # head splits were compared


def test_traced_attention_refuses_what_it_cannot_record():
    model = build("beit_base_patch16_224", embed_dim=48, num_heads=2)
    attn = model.blocks[0].attn
    forward = type(attn).forward

    def twice(self, x, shared_rel_pos_bias=None):  # two attention products in one call: which is the heads'?
        forward(self, x, shared_rel_pos_bias)
        return forward(self, x, shared_rel_pos_bias)

    attn.forward = twice.__get__(attn)
    with pytest.raises(UnsupportedModelError, match="computed 2 attention products; expected one"):
        vitdecomp.decompose(model, images(torch.float32), adapter="auto", tokens="source")


def test_fallback_dispatch_uses_auto_only_when_no_family_claims():
    beit = build("beit_base_patch16_224", embed_dim=48, num_heads=2)
    choice = vitdecomp.choose_adapter(beit)
    assert (choice.name, choice.how) == ("auto", "fallback")
    assert vitdecomp.decompose(beit, images(torch.float32)).meta["adapter"] == "auto"
    assert vitdecomp.choose_adapter(build("vit_tiny_patch16_224")).name == "timm-vit"


def test_cait_class_attention_tail_equals_the_pack():
    # blocks_token_only.j(x, x_cls): the class token (a parameter) reads the patches through class attention at
    # the forward's weights; the talking-heads attention of the patch blocks is split by proj's columns
    model = build("cait_xxs24_224")
    f32 = vitdecomp.decompose(model, images(torch.float32), adapter="auto")
    assert f32.error <= 1e-5
    model = model.double()
    auto = vitdecomp.decompose(model, images(), adapter="auto")
    assert auto.error <= 1e-10 and auto.grid.num_prefix == 1
    assert {"cls_token", "blocks_token_only.1.attn.bias", "blocks_token_only.1.mlp", "blocks.1.attn.head.3"} <= set(
        auto.names)
    if "timm-cait" in {c[0] for c in vitdecomp.choose_adapter(model).claims}:  # the contrib pack is installed
        ref = vitdecomp.decompose(model, images(), adapter="timm-cait")
        assert auto.names == ref.names and (auto.contributions - ref.contributions).abs().max() <= 1e-10
    res = testing.check_attributions(model.float(), images(torch.float32, 1), adapter="auto")
    assert res and all(err <= 1e-6 for _, err, _ in res) and res[0][2] > 0, res


def test_refusals_name_the_operation_module_and_source_line():
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

    with pytest.raises(UnsupportedModelError) as exc:  # a non-linear readout
        vitdecomp.decompose(build("vit_tiny_patch16_224", global_pool="max"), images(torch.float32), adapter="auto")
    assert "amax" in str(exc.value) and "vision_transformer.py" in str(exc.value), str(exc.value)
    model = build("vit_tiny_patch16_224", global_pool="map")  # a MAP head returning every latent row
    model.attn_pool.pool = ""
    with pytest.raises(UnsupportedModelError, match=r"module model.attn_pool .*pool_type=''"):
        vitdecomp.decompose(model, images(torch.float32), adapter="auto")


def test_blocks_with_extra_arguments_are_derived():
    # XCiT's blocks take (x, H, W): the grid size stays a placeholder of the trace, the stream is followed alone
    # (the whole model: tests/test_auto_xcit.py); a class token concatenated after the blocks that is not a
    # parameter expanded over the batch is refused at the cat
    from vitdecomp.graph.auto import derived_writes

    xcit = timm.create_model("xcit_nano_12_p16_224", pretrained=False, img_size=32, depth=2).eval()
    assert derived_writes(xcit) == [f"blocks.{i}.{w}" for i in (0, 1) for w in ("attn", "local_mp", "mlp")]
    xcit.forward_cls = lambda x: type(xcit).forward_cls(xcit, torch.cat((x[:, :1], x), dim=1))
    with pytest.raises(UnsupportedModelError, match=r"call_function cat .*concatenates something other"):
        vitdecomp.decompose(xcit, images(torch.float32), adapter="auto")


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


# ------------------------------------------------------------------ attention-pool (MAP) heads
def map_models():
    from timm.layers import AttentionPoolLatent

    siglip = build("vit_base_patch16_siglip_224", embed_dim=48, num_heads=4)  # no class token, MAP head
    cls = build("vit_tiny_patch16_224", global_pool="map")  # class token kept out of the pool (pool_include_prefix)
    odd = timm.create_model("vit_tiny_patch16_224", **SMALL, global_pool="map", class_token=False)
    odd.attn_pool = AttentionPoolLatent(odd.embed_dim, num_heads=3, latent_len=2, pool_type="avg", qk_norm=True,
                                        pos_embed="abs", feat_size=16, norm_layer=torch.nn.LayerNorm)
    return {"siglip": siglip, "cls": cls, "latents2-avg-qknorm-pos": testing.perturb_parameters(odd.eval())}


@pytest.mark.parametrize("which", ["siglip", "cls", "latents2-avg-qknorm-pos"])
def test_map_head_decomposes_through_its_value_path(which):
    model = map_models()[which]
    assert vitdecomp.choose_adapter(model).name == "auto"  # timm-vit leaves MAP heads to the fallback
    f32 = vitdecomp.decompose(model, images(torch.float32))
    assert f32.meta["adapter"] == "auto" and f32.error <= 1e-5
    dec = vitdecomp.decompose(model.double(), images())
    assert dec.error <= 1e-10
    # the pool's MLP residual is a component of its own (z is read after it), and the pool's constants another
    assert dec.names[-2:] == ("attn_pool.bias", "attn_pool.mlp") and "blocks.1.attn.head.0" in dec.names
    with torch.no_grad():
        z = model.forward_head(model.forward_features(images()), pre_logits=True)
    assert torch.allclose(dec.contributions.sum(1), z, rtol=0, atol=1e-10 * float(z.norm()))
    tok = vitdecomp.decompose(model, images(), tokens="source")
    assert tok.error <= 1e-10 and tok.meta["spread_tokens"] == ["attn_pool.bias", "attn_pool.mlp"]
    # written to the latent query, which is no image position: spread evenly over the rows the pool reads
    npre = model.num_prefix_tokens
    spread = tok.token_contributions("attn_pool.mlp")
    assert torch.allclose(spread[:, npre:], (dec["attn_pool.mlp"] / (spread.shape[1] - npre))[:, None].expand_as(
        spread[:, npre:]), atol=1e-12) and not spread[:, :npre].any()
    paper = vitdecomp.decompose(model, images(), bias="paper")  # the pool's constant split over its leaves
    assert paper.error <= 1e-10 and not [c for c in paper.components if c.kind == "const"]
    # every component and token split against the oracle (frozen attention weights, autograd)
    res = testing.check_attributions(model.float(), images(torch.float32, 1))
    assert res and all(err <= 1e-6 for _, err, _ in res) and sum(n for *_, n in res) > 0, res


def test_map_head_conformance_kit():
    model = map_models()["siglip"]
    results = testing.run_conformance(model, (32, 32), reference=lambda m, x: m.forward_head(
        m.forward_features(x), pre_logits=True))
    worst = {dt: max(e for d, _, e in results if d == dt) for dt in (torch.float32, torch.float64)}
    assert worst[torch.float32] <= 1e-5 and worst[torch.float64] <= 1e-10, worst
