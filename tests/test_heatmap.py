"""Token heat maps (METHOD.md §6): placement on the image, several grids, aligner maps, real models."""

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import vitdecomp
from vitdecomp import Component, Decomposition, TokenGrid
from vitdecomp.compalign import Aligner
from vitdecomp.decomposition import DenseTokens
from vitdecomp.errors import InputError, MismatchError
from vitdecomp.heatmap import heatmap_components, resample_to_image, token_heatmap
from vitdecomp.plotting import colorize, overlay


def _synthetic():
    """Two components with known maps: a head on a 4×4 grid of 8-px patches (after 1 prefix token) that writes
    5·e0 at patch (1, 2), and a 'stage' head on a 2×2 grid of 16-px cells writing 3·e0 at cell (1, 0)."""
    D = 3
    g1 = TokenGrid(num_prefix=1, h=4, w=4, patch_size=(8, 8))
    g2 = TokenGrid(num_prefix=0, h=2, w=2, patch_size=(16, 16))
    t1 = torch.zeros(1, g1.num_tokens, D)
    t1[0, 1 + 1 * 4 + 2, 0] = 5.0
    t1[0, 0, 1] = 7.0  # the CLS token's share: not an image location
    t2 = torch.zeros(1, g2.num_tokens, D)
    t2[0, 1 * 2 + 0, 0] = 3.0
    t3 = torch.zeros(1, g1.num_tokens, D)
    t3[0, 0, 2] = 1.0
    comps = (Component("blocks.0.attn.head.0", "head", block=0, head=0),
             Component("stages.1.blocks.0.attn.head.0", "head", block=1, head=0, stage=1),
             Component("blocks.0.mlp", "mlp", block=0))
    tok = [t1, t2, t3]
    contributions = torch.stack([t.sum(1) for t in tok], 1)
    return Decomposition(contributions=contributions, components=comps, representation=contributions.sum(1), grid=g1,
                         token_details={c.name: DenseTokens(t) for c, t in zip(comps, tok)},
                         token_grids={comps[1].name: g2})


def test_known_map_lands_in_the_right_place_of_the_png(tmp_path):
    dec = _synthetic()
    e0 = torch.tensor([1.0, 0.0, 0.0])
    hm = token_heatmap(dec, None, e0, components=["blocks.0.attn.head.0"], mode="nearest")
    assert hm.maps.shape == (1, 32, 32)
    expected = torch.zeros(32, 32)
    expected[8:16, 16:24] = 5.0
    torch.testing.assert_close(hm.maps[0], expected)
    # the PNG, pixel for pixel: with alpha = 1 and a grey colormap the hot patch is white, the rest black
    out = tmp_path / "heat.png"
    overlay(np.zeros((32, 32, 3), np.uint8), hm.maps[0], out, alpha=1.0, cmap="gray")
    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape == (32, 32, 3)
    hot = png[..., 0] > 128
    assert hot[8:16, 16:24].all() and hot.sum() == 64
    # bilinear: the peak stays inside the same patch
    hb = token_heatmap(dec, None, e0, components=["blocks.0.attn.head.0"], mode="bilinear").maps[0]
    r, c = divmod(int(hb.argmax()), 32)
    assert 8 <= r < 16 and 16 <= c < 24


def test_maps_on_different_grids_are_resampled_and_summed():
    dec = _synthetic()
    e0 = torch.tensor([1.0, 0.0, 0.0])
    hm = token_heatmap(dec, None, e0, components=["blocks.0.attn.head.0", "stages.1.blocks.0.attn.head.0"],
                       mode="nearest")
    expected = torch.zeros(32, 32)
    expected[8:16, 16:24] += 5.0
    expected[16:32, 0:16] += 3.0
    torch.testing.assert_close(hm.maps[0], expected)
    assert hm.per_component["stages.1.blocks.0.attn.head.0"].shape == (1, 2, 2)
    assert hm.grids["stages.1.blocks.0.attn.head.0"].patch_size == (16, 16)


def test_top_components_by_score_and_kinds():
    dec = _synthetic()
    scores = torch.tensor([0.1, 0.9, 0.5])
    assert heatmap_components(dec, scores, k=1) == ("stages.1.blocks.0.attn.head.0",)
    assert heatmap_components(dec, scores, k=None, kinds=None) == (
        "stages.1.blocks.0.attn.head.0", "blocks.0.mlp", "blocks.0.attn.head.0")
    with pytest.raises(MismatchError, match=r"\[C\] = \[3\]"):
        heatmap_components(dec, torch.ones(5))


