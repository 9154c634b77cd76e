"""Nothing stale, nothing lost, nothing silent (issue 14): cache identity and checksums, folder ownership, corrupt
images, output paths, a SIGKILLed extraction resumed; all on real files with a tiny random timm ViT."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import vitdecomp
from vitdecomp._fingerprint import weights_fingerprint
from vitdecomp.errors import CorruptCacheError, InputError, MismatchError, OutputError
from vitdecomp.extraction import ExtractionCache, extract


def _vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16, depth=1,
                             num_classes=0).eval()


@pytest.fixture(scope="module")
def vit():
    return _vit()


class _Tensors(torch.utils.data.Dataset):
    def __init__(self, n=6, seed=0, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g).to(dtype)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 2


def _folder(root: Path, n=6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    for k in range(n):
        arr = (torch.rand(24, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"img{k}.png")
    return root


def _pre():
    from torchvision import transforms as T

    return T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])


def _run(model, data, out, **kw):
    kw.setdefault("preprocess", _pre())
    return extract(model, data, out, shard_size=2, batch_size=2, progress=False, **kw)


# ------------------------------------------------------------------------------------------------ fingerprints


def test_weight_fingerprint_sees_every_change_including_permutations():
    m = _vit()
    fp = weights_fingerprint(m)
    assert fp == weights_fingerprint(_vit()) and len(fp) == 32  # same weights, same digest
    with torch.no_grad():
        w = m.blocks[0].mlp.fc1.weight
        w[[0, 1]] = w[[1, 0]]  # a permutation keeps every statistic of the values
    fp_perm = weights_fingerprint(m)
    assert fp_perm != fp
    with torch.no_grad():
        w[[0, 1]] = w[[1, 0]]
    assert weights_fingerprint(m) == fp
    m.norm.bias.data[3] += 1e-7  # one value, changed through .data (no version counter sees it)
    assert weights_fingerprint(m) != fp
    m2 = _vit()
    m2.register_buffer("extra", torch.zeros(2))
    assert weights_fingerprint(m2) != fp  # buffers count


# ------------------------------------------------------------------------------------------------ identity


def test_images_changed_in_place_are_detected_on_resume(tmp_path, vit):
    root = _folder(tmp_path / "imgs", 4)
    _run(vit, root, tmp_path / "c")
    f = root / "img1.png"
    st = f.stat()
    im = Image.open(f).convert("RGB")
    im.putpixel((0, 0), (0, 0, 0) if im.getpixel((0, 0)) != (0, 0, 0) else (255, 255, 255))
    im.save(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same name, same mtime: only the content differs
    with pytest.raises(MismatchError, match=r"img1\.png \(index 1\) is not the image shard .*shard-00000"):
        _run(vit, root, tmp_path / "c")


def test_dataset_samples_not_class_and_length_identify_a_dataset(tmp_path, vit):
    _run(vit, _Tensors(4, seed=0), tmp_path / "c", preprocess=None)
    with pytest.raises(MismatchError, match="dataset item 0 is not the image"):
        _run(vit, _Tensors(4, seed=1), tmp_path / "c", preprocess=None)  # same class, same length


def test_meta_deleted_and_other_weights_never_mix(tmp_path, vit):
    data = _Tensors(4)
    _run(vit, data, tmp_path / "c", preprocess=None)
    (tmp_path / "c" / "meta.json").unlink()
    with pytest.raises(MismatchError, match="shard-00000.safetensors was made with other settings"):
        _run(_vit(seed=1), data, tmp_path / "c", preprocess=None)
    # and the folder does not pretend to be a cache of the other model
    with pytest.raises(MismatchError):
        ExtractionCache.open(tmp_path / "c", allow_partial=True)


# ------------------------------------------------------------------------------------------------ checksums


def _corrupt(kind: str, d: Path) -> Path:
    f = d / "shard-00001.safetensors"
    if kind == "truncated":
        data = f.read_bytes()
        f.write_bytes(data[: len(data) - 100])
    elif kind == "bitflip":
        data = bytearray(f.read_bytes())
        data[-5] ^= 0x10  # a byte of the tensor data
        f.write_bytes(bytes(data))
    else:  # duplicated
        shutil.copyfile(d / "shard-00000.safetensors", f)
    return f


@pytest.mark.parametrize("kind", ["truncated", "bitflip", "duplicated"])
def test_broken_shards_are_named_and_rerunning_extract_repairs_them(tmp_path, vit, kind):
    data = _Tensors(6)
    good = _run(vit, data, tmp_path / "c", preprocess=None)
    ref = good.contributions().clone()
    f = _corrupt(kind, tmp_path / "c")
    with pytest.raises(CorruptCacheError, match=str(f)):
        cache = ExtractionCache.open(tmp_path / "c")
        cache.contributions()  # a bit flip in the data is found on the first read
    untouched = (tmp_path / "c" / "shard-00000.safetensors").stat().st_mtime_ns
    with pytest.warns(UserWarning, match="re-extracting"):
        repaired = _run(vit, data, tmp_path / "c", preprocess=None)
    assert (tmp_path / "c" / "shard-00000.safetensors").stat().st_mtime_ns == untouched  # only the broken one redone
    repaired.verify()
    assert torch.equal(repaired.contributions(), ref)


def test_verify_checks_every_shard(tmp_path, vit):
    _run(vit, _Tensors(6), tmp_path / "c", preprocess=None)
    f = _corrupt("bitflip", tmp_path / "c")
    cache = ExtractionCache.open(tmp_path / "c")  # headers are fine
    with pytest.raises(CorruptCacheError, match=f"{f}.*checksum"):
        cache.verify()
    with pytest.raises(CorruptCacheError, match=f"{f}.*checksum"):
        ExtractionCache.open(tmp_path / "c", verify=True)


def test_broken_or_old_meta_json(tmp_path, vit):
    data = _Tensors(4)
    _run(vit, data, tmp_path / "c", preprocess=None)
    meta = tmp_path / "c" / "meta.json"
    text = meta.read_text()
    meta.write_text(text[:50])
    with pytest.raises(CorruptCacheError, match="meta.json is broken.*rerun vitdecomp extract"):
        ExtractionCache.open(tmp_path / "c")
    with pytest.warns(UserWarning, match="rebuilding it"):
        _run(vit, data, tmp_path / "c", preprocess=None)  # the shards are verified and kept
    assert len(ExtractionCache.open(tmp_path / "c")) == 4
    old = json.loads(meta.read_text())
    old["format"] = "vitdecomp.extraction/1"
    meta.write_text(json.dumps(old))
    with pytest.raises(MismatchError, match="older vitdecomp.*rebuild it"):
        ExtractionCache.open(tmp_path / "c")
    # an old cache (no marker) is refused by extract with the same advice
    (tmp_path / "c" / ".vitdecomp-cache").unlink()
    with pytest.raises(MismatchError, match="older vitdecomp.*new folder"):
        _run(vit, data, tmp_path / "c", preprocess=None)


# ------------------------------------------------------------------------------------------------ ownership


def test_extract_refuses_folders_it_does_not_own_and_keeps_foreign_files(tmp_path, vit):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "shard-00000.safetensors").write_bytes(b"user data")
    (foreign / "notes.tmp").write_text("user data")
    with pytest.raises(OutputError, match="not empty.*not a vitdecomp extraction cache"):
        _run(vit, _Tensors(4), foreign, preprocess=None)
    assert (foreign / "shard-00000.safetensors").read_bytes() == b"user data"
    assert (foreign / "notes.tmp").read_text() == "user data"
    # inside its own cache folder extract removes only its own temporary files
    out = tmp_path / "c"
    _run(vit, _Tensors(4), out, preprocess=None)
    (out / "user.tmp").write_text("keep me")
    (out / ".vitdecomp-leftover.tmp").write_text("a crashed run's temporary file")
    _run(vit, _Tensors(4), out, preprocess=None)
    assert (out / "user.tmp").read_text() == "keep me" and not (out / ".vitdecomp-leftover.tmp").exists()


def test_a_folder_claimed_at_the_same_moment_by_another_process_is_not_foreign(tmp_path, monkeypatch):
    """Two ranks of one torchrun launch (two nodes, one shared folder) claim the same --out at once: the other's
    marker can appear between the look for it and the listing of the folder (seen in CI: rank 1 refused the folder
    rank 0 had just claimed, and the launch failed)."""
    from vitdecomp import extraction

    out = tmp_path / "shared"
    out.mkdir()
    real = Path.is_file

    def marker_appears_just_after_the_look(self):
        seen = real(self)
        if self.name == extraction._MARKER and not seen:
            (self.parent / extraction._MARKER).write_text('{"written_by": "vitdecomp.extract"}')  # the other rank
        return seen

    monkeypatch.setattr(Path, "is_file", marker_appears_just_after_the_look)
    extraction._claim(out)  # not refused
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == [extraction._MARKER]
    (out / "user.txt").write_text("a user's file")
    (out / extraction._MARKER).unlink()
    with pytest.raises(OutputError, match="not empty"):  # a foreign file beside no marker is still refused
        extraction._claim(out)


def test_output_paths_are_checked_before_the_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot create the output folder"):
        extract("timm:no_such_model_is_loaded_first", _Tensors(2), tmp_path / "file" / "sub", progress=False)
    with pytest.raises(OutputError, match="not a folder"):
        extract("timm:no_such_model_is_loaded_first", _Tensors(2), tmp_path / "file", progress=False)
    if os.geteuid() != 0:  # root writes everywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(OutputError, match="not writable"):
                extract("timm:no_such_model_is_loaded_first", _Tensors(2), ro, progress=False)
        finally:
            ro.chmod(0o700)


def test_disk_full_keeps_finished_shards(tmp_path, vit, monkeypatch):
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def full_after_one(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_after_one)
    with pytest.raises(OutputError, match=r"shard-00001.safetensors: No space left.*1 shards finished before it"):
        _run(vit, _Tensors(6), tmp_path / "c", preprocess=None)
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == [".vitdecomp-cache", "meta.json", "shard-00000.safetensors"]  # no partial file left
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert len(_run(vit, _Tensors(6), tmp_path / "c", preprocess=None)) == 6


def test_a_disk_too_small_is_announced_after_the_first_batch(tmp_path, vit, monkeypatch):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))  # 1000 bytes free
    with pytest.warns(UserWarning, match="needs about .* GiB more but .* has 0.00 GiB free"):
        _run(vit, _Tensors(2), tmp_path / "c", preprocess=None)


# ------------------------------------------------------------------------------------------------ corrupt images


def test_corrupt_image_is_named_or_skipped_and_recorded(tmp_path, vit):
    root = _folder(tmp_path / "imgs", 6)
    (root / "img3.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match=r"img3\.png \(index 3\) cannot be read"):
        _run(vit, root, tmp_path / "c")
    first = (tmp_path / "c" / "shard-00000.safetensors").stat().st_mtime_ns
    with pytest.warns(UserWarning, match=r"skipped image .*img3\.png \(index 3\)"):
        cache = _run(vit, root, tmp_path / "c", on_error="skip")
    assert (tmp_path / "c" / "shard-00000.safetensors").stat().st_mtime_ns == first  # shard 0 stays valid
    assert len(cache) == 5 and list(cache.skipped) == [3] and "UnidentifiedImageError" in cache.skipped[3]
    assert cache.source_indices() == [0, 1, 2, 4, 5]
    assert cache.paths() == ["img0.png", "img1.png", "img2.png", "img4.png", "img5.png"]
    pre = _pre()
    x = torch.stack([pre(Image.open(root / p).convert("RGB")) for p in cache.paths()])
    torch.testing.assert_close(cache.contributions().float().sum(1), vitdecomp.representation(vit, x),
                               rtol=2e-3, atol=2e-3)  # float16 storage
    assert [b.indices.tolist() for b in cache.batches(batch_size=8)] == [[0, 1], [2], [3, 4]]


# ------------------------------------------------------------------------------------------------ a real kill


_CHILD = r"""
import sys, time, torch, timm
sys.path[:0] = {paths!r}
torch.set_num_threads({threads})  # the parent's: another thread count may round the products differently
from vitdecomp.extraction import extract
from torchvision import transforms as T

