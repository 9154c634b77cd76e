"""The application commands: retrieve, heatmap, segment, ablate, spurious (end to end on tiny random models)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vitdecomp
from vitdecomp.cli import main
from vitdecomp.compalign import Aligner

MODEL = ["timm:deit_tiny_patch16_224", "--random-init", "--img-size", "32", "--model-arg", "depth=2",
         "--model-arg", "patch_size=8"]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def _save(path, name, size=(40, 40)):
    from skimage import data

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(getattr(data, name)()).resize(size).save(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_clip_name):
    root = tmp_path_factory.mktemp("apps")
    for n in PHOTOS:
        _save(root / "imgs" / f"{n}.png", n)
    loaded = vitdecomp.load_model(MODEL[0], random_init=True, img_size=32, depth=2, patch_size=8)
    cache = vitdecomp.extract(loaded, root / "imgs", root / "cache", dtype=torch.float32, progress=False)
    g = torch.Generator().manual_seed(0)
    al = Aligner(torch.randn(len(cache.names), 192, 24, generator=g) / 14, torch.zeros(24), cache.names,
                 model_name=MODEL[0], clip_model=tiny_clip_name)
    al.save(root / "aligner.safetensors")
    clip = ["--aligner", str(root / "aligner.safetensors"), "--clip-random-init", "--no-progress"]
    return root, clip


def test_help_has_examples(capsys):
    for cmd in ("retrieve", "heatmap", "segment", "ablate", "spurious"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        assert "examples:" in out and f"vitdecomp {cmd}" in out and "--out" in out


def test_retrieve_text_and_reference(setup, capsys):
    root, clip = setup
    out = root / "ret"
    assert main(["retrieve", str(root / "cache"), *clip, "--property", "location", "--text", "a beach", "--k", "3",
                 "--out", str(out)]) == 0
    rec = json.loads((out / "ranking.json").read_text())
    assert len(rec["components"]) == 3 and len(rec["ranked"]) == 4 and len(rec["baseline"]) == 4
    assert (out / "sheet.png").stat().st_size > 1000
    assert not [c for c in rec["components"] if c.endswith(".bias")]  # constants are never chosen by score
    assert len(rec["component_scores"]) == 3 and 0 < rec["variance_share"] <= 1
    printed = capsys.readouterr().out
    assert "whole representation" in printed
    for c, sc in zip(rec["components"], rec["component_scores"]):
        assert f"{c}" in printed and f"{sc:+.4f}" in printed  # the selection is printed with each score
    out2 = root / "ret2"
    assert main(["retrieve", str(root / "cache"), *clip, "--property", "color", "--reference", "chelsea.png",
                 "--against", "texture,pattern", "--out", str(out2)]) == 0
    rec = json.loads((out2 / "ranking.json").read_text())
    assert "chelsea.png" not in [r[0] for r in rec["ranked"]] and len(rec["ranked"]) == 3
    assert main(["retrieve", str(root / "cache"), *clip, "--property", "color", "--text", "x", "--reference", "1",
                 "--out", str(out2)]) == 2
    assert "exactly one of --text or --reference" in capsys.readouterr().err
    assert main(["retrieve", str(root / "cache"), *clip, "--property", "colour", "--text", "x", "--out", str(out2)]) == 2
    assert "Unknown property 'colour'" in capsys.readouterr().err


def test_heatmap_writes_png_and_array(setup):
    root, clip = setup
    out = root / "heat"
    imgs = [str(root / "imgs" / f"{n}.png") for n in PHOTOS[:2]]
    assert main(["heatmap", *MODEL, *imgs, *clip, "--text", "striped pattern", "--k", "2", "--out", str(out)]) == 0
    a = np.load(out / "astronaut_heatmap.npy")
    assert a.shape == (32, 32)  # the model's input
    photo = np.load(out / "astronaut_heatmap_photo.npy")
    assert photo.shape == (40, 40)  # the photo: Resize 36 + CenterCrop 32 undone, the cropped border NaN
    assert np.isnan(photo[0]).all() and not np.isnan(photo[5:35, 5:35]).any()
    with Image.open(out / "astronaut_overlay.png") as im:
        assert im.size == (32, 32)
    with Image.open(out / "astronaut_heatmap.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200  # a figure with title and colour bar
    rec = json.loads((out / "heatmap.json").read_text())
    assert len(rec["components"]) == 2 and "CenterCrop" in rec["images"][imgs[0]]["placement"]
    assert main(["heatmap", *MODEL, imgs[0], *clip, "--property", "color", "--cache", str(root / "cache"),
                 "--out", str(out)]) == 0


def test_segment_folder(setup, capsys):
    root, _ = setup
    seg = root / "seg"
    for i, n in enumerate(PHOTOS[:3]):
        _save(seg / "images" / f"{n}.jpg", n)
        (seg / "masks").mkdir(exist_ok=True)
        mk = np.zeros((40, 40), np.uint8)
        mk[8:32, 5 + i:30] = 1
        Image.fromarray(mk).save(seg / "masks" / f"{n}.png")
    out = root / "seg_out"
    assert main(["segment", *MODEL, str(seg), "--examples", "2", "--no-progress", "--out", str(out)]) == 0
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["num_images"] == 3 and 0 <= rec["metrics"]["miou_foreground"] <= 1
    assert (out / "astronaut_saliency.png").exists() and (out / "astronaut_mask.png").exists()
    assert (out / "astronaut_figure.png").stat().st_size > 5000
    assert "mIoU (two-class)" in capsys.readouterr().out


def test_ablate_curves(setup, capsys):
    root, _ = setup
    for split, names in (("data", PHOTOS), ("held", PHOTOS[::-1])):
        for i, n in enumerate(names):
            _save(root / split / str(i % 2) / f"{n}.png", n)
    out = root / "abl"
    assert main(["ablate", *MODEL, "--data", str(root / "data"), "--heldout", str(root / "held"), "--steps", "4",
                 "--no-progress", "--out", str(out)]) == 0
    rec = json.loads((out / "curves.json").read_text())
    assert set(rec) == {"execution", "score"} and rec["execution"]["num_ablated"][0] == 0
    assert len(rec["score"]["accuracy"]) == 5 and (out / "curves.png").stat().st_size > 1000
    assert "nothing ablated" in capsys.readouterr().out


def test_spurious_waterbirds_layout(setup, capsys):
    root, clip = setup
    wb = root / "wb"
    rows = ["img_id,img_filename,y,split,place"]
    k = 0
    for split in (1, 2):
        for y in (0, 1):
            for place in (0, 1):
                n = PHOTOS[k % 4]
                _save(wb / f"{y}{place}" / f"{split}_{n}.png", n)
                rows.append(f"{k},{y}{place}/{split}_{n}.png,{y},{split},{place}")
                k += 1
    (wb / "metadata.csv").write_text("\n".join(rows) + "\n")
    out = root / "wb_out"
    assert main(["spurious", *MODEL, str(wb), *clip, "--k", "3", "--out", str(out)]) == 0
    rec = json.loads((out / "results.json").read_text())
    assert len(rec["components"]) == 3 and len(rec["before"]["groups"]) == 4 and rec["num_test"] == 4
    assert (out / "groups.png").exists()
    assert "worst group" in capsys.readouterr().out


def test_aligner_or_cache_of_another_model_is_refused(setup, capsys, tiny_clip_name):
    root, clip = setup
    img = str(root / "imgs" / "astronaut.png")
    cache_names = vitdecomp.ExtractionCache.open(root / "cache").names
    # an aligner for a deeper model: other components
    other = Aligner(torch.zeros(3, 192, 24), torch.zeros(24), ["embed", "blocks.0.mlp", "norm.bias"],
                    model_name=MODEL[0], clip_model=tiny_clip_name)
    other.save(root / "other.safetensors")
    bad = ["--aligner", str(root / "other.safetensors"), *clip[2:]]
    assert main(["heatmap", *MODEL, img, *bad, "--text", "x", "--k", "1", "--out", str(root / "h")]) == 2
    err = capsys.readouterr().err
    assert "aligner" in err and "belongs to another model" in err and "components differ" in err
    assert main(["retrieve", str(root / "cache"), *bad, "--property", "color", "--text", "x",
                 "--out", str(root / "r")]) == 2
    assert "belongs to another model" in capsys.readouterr().err
    # the right components, but recorded for another model string
    Aligner(torch.zeros(len(cache_names), 192, 24), torch.zeros(24), cache_names, model_name="timm:vit_small_x",
            clip_model=tiny_clip_name).save(root / "renamed.safetensors")
    assert main(["heatmap", *MODEL, img, "--aligner", str(root / "renamed.safetensors"), *clip[2:], "--text", "x",
                 "--k", "1", "--out", str(root / "h")]) == 2
    assert "made for 'timm:vit_small_x'" in capsys.readouterr().err
    # a cache of the same architecture with other (random) weights: the fingerprint differs
    assert main(["heatmap", *MODEL, "--init-seed", "1", img, *clip, "--text", "x", "--cache", str(root / "cache"),
                 "--out", str(root / "h")]) == 2
    err = capsys.readouterr().err
    assert "cache" in err and "fingerprint" in err and "--random-init seed" in err
    # the same seed (the default) in both commands: accepted
    assert main(["heatmap", *MODEL, img, *clip, "--text", "x", "--cache", str(root / "cache"),
                 "--out", str(root / "h")]) == 0


def test_random_text_model_is_seeded(tiny_clip_name):
    """--text-random-init builds the same text model in every command (chained commands compare the same texts)."""
    import argparse

    from vitdecomp._cli_apps import _encoder

    args = argparse.Namespace(text_model=f"open_clip:{tiny_clip_name}", text_random_init=True, text_weights=None,
                              text_cache=None, device="cpu", quiet=True, init_seed=0)
    al = Aligner(None, torch.zeros(24), ["a"], clip_model=f"open_clip:{tiny_clip_name}")
    a = _encoder(args, al).encode(["a red square"])
    torch.manual_seed(123)
    b = _encoder(args, al).encode(["a red square"])
    torch.testing.assert_close(a, b)


def test_heatmap_and_retrieve_aligner_of_other_weights(setup, capsys):
    """An aligner recording another model's weights (same names and sizes): heatmap refuses before decomposing,
    retrieve refuses the cache; --no-model-check applies it anyway."""
    root, clip = setup
    cache = vitdecomp.ExtractionCache.open(root / "cache")
    al = Aligner.load(root / "aligner.safetensors")
    al.model_fingerprint = cache.meta["model_fingerprint"]
    al.save(root / "fp.safetensors")
    mine = ["--aligner", str(root / "fp.safetensors"), *clip[2:]]
    img = str(root / "imgs" / "astronaut.png")
    head = ["--components", next(n for n in cache.names if ".head." in n)]
    assert main(["heatmap", *MODEL, img, *mine, "--text", "x", *head, "--out", str(root / "h1")]) == 0
    capsys.readouterr()
    # the same architecture with other weights: --init-seed 1
    assert main(["heatmap", *MODEL, "--init-seed", "1", img, *mine, "--text", "x", *head,
                 "--out", str(root / "h2")]) == 2
    err = capsys.readouterr().err
    assert al.model_fingerprint in err and "the model timm:deit_tiny_patch16_224" in err and "--no-model-check" in err
    assert not (root / "h2").exists() or not list((root / "h2").glob("*.npy"))
    assert main(["heatmap", *MODEL, "--init-seed", "1", img, *mine, "--text", "x", *head,
                 "--out", str(root / "h2"), "--no-model-check"]) == 0
    al.model_fingerprint = "0" * 32
    al.save(root / "fp0.safetensors")
    other = ["--aligner", str(root / "fp0.safetensors"), *clip[2:]]
    assert main(["retrieve", str(root / "cache"), *other, "--property", "color", "--text", "x",
                 "--out", str(root / "r0")]) == 2
    err = capsys.readouterr().err
    assert "0" * 32 in err and cache.meta["model_fingerprint"] in err
    assert main(["retrieve", str(root / "cache"), *other, "--property", "color", "--text", "x",
                 "--out", str(root / "r0"), "--no-model-check"]) == 0


def test_no_input_check_flag(setup, capsys):
    """Image files go through the model's preprocessing, so they pass the range check; the flag is accepted on
    every command that decomposes images and documented in --help."""
    for cmd in ("heatmap", "retrieve", "ablate", "spurious"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "--no-input-check" in capsys.readouterr().out
    root, clip = setup
    img = str(root / "imgs" / "astronaut.png")
    head = next(n for n in vitdecomp.ExtractionCache.open(root / "cache").names if ".head." in n)
    assert main(["heatmap", *MODEL, img, *clip, "--text", "x", "--components", head, "--out", str(root / "h3"),
                 "--no-input-check"]) == 0