def test_aligner_maps_and_property_mode():
    dec = _synthetic()
    torch.manual_seed(0)
    W = torch.randn(3, 3, 4)
    al = Aligner(W, torch.randn(4), dec.names)
    t = torch.nn.functional.normalize(torch.randn(4), dim=0)
    hm = token_heatmap(dec, al, t, components=["blocks.0.attn.head.0"], mode="nearest")
    want = 5.0 * float(W[0, 0] @ t)
    assert hm.maps[0, 10, 20].item() == pytest.approx(want, rel=1e-5)
    assert hm.maps[0, 0, 0].item() == 0.0
    basis = torch.randn(2, 4)
    hp = token_heatmap(dec, al, basis=basis, components=["blocks.0.attn.head.0"], mode="nearest")
    q = vitdecomp.scores.orthonormal_basis(basis).float()
    assert hp.maps[0, 10, 20].item() == pytest.approx(float((5.0 * W[0, 0] @ q.T).norm()), rel=1e-5)
    assert (hp.maps >= 0).all()
    with pytest.raises(MismatchError, match="d = 5"):
        token_heatmap(dec, al, torch.randn(5), components=["blocks.0.attn.head.0"])
    with pytest.raises(InputError, match="exactly one"):
        token_heatmap(dec, al, t, basis=basis)


def test_resample_crops_and_pads():
    g = TokenGrid(0, 2, 2, (4, 4))
    m = torch.arange(4.0).reshape(1, 2, 2)
    out = resample_to_image(m, g, (6, 10), mode="nearest")
    assert out.shape == (1, 6, 10)
    assert out[0, 5, 7].item() == 3.0 and out[0, 0, 9].item() == 0.0
    with pytest.raises(InputError, match="mode"):
        resample_to_image(m, g, (8, 8), mode="cubic")


def test_real_vit_heatmap_consistent_with_token_split(photo_batch):
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8).eval()
    x = photo_batch()
    dec = vitdecomp.decompose(m, x, tokens="source")
    al = Aligner(torch.randn(len(dec), 192, 16) / 14, torch.zeros(16), dec.names)
    t = torch.nn.functional.normalize(torch.randn(16), dim=0)
    ve = vitdecomp.variance_explained(al(dec), t[None])
    hm = token_heatmap(dec, al, t, scores=ve, k=3, mode="nearest")
    assert hm.maps.shape == (4, 32, 32) and len(hm.components) == 3
    assert all(dec.components[dec.index(n)].kind == "head" for n in hm.components)
    # every 8×8 block repeats a patch value; summed over patches it is Σ_{i∈S} Σ_p ⟨c_i(p) W_i, t⟩
    per_patch = sum(hm.per_component[n].sum((1, 2)) for n in hm.components)
    torch.testing.assert_close(hm.maps.sum((1, 2)).double() / 64, per_patch, rtol=1e-4, atol=1e-4)
    with pytest.raises(InputError, match="tokens='source'"):
        token_heatmap(vitdecomp.decompose(m, x), al, t)


def test_real_swin_heatmap_uses_stage_grids(photo_batch):
    torch.manual_seed(0)
    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=2, embed_dim=16,
                          depths=(1, 1), num_heads=(2, 2), num_classes=3).eval()
    x = photo_batch(names=("coffee",))
    dec = vitdecomp.decompose(m, x, tokens="source")
    t = torch.nn.functional.normalize(torch.randn(dec.contributions.shape[-1]), dim=0)
    hm = token_heatmap(dec, None, t, k=None, kinds=None, mode="nearest")
    grids = {g.patch_size for g in hm.grids.values()}
    assert len(grids) == 2 and hm.maps.shape == (1, 32, 32)
    # each grid cell covers ph·pw pixels: the image sum is the area-weighted sum of the raw maps
    want = sum(hm.per_component[n].sum() * hm.grids[n].patch_size[0] * hm.grids[n].patch_size[1]
               for n in hm.components)
    assert float(hm.maps.sum()) == pytest.approx(float(want), rel=1e-4, abs=1e-3)
    # and the maps sum to ⟨z, t⟩ (every component's split sums to it; the prefix-free Swin grid has no CLS share)
    assert float(sum(v.sum() for v in hm.per_component.values())) == pytest.approx(float(dec.representation[0] @ t),
                                                                                    rel=1e-4, abs=1e-4)
    rgb = colorize(hm.maps[0])
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8


def test_display_size_scales_the_map_instead_of_padding_it():
    """image_size ≠ the model's input: the map is scaled as a whole (it used to be padded into the top-left)."""
    from vitdecomp.heatmap import scale_to

    dec = _synthetic()
    t = torch.tensor([1.0, 0.0, 0.0])
    small = token_heatmap(dec, None, t, components=["blocks.0.attn.head.0"], mode="nearest").maps[0]  # 32×32
    big = token_heatmap(dec, None, t, components=["blocks.0.attn.head.0"], mode="nearest",
                        image_size=(64, 96)).maps[0]
    assert big.shape == (64, 96)
    hot = (big == big.max()).nonzero()
    # patch (1, 2) of 8-px patches covers input rows 8..15, cols 16..23 → display rows 16..31, cols 48..71
    assert hot[:, 0].min() == 16 and hot[:, 0].max() == 31 and hot[:, 1].min() == 48 and hot[:, 1].max() == 71
    torch.testing.assert_close(big, scale_to(small, (64, 96), mode="nearest"))


