"""Scaling of distributed extraction: images/s with 1 process vs ``torchrun --nproc_per_node N``.

    python benchmarks/distributed_extract.py --model vit_small_patch16_224 --images 64 --nproc 2
    python benchmarks/distributed_extract.py --device cuda --model vit_base_patch16_224 --images 4096 --batch 128 --nproc 8

Each process uses ``--threads`` intra-op threads (default 1 on CPU, so N processes use N cores). Random-weight
model, random images; the cache is written to a temporary directory. Scaling efficiency = (images/s with N
processes) / (N × images/s with 1 process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

JOB = r'''
import sys, time, json, torch, timm, vitdecomp
from vitdecomp import distributed as vdist
out, model_name, n, batch, device, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
if threads:
    torch.set_num_threads(threads)
info = vdist.init_from_env(device=device)
torch.manual_seed(0)
model = timm.create_model(model_name, pretrained=False).eval()
size = model.pretrained_cfg["input_size"][1:]
data = torch.utils.data.TensorDataset(torch.randn(n, 3, *size), torch.zeros(n, dtype=torch.long))
vdist.barrier()
t0 = time.perf_counter()
vitdecomp.extract(model, data, out, batch_size=batch, shard_size=batch, dtype=torch.float16, device=device,
                  progress=False, model_name=model_name)
vdist.barrier()
if info.rank == 0:
    print(json.dumps({"seconds": time.perf_counter() - t0, "world": info.world_size}))
'''


def run(nproc: int, args) -> dict:
    with tempfile.TemporaryDirectory() as d:
        job = os.path.join(d, "job.py")
        with open(job, "w") as f:
            f.write(JOB)
        launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        "--nproc_per_node", str(nproc)]
        cmd = [*launcher, job, os.path.join(d, "cache"), args.model, str(args.images), str(args.batch), args.device,
               str(args.threads)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(max(args.threads, 1))}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode:
            raise SystemExit(res.stderr[-4000:])
        return json.loads([l for l in res.stdout.splitlines() if l.startswith("{")][-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from _device import require_device

    require_device(args.device, count=args.nproc if args.device.startswith("cuda") else 1)
    one = run(1, args)
    many = run(args.nproc, args)
    ips1, ipsn = args.images / one["seconds"], args.images / many["seconds"]
    print(f"{args.model}: 1 process {ips1:.2f} img/s, {args.nproc} processes {ipsn:.2f} img/s, "
          f"scaling efficiency {ipsn / (args.nproc * ips1):.2f}")


if __name__ == "__main__":
    main()
