"""Recipe combinations against the best single paper at each setting (#21 benchmark).

Reads one ``diffquant bench`` run holding combination rows (recipe files) and, optionally,
paper rows, plus the committed per-model recipe table (``recipes_<model>.json``, same protocol and
seeds) for the paper rows that run did not repeat. For every setting with a combination row it
writes the combination and the best paper row (lowest FID) side by side, with calibration time and
the load average during calibration, to ``recipes_combinations.{json,md}``.

    python3 benchmarks/compare_combinations.py benchmarks/results/default-combos \\
        benchmarks/results/recipes_fmnist-unet.json --out benchmarks/results/recipes_combinations
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PAPERS = ("naive", "qdiffusion", "edadm", "dmq", "mpqdm", "efficientdm")
METRICS = ("fid", "sfid", "precision", "recall", "accuracy", "psnr", "eps_mse", "calib_s", "load_1m")


def is_combination(recipe: str) -> bool:
    return recipe.split(":", 1)[0].endswith(".yaml")


def paper_of(recipe: str) -> str | None:
    head = recipe.split(":", 1)[0].split("@", 1)[0]
    base = head.removesuffix("_official")
    return base if base in PAPERS else None


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="bench output directory with the combination rows")
    parser.add_argument("table", type=Path, help="committed recipes_<model>.json with the paper rows")
    parser.add_argument("--out", type=Path, required=True, help="output stem (.json and .md are written)")
    args = parser.parse_args(argv)
    run = json.loads((args.run / "results.json").read_text())
    table = json.loads(args.table.read_text())
    if run["protocol"]["n"] != table["protocol"]["n"] or run["model"] != table["model"]:
        print("compare_combinations: the run and the table use another model or N", file=sys.stderr)
        return 2
    here = [dict(r, source=args.run.name) for r in run["rows"]]
    papers = [r for r in here + table["rows"] if paper_of(r["recipe"])]
    fp = next(r for r in here if r["recipe"] == "fp32")
    pairs = []
    for combo in (r for r in here if is_combination(r["recipe"])):
        same = [p for p in papers if p["setting"] == combo["setting"] and p.get("fid") is not None]
        best = min(same, key=lambda p: p["fid"]) if same else None
        pairs.append({"setting": combo["setting"], "combination": combo, "best_paper": best})
    result = {"model": run["model"], "protocol": run["protocol"], "fp32": fp, "pairs": pairs,
              "command": " ".join(sys.argv)}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float))
    lines = [f"# {run['model']}: recipe combinations vs the best single paper",
             "",
             f"N = {run['protocol']['n']}, {run['protocol']['scheduler']} {run['protocol']['steps']} steps, "
             f"guidance {run['protocol']['guidance']}, the same seeds in every row; float FID {fp['fid']:.2f}. "
             "calib_s: wall-clock seconds of the calibration on 2 shared cores; load_1m: the 1-minute load "
             "average when it ended (rows of earlier runs did not record it). `source`: the bench run of the row.",
             "",
             "| setting | row | recipe | " + " | ".join(METRICS) + " | source |",
             "|---|---|---|" + "---|" * len(METRICS) + "---|"]
    for pair in pairs:
        for label, row in (("combination", pair["combination"]), ("best paper", pair["best_paper"])):
            if row is None:
                lines.append(f"| {pair['setting']} | {label} | (no paper row at this setting) |" + " - |" * (len(METRICS) + 1))
                continue
            cells = " | ".join(fmt(row.get(m)) for m in METRICS)
            lines.append(f"| {pair['setting']} | {label} | `{row['recipe']}` | {cells} | {row.get('source', '-')} |")
    lines += ["", f"Command: `python3 {' '.join(sys.argv)}`", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
