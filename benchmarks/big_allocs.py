"""Large CPU allocations per decomposition phase of one timm model, for one or more source trees (e.g. before /
after an engine change): does the new engine allocate more (or larger) tensors than the old one?

    python benchmarks/big_allocs.py --tree /tmp/oldtree --tree . [--model maxvit_small_tf_224] [--batch 2]
        [--min-mib 8] [--ops]

Each tree runs in its own worker process (``PYTHONPATH`` = its ``core``, ``plugins`` and ``contrib/*/src``, as in
``lockstep.py``; one torch thread). After one warm-up call, each phase — ``decompose`` (component level),
``decompose(tokens="source")``, every ``spatial_map``, every head's ``maxvit.source_map`` (MaxViT models only) —
runs once under ``torch.profiler`` with ``profile_memory=True``, and every allocation the torch CPU allocator made
(the kernels' own workspaces included) is counted by size: at least 1 MiB, at least ``--min-mib`` and at least
32 MiB (glibc's largest dynamic mmap threshold: above it every allocation that finds no free heap chunk is a fresh
mapping, faulted page by page). ``--ops``: also list the allocations ≥ ``--min-mib`` by op and size. Counts, not
times: the result does not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys

from lockstep import tree_path

PHASES = ("component", "tokens_decompose", "spatial_maps", "source_maps")


def worker(model_name: str, batch: int, min_bytes: int) -> None:
    import torch
    from torch._C._profiler import _EventType

    from lockstep import phases  # this folder's lockstep.py: the same phases, timed there

    fns = phases(model_name, batch)
    for phase in PHASES:  # warm-up: traces and caches
        fns[phase]()
    out = {}
    for phase in PHASES:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fns[phase]()
        sizes, ops = [], collections.Counter()

        def walk(node, parent):
            if node.typed[0] == _EventType.Allocation:
                n = node.typed[1].alloc_size
                if n > 0:
                    sizes.append(n)
                    if n >= min_bytes:
                        ops[f"{parent} {n / 2**20:.1f} MiB"] += 1
            for child in node.children:
                walk(child, node.name)

        for root in prof.profiler.kineto_results.experimental_event_tree():
            walk(root, "<top>")
        out[phase] = dict(sizes=sizes, ops=dict(ops))
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", default=[], help="root of a source tree (repeatable)")
    p.add_argument("--model", default="maxvit_small_tf_224")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--min-mib", type=float, default=8.0, help="the middle size class and --ops' cut (MiB)")
    p.add_argument("--ops", action="store_true", help="list allocations >= --min-mib by op and size")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    min_bytes = int(args.min_mib * 2**20)
    if args.worker:
        worker(args.model, args.batch, min_bytes)
        return
    if not args.tree:
        p.error("give at least one --tree")
    res = {}
    for root in args.tree:
        root = os.path.abspath(root)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=tree_path(root))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", args.model, "--batch",
               str(args.batch), "--min-mib", str(args.min_mib)]
        text = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        res[root] = json.loads(next(line for line in text.splitlines() if line.startswith("RESULT "))[7:])
    cuts = [(1 << 20, "1 MiB"), (min_bytes, f"{args.min_mib:g} MiB"), (32 << 20, "32 MiB")]
    print(f"{args.model}, batch {args.batch}: allocations at least N (count, MiB) per call")
    print(f"{'phase':18s} {'tree':40s} " + " ".join(f"{'>= ' + c:>16s}" for _, c in cuts))
    for phase in PHASES:
        for root, r in res.items():
            sizes = r[phase]["sizes"]
            cells = []
            for cut, _ in cuts:
                sel = [s for s in sizes if s >= cut]
                cells.append(f"{len(sel):5d} {sum(sel) / 2**20:8.0f}")
            print(f"{phase:18s} {root[-40:]:40s} " + " ".join(f"{c:>16s}" for c in cells))
            if args.ops:
                for k, n in sorted(r[phase]["ops"].items(), key=lambda kv: kv[0]):
                    print(f"    {n:4d} x {k}")


if __name__ == "__main__":
    main()