class Slow(torch.utils.data.Dataset):
    def __len__(self): return 6
    def __getitem__(self, i):
        if i >= 2:
            time.sleep(30)  # the parent kills us while we wait here
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, 32, 32, generator=g), 0

torch.manual_seed(0)
m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16, depth=1,
                      num_classes=0).eval()
extract(m, Slow(), {out!r}, shard_size=2, batch_size=2, progress=False)
"""


class _Same(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, 32, 32, generator=g), 0


def test_sigkill_then_resume_gives_the_uninterrupted_cache(tmp_path):
    out = tmp_path / "c"
    paths = [p for p in sys.path if p]
    proc = subprocess.Popen([sys.executable, "-c", _CHILD.format(paths=paths, out=str(out), threads=torch.get_num_threads())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while not (out / "shard-00000.safetensors").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the child never wrote its first shard"
            time.sleep(0.1)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.safetensors"]
    resumed = extract(_vit(), _Same(), out, shard_size=2, batch_size=2, progress=False)
    fresh = extract(_vit(), _Same(), tmp_path / "fresh", shard_size=2, batch_size=2, progress=False)
    for j in range(3):
        assert (out / f"shard-0000{j}.safetensors").read_bytes() == \
            (tmp_path / "fresh" / f"shard-0000{j}.safetensors").read_bytes()
    assert torch.equal(resumed.contributions(), fresh.contributions())


# ------------------------------------------------------------------------------------------------ bad values


def test_decompose_names_nan_and_inf_images_also_without_check(vit, photo_batch):
    x = photo_batch()
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(InputError, match=r"images\[1\] contains NaN"):
        vitdecomp.decompose(vit, x, check=False)
    x[1, 0, 3, 3] = float("inf")
    with pytest.raises(InputError, match=r"images\[1\] contains Inf"):
        vitdecomp.decompose(vit, x)
    bad = _vit()
    with torch.no_grad():
        bad.blocks[0].mlp.fc2.bias[0] = float("nan")
    with pytest.raises(InputError, match=r"contributions of images\[0\] contains NaN"):
        vitdecomp.decompose(bad, photo_batch(), check=False)


def test_a_submodule_in_training_mode_is_refused(photo_batch):
    m = _vit()
    m.blocks[0].attn.train()
    with pytest.raises(InputError, match="training mode \\(submodule 'blocks.0.attn'.*model.eval"):
        vitdecomp.decompose(m, photo_batch())


@pytest.mark.parametrize("kw, match", [
    ({"heads": "yes"}, "heads must be True .* or False"), ({"heads": 1}, "heads must be True"),
    ({"tokens": "all"}, "tokens must be None or 'source'"), ({"tokens": True}, "tokens must be None or 'source'"),
    ({"bias": "mean"}, "bias must be one of \\('explicit', 'paper', 'even'\\)"), ({"bias": 1}, "bias must be one of"),
])
def test_bad_option_values_are_named(vit, photo_batch, kw, match):
    with pytest.raises(InputError, match=match):
        vitdecomp.decompose(vit, photo_batch(), **kw)


def test_extract_gives_decomposes_errors_for_bad_images(tmp_path, vit):
    u8 = _Tensors(2)
    u8.x = (u8.x.clamp(-1, 1) * 100 + 127).to(torch.uint8)
    with pytest.raises(InputError) as direct:
        vitdecomp.decompose(vit, u8.x)
    with pytest.raises(InputError, match="dataset item 0: images must be a floating-point tensor") as via:
        _run(vit, u8, tmp_path / "a", preprocess=None)
    assert str(direct.value).split(";")[0] in str(via.value)  # the same message, naming the item
    nan = _Tensors(4)
    nan.x[3, 1, 2, 2] = float("nan")
    with pytest.raises(InputError, match=r"dataset item 3 \(batch 0 of its shard\): images\[1\] contains NaN"):
        _run(vit, nan, tmp_path / "b", preprocess=None)
    big = _vit()
    with torch.no_grad():
        big.norm.weight.mul_(1e6)
    with pytest.raises(InputError, match=r"contributions of dataset item 0 \(batch 0 of its shard\) overflow float16"):
        _run(big, _Tensors(2), tmp_path / "c", preprocess=None)


def test_streaming_scores_name_the_nan_batch():
    from vitdecomp.scores import StreamingScores

    g = torch.Generator().manual_seed(0)
    acc = StreamingScores(torch.randn(2, 8, generator=g))
    acc.update(torch.randn(5, 3, 8, generator=g))
    bad = torch.randn(4, 3, 8, generator=g)
    bad[2, 1, 0] = float("nan")
    with pytest.raises(InputError, match=r"batch 1 .*image 2 of that batch \(image 7 overall\) has NaN"):
        acc.update(bad)
    assert acc.n == 5 and torch.isfinite(acc.variance_attributed()).all()  # the good batches are kept


def test_fit_aligner_refuses_nan_and_aligners_know_their_model(tmp_path, vit):
    from vitdecomp.compalign import Aligner, fit_aligner

    data = _Tensors(6)
    ca = _run(vit, data, tmp_path / "a", preprocess=None, dtype=torch.float32)
    other = _vit(seed=3)
    cb = _run(other, data, tmp_path / "b", preprocess=None, dtype=torch.float32)
    t = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    t_nan = t.clone()
    t_nan[4, 0] = float("nan")
    with pytest.raises(InputError, match="target of image 4 has NaN"):
        fit_aligner(ca, targets=t_nan, max_epochs=1, progress=False)
    c = ca.contributions()
    c[5, 2, 1] = float("inf")
    with pytest.raises(InputError, match="image 5 has NaN or Inf"):
        fit_aligner(c, targets=t, max_epochs=1, progress=False)
    al = fit_aligner(ca, targets=t, max_epochs=1, progress=False)
    assert al.model_fingerprint == ca.meta["model_fingerprint"] == weights_fingerprint(vit)
    al.save(tmp_path / "al.safetensors")
    al = Aligner.load(tmp_path / "al.safetensors")
    assert al.align_components(ca).shape[0] == 6
    with pytest.raises(MismatchError, match="fitted on model .* with weights .* other weights"):
        al.align_components(cb)  # same names and sizes, other weights
    with pytest.raises(MismatchError, match="other weights"):
        list(al.iter_aligned(cb))
    loose = Aligner.load(tmp_path / "al.safetensors", check_model=False)  # the explicit override
    assert loose.align_components(cb).shape[0] == 6
    with pytest.raises(OutputError, match="cannot write the aligner to .*nowhere"):
        al.save(tmp_path / "nowhere" / "al.safetensors")


# ------------------------------------------------------------------------------------------------ named errors


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory, vit):
    """A folder cache and an identity aligner file for it (no CLIP needed for argument checks)."""
    from vitdecomp.compalign import Aligner

    d = tmp_path_factory.mktemp("cli")
    cache = _run(vit, _folder(d / "imgs", 4), d / "cache")
    Aligner.identity(cache.names, cache.dim, model_name=cache.model_name).save(d / "id.safetensors")
    return d


def _cli(argv, capsys):
    from vitdecomp.cli import main

    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["check", "timm:deit_tiny_patch16_224", "--random-init", "--batch-size", "-3"], "--batch-size -3: must be an integer ≥ 1"),
    (["extract", "timm:x", "{d}/imgs", "--out", "{d}/o1", "--random-init", "--workers", "-1"],
     "--workers -1: must be an integer ≥ 0"),
    (["extract", "timm:x", "{d}/imgs", "--out", "{d}/o2", "--random-init", "--image-size", "0"],
     "--image-size 0: height and width must be ≥ 1"),
    (["retrieve", "{d}/cache", "--aligner", "{d}/id.safetensors", "--property", "color", "--text", "red",
      "--out", "{d}/r", "--top", "0"], "--top 0: must be an integer ≥ 1"),
    (["retrieve", "{d}/cache", "--aligner", "{d}/id.safetensors", "--property", "color", "--reference", "99",
      "--out", "{d}/r"], "--reference 99: the cache holds images 0..3"),
    (["describe", "{d}/cache", "--aligner", "{d}/id.safetensors", "--components", "blocks.9.*"],
     "no component matches \\['blocks.9.\\*'\\]"),
    (["heatmap", "timm:x", "{d}/imgs/img0.png", "--random-init", "--aligner", "{d}/id.safetensors", "--text", "red",
      "--components", "blocks.0.attn.head.99", "--out", "{d}/h"], "--components blocks.0.attn.head.99: not components"),
    (["align", "{d}/cache", "--out", "{d}/missing/al.safetensors"], "the folder .*missing does not exist"),
    (["align", "{d}/cache", "--out", "{d}/cache"], "is a folder; give a file path"),
    (["align", "{d}/cache", "--out", "{d}/al.safetensors", "--val-fraction", "1.5"], "--val-fraction 1.5: must be in"),
    (["extract", "timm:x", "{d}/imgs", "--out", "{d}/imgs", "--random-init"], "not empty .*not a vitdecomp"),
])
def test_cli_values_are_checked_before_the_work(cli_cache, capsys, argv, match):
    rc, err = _cli([a.format(d=cli_cache) for a in argv], capsys)
    assert rc == 2 and err.startswith("vitdecomp: error:")
    import re

    assert re.search(match, err), err
    assert not (cli_cache / "o1").exists() and not (cli_cache / "r").exists()  # nothing was started


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_device_cuda_without_one(cli_cache, capsys):
    rc, err = _cli(["score", cli_cache / "cache", "--aligner", cli_cache / "id.safetensors", "--property", "color",
                    "--device", "cuda"], capsys)
    assert rc == 2 and "--device cuda: this machine has no CUDA GPU" in err
    rc, err = _cli(["score", cli_cache / "cache", "--aligner", cli_cache / "id.safetensors", "--property", "color",
                    "--device", "gpu0"], capsys)
    assert rc == 2 and "is not a torch device" in err


def test_decomposition_load_names_bad_files(tmp_path, vit, photo_batch):
    from safetensors.torch import save_file

    from vitdecomp import Decomposition

    dec = vitdecomp.decompose(vit, photo_batch()[:2])
    dec.save(tmp_path / "d.safetensors")
    data = (tmp_path / "d.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    save_file({"contributions": torch.zeros(1, 2, 3), "representation": torch.zeros(1, 3)},
              str(tmp_path / "nometa.safetensors"))
    (tmp_path / "text.safetensors").write_text("hello")
    for name, match in [("cut", "cannot read"), ("foreign", "no vitdecomp metadata"), ("nometa", "no vitdecomp meta"),
                        ("text", "cannot read"), ("absent", "is not a file")]:
        with pytest.raises(InputError, match=f"{name}.safetensors.*{match}.*Decomposition.save"):
            Decomposition.load(tmp_path / f"{name}.safetensors")
    assert torch.equal(Decomposition.load(tmp_path / "d.safetensors").contributions, dec.contributions)


def test_load_properties_on_a_folder(tmp_path):
    with pytest.raises(InputError, match="is a folder; give a .toml or .json file"):
        vitdecomp.load_properties(tmp_path)


def test_extract_concept_world_with_its_default_target(tmp_path):
    from vitdecomp.concept_world import load
    from vitdecomp.datasets import ConceptWorld

    ds = ConceptWorld(4)
    cache = extract(load("deit"), ds, tmp_path / "c", batch_size=4, progress=False)
    assert cache.labels() == [ds[i][1].tolist() for i in range(4)]  # the factor vectors, as lists


# ------------------------------------------------------------------------------------------------ plugin isolation


def _pack(tmp_path, monkeypatch, mod: str, body: str, ep_name: str = "newpack"):
    """A real installed-looking distribution 'new-pack 1.0' (dist-info on sys.path) with one entry point."""
    import textwrap

    (tmp_path / f"{mod}.py").write_text(textwrap.dedent(body))
    info = tmp_path / "new_pack-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: new-pack\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[vitdecomp]\n{ep_name} = {mod}\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_a_raising_hook_is_named_lenient_drops_it_and_plugins_still_lists(tmp_path, monkeypatch, capsys):
    from vitdecomp._plugins import Registry, reset_default_registry
    from vitdecomp.cli import main

    _pack(tmp_path, monkeypatch, "raising_hook_pack", """
        import vitdecomp

        @vitdecomp.hookimpl
        def register_adapters(register):
            raise KeyError("boom in the hook")
    """)
    with pytest.raises(vitdecomp.PluginLoadError, match="plugin 'newpack' \\(new-pack 1.0\\): its hook "
                                                         "register_adapters raised KeyError") as exc:
        Registry.from_entry_points()
    assert isinstance(exc.value.__cause__, KeyError)
    with pytest.warns(RuntimeWarning, match="newpack.*skipping this plugin"):
        reg = Registry.from_entry_points(lenient=True)
    assert "timm-vit" in [r.obj.name for r in reg.adapters] and "newpack" in reg.dropped
    assert "newpack" not in [i.name for i in reg.plugins()]
    reset_default_registry()
    try:
        rc = main(["plugins"])
    finally:
        reset_default_registry()
    out, err = capsys.readouterr()
    assert rc == 1 and "timm_vit" in out and "built-in" in out and "new-pack 1.0" in err and "boom in the hook" in err


@pytest.mark.parametrize("kind", ["loader", "entry_point", "property"])
def test_name_clashes_blame_the_newcomer_and_lenient_keeps_the_builtin(tmp_path, monkeypatch, kind):
    from vitdecomp._plugins import Registry
    from vitdecomp.properties import get_property

    bodies = {
        "loader": "@vitdecomp.hookimpl\ndef register_model_loaders(register):\n    register('timm', lambda *a, **k: 0)\n",
        "entry_point": "@vitdecomp.hookimpl\ndef register_adapters(register):\n    pass\n",
        "property": "@vitdecomp.hookimpl\ndef register_properties(register):\n    register('color', ['pink'])\n",
    }
    ep = "timm_vit" if kind == "entry_point" else "newpack"
    _pack(tmp_path, monkeypatch, f"clash_{kind}_pack", "import vitdecomp\n" + bodies[kind], ep_name=ep)
    with pytest.raises(vitdecomp.PluginLoadError) as exc:
        Registry.from_entry_points()
    msg = str(exc.value)
    first = msg.split(",")[0] if kind != "entry_point" else msg
    assert "new-pack 1.0" in first.split("already")[0] and "distribution vitdecomp" not in first.split("already")[0]
    with pytest.warns(RuntimeWarning, match="new-pack"):
        reg = Registry.from_entry_points(lenient=True)
    assert {"timm-vit", "open_clip-vit", "timm-swin", "timm-maxvit"} <= {r.obj.name for r in reg.adapters}
    assert reg.origin(reg.loaders["timm"].plugin).endswith("built-in)")
    assert get_property("color", registry=reg).descriptions != ("pink",)


def test_an_adapter_that_claims_then_fails_is_named(vit, photo_batch):
    from vitdecomp import Adapter
    from vitdecomp._plugins import Registry

    class Greedy(Adapter):
        name = "greedy"

        def supports(self, model):
            return True

        def decompose(self, model, images, options):
            return {}["no such key"]

        def representation(self, model, images):
            raise ZeroDivisionError("oops")

    class GreedyPack:
        __name__ = "greedy_pack"

        @vitdecomp.hookimpl
        def register_adapters(self, register):
            register(Greedy())

    reg = Registry.from_plugins([GreedyPack()], dists={"greedy_pack": ("greedy-dist", "0.1")})
    with pytest.raises(vitdecomp.AdapterError, match="adapter 'greedy' of plugin 'greedy_pack' \\(greedy-dist 0.1\\) "
                                                     "claimed model class .*VisionTransformer but failed on its "
                                                     "decomposition: KeyError"):
        vitdecomp.decompose(vit, photo_batch()[:1], registry=reg)
    with pytest.raises(vitdecomp.AdapterError, match="failed on its representation: ZeroDivisionError"):
        vitdecomp.representation(vit, photo_batch()[:1], registry=reg)


def test_plugins_check_shows_which_adapters_claim_a_model(capsys):
    from vitdecomp.cli import main

    rc = main(["plugins", "--check", "timm:deit_tiny_patch16_224"])
    out = capsys.readouterr().out
    assert rc == 0 and "CLAIMS  timm-vit" in out and "no      timm-swin" in out
    assert "decompose uses adapter 'timm-vit'" in out


def test_cli_extract_skips_bad_images_on_request(tmp_path, capsys):
    root = _folder(tmp_path / "imgs", 3)
    (root / "img1.png").write_bytes(b"broken")
    args = ["extract", "timm:deit_tiny_patch16_224", root, "--random-init", "--image-size", "32", "--quiet",
            "--shard-size", "2"]
    rc, err = _cli([*args, "--out", tmp_path / "a"], capsys)
    assert rc == 2 and "img1.png (index 1) cannot be read" in err and "--skip-bad-images" in err
    from vitdecomp.cli import main

    with pytest.warns(UserWarning, match="skipped image"):
        rc = main([str(a) for a in [*args, "--out", tmp_path / "a", "--skip-bad-images"]])
    assert rc == 0 and "skipped 1 unreadable image(s), indices [1]" in capsys.readouterr().out
    assert ExtractionCache.open(tmp_path / "a").paths() == ["img0.png", "img2.png"]


def test_saved_decompositions_carry_the_fingerprint_aligners_check(tmp_path, capsys):
    from vitdecomp import Decomposition
    from vitdecomp.compalign import Aligner

    img = _folder(tmp_path / "imgs", 1) / "img0.png"
    rc, err = _cli(["decompose", "timm:deit_tiny_patch16_224", img, tmp_path / "imgs" / "missing.png",
                    "--random-init", "--image-size", "32", "--out", tmp_path / "d.safetensors"], capsys)
    assert rc == 2 and "missing.png' (index 1)" in err
    rc, _ = _cli(["decompose", "timm:deit_tiny_patch16_224", img, "--random-init", "--image-size", "32",
                  "--out", tmp_path / "d.safetensors"], capsys)
    dec = Decomposition.load(tmp_path / "d.safetensors")
    assert rc == 0 and len(dec.meta["model_fingerprint"]) == 32
    mine = Aligner.identity(dec.names, dec.contributions.shape[-1])
    mine.model_fingerprint = dec.meta["model_fingerprint"]
    assert mine(dec).shape[0] == 1
    other = Aligner.identity(dec.names, dec.contributions.shape[-1])
    other.model_fingerprint = "0" * 32
    with pytest.raises(MismatchError, match="other weights"):
        other(dec)
    other.check_model = False
    assert other(dec).shape[0] == 1


# ------------------------------------------------------------------------------------------------ in-memory decompositions


def test_torch_version_counters_miss_data_and_numpy_edits():
    """Why decompose never memoises the fingerprint on (data_ptr, _version, ...): on this torch, writes through
    ``.data`` and through numpy leave the version counter as it was, so such a key cannot prove weights unchanged."""
    p = torch.nn.Parameter(torch.randn(4, 4))
    v, ptr = p._version, p.data_ptr()
    p.data.mul_(2)
    p.detach().numpy()[0, 0] = 7.0
    assert p._version == v and p.data_ptr() == ptr  # changed values, same key
    m = _vit()
    fp = vitdecomp.decompose(m, torch.randn(1, 3, 32, 32)).meta["model_fingerprint"]
    m.blocks[0].attn.qkv.weight.data[0, 0] += 1.0  # a version-blind edit between two calls
    assert vitdecomp.decompose(m, torch.randn(1, 3, 32, 32)).meta["model_fingerprint"] != fp  # never stale


def _aligner_for(model, x):
    from vitdecomp.compalign import Aligner

    dec = vitdecomp.decompose(model, x)
    g = torch.Generator().manual_seed(0)
    al = Aligner(torch.randn(len(dec.names), dec.contributions.shape[-1], 8, generator=g), torch.zeros(8), dec.names,
                 model_name="timm:vit_tiny_patch16_224", clip_model="x", model_fingerprint=weights_fingerprint(model))
    return al, dec


def test_aligner_refuses_in_memory_decompositions_of_other_weights(tmp_path, photo_batch):
    import copy
    import re

    from vitdecomp.compalign import Aligner
    from vitdecomp.heatmap import token_heatmap
    from vitdecomp.retrieval import component_projections, property_scores

    a = _vit()
    x = photo_batch()
    al, dec_a = _aligner_for(a, x)
    fp_a = al.model_fingerprint
    assert dec_a.meta["model_fingerprint"] == fp_a
    assert al(dec_a).shape == (4, len(dec_a.names), 8) and al.total(dec_a).shape == (4, 8)

    one = copy.deepcopy(a)  # one weight, one ulp
    w = one.blocks[0].mlp.fc1.weight.data
    w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(float("inf")))
    perm = copy.deepcopy(a)  # hidden units of the MLP permuted: the same function, other weights
    idx = torch.randperm(perm.blocks[0].mlp.fc1.out_features, generator=torch.Generator().manual_seed(0))
    fc1, fc2 = perm.blocks[0].mlp.fc1, perm.blocks[0].mlp.fc2
    fc1.weight.data, fc1.bias.data, fc2.weight.data = fc1.weight.data[idx], fc1.bias.data[idx], fc2.weight.data[:, idx]
    for b in (one, perm, _vit(seed=5)):
        dec_b = vitdecomp.decompose(b, x, tokens="source")
        fp_b = dec_b.meta["model_fingerprint"]
        assert fp_b == weights_fingerprint(b) != fp_a and dec_b.names == dec_a.names
        both = f"{re.escape(fp_a)}.*{re.escape(fp_b)}"
        for apply in (al, al.total, lambda d: al.cosine(d, torch.randn(4, 8)), al.align_components,
                      lambda d: component_projections(d, torch.randn(8), aligner=al),
                      lambda d: property_scores(d, torch.randn(3, 8), aligner=al),
                      lambda d: token_heatmap(d, al, text=torch.randn(8), k=1)):
            with pytest.raises(MismatchError, match=both):
                apply(dec_b)
    # the explicit overrides: the attribute, Aligner.load(check_model=False), or no fingerprint at all
    al.check_model = False
    assert al(dec_b).shape[0] == 4 and token_heatmap(dec_b, al, text=torch.randn(8), k=1).maps.shape[0] == 4
    al.check_model = True
    al.save(tmp_path / "al.safetensors")
    with pytest.raises(MismatchError, match="check_model=False"):
        Aligner.load(tmp_path / "al.safetensors")(dec_b)
    assert Aligner.load(tmp_path / "al.safetensors", check_model=False)(dec_b).shape[0] == 4
    unmarked = vitdecomp.decompose(perm, x, fingerprint=False)
    assert unmarked.meta["model_fingerprint"] is None and al(unmarked).shape[0] == 4
    # a saved decomposition keeps it
    dec_b.save(tmp_path / "b.safetensors")
    with pytest.raises(MismatchError, match=both):
        al(vitdecomp.Decomposition.load(tmp_path / "b.safetensors"))


def test_decompose_fingerprint_argument(photo_batch):
    m, x = _vit(), photo_batch()
    fp = weights_fingerprint(m)
    assert vitdecomp.decompose(m, x, fingerprint=fp).meta["model_fingerprint"] == fp  # the caller's, as given
    assert vitdecomp.decompose(m, x, bias="even", heads=False).meta["model_fingerprint"] == fp
    for bad in ("abc", fp.upper(), 3):
        with pytest.raises(InputError, match="fingerprint=.*True .*False .*32-hex-digit"):
            vitdecomp.decompose(m, x, fingerprint=bad)


# ------------------------------------------------------------------------------------------------ unnormalised floats


def _photos(size=32):
    from skimage import data

    return [Image.fromarray(getattr(data, n)()).convert("RGB").resize((size, size))
            for n in ("astronaut", "coffee", "chelsea", "rocket", "camera", "moon")]


def _unnormalised(photos):
    from torchvision.transforms.functional import to_tensor

    return torch.stack([to_tensor(p) for p in photos])  # [0, 1], not normalised


def _models(tiny_clip_name):
    """(label, what decompose is given, its own preprocess) for timm (0.5/0.5 and ImageNet statistics), open_clip
    and a Hugging Face ViT with its image processor."""
    import open_clip

    from vitdecomp.api import LoadedModel

    out = [("timm 0.5/0.5", _vit(), _pre())]
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=0).eval()
    cfg = timm.data.resolve_data_config({}, model=deit)
    cfg["input_size"], cfg["crop_pct"] = (3, 32, 32), 1.0
    out.append(("timm ImageNet", deit, timm.data.create_transform(**cfg)))
    clip, _, pre = open_clip.create_model_and_transforms(tiny_clip_name)
    out.append(("open_clip", clip.eval(), pre))
    transformers = pytest.importorskip("transformers")
    from vitdecomp_transformers.loading import HFImagePreprocess

    torch.manual_seed(0)
    hf = transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1,
                                                      num_attention_heads=2, intermediate_size=64)).eval()
    proc = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.45, 0.5],
                                          image_std=[0.2, 0.25, 0.3])
    out.append(("hf", LoadedModel(hf, HFImagePreprocess(proc), "hf:tiny"), None))
    return out


def test_unnormalised_float_images_are_refused_and_normalised_photos_accepted(tiny_clip_name):
    photos = _photos()
    raw = _unnormalised(photos)
    for label, model, pre in _models(tiny_clip_name):
        pre = pre or model.preprocess
        good = torch.stack([pre(p) for p in photos])
        dec = vitdecomp.decompose(model, good, fingerprint=False)  # normalised real photos: accepted
        assert dec.contributions.shape[0] == 6, label
        with pytest.raises(InputError, match=r"images\[0\] holds values in \[0, 1\].*unnormalised \[0, 1\].*"
                                             r"accepted: .*mean .*check_input=False"):
            vitdecomp.decompose(model, raw, fingerprint=False)
        for bad in (raw * 255, (raw * 255 - 0.5) / 0.25):
            with pytest.raises(InputError, match=r"look like 0–255 pixel values.*accepted: .*mean"):
                vitdecomp.decompose(model, bad, fingerprint=False)
        assert vitdecomp.decompose(model, raw * 255, check_input=False, fingerprint=False).contributions.isfinite().all()
        # where the accepted range comes from is named: a LoadedModel's preprocessing, else the model's config
        where = {"timm 0.5/0.5": r"mean \(0\.5, 0\.5, 0\.5\), std \(0\.5, 0\.5, 0\.5\) from timm's pretrained_cfg",
                 "timm ImageNet": r"mean \(0\.485, 0\.456, 0\.406\), std \(0\.229, 0\.224, 0\.225\) from timm's",
                 "open_clip": r"mean \(0\.481, 0\.458, 0\.408\), std \(0\.269, 0\.261, 0\.276\) from open_clip's",
                 "hf": r"mean \(0\.4, 0\.45, 0\.5\), std \(0\.2, 0\.25, 0\.3\) from the image processor "
                       r"ViTImageProcessor"}[label]
        with pytest.raises(InputError, match=where):
            vitdecomp.decompose(model, raw, fingerprint=False)


class _Floats(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def test_extract_gives_decomposes_error_for_unnormalised_floats(tmp_path, vit):
    photos = _photos()
    raw = _unnormalised(photos)
    for k, bad in enumerate((raw * 255, raw)):
        with pytest.raises(InputError) as from_decompose:
            vitdecomp.decompose(vit, bad[:2], fingerprint=False)
        with pytest.raises(InputError) as from_extract:
            _run(vit, _Floats(bad), tmp_path / f"c{k}", preprocess=None)
        assert str(from_extract.value).startswith("dataset item 0 (batch 0 of its shard): ")
        assert str(from_extract.value).endswith(str(from_decompose.value))  # the same error, naming the item
    cache = _run(vit, _Floats(raw * 255), tmp_path / "ok", preprocess=None, check_input=False)
    assert len(cache) == 6
    good = torch.stack([_pre()(p) for p in photos])
    assert len(_run(vit, _Floats(good), tmp_path / "good", preprocess=None)) == 6
    # a preprocess without Normalize says the model takes [0, 1] pixels: they are accepted, 0-255 are not
    from torchvision import transforms as T

    to01 = T.Compose([T.Resize(32), T.ToTensor()])
    assert len(_run(vit, _Floats(raw), tmp_path / "01", preprocess=to01)) == 6
    with pytest.raises(InputError, match="0–255 pixel values.*no Normalize"):
        _run(vit, _Floats(raw * 255), tmp_path / "255", preprocess=to01)
