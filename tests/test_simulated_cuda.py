"""The CUDA path, checked without a GPU.

``vitdecomp.testing.simulated_cuda`` runs code on fake CUDA tensors (shape, dtype and device, no data): mixing
devices raises as on a GPU, and so does every operation that makes the host wait for the device. These tests
prove the checker catches what it claims to, then run decomposition (every family, via the conformance kit's
``check_cuda_placement`` in test_vit/test_swin/test_maxvit/test_open_clip), extraction's per-batch step and the
streaming applications on it. Numbers are checked on CPU elsewhere; here it is placement and synchronisation.
"""

import copy

import pytest
import timm
import torch

import vitdecomp
from vitdecomp import testing
from vitdecomp.engine import index_tensor, to_device, to_host, synchronize
from vitdecomp.testing import HostSyncError, simulated_cuda


def _tiny_vit():
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8, num_classes=5)
    return copy.deepcopy(m.eval())  # a fresh copy: fake-tensor conversion cannot swap parameters others refer to


# ---------------------------------------------------------------------------------------------------- the checker
SYNCS = {
    "item": lambda t: t.sum().item(),
    "float": lambda t: float(t.sum()),
    "bool": lambda t: bool((t > 0).all()),
    "mask indexing": lambda t: t[t > 0],
    "nonzero": lambda t: torch.nonzero(t),
    ".cpu()": lambda t: t.cpu(),
    "blocking .to('cuda')": lambda t: t + torch.ones(3).to("cuda"),
    "torch.tensor(device=cuda)": lambda t: t.index_select(0, torch.tensor([0, 2], device="cuda")),
}


@pytest.mark.parametrize("what", list(SYNCS))
def test_checker_catches_host_syncs(what):
    with pytest.raises(HostSyncError, match="host wait"):
        with simulated_cuda():
            SYNCS[what](torch.randn(3, device="cuda"))


def test_checker_catches_device_mixing():
    with pytest.raises(RuntimeError, match="same device"):
        with simulated_cuda():
            torch.randn(3, device="cuda") + torch.randn(3)


def test_checker_lets_asynchronous_work_through():
    with simulated_cuda() as sim:
        t = torch.randn(3, device="cuda")
        idx = index_tensor([2, 0], "cuda")  # staged through pinned memory
        rng = index_tensor([1, 2], "cuda")  # a range: arange on the device
        w = to_device(torch.ones(3, dtype=torch.float64), "cuda", torch.float32)
        h = to_host(t.index_select(0, idx) * w[:2] + t.index_select(0, rng))
        assert h.device.type == "cpu" and idx.device.type == rng.device.type == w.device.type == "cuda"
    assert sim.syncs == []


def test_allow_counts_blocking_copies_and_never_allows_reads():
    with simulated_cuda(allow=1) as sim:
        torch.randn(3, device="cuda").cpu()
    assert len(sim.syncs) == 1
    with pytest.raises(HostSyncError):
        with simulated_cuda(allow=1):
            t = torch.randn(3, device="cuda")
            t.cpu(), t.cpu()
    with pytest.raises(HostSyncError):
        with simulated_cuda(allow=5):
            float(torch.randn(3, device="cuda").sum())


def test_engine_helpers_are_the_plain_operations_on_cpu():
    v = [4, 1, 3]
    assert torch.equal(index_tensor(v, "cpu"), torch.tensor(v))
    assert torch.equal(index_tensor([2, 3, 4], "cpu"), torch.arange(2, 5))
    x = torch.randn(2, 3, dtype=torch.float64)
    assert torch.equal(to_device(x, "cpu", torch.float32), x.float())
    assert to_host(x) is x
    synchronize("cpu")


def test_check_cuda_placement_fails_for_an_adapter_that_reads_the_device():
    model = _tiny_vit()
    base = vitdecomp.find_adapter(model)

    class Reading(type(base)):
        def decompose(self, model, images, options):
            dec = super().decompose(model, images, options)
            if float(dec.contributions.abs().max()) > 1e6:  # a host read in the middle of the work
                raise RuntimeError("large")
            return dec

    reading = copy.copy(base)
    reading.__class__ = Reading
    with pytest.raises(HostSyncError, match=r"test_simulated_cuda.py:\d+ .*float\(dec.contributions"):
        testing.check_cuda_placement(model, (32, 32), adapter=reading, granularities=({"heads": True},))


# ---------------------------------------------------------------------------------------------------- public functions
def test_decompose_device_moves_images_without_waiting():
    model = _tiny_vit()
    fp = vitdecomp.weights_fingerprint(model)  # once, on the host: the default (hash at every call) would wait
    with simulated_cuda() as sim:
        with sim.paused():
            model.to("cuda")
        x = torch.randn(2, 3, 32, 32)  # host images: copied through pinned memory
        dec = vitdecomp.decompose(model, x, device="cuda", tokens="source", fingerprint=fp)
        assert dec.meta["model_fingerprint"] == fp
        z = vitdecomp.representation(model, x, device="cuda")
        assert dec.contributions.device.type == z.device.type == "cuda"
        assert dec.token_contributions(dec.names[2]).device.type == "cuda"
    assert sim.syncs == []


