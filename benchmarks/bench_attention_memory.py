"""Peak memory and time of one quantized attention call: whole score tensor vs chunks vs fused.

Each configuration runs in a fresh subprocess (peak RSS is a process high-water mark); the
reported ``peak_mb`` is that process's resident high-water mark minus its resident memory just
before the call. Self-attention of an SD-1.5-like block (320 channels, 8 heads of 40) on a
T-token image, batch 2, quantizers calibrated on the same input first.

    python3 benchmarks/bench_attention_memory.py --out benchmarks/results/attention_memory
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
from diffusers.models.attention_processor import Attention
import diffquant.nn.attention as A
from diffquant.nn.attention import QuantAttnProcessor
from diffquant.nn.layers import QuantizerSpec

tokens, mode, softmax_bits = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
side = int(tokens ** 0.5)
attn = Attention(320, heads=8, dim_head=40, norm_num_groups=32, residual_connection=True, bias=True,
                 upcast_softmax=True, _from_deprecated_attn_block=True).eval()
x = torch.randn(2, 320, side, side)
proc = QuantAttnProcessor(QuantizerSpec(bits=8), QuantizerSpec(bits=softmax_bits, grid="unsigned"),
                          float_processor=attn.processor)
attn.set_processor(proc)
with torch.no_grad():
    small = torch.randn(1, 320, 8, 8)
    for q in proc.quantizers().values():
        q.mode = "observe"
    attn(small)
    for q in proc.quantizers().values():
        q.mode = "quantize"
    if mode == "whole":
        A.SCORE_CHUNK_ELEMENTS = A.DEVICE_SCORE_CHUNK_ELEMENTS = 1 << 62
        proc._fused = lambda q, k, v, m, s: proc._attend_rows(q, k, v, m, s)
    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    before = rss_mb()
    t0 = time.perf_counter()
    out = attn(x)
    seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"tokens": tokens, "mode": mode, "softmax_bits": softmax_bits, "peak_mb": round(peak - before, 1),
                  "seconds": round(seconds, 3), "checksum": float(out.double().abs().sum())}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--out", default="benchmarks/results/attention_memory")
    args = parser.parse_args()
    rows = []
    for tokens in args.tokens:
        for softmax_bits, modes in ((8, ("whole", "chunked")), (16, ("whole", "fused"))):
            for mode in modes:
                done = subprocess.run([sys.executable, "-c", CHILD, str(tokens), mode, str(softmax_bits)],
                                      capture_output=True, text=True, check=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                row["load_1m"] = round(os.getloadavg()[0], 2)
                rows.append(row)
                print(row, flush=True)
    for row in rows:  # same numbers from every path (chunks and the fused kernel: float rounding)
        ref = next(r for r in rows if r["tokens"] == row["tokens"] and r["softmax_bits"] == row["softmax_bits"]
                   and r["mode"] == "whole")
        row["checksum_rel_diff"] = abs(row["checksum"] - ref["checksum"]) / abs(ref["checksum"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python3 " + " ".join(sys.argv), "cpu": platform.processor() or platform.machine(),
            "threads": __import__("torch").get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, **meta}, indent=1))
    lines = ["# Quantized attention: peak memory of one call (SD-1.5-like block, batch 2, 8 heads)", "",
             "`whole`: the score and probability tensors materialised at once (before); `chunked`: rows and "
             "query tokens within the score budget; `fused`: softmax output not quantized, one "
             "scaled_dot_product_attention on the quantized q, k, v. peak_mb: resident high-water mark of the "
             "call's process above its memory before the call.", "",
             "| tokens | softmax bits | path | peak MB | seconds | output rel. diff vs whole | load |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['tokens']} | {r['softmax_bits']} | {r['mode']} | {r['peak_mb']} | {r['seconds']} | "
              f"{r['checksum_rel_diff']:.1e} | {r['load_1m']} |" for r in rows]
    lines += ["", f"Command: `{meta['command']}` ({meta['date']}, {meta['threads']} threads)"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
