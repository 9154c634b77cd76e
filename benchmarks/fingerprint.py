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
