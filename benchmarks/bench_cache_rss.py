"""Resident memory of a disk-backed unit cache: a memory map (before) vs positioned I/O (now).

Each configuration runs in a fresh subprocess: it writes N rows of one per-sample activation
([64, 32, 32] float32, 256 KiB a row) to a disk cache, then reads every row back once in random
batches of 32, as a reconstruction pass does. Reported: the process's resident high-water mark
above its memory before the cache existed, at N and 2N. ``memmap`` is the storage of the
previous commits (``np.memmap``); ``pread`` is :class:`diffquant.recon.cache.TensorStore`.

    python3 benchmarks/bench_cache_rss.py --out benchmarks/results/cache_rss
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, tempfile
import numpy as np, torch
from diffquant.recon.cache import CacheOptions, TensorStore, _Budget

mode, n = sys.argv[1], int(sys.argv[2])
shape = (64, 32, 32)
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
before = rss_mb()
with tempfile.TemporaryDirectory(dir=sys.argv[3]) as tmp:
    if mode == "memmap":
        store = np.memmap(f"{tmp}/t.bin", dtype=np.float32, mode="w+", shape=(n, *shape))
        write = lambda i, v: store.__setitem__(slice(i, i + len(v)), v.numpy())
        read = lambda idx: torch.from_numpy(np.ascontiguousarray(store[idx.numpy()]))
    else:
        store = TensorStore(n, shape, torch.float32, _Budget(CacheOptions(storage="disk", directory=tmp)))
        write = lambda i, v: store.write(slice(i, i + len(v)), v)
        read = store.read
    gen = torch.Generator().manual_seed(0)
    for i in range(0, n, 64):
        write(i, torch.randn(min(64, n - i), *shape, generator=gen))
    total = 0.0
    for idx in torch.randperm(n, generator=gen).split(32):
        total += float(read(idx).sum())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"mode": mode, "n": n, "cache_mb": n * 64 * 32 * 32 * 4 / 2**20,
                  "peak_rss_mb": round(peak - before, 1)}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="rows at N (2N is measured too)")
    parser.add_argument("--dir", default=None, help="where the cache files go (default: the system temp dir)")
    parser.add_argument("--out", default="benchmarks/results/cache_rss")
    args = parser.parse_args()
    directory = args.dir or os.environ.get("TMPDIR", "/tmp")
    rows = []
    for mode in ("memmap", "pread"):
        for n in (args.n, 2 * args.n):
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", CHILD, mode, str(n), directory], capture_output=True,
                                  text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["seconds"] = round(time.perf_counter() - t0, 1)
            row["load_1m"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            print(row, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python3 " + " ".join(sys.argv)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "command": command}, indent=1))
    lines = ["# Disk-backed unit cache: resident memory at N and 2N rows", "",
             "Rows of [64, 32, 32] float32 written, then each read once in random batches of 32. "
             "peak_rss_mb: the process's resident high-water mark above its memory before the cache.", "",
             "| storage | rows | cache MB | peak RSS MB | seconds | load |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['n']} | {r['cache_mb']:.0f} | {r['peak_rss_mb']} | {r['seconds']} | {r['load_1m']} |"
              for r in rows]
    lines += ["", f"Command: `{command}` ({time.strftime('%Y-%m-%d')})"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
