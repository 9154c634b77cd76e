"""A timm ViT / distilled DeiT converted to transformers decomposes exactly like the timm plugin decomposes it.

The conversion (timm state dict → transformers config and state dict) is written here for tiny models; the
timm side is decomposed through the installed plugins (entry points), never by importing them.
"""

from __future__ import annotations

import pytest
import torch

import vitdecomp
from vitdecomp import testing

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

TIMM_KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2, num_classes=5)


def hf_config_from_timm(model, cls):
    blk = model.blocks[0]
    return cls(
        hidden_size=model.embed_dim, num_hidden_layers=len(model.blocks), num_attention_heads=blk.attn.num_heads,
        intermediate_size=blk.mlp.fc1.out_features, image_size=model.patch_embed.img_size[0],
        patch_size=model.patch_embed.patch_size[0], layer_norm_eps=model.norm.eps, hidden_act="gelu",
        qkv_bias=blk.attn.qkv.bias is not None, num_labels=model.num_classes,
        attn_implementation="sdpa",  # HF ViT's eager path runs softmax in float32 even for float64 models
    )


def hf_state_dict_from_timm(sd, prefix):
    """timm ``vit_*`` / ``deit_*_distilled_*`` keys → transformers-5 ViT / DeiT keys (``prefix`` = "vit." / "deit.")."""
    out = {}
    emb = prefix + "embeddings."
    for k, v in sd.items():
        if k == "cls_token":
            out[emb + "cls_token"] = v
        elif k == "dist_token":
            out[emb + "distillation_token"] = v
        elif k == "pos_embed":
            out[emb + "position_embeddings"] = v
        elif k.startswith("patch_embed.proj."):
            out[emb + "patch_embeddings.projection." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            layer = f"{prefix}layers.{i}."
            if rest.startswith("attn.qkv."):
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    out[layer + f"attention.{name}." + rest.rsplit(".", 1)[1]] = part
            else:
                rest = (rest.replace("norm1.", "layernorm_before.").replace("norm2.", "layernorm_after.")
                        .replace("attn.proj.", "attention.o_proj."))
                out[layer + rest] = v
        elif k.startswith("norm."):
            out[prefix + "layernorm." + k.split(".", 1)[1]] = v
        elif k.startswith("head_dist."):
            out["distillation_classifier." + k.split(".", 1)[1]] = v
        elif k.startswith("head."):
            out[("cls_classifier." if "dist_token" in sd else "classifier.") + k.split(".", 1)[1]] = v
        else:
            raise KeyError(f"unmapped timm key {k}")
    return out


def timm_and_pack_registry():
    """The built-in timm plugin, found through its entry point like any plugin, plus this pack's ViT module."""
    from importlib.metadata import entry_points

    from vitdecomp_transformers import vit

    eps = list(entry_points(group="vitdecomp", name="timm_vit"))
    if not eps:
        pytest.skip("the built-in timm_vit plugin is not installed")
    return vitdecomp.Registry.from_plugins([eps[0].load(), vit])


CASES = [
    ("vit_tiny_patch16_224", transformers.ViTConfig, "ViTForImageClassification", "vit."),
    ("deit_tiny_distilled_patch16_224", transformers.DeiTConfig, "DeiTForImageClassificationWithTeacher", "deit."),
]


@pytest.mark.parametrize("timm_name,config_cls,hf_cls,prefix", CASES)
def test_hf_decomposition_matches_timm(timm_name, config_cls, hf_cls, prefix):
    registry = timm_and_pack_registry()
    torch.manual_seed(0)
    tm = timm.create_model(timm_name, **TIMM_KW).eval()
    testing.perturb_parameters(tm)
    hf = getattr(transformers, hf_cls)(hf_config_from_timm(tm, config_cls)).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict_from_timm(tm.state_dict(), prefix), strict=True)
    assert not missing and not unexpected
    tm, hf = tm.double(), hf.double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():  # the conversion itself is right: same logits
        logits_t, logits_h = tm(x), hf(x).logits
    torch.testing.assert_close(logits_h, logits_t, rtol=1e-9, atol=1e-10)
    for opts in ({"heads": True}, {"heads": False}, {"start": 1}, {"tokens": "source"}):
        dt = vitdecomp.decompose(tm, x, registry=registry, check=True, **opts)
        dh = vitdecomp.decompose(hf, x, registry=registry, check=True, **opts)
        assert dh.meta["adapter"] == "transformers-vit" and dt.meta["adapter"] == "timm-vit"
        rename = {"norm.bias": "layernorm.bias"}
        assert tuple(rename.get(n, n) for n in dt.names) == dh.names, opts
        scale = dt.representation.norm(dim=-1).max()
        err = float((dt.contributions - dh.contributions).norm(dim=-1).max() / scale)
        assert err < 1e-10, f"{opts}: components differ by {err:.2e}"
        if opts.get("tokens"):
            for n in ("blocks.1.attn.head.3", "embed", "blocks.0.mlp"):
                torch.testing.assert_close(dh.token_contributions(n), dt.token_contributions(n), rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(dh.token_contributions("layernorm.bias"), dt.token_contributions("norm.bias"),
                                       rtol=1e-9, atol=1e-11)


def paper_walk(tm, x):
    """The paper's RepDecompose by hand on the timm twin (CLS readout): leaves are the embedding, each head's
    W_O^(h) o_h + b_O / H and each MLP write; the final LayerNorm turns leaf k into γ ⊙ (u_k − μ/M)/σ + β/M."""
    cap = {}
    hs = [tm.blocks[0].register_forward_pre_hook(lambda m, a: cap.__setitem__("embed", a[0][:, 0]))]
    for i, blk in enumerate(tm.blocks):
        hs.append(blk.attn.proj.register_forward_pre_hook(lambda m, a, i=i: cap.__setitem__(("o", i), a[0][:, 0])))
        hs.append(blk.mlp.register_forward_hook(lambda m, a, o, i=i: cap.__setitem__(("mlp", i), o[:, 0])))
    with torch.no_grad():
        tm(x)
    for h in hs:
        h.remove()
    leaves = [cap["embed"]]
    for i, blk in enumerate(tm.blocks):
        H = blk.attn.num_heads
        o, W = cap[("o", i)].unflatten(-1, (H, -1)), blk.attn.proj.weight.unflatten(1, (H, -1))
        leaves += [o[:, h] @ W[:, h].T + blk.attn.proj.bias / H for h in range(H)] + [cap[("mlp", i)]]
    u, M, ln = sum(leaves), len(leaves), tm.norm
    mu, sd = u.mean(-1, keepdim=True), (u.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
    return [ln.weight * (v - mu / M) / sd + ln.bias / M for v in leaves]


def test_hf_paper_convention_matches_the_papers_walk():
    registry = timm_and_pack_registry()
    torch.manual_seed(0)
    tm = timm.create_model("vit_tiny_patch16_224", **TIMM_KW).eval()
    testing.perturb_parameters(tm)
    hf = transformers.ViTForImageClassification(hf_config_from_timm(tm, transformers.ViTConfig)).eval()
    hf.load_state_dict(hf_state_dict_from_timm(tm.state_dict(), "vit."), strict=True)
    tm, hf = tm.double(), hf.double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    want = paper_walk(tm, x)
    dh = vitdecomp.decompose(hf, x, registry=registry, bias="paper", check=True)
    assert len(dh.names) == len(want) and not any(c.kind == "const" for c in dh.components)
    for name, w in zip(dh.names, want):
        assert (dh[name] - w).norm() <= 1e-12 * w.norm(), name
