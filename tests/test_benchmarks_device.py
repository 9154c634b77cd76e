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
