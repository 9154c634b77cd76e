"""Time of the full weight fingerprint (vitdecomp._fingerprint.weights_fingerprint) on a ViT-B-sized random timm
model: every parameter and buffer hashed with blake2b. Run by hand: python benchmarks/fingerprint.py"""

import os
import time

import timm
import torch

from vitdecomp._fingerprint import weights_fingerprint

torch.manual_seed(0)
m = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
n = sum(t.numel() for t in m.state_dict().values())
weights_fingerprint(m)  # warm the page cache / allocator
times = []
for _ in range(5):
    t0 = time.perf_counter()
    weights_fingerprint(m)
    times.append(time.perf_counter() - t0)
print(f"vit_base_patch16_224: {n / 1e6:.1f}M values, {n * 4 / 2**20:.0f} MiB float32; fingerprint "
      f"min {min(times):.3f} s, median {sorted(times)[2]:.3f} s over 5 runs; load avg {os.getloadavg()[0]:.1f}")

# the shard checksum and the resume verification hash the same way: one SHA-256 pass, single-threaded per shard
import hashlib  # noqa: E402

blob = torch.randn(64 * 2**20 // 4).numpy().tobytes()
t0 = time.perf_counter()
hashlib.sha256(blob).hexdigest()
dt = time.perf_counter() - t0
print(f"SHA-256 of 64 MiB (one thread): {dt:.3f} s = {64 / dt:.0f} MiB/s (shard checksum / verification speed)")
