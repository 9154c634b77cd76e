"""Where glibc gives heap memory back: per decomposition phase, how often a ``free`` shrank the heap (a *trim*),
by how much, the size of the chunk whose release triggered it, and the minor page faults that followed.

    python benchmarks/trim_probe.py --tree /tmp/oldtree --tree . [--model maxvit_small_tf_224] [--rounds 5]

Each tree runs in a fresh process (``PYTHONPATH`` from :func:`lockstep.tree_path`) with a small ``free`` wrapper
preloaded (C source below, compiled with the system's ``cc`` into a temporary folder): it compares the program
break (``sbrk(0)``) before and after every ``free`` and counts the calls that lowered it. After each phase
(the phases of ``lockstep.py``) it prints the trims, the MiB returned, the sizes of the triggering chunks
(power-of-two classes), the minor page faults and ``mallinfo2``'s arena / in-use / top-releasable MiB.
glibc only; needs a C compiler.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile

SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <malloc.h>
#include <unistd.h>
static void (*real_free)(void *) = 0;
long trim_events = 0, trim_bytes = 0;
long trim_sizes[64];
void free(void *p) {
    if (!real_free) real_free = dlsym(RTLD_NEXT, "free");
    if (!p) return;
    size_t size = malloc_usable_size(p);
    char *before = sbrk(0);
    real_free(p);
    char *after = sbrk(0);
    if (after < before) {
        int k = 0;
        trim_events++;
        trim_bytes += before - after;
        while (size > 1) { size >>= 1; k++; }
        trim_sizes[k]++;
    }
}
"""


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _size(k: int) -> str:
    b = 1 << k
    return f"{b >> 20}M" if b >= 1 << 20 else f"{b >> 10}K" if b >= 1 << 10 else f"{b}B"


def worker(shim: str, model: str, batch: int, rounds: int) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from lockstep import PHASES, phases

    lib = ctypes.CDLL(shim)
    count = lambda name: ctypes.c_long.in_dll(lib, name).value  # noqa: E731
    sizes = (ctypes.c_long * 64).in_dll(lib, "trim_sizes")
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    fns = phases(model, batch)
    for r in range(rounds):
        for p in PHASES:
            e0, b0, s0 = count("trim_events"), count("trim_bytes"), list(sizes)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            fns[p]()
            mi = libc.mallinfo2()
            print(json.dumps({"round": r, "phase": p, "trims": count("trim_events") - e0,
                              "trimmed_mib": (count("trim_bytes") - b0) >> 20,
                              "trigger_sizes": {_size(k): sizes[k] - s0[k] for k in range(64) if sizes[k] - s0[k]},
                              "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0,
                              "arena_mib": mi.arena >> 20, "in_use_mib": mi.uordblks >> 20,
                              "top_mib": mi.keepcost >> 20}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", default=[], help="root of a source tree (repeatable)")
    p.add_argument("--model", default="maxvit_small_tf_224")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--worker", metavar="SHIM", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.worker, a.model, a.batch, a.rounds)
        return
    from lockstep import tree_path

    with tempfile.TemporaryDirectory() as tmp:
        src, shim = os.path.join(tmp, "trim.c"), os.path.join(tmp, "trim.so")
        with open(src, "w") as f:
            f.write(SOURCE)
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", shim, src, "-ldl"], check=True)
        for tree in a.tree or ["."]:
            env = {**os.environ, "PYTHONPATH": tree_path(tree), "LD_PRELOAD": shim, "OMP_NUM_THREADS": "1"}
            print(f"== {tree}", flush=True)
            subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", shim, "--model", a.model,
                            "--batch", str(a.batch), "--rounds", str(a.rounds)], env=env, check=True)


if __name__ == "__main__":
    main()
