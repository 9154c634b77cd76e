"""Pictures that explain themselves: heat-map figures, contact-sheet captions, segmentation figures."""

import numpy as np
import pytest
import torch
from PIL import Image

from vitdecomp.errors import InputError
from vitdecomp.plotting import (_alpha, _heat_norm, contact_sheet, heatmap_figure, overlay, segmentation_figure,
                                wrap_caption)


def _photo():
    from skimage import data

    return data.chelsea()  # 300×451, not square


def test_signed_maps_get_a_diverging_scale_centred_at_zero():
    h = np.array([[-0.2, 0.0], [0.5, np.nan]])
    name, lo, hi, signed = _heat_norm(h, None, None, None)
    assert signed and name == "RdBu_r" and (lo, hi) == (-0.5, 0.5)
    name, lo, hi, signed = _heat_norm(np.array([[0.1, 0.4]]), None, None, None)
    assert not signed and (lo, hi) == (0.1, 0.4)
    a = _alpha(np.array([[-0.5, 0.0, 0.5]]), -0.5, 0.5, 0.8)
    assert a.tolist() == [[0.8, 0.0, 0.8]]  # transparent where the map is 0: the image shows through


def test_heatmap_figure_at_full_photo_resolution_with_colour_bar(tmp_path):
    img = _photo()
    H, W = img.shape[:2]
    heat = np.zeros((H, W))
    heat[50:120, 300:400] = 1.0
    heat[200:260, 50:120] = -0.5
    heat[:, :20] = np.nan  # not seen by the model
    out = heatmap_figure(img, heat, tmp_path / "h.png", title="blocks.3.attn.head.1: 'a cat'", label="⟨c W, t⟩")
    with Image.open(out) as im:
        assert im.size[0] >= W and im.size[1] >= H  # never downsampled
    zero = heatmap_figure(img, np.zeros((H, W)), tmp_path / "z.png", title="zero")
    with Image.open(zero) as im:
        assert im.size[0] >= W
    with pytest.raises(InputError, match="map the heat onto the image"):
        heatmap_figure(img, np.zeros((10, 10)), tmp_path / "bad.png")


def test_identically_zero_map_is_said_not_painted(tmp_path, monkeypatch):
    """The picture of a zero map shows the photo unchanged plus a statement, not a uniform colour."""
    import matplotlib.axes

    said = []
    orig = matplotlib.axes.Axes.text

    def spy(self, x, y, s, *a, **k):
        said.append(s)
        return orig(self, x, y, s, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "text", spy)
    img = _photo()
    heatmap_figure(img, np.zeros(img.shape[:2]), tmp_path / "z.png")
    assert any("identically zero" in s for s in said)
    said.clear()
    heatmap_figure(img, np.ones(img.shape[:2]), tmp_path / "o.png")
    assert not any("identically zero" in s for s in said)


def test_captions_are_wrapped_to_their_panel():
    long = "reference: a large red striped triangle at the top left on water"
    w = wrap_caption(long, 20)
    assert all(len(line) <= 20 for line in w.split("\n")) and w.count("\n") <= 2
    cut = wrap_caption(" ".join(["word"] * 40), 12, max_lines=2)
    assert cut.count("\n") == 1 and cut.endswith("…")


def test_contact_sheet_captions_do_not_overlap(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    figs = []
    orig = Figure.savefig

    def keep(self, *a, **k):
        figs.append(self)
        return orig(self, *a, **k)

    monkeypatch.setattr(Figure, "savefig", keep)
    img = _photo()
    caps = ["reference: a large red striped triangle at the top left on water"] + ["another long caption here"] * 4
    contact_sheet([img] * 5, tmp_path / "s.png", titles=caps, ncols=5, thumb=1.6,
                  title="retrieval by reference image for the property color, a long title that must be wrapped")
    fig = figs[-1]
    r = fig.canvas.get_renderer()
    boxes = [ax.title.get_window_extent(r) for ax in fig.axes if ax.get_title()]
    assert len(boxes) == 5
    for a, b in zip(boxes, boxes[1:]):
        assert a.x1 <= b.x0 + 1, (a, b)  # neighbouring captions never overlap
    sup = fig._suptitle.get_window_extent(r)
    assert sup.x0 >= 0 and sup.x1 <= fig.bbox.x1 + 1  # the title fits the figure


def test_segmentation_figure_has_a_legend(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    legends = []
    orig = Axes.legend

    def spy(self, *a, **k):
        legends.append([h.get_label() for h in k.get("handles", [])])
        return orig(self, *a, **k)

    monkeypatch.setattr(Axes, "legend", spy)
    img = _photo()
    H, W = img.shape[:2]
    sal = torch.randn(H, W)
    m = sal > 0
    t = torch.zeros(H, W, dtype=torch.bool)
    t[50:200, 100:300] = True
    out = segmentation_figure(img, sal, m, tmp_path / "seg.png", truth=t, title="chelsea")
    assert out.stat().st_size > 10000
    assert legends[-1] == ["predicted only", "ground truth only", "both"]


def test_overlay_on_the_original_photo_goes_through_the_models_preprocessing():
    """overlay("photo", heat, preprocess=...) puts heat computed on the model's input onto the photo itself."""
    import vitdecomp

    img = _photo()  # 300×451
    pre = vitdecomp.load_model("timm:deit_tiny_patch16_224", random_init=True, depth=1).preprocess
    heat = torch.zeros(224, 224)
    heat[:, 112:] = 1.0  # the right half of the model's input
    arr = overlay(img, heat, alpha=1.0, cmap="gray", vmin=0, vmax=1, preprocess=pre)
    assert arr.shape == img.shape  # the photo's own resolution
    mid = img.shape[1] // 2
    assert (arr[150, mid + 20] == 255).all() and (arr[150, mid - 20] == 0).all()  # heat lands on the right half
    assert (arr[150, 5] == img[150, 5]).all()  # the cropped-away border keeps the photo
