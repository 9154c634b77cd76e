import os

import pytest
import torch

# Never wait on a hub that cannot be reached from CI machines.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The test models are tiny: intra-op threads only add synchronisation, and contention on a shared 2-core box.
torch.set_num_threads(1)


@pytest.fixture
def photo_batch():
    """Real photographs (scikit-image ships them) resized to ``size`` and normalised: a [B, 3, H, W] tensor."""

    def make(size=(32, 32), names=("astronaut", "coffee", "chelsea", "rocket"), dtype=torch.float32):
        from skimage import data

        imgs = []
        for n in names:
            a = torch.as_tensor(getattr(data, n)()).permute(2, 0, 1).float() / 255.0
            a = torch.nn.functional.interpolate(a[None], size=size, mode="bilinear", antialias=True)[0]
            imgs.append((a - 0.5) / 0.25)
        return torch.stack(imgs).to(dtype)

    return make


TINY_CLIP = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_clip_name(tmp_path_factory):
    """Register a tiny open_clip architecture config (open_clip.add_model_config) and return its name."""
    import json

    import open_clip

    d = tmp_path_factory.mktemp("clip_cfg")
    (d / "vitdecomp-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(d)
    return "vitdecomp-tiny-clip"
