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


def test_unsupported_architecture(tmp_path, registry):
    cfg = transformers.SwinConfig(image_size=SIZE, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                  window_size=4)
    path = save(tmp_path, "swin", transformers.SwinModel(cfg))
    with pytest.raises(vitdecomp.UnknownModelError, match="SwinModel"):
        vitdecomp.load_model(f"hf:{path}", registry=registry)
    with pytest.raises(vitdecomp.UnknownModelError, match="names no repository"):
        vitdecomp.load_model("hf:", registry=registry)
