"""Dataset extraction with a real (random-init, tiny) timm ViT and open_clip CLIP: cache contents, resume,
mismatch detection, memory-mapped reads, and the end-to-end path images → extract → align → scores → TextSpan."""

import json

import pytest
import timm
import torch
from PIL import Image
from skimage import data as skdata

import open_clip
import vitdecomp
from vitdecomp.errors import EmptyDatasetError, InputError, MismatchError
from vitdecomp.extraction import ExtractionCache, extract

CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _tiny_vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16, depth=2,
                             num_classes=0).eval()


def _images():
    """16 small RGB images from scikit-image with class labels."""
    base = {"people": skdata.astronaut(), "cats": skdata.chelsea(), "objects": skdata.coffee(), "space": skdata.rocket()}
    out = []
    for label, arr in base.items():
        im = Image.fromarray(arr)
        w, h = im.size
        variants = [im, im.transpose(Image.FLIP_LEFT_RIGHT), im.crop((0, 0, w // 2, h // 2)),
                    im.crop((w // 2, h // 2, w, h))]
        out += [(v.resize((40, 40)), label) for v in variants]
    return out


class _PILDataset(torch.utils.data.Dataset):
    def __init__(self, items, fail_at=None):
        self.items, self.fail_at, self.seen = items, fail_at, []

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise RuntimeError("simulated crash")
        self.seen.append(i)
        return self.items[i]


def _pre():
    from torchvision import transforms as T

    return T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])


@pytest.fixture(scope="module")
def clip_pair():
    name = "vitdecomp-test-tiny-extract"
    open_clip.factory._MODEL_CONFIGS[name] = CLIP_CFG
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    open_clip.factory._MODEL_CONFIGS.pop(name, None)
    return model.eval(), preprocess


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for k, (im, label) in enumerate(_images()):
        (root / label).mkdir(exist_ok=True)
        im.save(root / label / f"img{k:02d}.{'jpg' if k % 2 else 'png'}")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def vit():
    return _tiny_vit()


@pytest.fixture(scope="module")
def cache(tmp_path_factory, folder, vit, clip_pair):
    out = tmp_path_factory.mktemp("cache")
    return extract(vit, folder, out, preprocess=_pre(), clip=clip_pair, clip_name="tiny-clip", batch_size=5,
                   shard_size=6, dtype=torch.float32, progress=False)


def test_folder_cache_contents(cache, folder, vit, clip_pair):
    assert len(cache) == 16 and cache.shard_ranges == [(0, 6), (6, 12), (12, 16)]
    assert cache.labels() == ["cats"] * 4 + ["objects"] * 4 + ["people"] * 4 + ["space"] * 4
    assert cache.paths()[0].startswith("cats/") and cache.clip_model == "tiny-clip"
    assert cache.model_name == "timm:vit_tiny_patch16_224" and cache.max_error < 1e-5
    c = cache.contributions()
    assert c.shape == (16, len(cache.names), 192) and c.dtype == torch.float32
    # contributions sum to the model's own representation of the preprocessed image
    pre = _pre()
    paths = cache.paths()
    x = torch.stack([pre(Image.open(folder / p).convert("RGB")) for p in paths[:4]])
    z = vitdecomp.representation(vit, x)
    torch.testing.assert_close(c[:4].sum(1), z, rtol=1e-4, atol=1e-4)
    dec = vitdecomp.decompose(vit, x)
    assert cache.names == dec.names
    # targets: CLIP's own preprocessing of the raw image, normalised
    model, cpre = clip_pair
    with torch.no_grad():
        t = model.encode_image(torch.stack([cpre(Image.open(folder / p).convert("RGB")) for p in paths[:4]]))
    torch.testing.assert_close(cache.targets()[:4], torch.nn.functional.normalize(t, dim=-1), rtol=1e-5, atol=1e-5)


def test_indexed_reads_and_batches(cache):
    full = cache.contributions()
    idx = [13, 2, 7, 7, -1]
    torch.testing.assert_close(cache.contributions(idx), full[[13, 2, 7, 7, 15]])
    torch.testing.assert_close(cache.targets([0, 15]), cache.targets()[[0, 15]])
    batches = list(cache.batches(batch_size=4))
    assert [len(b.indices) for b in batches] == [4, 2, 4, 2, 4]
    torch.testing.assert_close(torch.cat([b.contributions for b in batches]), full)
    assert sum((b.labels for b in batches), []) == cache.labels()
    with pytest.raises(InputError, match="out of range"):
        cache.contributions([16])
    assert "16 images" in repr(cache)


def test_resume_after_a_crash(tmp_path, vit):
    items = _images()[:10]
    pre = _pre()
    crashing = _PILDataset(items, fail_at=7)
    with pytest.raises(InputError, match="dataset item 7 cannot be read: RuntimeError: simulated crash"):
        extract(vit, crashing, tmp_path, preprocess=pre, shard_size=4, batch_size=2, progress=False)
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-00000.safetensors"]
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(InputError, match="incomplete"):
        ExtractionCache.open(tmp_path)
    assert len(ExtractionCache.open(tmp_path, allow_partial=True)) == 4
    first = (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns
    ok = _PILDataset(items)
    cache = extract(vit, ok, tmp_path, preprocess=pre, shard_size=4, batch_size=2, progress=False)
    # shard 0 was not recomputed: its samples were read once only to verify their content digests
    assert sorted(ok.seen) == list(range(10))
    assert (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns == first
    assert len(cache) == 10 and cache.dtype == torch.float16 and cache.labels()[0] == "people"
    # same result as an uninterrupted run
    fresh = extract(vit, _PILDataset(items), tmp_path / "fresh", preprocess=pre, shard_size=4, batch_size=2,
                    progress=False)
    torch.testing.assert_close(cache.contributions(), fresh.contributions(), rtol=0, atol=0)


def test_mismatch_is_detected_and_resume_false_overwrites(tmp_path, vit):
    items = _images()[:3]
    pre = _pre()
    extract(vit, _PILDataset(items), tmp_path, preprocess=pre, progress=False)
    with pytest.raises(MismatchError, match="model_fingerprint"):
        extract(_tiny_vit(seed=1), _PILDataset(items), tmp_path, preprocess=pre, progress=False)
    with pytest.raises(MismatchError, match="decompose: cache has .*'heads': True.*now .*'heads': False"):
        extract(vit, _PILDataset(items), tmp_path, preprocess=pre, decompose_kwargs={"heads": False}, progress=False)
    with pytest.raises(MismatchError, match="num_images"):
        extract(vit, _PILDataset(items[:2]), tmp_path, preprocess=pre, progress=False)
    cache = extract(vit, _PILDataset(items), tmp_path, preprocess=pre, decompose_kwargs={"heads": False},
                    resume=False, progress=False)
    assert not any(".head." in n for n in cache.names)
    assert json.loads((tmp_path / "meta.json").read_text())["decompose"]["heads"] is False


def test_input_errors(tmp_path, vit, clip_pair):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyDatasetError, match="no images"):
        extract(vit, tmp_path / "empty", tmp_path / "out", progress=False)
    tensors = [(torch.randn(3, 32, 32), 0)]
    with pytest.raises(InputError, match="raw image"):
        extract(vit, tensors, tmp_path / "out2", clip=clip_pair, progress=False)
    with pytest.raises(InputError, match="token-level"):
        extract(vit, tensors, tmp_path / "out3", decompose_kwargs={"tokens": "source"}, progress=False)
    with pytest.raises(InputError, match="not an extraction cache"):
        ExtractionCache.open(tmp_path)
    # tensors without CLIP are fine, labels come from the dataset
    cache = extract(vit, tensors, tmp_path / "out4", progress=False)
    assert cache.labels() == [0] and not cache.has_targets
    with pytest.raises(InputError, match="no CLIP targets"):
        cache.targets()


def test_default_timm_preprocessing_follows_the_model_size(tmp_path, vit):
    cache = extract(vit, _PILDataset(_images()[:2]), tmp_path, progress=False)  # no preprocess given
    assert len(cache) == 2 and cache.dim == 192


def test_float16_overflow_is_reported(tmp_path, vit):
    big = _tiny_vit()
    with torch.no_grad():
        big.norm.weight.mul_(1e6)  # representation values far beyond float16's range
    with pytest.raises(InputError, match="overflow float16"):
        extract(big, [(torch.randn(3, 32, 32), 0)], tmp_path, progress=False)


def test_end_to_end_extract_align_score_describe(cache):
    from vitdecomp.compalign import fit_aligner
    from vitdecomp.scores import StreamingScores, variance_attributed
    from vitdecomp.spans import textspan_all

    torch.manual_seed(0)
    aligner = fit_aligner(cache, val_fraction=0.25, max_epochs=5, batch_size=8, progress=False)
    assert aligner.names == cache.names and aligner.model_name == cache.model_name
    assert aligner.clip_model == "tiny-clip" and aligner.out_dim == 16
    assert -1 <= aligner.held_out_cosine <= 1
    aligned = aligner(cache.contributions())
    assert aligned.shape == (16, len(cache.names), 16)
    basis = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    st, parts = StreamingScores(basis), []
    for _, batch in aligner.iter_aligned(cache, batch_size=5):
        st.update(batch)
        parts.append(batch)
    torch.testing.assert_close(torch.cat(parts), aligned)
    torch.testing.assert_close(st.variance_attributed(), variance_attributed(torch.cat(parts), basis), rtol=0, atol=1e-10)
    texts = torch.nn.functional.normalize(torch.randn(20, 16), dim=-1)
    desc = textspan_all(aligned, cache.names, texts, [f"t{i}" for i in range(20)], iters=3, rank=8,
                        components=list(cache.names[:2]), progress=False)
    assert set(desc) == set(cache.names[:2]) and all(len(v) == 3 for v in desc.values())


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_reduced_precision_extraction_records_error_vs_float32(tmp_path, family):
    """Two batches per shard: the first measures the error against float32, the others only run reduced (the
    second batch of a Swin shard used to crash: the readout ran under the shard's autocast)."""
    import timm

    torch.manual_seed(0)
    if family == "vit":
        m = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8).eval()
        size = 32
    else:
        m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4,
                              embed_dim=16, depths=(1, 1), num_heads=(1, 2)).eval()
        size = 32
    data = torch.utils.data.TensorDataset(torch.randn(5, 3, size, size), torch.zeros(5, dtype=torch.long))
    cache = extract(m, data, tmp_path / "c", batch_size=2, shard_size=3, dtype=torch.float32, progress=False,
                    autocast="bf16", model_name="tiny")
    errs = cache.shard_errors_vs_float32
    assert len(errs) == 2 and all(1e-6 < e < 0.1 for e in errs)
    with pytest.raises(vitdecomp.MismatchError, match="autocast"):
        extract(m, data, tmp_path / "c", batch_size=2, shard_size=3, dtype=torch.float32, progress=False,
                model_name="tiny")
