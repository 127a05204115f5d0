"""Unit caches from one propagation vs rebuilt from the input, side by side (issue 23, item 1).

Each recipe runs twice on the same model, calibration set and seeds, each run in its own process
(clean peak RSS): ``engine.cache_propagation = auto`` (one propagation through the units) and
``rerun`` (every unit's cache rebuilt from the network input, the code before). Reported: the
recipe's calibration time (capture excluded; the trajectories are captured once and cached),
peak RSS, and whether the two quantizer states are bit-identical (sha256 of every tensor).

    python3 benchmarks/bench_propagation.py --model default --calib-n 32 --calib-every 2 \
        --recipe qdiffusion:iters_w=20,iters_a=10 --recipe edadm:iters=20 --out benchmarks/results/propagation
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MODES = ("rerun", "auto")


def one_run(args) -> dict:
    import torch

    from diffquant.config import QuantConfig
    from diffquant.pipeline import CalibConfig, as_recipe, quantize_bundle, resolve_recipe
    from diffquant.zoo.registry import load_model

    torch.set_num_threads(args.threads)
    bundle = load_model(args.model)
    name, config = resolve_recipe(args.recipe)
    stages, _ = as_recipe(name, config)
    stages = dataclasses.replace(stages, engine=dataclasses.replace(stages.engine, cache_propagation=args.one))
    calib = CalibConfig(n=args.calib_n, every=args.calib_every)
    quant = QuantConfig(weight_bits=args.wbits, act_bits=args.abits)
    result = quantize_bundle(bundle, stages, quant, calib, "cpu")
    digest = hashlib.sha256()
    for key, value in sorted(result.qmodel.quant_state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().contiguous().cpu().numpy().tobytes())
    return {"mode": args.one, "recipe": args.recipe, "recipe_s": result.timings["recipe_s"],
            "capture_s": result.timings["capture_s"], "digest": digest.hexdigest(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "load_1m": float(open("/proc/loadavg").read().split()[0])}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# One propagation vs unit caches rebuilt from the input ({meta['model']}, W{meta['wbits']}A{meta['abits']})",
             "", f"Calibration: {meta['calib_n']} trajectories, every {meta['calib_every']} step(s) of 50; "
             f"{meta['threads']} threads; each run in its own process. `recipe s`: the recipe's time after "
             "capture. `load_1m`: the 1-minute load average when the run ended.", "",
             "| recipe | rerun s | propagation s | speed-up | peak RSS rerun / propagation MB | bit-identical | load_1m |",
             "|---|---|---|---|---|---|---|"]
    by_recipe: dict[str, dict] = {}
    for r in rows:
        by_recipe.setdefault(r["recipe"], {})[r["mode"]] = r
    for recipe, runs in by_recipe.items():
        a, b = runs["rerun"], runs["auto"]
        lines.append(f"| `{recipe}` | {a['recipe_s']:.1f} | {b['recipe_s']:.1f} | {a['recipe_s'] / b['recipe_s']:.2f}× | "
                     f"{a['peak_rss_mb']:.0f} / {b['peak_rss_mb']:.0f} | {'yes' if a['digest'] == b['digest'] else 'NO'} | "
                     f"{a['load_1m']:.2f} / {b['load_1m']:.2f} |")
    lines += ["", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--recipe", action="append", default=None)
    parser.add_argument("--calib-n", type=int, default=32)
    parser.add_argument("--calib-every", type=int, default=2)
    parser.add_argument("--wbits", type=int, default=4)
    parser.add_argument("--abits", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        args.recipe = args.recipe[0]
        print(json.dumps(one_run(args)))
        return 0
    if not args.out or not args.recipe:
        parser.error("--out and at least one --recipe are needed")
    from report_io import write_report

    rows = []
    for recipe in args.recipe:
        for mode in MODES:
            cmd = [sys.executable, __file__, "--one", mode, "--recipe", recipe, "--model", args.model,
                   "--calib-n", str(args.calib_n), "--calib-every", str(args.calib_every), "--wbits", str(args.wbits),
                   "--abits", str(args.abits), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"{recipe} {mode}: {rows[-1]['recipe_s']:.1f} s, {rows[-1]['peak_rss_mb']:.0f} MB", flush=True)
    meta = {k: getattr(args, k) for k in ("model", "calib_n", "calib_every", "wbits", "abits", "threads")}
    write_report(args.out, "bench_propagation.py", argv, meta, rows, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
