"""Text embeddings with a real (random-init, small) open_clip model: template averaging, caches, loading."""

import pytest
import torch

import open_clip
from open_clip import zero_shot_metadata

from vitdecomp.errors import EmptyDatasetError, InputError, UnknownModelError, WeightsUnavailableError
from vitdecomp.text import DEFAULT_TEXT_POOL, TextEncoder, load_text_pool

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_name():
    """Register a tiny architecture so open_clip's own factory (create_model_and_transforms) builds it."""
    name = "vitdecomp-test-tiny-text"
    open_clip.factory._MODEL_CONFIGS[name] = TINY
    yield name
    open_clip.factory._MODEL_CONFIGS.pop(name, None)


@pytest.fixture(scope="module")
def encoder(tiny_name):
    torch.manual_seed(0)
    return TextEncoder.from_pretrained(tiny_name, pretrained=None)


def test_imagenet_template_average(encoder):
    emb = encoder.encode(["red color", "a dog"], progress=False)
    assert emb.shape == (2, 32) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    templates = zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES
    assert len(templates) == 80
    with torch.no_grad():
        per = encoder.model.encode_text(encoder.tokenizer([t("red color") for t in templates]))
    manual = torch.nn.functional.normalize(torch.nn.functional.normalize(per, dim=-1).mean(0), dim=0)
    torch.testing.assert_close(emb[0], manual, rtol=1e-5, atol=1e-5)


def test_raw_and_custom_templates(encoder):
    raw = encoder.encode(["red color"], templates=None)
    with torch.no_grad():
        direct = torch.nn.functional.normalize(encoder.model.encode_text(encoder.tokenizer(["red color"])), dim=-1)
    torch.testing.assert_close(raw, direct, rtol=1e-5, atol=1e-5)
    custom = encoder.encode(["red color"], templates=["a photo of {}.", lambda c: f"art of {c}."])
    assert not torch.allclose(custom, raw)
    with pytest.raises(InputError, match="'{}'"):
        encoder.encode(["x"], templates=["no placeholder"])
    with pytest.raises(InputError, match="Unknown template set"):
        encoder.encode(["x"], templates="cifar")
    with pytest.raises(InputError, match="not a single string"):
        encoder.encode("red color")


def test_memory_and_disk_cache(tiny_name, tmp_path, monkeypatch):
    torch.manual_seed(1)
    enc = TextEncoder.from_pretrained(tiny_name, cache_dir=tmp_path)
    first = enc.encode(["striped pattern", "sea"], progress=False)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and enc.identity.split("#")[0].replace(":", "_") in files[0].name
    # a fresh encoder with the same weights reads the disk cache without calling the model
    enc2 = TextEncoder(enc.model, enc.tokenizer, enc.name, cache_dir=tmp_path)

    def boom(*a, **k):
        raise AssertionError("model called although the text is cached")

    with monkeypatch.context() as m:
        m.setattr(TextEncoder, "_encode_prompts", boom)
        torch.testing.assert_close(enc2.encode(["sea", "striped pattern"]), first.flip(0))
        torch.testing.assert_close(enc.encode(["sea"]), first[1:])  # the in-memory cache
    # other weights under the same name: another identity, so the cache is not reused
    torch.manual_seed(2)
    other = TextEncoder.from_pretrained(tiny_name, cache_dir=tmp_path)
    assert other.identity != enc.identity
    assert not torch.allclose(other.encode(["sea"], progress=False), first[1:])


def test_from_pretrained_checkpoint_path(tiny_name, tmp_path, encoder):
    path = tmp_path / "tiny.pt"
    torch.save(encoder.model.state_dict(), path)
    loaded = TextEncoder.from_pretrained(f"open_clip:{tiny_name}", pretrained=str(path))
    assert loaded.identity.split("#")[1] == encoder.identity.split("#")[1]
    torch.testing.assert_close(loaded.encode(["car"]), encoder.encode(["car"]))


def test_from_pretrained_errors(tiny_name):
    with pytest.raises(UnknownModelError, match="no model 'ViT-Q-99'"):
        TextEncoder.from_pretrained("ViT-Q-99")
    with pytest.raises(WeightsUnavailableError, match="local checkpoint"):
        TextEncoder.from_pretrained(tiny_name, pretrained="/nonexistent/weights.pt")


def test_from_model_and_errors(encoder):
    enc = TextEncoder.from_model(encoder.model, name="mine")
    torch.testing.assert_close(enc.encode(["van"]), encoder.encode(["van"]))
    assert enc.dim == 32
    with pytest.raises(InputError, match="encode_text"):
        TextEncoder(torch.nn.Linear(2, 2), encoder.tokenizer, "linear")


def test_default_text_pool():
    pool = load_text_pool()
    assert 3000 <= len(pool) <= 4000 and len(set(pool)) == len(pool)
    assert all(p and not p.startswith("#") for p in pool)
    assert "Red color" in pool and "Photo of a dog" in pool


def test_default_pool_is_reproducible(tmp_path):
    from vitdecomp.data.make_textpool import build_pool, main

    main(["--out", str(tmp_path / "pool.txt")])
    assert load_text_pool(tmp_path / "pool.txt") == load_text_pool(DEFAULT_TEXT_POOL) == build_pool()


def test_user_text_pool(tmp_path):
    f = tmp_path / "pool.txt"
    f.write_text("# comment\nA dog\n\nA cat\nA dog\n")
    assert load_text_pool(f) == ["A dog", "A cat"]
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(EmptyDatasetError):
        load_text_pool(tmp_path / "empty.txt")
    with pytest.raises(InputError, match="does not exist"):
        load_text_pool(tmp_path / "missing.txt")
