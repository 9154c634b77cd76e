"""Benchmark scripts asked for a GPU on a machine without one say so in one line (and exit non-zero)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [("overhead.py", ["--device", "cuda"]), ("maxvit_overhead.py", ["--device", "cuda"]),
           ("extract_speed.py", ["--device", "cuda"]), ("distributed_extract.py", ["--device", "cuda", "--nproc", "2"]),
           ("gpu_check.py", [])]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("script,args", SCRIPTS, ids=[s for s, _ in SCRIPTS])
def test_cuda_without_a_gpu_is_refused_clearly(script, args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "core"), str(ROOT / "plugins"),
                                                         os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode != 0
    assert "no usable CUDA GPU" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_planted_aligner_cache_is_a_current_verified_cache(tmp_path, monkeypatch):
    """benchmarks/aligner_training.py writes its planted data as a cache of the current format, which the library
    opens and verifies like one extract wrote (a format-1 cache would be refused)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import aligner_training as A
    from safetensors.torch import load_file

    from vitdecomp.extraction import ExtractionCache

    A.write_cache(tmp_path / "c", 250, 3, 8, 8, shard=100)
    cache = ExtractionCache.open(tmp_path / "c", verify=True)
    assert len(cache) == 250 and cache.names == tuple(f"planted.{i}" for i in range(3))
    maps = load_file(str(tmp_path / "c" / "planted_maps.safetensors"))["maps"]
    assert maps.shape == (3, 8, 8)


def test_gpu_check_compalign_section_runs(monkeypatch):
    """benchmarks/gpu_check.py's CompAlign section runs end to end (here with device="cpu", where the device fit
    and its CPU reference are the same computation: the script is exercised, not the GPU, which CI lacks): one
    record per fitter, each with the held-out cosine of a fit that learned something (above 0.5 on planted maps)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    records = gpu_check.aligners("cpu", full=False, size=(800, 4, 8, 8))
    assert [r["method"] for r in records] == ["dual", "joint", "bcd", "adam"]
    for r in records:
        assert r["held_out_cosine"] == r["cpu_held_out_cosine"] > 0.5, r
