"""Calibration cost on Stable-Diffusion-topology UNets from small to SD-1.5's exact config (issue #23).

Each row is one preset at a few iterations per unit on one config-built ``StableDiffusionPipeline``
(SD-1.5's UNet topology at reduced width, or SD-1.5's own widths 320/640/1280/1280 = 859.5 M
parameters; random weights, 32×32 latents, 77-token text embeddings) calibrated from ``N`` prompts'
trajectories, run in its own process (``benchmarks/bench_sd_pipeline.py --spec``) so that its peak
RSS is its own. Per row: peak RSS, peak disk under the row's temporary directory (caches that
spill), wall and CPU seconds of the calibration, CPU seconds per reconstruction unit (total / units
of the wrap plan), and the quality numbers of bench_sd_pipeline. With ``--double`` every row also
runs at 2N prompts: the RSS growth from N to 2N is what a memory bound must keep small.

    python benchmarks/bench_sd_scaling.py --sizes 10M --presets naive qdiffusion --double
    python benchmarks/bench_sd_scaling.py --tiny --out /tmp/s    # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: name -> (block widths, text context width); SD-1.5 itself is 320/640/1280/1280 with 768
SIZES = {
    "4M": ([32, 64, 128, 128], 256),
    "10M": ([32, 64, 128, 128], 768),
    "38M": ([64, 128, 256, 256], 768),
    "82M": ([96, 192, 384, 384], 768),
    "sd15": ([320, 640, 1280, 1280], 768),
    "tiny": ([32, 32], 64),
}
#: a few iterations per unit / one short epoch: this measures cost, not quality
PRESETS = {
    "naive": "naive",
    "qdiffusion": "qdiffusion:iters_w=3,iters_a=3,batch_size=4,act_init_n=16",
    "edadm": "edadm:iters=3,batch_size=4,tdac_n=32,act_init_n=16",
    "dmq": "dmq:les_iters=3,iters_w=3,batch_size=4,cali_n=8,act_init_n=16",
    "mpqdm": "mpqdm:epochs=1,pool_n=8,batch_size=2,trd_n=4",
    "efficientdm": "efficientdm:epochs=1,pool_n=8,batch_size=2,trd_n=4",
}


def dir_bytes(root: Path) -> int:
    total = 0
    for base, _dirs, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(base, f)).st_size
            except OSError:
                pass
    return total


def run_row(size: str, preset: str, prompts: int, args) -> dict:
    channels, context = SIZES[size]
    with tempfile.TemporaryDirectory(prefix="sdscale-") as tmp:
        tmp = Path(tmp)
        out = tmp / "out"
        cmd = [sys.executable, str(HERE / "bench_sd_pipeline.py"), "--channels", ",".join(map(str, channels)),
               "--context-dim", str(context), "--prompts", str(prompts), "--steps", str(args.steps),
               "--eval-prompts", "1", "--spec", PRESETS[preset], "--setting", args.setting,
               "--threads", str(args.threads), "--name", "row", "--out", str(out)]
        env = dict(os.environ, TMPDIR=str(tmp), DIFFQUANT_CACHE=str(tmp / "cache"))
        peak_disk = [0]
        done = threading.Event()

        def watch():
            while not done.wait(2.0):
                peak_disk[0] = max(peak_disk[0], dir_bytes(tmp))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        done.set()
        watcher.join()
        row = {"size": size, "channels": channels, "context": context, "preset": preset, "spec": PRESETS[preset],
               "prompts": prompts, "process_s": round(time.perf_counter() - t0, 1),
               "peak_disk_mb": round(peak_disk[0] / 2**20, 1), "load_avg_end": round(os.getloadavg()[0], 2)}
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            return {**row, "error": tail[0][:300]}
        result = json.loads((out / "row.json").read_text())
        measured = result["rows"][-1]
        row.update({"unet_parameters": result["model"]["unet_parameters"], "calib_inputs": result["calibration"]["rows"],
                    "capture_s": result["calibration"]["capture_s"], "units": measured["units"],
                    "calib_s": measured["calib_s"], "calib_cpu_s": measured["calib_cpu_s"],
                    "cpu_s_per_unit": round(measured["calib_cpu_s"] / max(1, measured["units"]), 2),
                    "peak_rss_mb": measured["peak_rss_mb"], "eps_rel_mse": measured["eps_rel_mse"],
                    "load_avg": measured["load_avg"]})
        return row


def write_report(rows: list[dict], args, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]])
    (out / f"{args.name}.json").write_text(json.dumps({"command": command, "setting": args.setting,
                                                      "steps": args.steps, "threads": args.threads, "rows": rows},
                                                     indent=1))
    lines = [f"# Calibration cost on SD-topology UNets ({args.setting}, {args.steps} DDIM steps × 2 CFG halves per "
             f"prompt, {args.threads} threads, one process per row)", "",
             "| size | UNet M params | preset | prompts | inputs | units | calib s | calib CPU s | CPU s / unit | "
             "peak RSS MB | peak disk MB | ε rel. MSE | load |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | - | {r['preset']} | {r['prompts']} | - | - | - | - | - | - | "
                         f"{r['peak_disk_mb']} | failed: {r['error']} | {r['load_avg_end']} |")
            continue
        lines.append(f"| {r['size']} | {r['unet_parameters'] / 1e6:.1f} | {r['preset']} | {r['prompts']} | "
                     f"{r['calib_inputs']} | {r['units']} | {r['calib_s']} | {r['calib_cpu_s']} | {r['cpu_s_per_unit']} | "
                     f"{r['peak_rss_mb']} | {r['peak_disk_mb']} | {r['eps_rel_mse']:.3g} | {r['load_avg']:.2f} |")
    growth = []
    for r in rows:
        twin = next((o for o in rows if o is not r and o["size"] == r["size"] and o["preset"] == r["preset"]
                     and o["prompts"] == 2 * r["prompts"] and "error" not in o), None)
        if twin and "error" not in r:
            g = 100 * (twin["peak_rss_mb"] / r["peak_rss_mb"] - 1)
            growth.append(f"- {r['size']} {r['preset']}: peak RSS {r['peak_rss_mb']} → {twin['peak_rss_mb']} MB from "
                          f"N = {r['prompts']} to {twin['prompts']} prompts ({g:+.1f} %; goal < 10 %: "
                          f"{'met' if g < 10 else 'NOT met'}).")
    lines += [""] + growth + ["", "Presets at: " + "; ".join(f"`{PRESETS[p]}`" for p in dict.fromkeys(r["preset"] for r in rows)),
                              "", f"Command: `{command}`", ""]
    (out / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["10M", "38M", "82M", "sd15"], choices=list(SIZES))
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--double", action="store_true", help="also run every row at 2N prompts")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--setting", default="W4A8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="tiny UNet, 2 prompts: checks that every row runs")
    p.add_argument("--name", default="sd_scaling")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    if args.tiny:
        args.sizes, args.prompts = ["tiny"], 2
    rows = []
    for size in args.sizes:
        for preset in args.presets:
            for prompts in ([args.prompts, 2 * args.prompts] if args.double else [args.prompts]):
                rows.append(run_row(size, preset, prompts, args))
                print(json.dumps(rows[-1]), flush=True)
                write_report(rows, args, Path(args.out))  # after every row: nothing lost if stopped
    return 0


if __name__ == "__main__":
    sys.exit(main())