@pytest.mark.parametrize("photo", ["coffee", "chelsea"])
def test_heat_is_mapped_through_resize_and_centre_crop_onto_the_photo(photo):
    """A square planted on a non-square photo goes through the model's real preprocessing; a heat map that is hot
    exactly where the square landed in the model's input comes back onto the square in the photo."""
    from skimage import data

    from vitdecomp.heatmap import map_to_photo, preprocess_geometry

    arr = getattr(data, photo)().copy()  # coffee 400×600, chelsea 300×451: landscape
    H, W = arr.shape[:2]
    top, left, size = H // 3, W - W // 3 - 40, 50  # right of centre, inside the crop
    arr[...] = 0
    arr[top:top + size, left:left + size] = 255
    pre = vitdecomp.load_model("timm:deit_tiny_patch16_224", random_init=True, depth=1).preprocess
    x = pre(Image.fromarray(arr))  # [3, 224, 224], normalised
    seen = (x[0] > x[0].min() + 1e-3).to(torch.float64)  # where the square is in the model's input
    assert 0 < seen.sum() < seen.numel()
    geo = preprocess_geometry(pre, (H, W))
    assert geo.input_size == (224, 224) and geo.steps[0].startswith("Resize") and geo.steps[1].startswith("CenterCrop")
    back = map_to_photo(seen, geo, mode="nearest")
    assert back.shape == (H, W)
    truth = np.zeros((H, W), bool)
    truth[top:top + size, left:left + size] = True
    hot = (back > 0.5).numpy()
    iou = (hot & truth).sum() / (hot | truth).sum()
    assert iou > 0.9, iou
    # the crop removed the photo's margins: no value there, values everywhere inside
    t0, l0, h0, w0 = geo.box()
    assert l0 > 50 and torch.isnan(back[:, : int(l0) - 1]).all() and torch.isnan(back[:, int(l0 + w0) + 1:]).all()
    assert not torch.isnan(back[int(t0) + 2: int(t0 + h0) - 2, int(l0) + 2: int(l0 + w0) - 2]).any()


def test_preprocessing_that_cannot_be_mapped_is_refused():
    import torchvision.transforms as T

    from vitdecomp.heatmap import map_to_photo, preprocess_geometry

    with pytest.raises(InputError, match="RandomResizedCrop"):
        preprocess_geometry(T.Compose([T.RandomResizedCrop(32), T.ToTensor()]), (40, 60))
    geo = preprocess_geometry(T.Compose([T.Resize((20, 30)), T.ToTensor()]), (40, 60))  # plain resize: the whole photo
    assert geo.box() == pytest.approx((0, 0, 40, 60))
    ramp = torch.arange(30, dtype=torch.float64).expand(20, 30)
    back = map_to_photo(ramp, geo, mode="nearest")
    assert not torch.isnan(back).any() and torch.equal(back[0, :4], torch.tensor([0.0, 0, 1, 1], dtype=torch.float64))


def test_coarsest_grid_sums_merge_slots_exactly(photo_batch):
    """Swin: with grid='coarsest' every stage-0 map is summed into the final 2×2-merged grid; each coarse cell holds
    the total of its merge slot, so the maps still sum to ⟨z, t⟩ and the picture is constant on coarse cells."""
    from vitdecomp.heatmap import pool_to_grid

    torch.manual_seed(0)
    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=2, embed_dim=16,
                          depths=(1, 1), num_heads=(2, 2), num_classes=3).eval()
    dec = vitdecomp.decompose(m, photo_batch(names=("chelsea",)), tokens="source")
    t = torch.nn.functional.normalize(torch.randn(dec.contributions.shape[-1]), dim=0)
    native = token_heatmap(dec, None, t, k=None, kinds=None, mode="nearest")
    coarse = token_heatmap(dec, None, t, k=None, kinds=None, mode="nearest", grid="coarsest")
    g = coarse.display_grid
    assert g.patch_size == max(gr.patch_size for gr in native.grids.values())
    assert "coarsest grid" in coarse.grid_description() and f"{g.h}×{g.w}" in coarse.grid_description()
    cells = coarse.maps[0].reshape(g.h, g.patch_size[0], g.w, g.patch_size[1])
    assert torch.allclose(cells, cells[:, :1, :, :1].expand_as(cells))  # one value per coarse cell
    area = g.patch_size[0] * g.patch_size[1]
    assert float(coarse.maps.sum()) / area == pytest.approx(float(dec.representation[0] @ t), rel=1e-4, abs=1e-4)
    fine_name = next(n for n, gr in native.grids.items() if gr != g)
    pooled = pool_to_grid(native.per_component[fine_name], native.grids[fine_name], g)
    assert float(pooled.sum()) == pytest.approx(float(native.per_component[fine_name].sum()), rel=1e-9, abs=1e-12)
    with pytest.raises(MismatchError, match="cannot pool"):
        pool_to_grid(torch.zeros(3, 3), TokenGrid(0, 3, 3, (8, 8)), TokenGrid(0, 2, 2, (16, 16)))