def test_decompose_device_cpu_is_the_default_result(photo_batch):
    model = _tiny_vit()
    x = photo_batch((32, 32))
    a = vitdecomp.decompose(model, x)
    b = vitdecomp.decompose(model, x, device="cpu")
    assert torch.equal(a.contributions, b.contributions)


@pytest.mark.parametrize("with_clip", [False, True])
def test_extraction_batch_step_never_waits(with_clip):
    import open_clip

    from vitdecomp.extraction import _extract_batch

    model = _tiny_vit()
    clip = None
    if with_clip:  # CLIP targets: a second model's forward, its embedding copied to the host asynchronously
        clip = copy.deepcopy(open_clip.CLIP(
            embed_dim=24, vision_cfg={"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
            text_cfg={"context_length": 8, "vocab_size": 50, "width": 16, "heads": 1, "layers": 1}).eval())
    dk = {"heads": True, "start": None, "bias": "explicit"}
    with simulated_cuda() as sim:
        with sim.paused():
            model.to("cuda")
            if clip is not None:
                clip.to("cuda")
        x = torch.randn(4, 3, 32, 32)  # what the (pinned) DataLoader hands over
        xc = torch.randn(4, 3, 32, 32) if with_clip else None
        out = _extract_batch(model, x, xc, clip, device=torch.device("cuda"), model_dtype=torch.float32, ac=None,
                             measure32=False, store_dtype=torch.float16, registry=None, dk=dk)
        assert out["contributions"].device.type == "cpu" and out["contributions"].dtype == torch.float16
        assert out["representation"].device.type == "cpu"
        assert out["error"].device.type == "cuda" and out["finite"].device.type == "cuda"  # read once per shard
        if with_clip:
            assert out["targets"].device.type == "cpu" and out["targets"].shape == (4, 24)
    assert sim.syncs == []


def _source(n=24, C=12, D=192):
    return torch.randn(n, C, D), [f"c{i}" for i in range(C)]


def test_streaming_functions_read_back_once_however_many_batches():
    """property scores, projections, retrieval, means and ablation curves: the number of blocking copies does not
    grow with the number of batches (6 here)."""
    from vitdecomp.ablation import ablation_curve, component_means, direct_effects, iter_source
    from vitdecomp.retrieval import component_projections, retrieve_by_image, retrieve_by_text

    acc = vitdecomp.StreamingScores(torch.randn(3, 192))  # the basis is orthonormalised on the host, outside
    with simulated_cuda(allow=0) as sim:
        c, names = _source()
        for _, cb, _ in iter_source(c, 4, device="cuda"):  # what property_scores does per batch
            acc.update(cb)
        assert acc._stats["m2_p"].device.type == "cuda" and acc.n == 24  # statistics stay on the device
    assert sim.syncs == []

    head = None

    checks = {  # function → how many blocking reads it may make in total
        "component_projections": (lambda c, n: component_projections(c, torch.randn(192), batch_size=4, device="cuda"), 1),
        "retrieve_by_text": (lambda c, n: retrieve_by_text(c, torch.randn(192), components=n[:3], names=n,
                                                           batch_size=4, device="cuda"), 1),
        "retrieve_by_image": (lambda c, n: retrieve_by_image(c, torch.randn(12, 192), components=n[:3], names=n,
                                                             batch_size=4, device="cuda"), 2),
        "component_means": (lambda c, n: component_means(c, batch_size=4, device="cuda"), 1),
        "direct_effects": (lambda c, n: direct_effects(c, torch.zeros(24, dtype=torch.long), head,
                                                       torch.zeros(12, 192), batch_size=4, device="cuda"), 1),
        "ablation_curve": (lambda c, n: ablation_curve(c, torch.zeros(24, dtype=torch.long), head,
                                                       torch.zeros(12, 192), n[:4], names=n, batch_size=4,
                                                       device="cuda"), 1),
    }
    for label, (fn, budget) in checks.items():
        head = torch.nn.Linear(192, 5)
        with simulated_cuda(allow=budget) as sim:
            with sim.paused():
                head.to("cuda")
            c, names = _source()
            fn(c, names)
        assert len(sim.syncs) <= budget, (label, sim.syncs)


def test_segment_on_simulated_cuda():
    model = _tiny_vit()
    with simulated_cuda(allow=1) as sim:
        with sim.paused():
            model.to("cuda")
        seg = vitdecomp.segment(model, torch.randn(2, 3, 32, 32), device="cuda")  # predicted classes
        assert seg.saliency.device.type == "cuda" and seg.saliency.shape == (2, 32, 32)
    assert len(sim.syncs) <= 1  # the class indices handed back on the host


def test_token_heatmap_on_simulated_cuda():
    model = _tiny_vit()
    with simulated_cuda() as sim:
        with sim.paused():
            model.to("cuda")
        dec = vitdecomp.decompose(model, torch.randn(2, 3, 32, 32, device="cuda"), tokens="source", fingerprint=False)
        hm = vitdecomp.token_heatmap(dec, text=torch.randn(192), components=list(dec.names[2:5]))
        assert hm.maps.device.type == "cuda" and hm.maps.shape == (2, 32, 32)
    assert sim.syncs == []
