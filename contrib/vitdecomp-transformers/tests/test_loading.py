"""``hf:<dir>`` loading on checkpoints the tests save themselves (no downloads), and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitdecomp

from hf_models import SIZE, build, clip_config, deit_config, dinov2_reg_config, transformers


def save(tmp_path, name, model, processor=None):
    d = tmp_path / name
    model.save_pretrained(d)
    if processor is not None:
        processor.save_pretrained(d)
    return str(d)


def image():
    from PIL import Image

    return Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype("uint8"))


@pytest.mark.parametrize("cls_name,config,processor", [
    ("DeiTForImageClassificationWithTeacher", deit_config, lambda: transformers.ViTImageProcessor(
        size={"height": SIZE, "width": SIZE})),
    ("Dinov2WithRegistersModel", dinov2_reg_config, lambda: transformers.BitImageProcessor(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})),
    ("CLIPModel", clip_config, lambda: transformers.CLIPImageProcessor(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})),
])
def test_load_saved_checkpoint_and_decompose(tmp_path, registry, cls_name, config, processor):
    model = build(cls_name, config())
    path = save(tmp_path, cls_name, model, processor())
    loaded = vitdecomp.load_model(f"hf:{path}", registry=registry)
    assert type(loaded.model).__name__ == cls_name and not loaded.model.training
    assert loaded.name == f"hf:{path}"
    x = loaded.preprocess(image()).unsqueeze(0)
    assert x.shape == (1, 3, SIZE, SIZE)
    dec = vitdecomp.decompose(loaded.model, x, registry=registry, check=True)
    with torch.no_grad():
        ref = vitdecomp.representation(model, x, registry=registry)
    torch.testing.assert_close(dec.representation, ref)  # the saved weights came back
    # random_init builds the same class from the saved config, with other weights
    rnd = vitdecomp.load_model(f"hf:{path}", random_init=True, registry=registry)
    assert type(rnd.model) is type(loaded.model)
    # weights=DIR loads from a local directory whatever the spec says
    again = vitdecomp.load_model("hf:someone/else", weights=path, registry=registry)
    assert type(again.model) is type(loaded.model)


def test_checkpoint_without_image_processor_still_loads(tmp_path, registry):
    path = save(tmp_path, "vit", build("ViTModel", transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=SIZE, patch_size=8)))
    with pytest.warns(RuntimeWarning, match="no image processor"):
        loaded = vitdecomp.load_model(f"hf:{path}", registry=registry)
    vitdecomp.decompose(loaded.model, torch.randn(1, 3, SIZE, SIZE), registry=registry, check=True)
    with pytest.raises(vitdecomp.WeightsUnavailableError, match="image processor"):
        loaded.preprocess(image())


def test_missing_directory(tmp_path, registry):
    with pytest.raises(vitdecomp.WeightsUnavailableError, match="does not exist"):
        vitdecomp.load_model(f"hf:{tmp_path / 'nope'}", registry=registry)
    with pytest.raises(vitdecomp.WeightsUnavailableError, match="does not exist"):
        vitdecomp.load_model("hf:google/vit-base-patch16-224", weights=tmp_path / "nope", registry=registry)


def test_offline_repo_id_says_how_to_pass_a_local_dir(monkeypatch, registry):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast instead of retrying
    with pytest.raises(vitdecomp.WeightsUnavailableError) as info:
        vitdecomp.load_model("hf:google/vit-base-patch16-224", registry=registry)
    msg = str(info.value)
    assert "hf:google/vit-base-patch16-224" in msg and "'hf:DIR'" in msg and "--local-dir" in msg


SWIN = dict(image_size=SIZE, patch_size=4, embed_dim=16, depths=[1, 2], num_heads=[2, 4], window_size=2, mlp_ratio=2.0)


def swin_processor():  # Swin checkpoints ship a ViTImageProcessor; mean/std away from the defaults
    return transformers.ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.2, 0.4, 0.6],
                                          image_std=[0.5, 0.25, 0.3])


@pytest.mark.parametrize("cls_name,config", [
    ("SwinModel", lambda: transformers.SwinConfig(**SWIN)),
    ("SwinForImageClassification", lambda: transformers.SwinConfig(num_labels=5, **SWIN)),
    ("Swinv2Model", lambda: transformers.Swinv2Config(attn_implementation="eager", **SWIN)),
    ("Swinv2ForImageClassification", lambda: transformers.Swinv2Config(attn_implementation="eager", num_labels=5,
                                                                       **SWIN)),
])
def test_load_saved_swin_checkpoint(tmp_path, registry, cls_name, config):
    model = build(cls_name, config())
    proc = swin_processor()
    path = save(tmp_path, cls_name, model, proc)
    loaded = vitdecomp.load_model(f"hf:{path}", registry=registry)
    assert type(loaded.model).__name__ == cls_name and not loaded.model.training
    assert registry.find_adapter(loaded.model).name == "transformers-swin"
    img = image()
    x = loaded.preprocess(img).unsqueeze(0)  # the saved processor's size, mean and std
    torch.testing.assert_close(x, proc(images=img, return_tensors="pt")["pixel_values"], rtol=0, atol=0)
    dec = vitdecomp.decompose(loaded.model, x, registry=registry, check=True, tokens="source")
    with torch.no_grad():
        ref = vitdecomp.representation(model, x, registry=registry)
    torch.testing.assert_close(dec.representation, ref)  # the saved weights came back
    assert dec.spatial_map("stages.0.blocks.0.attn.head.0").shape[1:3] == (SIZE // 4, SIZE // 4)
    if "Classification" in cls_name:
        head = registry.find_adapter(loaded.model).readout(loaded.model)
        with torch.no_grad():
            torch.testing.assert_close(head(dec.representation), loaded.model(pixel_values=x).logits)
    rnd = vitdecomp.load_model(f"hf:{path}", random_init=True, registry=registry)
    assert type(rnd.model) is type(loaded.model)


def test_swin_base_class_from_model_type(tmp_path, registry):
    """A Swin checkpoint of a class the pack does not decompose (masked image modelling) loads as the base model
    of its model_type, with the weights of that base."""
    model = build("SwinForMaskedImageModeling", transformers.SwinConfig(**SWIN))
    path = save(tmp_path, "mim", model, swin_processor())
    loaded = vitdecomp.load_model(f"hf:{path}", registry=registry)
    assert type(loaded.model).__name__ == "SwinModel"
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(pixel_values=x).last_hidden_state,
                                   model.swin(pixel_values=x).last_hidden_state)


def test_swin_from_hub_id_offline(tmp_path, monkeypatch, registry):
    """``hf:<org>/<name>`` goes through ``from_pretrained`` and the hub cache (populated here, read offline)."""
    import huggingface_hub.constants

    model = build("Swinv2ForImageClassification", transformers.Swinv2Config(attn_implementation="eager",
                                                                            num_labels=3, **SWIN))
    snap = tmp_path / "hub" / "models--tiny-org--swinv2-test"
    rev = "0123456789abcdef0123456789abcdef01234567"
    model.save_pretrained(snap / "snapshots" / rev)
    swin_processor().save_pretrained(snap / "snapshots" / rev)
    (snap / "refs").mkdir()
    (snap / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = vitdecomp.load_model("hf:tiny-org/swinv2-test", registry=registry)
    assert type(loaded.model).__name__ == "Swinv2ForImageClassification"
    x = loaded.preprocess(image()).unsqueeze(0)
    assert x.shape == (1, 3, SIZE, SIZE)
    dec = vitdecomp.decompose(loaded.model, x, registry=registry, check=True)
    with torch.no_grad():
        torch.testing.assert_close(dec.representation, vitdecomp.representation(model, x, registry=registry))
    with pytest.raises(vitdecomp.WeightsUnavailableError, match="'hf:DIR'"):  # not in the cache: how to get it
        vitdecomp.load_model("hf:tiny-org/not-cached", registry=registry)


def test_unsupported_architecture(tmp_path, registry):
    cfg = transformers.ConvNextConfig(image_size=SIZE, num_channels=3, hidden_sizes=[8, 16], depths=[1, 1],
                                      num_stages=2)
    path = save(tmp_path, "convnext", transformers.ConvNextModel(cfg))
    with pytest.raises(vitdecomp.UnknownModelError, match="ConvNextModel") as info:
        vitdecomp.load_model(f"hf:{path}", registry=registry)
    assert "Swinv2ForImageClassification" in str(info.value) and "swinv2" in str(info.value)
    with pytest.raises(vitdecomp.UnknownModelError, match="names no repository"):
        vitdecomp.load_model("hf:", registry=registry)
