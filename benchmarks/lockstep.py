"""Decomposition phases of one timm model, two source trees side by side in lockstep (e.g. before / after an engine
change).

    python benchmarks/lockstep.py --old /tmp/oldtree --new . [--model maxvit_small_tf_224] [--batch 2]
        [--rounds 6] [--env MALLOC_TRIM_THRESHOLD_=...]

Each tree runs in its own worker process (``PYTHONPATH`` = its ``core``, ``plugins`` and ``contrib/*/src``; one
torch thread) and the
driver sends both the same phase one after the other — forward, ``decompose`` (component level),
``decompose(tokens="source")``, every ``spatial_map``, every head's ``maxvit.source_map`` (MaxViT models; 0 for
others) — swapping which tree
goes first every round, so that load from other processes on a shared machine hits both alike (a whole benchmark
run per tree, one after the other, sees load that moves by tens of percent between them). Per phase it prints the
min and median wall time, process CPU time (user + system) and system time, the median count of minor page faults
(fresh pages the allocator had to map), and the per-round CPU difference new − old. ``tokens`` = the three
token-level phases together (what ``maxvit_overhead.py``'s ``sources`` mode times for MaxViT, and
``swin_overhead.py``'s ``spatial`` mode for Swin). The first round is a warm-up.
``--env`` sets variables for both workers (e.g. glibc's ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``,
to see the engines' work without the allocator returning memory to the system and faulting it back).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PHASES = ("forward", "component", "tokens_decompose", "spatial_maps", "source_maps")


def phases(model_name: str, batch: int) -> dict:
    """The phases of one timm model (random weights, one torch thread), by name: each a call that runs it once.
    Shared with ``big_allocs.py``."""
    import inspect

    import timm
    import torch

    import vitdecomp

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    size = getattr(model, "img_size", None) or model.pretrained_cfg["input_size"][1:]
    x = torch.randn(batch, 3, *tuple(size))
    # trees from before the weight fingerprint have no such argument (and compute none)
    kw = {"fingerprint": False} if "fingerprint" in inspect.signature(vitdecomp.decompose).parameters else {}
    ad = vitdecomp.find_adapter(model)
    state = {}

    def forward():
        with torch.no_grad():
            ad.representation(model, x)

    def component():
        vitdecomp.decompose(model, x, **kw)

    def tokens_decompose():
        state["dec"] = vitdecomp.decompose(model, x, tokens="source", **kw)

    def spatial_maps():
        dec = state["dec"]
        with torch.no_grad():
            for name in dec.names:
                dec.spatial_map(name)

    def source_maps():
        dec = state.pop("dec")
        if "source_tokens" not in dec.meta:  # only MaxViT splits heads by the position they read
            return
        from vitdecomp_plugins.maxvit import source_map

        with torch.no_grad():
            for name in dec.names:
                if name in dec.meta["source_tokens"]:
                    source_map(dec, name)

    return dict(forward=forward, component=component, tokens_decompose=tokens_decompose, spatial_maps=spatial_maps,
                source_maps=source_maps)


def tree_path(root: str) -> str:
    """PYTHONPATH for a worker of the source tree ``root``: its own core, built-in plugins and contrib packs (an
    installed pack from another tree would be loaded through its entry point against this tree's core)."""
    root = os.path.abspath(root)
    paths = [os.path.join(root, "core"), os.path.join(root, "plugins")]
    contrib = os.path.join(root, "contrib")
    paths += sorted(os.path.join(contrib, d, "src") for d in (os.listdir(contrib) if os.path.isdir(contrib) else ())
                    if os.path.isdir(os.path.join(contrib, d, "src")))
    return os.pathsep.join(paths)


def worker(model_name: str, batch: int) -> None:
    fns = phases(model_name, batch)
    print("ready", flush=True)
    for line in sys.stdin:
        phase = line.strip()
        if not phase:
            return
        r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        fns[phase]()
        wall, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps([wall, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt]),
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="root of the first source tree")
    p.add_argument("--new", required=True, help="root of the second source tree")
    p.add_argument("--model", default="maxvit_small_tf_224")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for both workers (repeatable)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.model, args.batch)
        return
    env0 = dict(os.environ, OMP_NUM_THREADS="1")
    for kv in args.env:
        k, _, v = kv.partition("=")
        env0[k] = v
    procs = {}
    for tag, root in (("old", args.old), ("new", args.new)):
        env = dict(env0, PYTHONPATH=tree_path(root))
        procs[tag] = subprocess.Popen([sys.executable, __file__, "--worker", "--model", args.model, "--batch",
                                       str(args.batch), "--old", args.old, "--new", args.new], env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for tag, w in procs.items():
        if w.stdout.readline().strip() != "ready":
            raise SystemExit(f"the {tag} worker did not start (see its error above)")

    def run(tag, phase):
        procs[tag].stdin.write(phase + "\n")
        procs[tag].stdin.flush()
        return json.loads(procs[tag].stdout.readline())

    rows = list(PHASES) + ["tokens"]
    res = {tag: {ph: [] for ph in rows} for tag in procs}
    for r in range(args.rounds + 1):  # round 0: warm-up
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        tok = {tag: [0.0] * 4 for tag in procs}
        for ph in PHASES:
            for tag in order:
                v = run(tag, ph)
                if r:
                    res[tag][ph].append(v)
                if ph in ("tokens_decompose", "spatial_maps", "source_maps"):
                    tok[tag] = [a + b for a, b in zip(tok[tag], v)]
        if r:
            for tag in procs:
                res[tag]["tokens"].append(tok[tag])
    for w in procs.values():
        w.stdin.write("\n")
        w.stdin.flush()
        w.wait()
    with open("/proc/loadavg") if os.path.exists("/proc/loadavg") else open(os.devnull) as f:
        load = " ".join(f.read().split()[:3])
    print(f"\n{args.model}, batch {args.batch}, 1 thread, {args.rounds} lockstep rounds, load average at the end "
          f"{load or '?'}, env {' '.join(args.env) or '-'}")
    print(f"{'phase':<17} {'tree':<4} {'wall min':>8} {'wall med':>8} {'cpu min':>8} {'cpu med':>8} {'sys med':>8} "
          f"{'faults':>8} {'new − old cpu (median, min..max)':>34}")
    for ph in rows:
        diff = [n[1] + n[2] - o[1] - o[2] for o, n in zip(res["old"][ph], res["new"][ph])]
        for tag in procs:
            v = res[tag][ph]
            extra = (f"{statistics.median(diff):+8.3f} ({min(diff):+.3f}..{max(diff):+.3f})" if tag == "new" else "")
            print(f"{ph:<17} {tag:<4} {min(x[0] for x in v):8.3f} {statistics.median(x[0] for x in v):8.3f} "
                  f"{min(x[1] + x[2] for x in v):8.3f} {statistics.median(x[1] + x[2] for x in v):8.3f} "
                  f"{statistics.median(x[2] for x in v):8.3f} {statistics.median(x[3] for x in v):8.0f} {extra:>34}")


if __name__ == "__main__":
    main()
