"""Bad input gets clear errors; model loading from strings and local checkpoints."""

import pytest
import timm
import torch

import vitdecomp


def tiny(**kw):
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8, **kw).eval()


@pytest.mark.parametrize(
    "images, needle",
    [
        (torch.randn(3, 32, 32), "4-D"),
        (torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), "floating-point"),
        (torch.randn(1, 1, 32, 32), "1 channels; this model takes 3"),
        (torch.randn(1, 3, 64, 64), "does not match the model's fixed input size 32×32"),
        (torch.randn(0, 3, 32, 32), "empty batch"),
        (torch.randn(1, 3, 32, 32, dtype=torch.float64), "float64 but the model's parameters are torch.float32"),
        ([[0.0]], "torch.Tensor"),
    ],
)
def test_bad_images(images, needle):
    with pytest.raises(vitdecomp.InputError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        vitdecomp.decompose(tiny(), images)


def test_training_mode_is_refused():
    m = tiny().train()
    with pytest.raises(vitdecomp.InputError, match="training mode.*model.eval"):
        vitdecomp.decompose(m, torch.randn(1, 3, 32, 32))


def test_dynamic_size_must_divide_patch():
    m = tiny(dynamic_img_size=True)
    assert vitdecomp.decompose(m, torch.randn(1, 3, 48, 40)).error < 1e-5
    with pytest.raises(vitdecomp.InputError, match="not divisible by the patch size 8×8"):
        vitdecomp.decompose(m, torch.randn(1, 3, 36, 32))


def test_unsupported_structure_named():
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8,
                          global_pool="max").eval()
    with pytest.raises(vitdecomp.UnsupportedModelError, match="global_pool='max'"):
        vitdecomp.decompose(m, torch.randn(1, 3, 32, 32))


def test_bad_options():
    with pytest.raises(ValueError, match="tokens"):
        vitdecomp.decompose(tiny(), torch.randn(1, 3, 32, 32), tokens="target")
    with pytest.raises(ValueError, match="bias"):
        vitdecomp.decompose(tiny(), torch.randn(1, 3, 32, 32), bias="smear")
    with pytest.raises(vitdecomp.InputError, match="out of range"):
        vitdecomp.decompose(tiny(), torch.randn(1, 3, 32, 32), start=5)


def test_check_raises_on_excess_error():
    dec = vitdecomp.decompose(tiny(), torch.randn(1, 3, 32, 32), check=True)
    dec.contributions[:, 0] += 1.0
    dec2 = vitdecomp.Decomposition(dec.contributions, dec.components, dec.representation, meta=dec.meta)
    with pytest.raises(vitdecomp.ReconstructionError, match="exceeds the tolerance 1e-05"):
        dec2.check()


# ---------------------------------------------------------------- loading

def test_unknown_model_strings():
    with pytest.raises(vitdecomp.UnknownModelError, match="no prefix"):
        vitdecomp.load_model("deit_base_patch16_224")
    with pytest.raises(vitdecomp.UnknownModelError, match="registered prefixes"):
        vitdecomp.load_model("keras:vit")
    with pytest.raises(vitdecomp.UnknownModelError, match="deit_base_patch16_224"):
        vitdecomp.load_model("timm:deit_bse_patch16_224", random_init=True)
    with pytest.raises(vitdecomp.UnknownModelError, match="ViT-B-32"):
        vitdecomp.load_model("open_clip:ViT-B-3", random_init=True)


def test_timm_local_checkpoint_roundtrip(tmp_path):
    from safetensors.torch import save_file

    kw = dict(depth=2, img_size=64)
    src = timm.create_model("deit_tiny_patch16_224", pretrained=False, **kw)
    path = tmp_path / "deit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    loaded = vitdecomp.load_model("timm:deit_tiny_patch16_224", weights=path, **kw)
    assert not loaded.model.training and loaded.name == "timm:deit_tiny_patch16_224"
    for (k, a), b in zip(src.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), k
    model, preprocess = loaded  # unpacks like a pair
    from PIL import Image

    x = preprocess(Image.new("RGB", (300, 250), (120, 30, 200))).unsqueeze(0)
    assert x.shape == (1, 3, 64, 64)
    assert vitdecomp.decompose(model, x, check=True).error < 1e-5


def test_open_clip_local_checkpoint_roundtrip(tmp_path, tiny_clip_name):
    import open_clip

    src = open_clip.create_model(tiny_clip_name, pretrained=None)
    path = tmp_path / "clip.pt"
    torch.save(src.state_dict(), path)
    loaded = vitdecomp.load_model(f"open_clip:{tiny_clip_name}", weights=path)
    assert torch.equal(loaded.model.visual.proj, src.visual.proj)
    assert loaded.tokenizer is not None
    from PIL import Image

    x = loaded.preprocess(Image.new("RGB", (40, 50), (10, 200, 30))).unsqueeze(0)
    dec = vitdecomp.decompose(loaded.model, x, check=True)
    torch.testing.assert_close(dec.representation, loaded.model.encode_image(x))


def test_offline_pretrained_error_says_how_to_pass_weights():
    with pytest.raises(vitdecomp.WeightsUnavailableError, match="weights=PATH"):
        vitdecomp.load_model("timm:deit_tiny_patch16_224")
    with pytest.raises(vitdecomp.WeightsUnavailableError, match="does not exist"):
        vitdecomp.load_model("timm:deit_tiny_patch16_224", weights="/nonexistent/ckpt.safetensors")
    with pytest.raises(vitdecomp.WeightsUnavailableError, match="pretrained tag"):
        vitdecomp.load_model("open_clip:ViT-B-32")


def test_random_init_is_seeded_and_loaded_models_are_accepted_everywhere():
    """load_model(random_init=True) gives the same model in every call (chained CLI commands see one model), and
    every function that takes a model takes the LoadedModel load_model returns."""
    from vitdecomp.ablation import prediction_head
    from vitdecomp.segmentation import input_size, segment

    kw = dict(random_init=True, img_size=32, depth=1, patch_size=8)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = vitdecomp.load_model("timm:deit_tiny_patch16_224", **kw)
    assert torch.equal(torch.rand(1), before)  # the caller's generator is left as it was
    b = vitdecomp.load_model("timm:deit_tiny_patch16_224", **kw)
    c = vitdecomp.load_model("timm:deit_tiny_patch16_224", seed=1, **kw)
    sa, sb, sc = (m.model.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    x = torch.randn(2, 3, 32, 32)
    ref = vitdecomp.decompose(a.model, x)
    for fn in (lambda m: vitdecomp.decompose(m, x).contributions, lambda m: vitdecomp.representation(m, x),
               lambda m: segment(m, x).saliency):
        torch.testing.assert_close(fn(a), fn(a.model))
    assert vitdecomp.find_adapter(a).name == vitdecomp.find_adapter(a.model).name
    assert input_size(a) == (32, 32)
    torch.testing.assert_close(prediction_head(a)(ref.representation), prediction_head(a.model)(ref.representation))
