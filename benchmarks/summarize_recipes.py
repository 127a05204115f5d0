"""Merge several ``diffquant bench`` runs on one model into one table.

Every bench run samples its own full-precision row from the same seeds (or keeps it, with
``--resume``), so runs made at different times (or in parallel) are comparable; this script
checks that claim (the fp32 FIDs must agree to 0.01) before it puts their rows side by side,
adds FID / float-FID, and writes
``benchmarks/results/recipes_<model>.{json,md}``.

    python3 benchmarks/summarize_recipes.py benchmarks/results/mnist-resunet-naive \\
        benchmarks/results/mnist-resunet-recipes benchmarks/results/mnist-resunet-mpqdm
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffquant.bench import format_cell

COLUMNS = ("fid", "sfid", "precision", "recall", "accuracy", "psnr", "eps_mse", "calib_s", "peak_rss_mb", "size_mb")


def load_runs(dirs: list[Path]) -> list[dict]:
    runs = []
    for d in dirs:
        path = d / "results.json"
        if not path.is_file():
            sys.exit(f"error: {path} does not exist (run diffquant bench --out {d} first)")
        runs.append({"dir": str(d), **json.loads(path.read_text())})
    models = {r["model"] for r in runs}
    if len(models) != 1:
        sys.exit(f"error: the runs are on different models: {sorted(models)}")
    return runs


def merge(runs: list[dict]) -> dict:
    floats = [next(row for row in r["rows"] if row["recipe"] == "fp32") for r in runs]
    fp_fids = [f["fid"] for f in floats]
    if max(fp_fids) - min(fp_fids) > 0.01:
        sys.exit(f"error: the fp32 rows disagree ({fp_fids}); the runs do not share a protocol")
    fp_fid = fp_fids[0]
    rows = [{"source": Path(runs[0]["dir"]).name, **floats[0], "fid_ratio": 1.0}]
    for run in runs:
        for row in run["rows"]:
            if row["recipe"] == "fp32":
                continue
            rows.append({"source": Path(run["dir"]).name, **row, "fid_ratio": row["fid"] / fp_fid})
    return {"model": runs[0]["model"], "fp32_fid": fp_fid, "complete": all(r.get("complete", True) for r in runs),
            "protocol": runs[0]["protocol"], "sources": [{"dir": r["dir"], "command": r["command"],
                                                          "commands": r.get("commands") or [r["command"]],
                                                          "calib": r["protocol"]["calib"]} for r in runs],
            "rows": rows}


def markdown(merged: dict) -> str:
    cols = [c for c in COLUMNS if any(c in row for row in merged["rows"])]
    head = ["recipe", "setting", *cols, "FID / float", "source"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in merged["rows"]:
        cells = [row["recipe"], row["setting"], *(format_cell(row.get(c)) for c in cols), f"{row['fid_ratio']:.2f}",
                 row["source"]]
        lines.append("| " + " | ".join(cells) + " |")
    p = merged["protocol"]
    sources = "\n".join(f"- `{s['dir']}` (calibration: {s['calib']['n']} trajectories, every "
                        f"{s['calib']['every']} step(s)): "
                        + " then ".join(f"`{c}`" for c in s.get("commands", [s["command"]])) for s in merged["sources"])
    status = "" if merged["complete"] else "\n\n(some source runs had not finished every row)"
    return (f"# {merged['model']}: recipes side by side\n\nN = {p['n']}, {p['scheduler']} {p['steps']} steps, "
            f"η = {p['eta']}, guidance {p['guidance']}, seeds {p['seeds']}; every source run re-sampled the "
            f"float row from the same seeds (FID {merged['fp32_fid']:.2f} in each). calib_s: wall-clock "
            "seconds of the calibration; peak_rss_mb: the bench process's resident-memory high-water mark "
            "once the row was done (calibration, sampling and scoring of this and earlier rows together, "
            "so an upper bound for the row's calibration).\n\n" + "\n".join(lines)
            + f"{status}\n\nSources:\n{sources}\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    merged = merge(load_runs(args.dirs))
    name = f"recipes_{merged['model']}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({**merged, "command": " ".join(sys.argv)}, indent=1))
    (args.out / f"{name}.md").write_text(markdown(merged) + f"\nCommand: `python3 {' '.join(sys.argv)}`\n")
    print(markdown(merged))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
