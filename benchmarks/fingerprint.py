"""Time of the full weight fingerprint (vitdecomp._fingerprint.weights_fingerprint) on a ViT-B-sized random timm
model, and what it adds to ``decompose`` (``fingerprint=True``, the default, hashes at every call; a precomputed
string or ``False`` does not), plus the input range check (``check_input``). Run by hand:
python benchmarks/fingerprint.py [--threads N]"""

import argparse
import os
import time

import timm
import torch

import vitdecomp
from vitdecomp._fingerprint import weights_fingerprint
from vitdecomp._input_range import check_image_range, input_stats

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
ap.add_argument("--repeats", type=int, default=5)
args = ap.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)


def best(fn, n=args.repeats):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), sorted(times)[len(times) // 2]


torch.manual_seed(0)
m = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
n = sum(t.numel() for t in m.state_dict().values())
weights_fingerprint(m)  # warm the page cache / allocator
lo, med = best(lambda: weights_fingerprint(m))
print(f"vit_base_patch16_224: {n / 1e6:.1f}M values, {n * 4 / 2**20:.0f} MiB float32; fingerprint "
      f"min {lo:.3f} s, median {med:.3f} s over {args.repeats} runs; load avg {os.getloadavg()[0]:.1f}")

fp = weights_fingerprint(m)
stats = input_stats(m)
for b in (1, 8):
    x = torch.randn(b, 3, 224, 224)
    vitdecomp.decompose(m, x, fingerprint=False)
    rows = {}
    for label, kw in (("fingerprint=True (default)", {}), ("fingerprint=<string>", {"fingerprint": fp}),
                      ("fingerprint=False", {"fingerprint": False}),
                      ("fingerprint=<string>, check_input=False", {"fingerprint": fp, "check_input": False})):
        rows[label] = best(lambda: vitdecomp.decompose(m, x, **kw), n=3)
    base = rows["fingerprint=<string>"][0]
    for label, (lo, med) in rows.items():
        print(f"decompose batch {b}, {label}: min {lo:.3f} s, median {med:.3f} s ({lo / base:.2f}x the string path)")
    lo, _ = best(lambda: check_image_range(x, stats), n=5)
    print(f"check_image_range batch {b}: {lo * 1e3:.1f} ms; load avg {os.getloadavg()[0]:.1f}")

# the shard checksum and the resume verification hash the same way: one SHA-256 pass, single-threaded per shard
import hashlib  # noqa: E402

blob = torch.randn(64 * 2**20 // 4).numpy().tobytes()
t0 = time.perf_counter()
hashlib.sha256(blob).hexdigest()
dt = time.perf_counter() - t0
print(f"SHA-256 of 64 MiB (one thread): {dt:.3f} s = {64 / dt:.0f} MiB/s (shard checksum / verification speed)")
