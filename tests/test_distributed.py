"""Distributed extraction and statistics under torchrun (gloo, 2 CPU processes) equal the single-process run."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SCRIPT = textwrap.dedent('''
    import sys, torch, timm, vitdecomp
    from vitdecomp import distributed as vdist
    from vitdecomp.compalign import _Data, _closed_form

    torch.set_num_threads(1)
    info = vdist.init_from_env()
    out = sys.argv[1]

    class Images(torch.utils.data.Dataset):
        def __init__(self):
            self.x = torch.randn(11, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        def __len__(self):
            return 11
        def __getitem__(self, i):
            return self.x[i], i % 3

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8).eval()
    cache = vitdecomp.extract(model, Images(), out + "/cache", batch_size=2, shard_size=2, dtype=torch.float32,
                              progress=False, model_name="tiny")
    means = vitdecomp.component_means(cache)
    g = torch.Generator().manual_seed(2)
    acc = vitdecomp.StreamingScores({"p": torch.randn(3, 192, generator=g)})
    for b in cache.batches(4, local=True):  # each rank its own shards
        acc.update(b.contributions)
    acc.all_reduce()
    targets = torch.nn.functional.normalize(torch.randn(11, 16, generator=g), dim=-1)
    mask = torch.zeros(11, dtype=torch.bool)
    mask[torch.arange(11)[info.rank::info.world_size]] = True
    W0, b0 = _closed_form(_Data.of(cache), targets, mask, 1e-3, 1024, "cpu")
    aligner = vitdecomp.fit_aligner(cache, targets, max_epochs=3, penalty_warmup=1, progress=False, val_fraction=0.3,
                                    method="adam")
    iso = vitdecomp.fit_aligner(cache, targets, max_epochs=3, penalty_warmup=1, progress=False, val_fraction=0.3,
                                method="adam", isometric=True)
    bcd = vitdecomp.fit_aligner(cache, targets, max_epochs=2, progress=False, val_fraction=0.3, method="bcd")
    joint = vitdecomp.fit_aligner(cache, targets, max_epochs=3, progress=False, val_fraction=0.3, method="joint")
    auto = vitdecomp.fit_aligner(cache, targets, max_epochs=1, progress=False, val_fraction=0.3).config["method"]
    try:
        vitdecomp.fit_aligner(cache, targets, max_epochs=1, progress=False, val_fraction=0.3, method="dual")
        dual = "fitted"
    except vitdecomp.errors.InputError as e:
        dual = str(e)
    torch.save({"auto": auto, "dual": dual, "W_joint": joint.weight, "cos_joint": joint.held_out_cosine, "hist_joint": joint.history,"means": means, "va": acc.variance_attributed("p"), "W0": W0, "b0": b0, "W": aligner.weight,
                "cos": aligner.held_out_cosine, "W_bcd": bcd.weight, "cos_bcd": bcd.held_out_cosine,
                "W_iso": iso.weight, "b_iso": iso.bias, "cos_iso": iso.held_out_cosine,
                "world": info.world_size}, f"{out}/rank{info.rank}.pt")
    print("done", info.rank, info.world_size)
''')


def _run(cmd, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    script = root / "job.py"
    script.write_text(SCRIPT)
    (root / "single").mkdir()
    (root / "multi").mkdir()
    _run([sys.executable, str(script), str(root / "single")], root)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*torchrun, str(script), str(root / "multi")], root)
    return root, torchrun, script


def test_extraction_is_identical_and_indexed(runs):
    import vitdecomp

    root, _, _ = runs
    single = vitdecomp.ExtractionCache.open(root / "single" / "cache")
    multi = vitdecomp.ExtractionCache.open(root / "multi" / "cache")
    assert multi.names == single.names and len(multi) == len(single) == 11
    torch.testing.assert_close(multi.contributions(), single.contributions(), rtol=1e-6, atol=1e-6)
    assert multi.labels() == single.labels()
    meta = json.loads((root / "multi" / "cache" / "meta.json").read_text())
    assert meta["complete"] and meta["world_size"] == 2
    assert [s["rank"] for s in meta["index"]] == [0, 1, 0, 1, 0, 1]
    assert [(s["start"], s["stop"]) for s in meta["index"]][-1] == (10, 11)


def test_statistics_reduce_across_ranks(runs):
    root, _, _ = runs
    one = torch.load(root / "single" / "rank0.pt")
    r0, r1 = torch.load(root / "multi" / "rank0.pt"), torch.load(root / "multi" / "rank1.pt")
    assert r0["world"] == 2
    for r in (r0, r1):  # every rank holds the global statistics, equal to one process over all images
        torch.testing.assert_close(r["means"], one["means"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(r["va"], one["va"], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(r["W0"], one["W0"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r["b0"], one["b0"], rtol=1e-4, atol=1e-5)
    # data-parallel refinement: both ranks apply identical updates
    torch.testing.assert_close(r0["W"], r1["W"], rtol=0, atol=0)
    assert r0["cos"] == r1["cos"]
    # isometric=True: the polar factors of that result, the bias refitted and the held-out cosine summed across
    # ranks, the same on both
    torch.testing.assert_close(r0["W_iso"], r1["W_iso"], rtol=0, atol=0)
    torch.testing.assert_close(r0["b_iso"], r1["b_iso"], rtol=0, atol=0)
    assert r0["cos_iso"] == r1["cos_iso"] and r0["cos_iso"] is not None
    U, _, Vh = torch.linalg.svd(r0["W"].double(), full_matrices=False)
    torch.testing.assert_close(r0["W_iso"], (U @ Vh).float(), rtol=0, atol=2e-5)
    # block-coordinate sweeps: per-block statistics all-reduced, so both ranks take the same steps (8 training
    # images for D = 192 make each block singular, so the single process's maps, summed in another order, are not
    # compared: the line search's choice is not continuous there)
    torch.testing.assert_close(r0["W_bcd"], r1["W_bcd"], rtol=0, atol=0)
    assert r0["cos_bcd"] == r1["cos_bcd"]
    assert one["cos_bcd"] is not None
    # joint L-BFGS: gradients and line-search sums all-reduced, so both ranks hold the same maps, and those of the
    # single process up to the order of summation
    torch.testing.assert_close(r0["W_joint"], r1["W_joint"], rtol=0, atol=0)
    assert r0["cos_joint"] == r1["cos_joint"]
    # (the isometric finish projects the best iterate, whose choice among near-tied ones may depend on the order of
    # summation: compared on the ranks above, not against the single process)
    steps = lambda hist: [h["val_cosine"] for h in hist if not h.get("projected")]  # noqa: E731
    assert steps(r0["hist_joint"]) == pytest.approx(steps(one["hist_joint"]), abs=1e-4)
    assert r0["hist_joint"][-1]["projected"] and one["hist_joint"][-1]["projected"]
    # the dual fit couples every pair of training images: one process takes it by default, ranks are refused it
    assert one["auto"] == "dual" and one["dual"] == "fitted"
    for r in (r0, r1):
        assert r["auto"] != "dual" and "method='dual' runs in one process" in r["dual"]


def test_interrupted_run_resumes_per_rank(runs):
    root, torchrun, script = runs
    cache = root / "multi" / "cache"
    victim = cache / "shard-00003.safetensors"  # a rank-1 shard
    keep = cache / "shard-00002.safetensors"
    before = keep.stat().st_mtime_ns
    victim.unlink()
    _run([*torchrun, str(script), str(root / "multi")], root)
    assert victim.exists() and keep.stat().st_mtime_ns == before  # only the missing shard was recomputed


def test_cli_extract_under_torchrun_matches_single_process(tmp_path, runs):
    from PIL import Image
    from skimage import data

    import vitdecomp

    _, torchrun, _ = runs
    for i, name in enumerate(("astronaut", "coffee", "chelsea")):
        (tmp_path / "imgs" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(data, name)()).resize((40, 40)).save(tmp_path / "imgs" / f"class{i % 2}" / f"{name}.png")
    args = ["extract", "timm:deit_tiny_patch16_224", str(tmp_path / "imgs"), "--random-init", "--img-size", "32",
            "--batch-size", "1", "--shard-size", "1", "--quiet", "--dtype", "float32"]
    _run([*torchrun, "-m", "vitdecomp.cli", *args, "--out", str(tmp_path / "multi")], tmp_path)
    _run([sys.executable, "-m", "vitdecomp.cli", *args, "--out", str(tmp_path / "single")], tmp_path)
    multi = vitdecomp.ExtractionCache.open(tmp_path / "multi")
    single = vitdecomp.ExtractionCache.open(tmp_path / "single")
    torch.testing.assert_close(multi.contributions(), single.contributions())
    assert multi.labels() == single.labels()


# ---------------------------------------------------------------------------------------------- NCCL device binding


def _fake_group(monkeypatch, accepts_device_id=True):
    """Stand-ins for torch.distributed / torch.cuda (no GPU here); records the calls in order."""
    from vitdecomp import distributed as vdist

    calls = []
    if accepts_device_id:
        def init_process_group(backend=None, init_method=None, device_id=None, **kw):
            calls.append(("init", backend, device_id))
    else:  # an older torch without the keyword
        def init_process_group(backend=None, init_method=None, **kw):
            assert "device_id" not in kw
            calls.append(("init", backend, None))
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    return vdist, calls


@pytest.mark.parametrize("accepts_device_id", [True, False])
def test_nccl_binds_local_rank_gpu_before_init(monkeypatch, accepts_device_id):
    vdist, calls = _fake_group(monkeypatch, accepts_device_id)
    vdist.init_from_env(backend="nccl")
    expected_id = torch.device("cuda", 1) if accepts_device_id else None
    assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl", expected_id)]


def test_cuda_device_picks_nccl_and_binds(monkeypatch):
    vdist, calls = _fake_group(monkeypatch)
    vdist.init_from_env(device="cuda")
    assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl", torch.device("cuda", 1))]


def test_cpu_device_keeps_gloo_without_binding(monkeypatch):
    vdist, calls = _fake_group(monkeypatch)
    vdist.init_from_env(device="cpu")
    assert calls == [("init", "gloo", None)]


def test_comm_device_is_local_rank_gpu_for_nccl(monkeypatch):
    from vitdecomp import distributed as vdist

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(vdist, "info", lambda: vdist.DistInfo(rank=3, world_size=4, local_rank=1, backend="nccl"))
    assert vdist._comm_device() == torch.device("cuda", 1)
    monkeypatch.setattr(vdist, "info", lambda: vdist.DistInfo(rank=3, world_size=4, local_rank=1, backend="gloo"))
    assert vdist._comm_device() == torch.device("cpu")


# ---------------------------------------------------------------------------------------------- two nodes


CLI_WRAPPER = textwrap.dedent('''
    import os, sys
    from vitdecomp.cli import main

    print("launch", *(os.environ.get(k, "-") for k in ("GROUP_RANK", "RANK", "LOCAL_RANK", "WORLD_SIZE")), flush=True)
    sys.exit(main(sys.argv[1:]))
''')


def _torchrun():
    exe = Path(sys.executable).with_name("torchrun")
    return str(exe) if exe.exists() else shutil.which("torchrun")


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_share_one_cache(tmp_path):
    """2 nodes × 1 process on localhost, as on a cluster with a shared filesystem: two concurrent torchrun
    launches (static rendezvous on MASTER_ADDR:MASTER_PORT) write into the same folder."""
    torchrun = _torchrun()
    if torchrun is None:
        pytest.skip("torchrun is not installed next to the interpreter nor on PATH")
    from PIL import Image
    from skimage import data

    import vitdecomp

    for i, name in enumerate(("astronaut", "coffee", "chelsea", "camera")):
        (tmp_path / "imgs" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(data, name)()).convert("RGB").resize((40, 40)).save(
            tmp_path / "imgs" / f"class{i % 2}" / f"{name}.png")
    wrapper = tmp_path / "cli.py"
    wrapper.write_text(CLI_WRAPPER)
    args = ["extract", "timm:deit_tiny_patch16_224", str(tmp_path / "imgs"), "--random-init", "--img-size", "32",
            "--batch-size", "1", "--shard-size", "1", "--quiet", "--dtype", "float32", "--device", "cpu"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    port = _free_port()
    logs = [tmp_path / f"node{node}.log" for node in (0, 1)]  # files, not pipes: a full pipe would stall a node
    procs = []
    try:
        for node, log in enumerate(logs):
            with open(log, "w") as fh:
                procs.append(subprocess.Popen(
                    [torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                     "--master_addr", "127.0.0.1", "--master_port", str(port),
                     str(wrapper), *args, "--out", str(tmp_path / "multi")],
                    cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT))
        for p in procs:
            p.wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = [log.read_text() for log in logs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-6000:]
    # each node ran one process: LOCAL_RANK 0 on both, global RANK = node rank, one world of 2
    launches = [[line.split()[1:] for line in out.splitlines() if line.startswith("launch ")] for out in outs]
    assert launches == [[["0", "0", "0", "2"]], [["1", "1", "0", "2"]]]

    _run([sys.executable, "-m", "vitdecomp.cli", *args, "--out", str(tmp_path / "single")], tmp_path)
    multi = vitdecomp.ExtractionCache.open(tmp_path / "multi")
    single = vitdecomp.ExtractionCache.open(tmp_path / "single")
    assert multi.names == single.names and len(multi) == len(single) == 4
    torch.testing.assert_close(multi.contributions(), single.contributions(), rtol=1e-6, atol=1e-6)
    assert multi.labels() == single.labels()
    meta = json.loads((tmp_path / "multi" / "meta.json").read_text())
    assert meta["complete"] and meta["world_size"] == 2
    assert [s["rank"] for s in meta["index"]] == [0, 1, 0, 1]
