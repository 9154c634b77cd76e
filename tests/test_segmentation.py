"""Zero-shot segmentation (METHOD.md §6): metrics by hand, the logit split, nonlinear heads, folder evaluation."""

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import vitdecomp
from vitdecomp.errors import InputError, MismatchError, UnsupportedModelError
from vitdecomp.segmentation import (SegmentationMeter, average_precision, binarize, class_directions,
                                    evaluate_segmentation, segment)


def _vit(**kw):
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8,
                             num_classes=5, **kw).eval()


def test_average_precision_by_hand():
    assert average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 1, 0])) == pytest.approx(
        0.5 * 1 + 0.5 * 2 / 3)
    # a tie is one threshold: (R, P) = (.5, .5) then (1, 2/3)
    assert average_precision(torch.tensor([0.5, 0.5, 0.2]), torch.tensor([1, 0, 1])) == pytest.approx(
        0.5 * 0.5 + 0.5 * 2 / 3)
    assert average_precision(torch.tensor([3.0, 1.0]), torch.tensor([1, 0])) == 1.0
    assert np.isnan(average_precision(torch.tensor([1.0, 2.0]), torch.tensor([0, 0])))


def test_metrics_against_hand_computed_masks():
    # 2×4 image; saliency mean = 2.5 → predicted mask = the 4 pixels with saliency 4
    sal = torch.tensor([[4.0, 4.0, 1.0, 1.0], [4.0, 4.0, 1.0, 1.0]])
    gt = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    assert binarize(sal).tolist() == [[True, True, False, False], [True, True, False, False]]
    meter = SegmentationMeter()
    meter.update(sal, gt)
    m = meter.compute()
    # pred fg: (0,0),(0,1),(1,0),(1,1); gt fg: (0,0),(0,1),(0,2)
    assert m.pixel_accuracy == pytest.approx(5 / 8)  # wrong: (0,2), (1,0), (1,1)
    fg = 2 / 5  # inter {(0,0),(0,1)}, union 5 pixels
    bg = 3 / 6  # pred bg (0,2),(0,3),(1,2),(1,3); gt bg (0,3),(1,0..3): inter 3, union 6
    assert m.miou_foreground == pytest.approx(fg)
    assert m.miou_two_class == pytest.approx((fg + bg) / 2)
    ap_fg = average_precision(sal, gt)
    assert m.mean_ap == pytest.approx(ap_fg)
    assert m.mean_ap_two_class == pytest.approx((ap_fg + average_precision(-sal, gt == 0)) / 2)
    # accumulation over images is over pixels (Chefer et al.), not a mean of per-image ratios
    meter.update(torch.ones(2, 4) * torch.arange(4.0), torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]]))
    m2 = meter.compute()
    assert m2.num_images == 2 and m2.pixel_accuracy == pytest.approx((5 + 8) / 16)
    assert m2.miou_foreground == pytest.approx((2 + 4) / (5 + 4))
    with pytest.raises(MismatchError):
        meter.update(torch.ones(2, 4), torch.ones(4, 2))


def test_saliency_is_the_class_logit_split_over_tokens(photo_batch):
    m = _vit()
    x = photo_batch()
    seg = segment(m, x, classes=[0, 1, 2, 3], mode="nearest")
    assert seg.saliency.shape == (4, 32, 32) and seg.masks.dtype == torch.bool
    dec = vitdecomp.decompose(m, x, tokens="source")
    # Σ_patches saliency + the prefix (CLS) share = w_k · z = logit_k − b_k
    prefix = sum(dec.token_contributions(n)[:, :1].sum(1) for n in dec.names)
    w = m.head.weight[torch.arange(4)]
    patches = seg.saliency.double().sum((1, 2)) / 64
    logits = m(x).detach()
    want = logits[torch.arange(4), torch.arange(4)] - m.head.bias[:4].detach()
    torch.testing.assert_close((patches + (prefix * w).sum(-1).double()).float(), want, rtol=1e-4, atol=1e-4)
    # default class = the prediction
    assert segment(m, x).classes.tolist() == logits.argmax(-1).tolist()


def test_nonlinear_head_uses_its_gradient():
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    z = torch.randn(4, 6)
    cls = torch.tensor([0, 2, 1, 1])
    d = class_directions(head, z, cls)
    for b in range(4):
        J = torch.autograd.functional.jacobian(head, z[b])
        torch.testing.assert_close(d[b], J[cls[b]])
    lin = torch.nn.Linear(6, 3)
    torch.testing.assert_close(class_directions(lin, z, cls), lin.weight[cls].detach())
    with pytest.raises(InputError, match="out of range"):
        class_directions(lin, z, torch.tensor([0, 0, 0, 7]))


def test_maxvit_segmentation_first_order(photo_batch):
    torch.manual_seed(0)
    m = timm.create_model("maxvit_tiny_tf_224", img_size=64, embed_dim=(16, 24, 32, 40), depths=(1, 1, 1, 1),
                          transformer_dim_head=8, num_classes=4, stem_width=8, head_hidden_size=16).eval()
    x = photo_batch(size=(64, 64), names=("chelsea",))
    seg = segment(m, x, mode="nearest")
    dec = vitdecomp.decompose(m, x, tokens="source")
    head = vitdecomp.ablation.prediction_head(m)
    grad = class_directions(head, dec.representation, seg.classes)
    # every MaxViT component sits on an image grid: the saliency sums (area-weighted) to ∇logit · z
    total = 0.0
    for n in dec.names:
        g = dec.grid_of(n)
        total += float(dec.spatial_map(n).sum((1, 2))[0] @ grad[0]) * g.patch_size[0] * g.patch_size[1]
    assert float(seg.saliency.double().sum()) == pytest.approx(total, rel=1e-4, abs=1e-4)


def test_distilled_deit_has_no_head_on_z():
    m = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8).eval()
    with pytest.raises(UnsupportedModelError, match="distilled"):
        vitdecomp.ablation.prediction_head(m)


def test_evaluate_folder(tmp_path):
    from skimage import data

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i, name in enumerate(("astronaut", "coffee", "chelsea")):
        Image.fromarray(getattr(data, name)()).resize((48, 40)).save(tmp_path / "images" / f"{name}.jpg")
        mk = np.zeros((40, 48), np.uint8)
        mk[10:30, 8 + i * 4:30 + i * 4] = 255
        Image.fromarray(mk).save(tmp_path / "masks" / f"{name}.png")
    (tmp_path / "labels.csv").write_text("name,class\nastronaut,3\ncoffee,1\n")
    m = _vit()
    ev = evaluate_segmentation(m, tmp_path, batch_size=2, keep=2, progress=False)
    met = ev.metrics
    assert met.num_images == 3 and 0 <= met.pixel_accuracy <= 1 and 0 <= met.miou_foreground <= 1
    assert 0 <= met.mean_ap <= 1
    assert ev.classes[ev.names.index("astronaut")] == 3 and ev.classes[ev.names.index("coffee")] == 1
    assert len(ev.examples) == 2 and ev.examples[0][2].shape == (32, 32)
    (tmp_path / "masks" / "coffee.png").unlink()
    with pytest.raises(InputError, match="no mask"):
        evaluate_segmentation(m, tmp_path, progress=False)
