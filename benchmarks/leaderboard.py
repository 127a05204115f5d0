"""Equal-budget leaderboard (issue 22): every preset at each bit setting, each given the same
calibration wall-clock budget, K calibration seeds per row, one table and a plot.

A budget is met by sizing each recipe's schedule, not by stopping it: the recipe's iterative knobs
(``SCHEDULE_KNOBS``: iterations per unit, LES iterations, fine-tuning epochs) are scaled by one
factor σ. Two short probe calibrations (σ₁, σ₂) give the cost line time = a + b·σ (a: capture and
the fixed passes), and σ = (budget − a) / b, clamped to [σ_min, 1] of the preset's own schedule.
The chosen schedule is written into the row's recipe spec, so every number is reproducible from
the table alone, whatever machine reruns it. Recipes whose fixed cost alone exceeds the budget run
at σ_min and are marked ``over budget``. The rows are then measured by ``diffquant bench`` with
``--calib-seeds K`` (mean ± std, bootstrap intervals, the sampling-noise floor, "not resolved"
marking) in one run per model.

    python3 benchmarks/leaderboard.py --model default --budget-s 600 --calib-seeds 3 \\
        --out benchmarks/results/leaderboard-default
    python3 benchmarks/leaderboard.py --summarize benchmarks/results/leaderboard-default \\
        benchmarks/results/leaderboard-mnist-resunet --out benchmarks/results/leaderboard
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

#: each preset's schedule knobs (scaled together by σ) and its full schedule on 2 CPU cores
SCHEDULE_KNOBS = {
    "naive": {},
    "qdiffusion": {"iters_w": 1000, "iters_a": 500},
    "edadm": {"iters": 1000},
    "dmq": {"les_iters": 100, "iters_w": 1000},
    "mpqdm": {"epochs": 15},
    "efficientdm": {"epochs": 15},
}
#: the smallest σ a row runs at
SIGMA_MIN = 0.02
#: probe schedules: fractions of the full schedule
PROBES = (0.02, 0.06)
SETTINGS = ("W8A8", "W4A8", "W4A6", "W3A4", "W2A4")


def knobs_at(preset: str, sigma: float) -> dict[str, int]:
    """Every schedule knob of ``preset`` at σ × its full value (at least 1)."""
    return {k: max(1, round(v * sigma)) for k, v in SCHEDULE_KNOBS[preset].items()}


def effective_sigma(preset: str, sigma: float) -> float:
    """The σ the rounded knobs really give (the largest knob's ratio)."""
    full = SCHEDULE_KNOBS[preset]
    if not full:
        return 1.0
    key = max(full, key=full.get)
    return knobs_at(preset, sigma)[key] / full[key]


def probe_sigmas(preset: str, probes=PROBES) -> tuple[float, float]:
    """Two probe σ whose rounded schedules differ (a 15-epoch schedule cannot take 2 % of itself)."""
    smallest = min(SCHEDULE_KNOBS[preset].values())
    s1 = max(probes[0], 1.0 / smallest)
    s2 = max(probes[1], 3.0 / smallest, 2 * s1)
    return effective_sigma(preset, s1), effective_sigma(preset, s2)


def spec_at(preset: str, sigma: float, extra: str = "") -> str:
    """The recipe spec of ``preset`` with every schedule knob at σ × its full value (≥ 1)."""
    parts = [f"{k}={v}" for k, v in knobs_at(preset, sigma).items()] + ([extra] if extra else [])
    return preset + (":" + ",".join(parts) if parts else "")


def fit_sigma(times: dict[float, float], budget_s: float) -> tuple[float, dict]:
    """σ for ``budget_s`` from probe times {σ: seconds} on the line a + b·σ."""
    (s1, t1), (s2, t2) = sorted(times.items())
    b = max((t2 - t1) / (s2 - s1), 1e-9)
    a = max(t1 - b * s1, 0.0)
    sigma = (budget_s - a) / b
    over = sigma < SIGMA_MIN
    return min(1.0, max(SIGMA_MIN, sigma)), {"fixed_s": round(a, 1), "per_sigma_s": round(b, 1),
                                             "over_budget": over}


def probe(model: str, preset: str, setting: str, sigma: float, calib_n: int, steps: int, extra: str) -> float:
    """Calibration seconds of one probe run (no sampling, no metrics)."""
    from diffquant.pipeline import CalibConfig, build_quant_config, parse_recipe_spec, parse_setting, quantize_bundle
    from diffquant.zoo.registry import load_model

    bundle = load_model(model)
    name, config = parse_recipe_spec(spec_at(preset, sigma, extra))
    wbits, abits = parse_setting(setting)
    res = quantize_bundle(bundle, name, build_quant_config(wbits, abits, None, split=False),
                          CalibConfig(n=calib_n, steps=steps, every=1), "cpu", recipe_config=config)
    return res.seconds


def plan_rows(args) -> list[dict]:
    """Every (setting, spec) row sized to the budget, with its probe record."""
    rows = []
    for preset in args.presets:
        for setting in args.settings:
            if not SCHEDULE_KNOBS[preset]:
                rows.append({"setting": setting, "spec": spec_at(preset, 1.0), "sigma": 1.0, "probe": None})
                continue
            times = {s: probe(args.model, preset, setting, s, args.calib_n, args.steps, args.extra.get(preset, ""))
                     for s in probe_sigmas(preset, args.probes)}
            sigma, record = fit_sigma(times, args.budget_s)
            record["probe_s"] = {str(k): round(v, 1) for k, v in times.items()}
            record["load_1m"] = round(os.getloadavg()[0], 2)
            rows.append({"setting": setting, "spec": spec_at(preset, sigma, args.extra.get(preset, "")),
                         "sigma": round(sigma, 3), "probe": record})
            print(f"[leaderboard] {preset} {setting}: σ = {sigma:.3f} ({record})", flush=True)
    return rows


def default_extras(calib_n: int) -> dict[str, str]:
    """Calibration-set sizes that fit ``calib_n`` captured trajectories (the presets' defaults assume more)."""
    return {"qdiffusion": f"cali_n={calib_n}", "edadm": f"tdac_n={calib_n},tdac_b={calib_n}",
            "mpqdm": f"pool_n={min(64, calib_n)}", "efficientdm": f"pool_n={min(64, calib_n)}"}


def run(args) -> int:
    from diffquant.bench import BenchConfig, run_bench
    from diffquant.pipeline import CalibConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan_file = out / "plan.json"
    if plan_file.is_file():  # a rerun keeps the sizing (and bench --resume keeps finished rows)
        rows = json.loads(plan_file.read_text())["rows"]
    else:
        t0 = time.perf_counter()
        rows = plan_rows(args)
        plan_file.write_text(json.dumps({"budget_s": args.budget_s, "model": args.model, "calib_n": args.calib_n,
                                         "steps": args.steps, "sizing_s": round(time.perf_counter() - t0, 1),
                                         "rows": rows}, indent=1))
    cfg = BenchConfig(model=args.model, recipes=[], rows=[[r["setting"], r["spec"]] for r in rows], n=args.n,
                      steps=args.steps, calib=CalibConfig(n=args.calib_n, steps=args.steps, every=1),
                      calib_seeds=args.calib_seeds, metrics=args.metrics, out=str(out / "bench"), resume=True)
    run_bench(cfg)
    return summarize([out], Path(args.summary) if args.summary else out / "leaderboard", args.budget_s)


def summarize(dirs: list[Path], out: Path, budget_s: float | None = None) -> int:
    """leaderboard.{json,md,png} from one or more leaderboard run directories."""
    tables = []
    for d in dirs:
        plan = json.loads((d / "plan.json").read_text())
        bench = json.loads((d / "bench" / "results.json").read_text())
        sizing = {(r["setting"], r["spec"]): r for r in plan["rows"]}
        rows = []
        for r in bench["rows"]:
            entry = sizing.get((r["setting"], r["recipe"]), {})
            rows.append({**r, "sigma": entry.get("sigma"),
                         "over_budget": bool((entry.get("probe") or {}).get("over_budget"))})
        tables.append({"model": bench["model"], "budget_s": plan["budget_s"], "rows": rows,
                       "resolution": bench.get("resolution", {}), "protocol": bench["protocol"]})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"tables": tables}, indent=1, default=str))
    lines = ["# Equal-budget leaderboard", ""]
    for t in tables:
        lines += [f"## {t['model']} (calibration budget {t['budget_s']:.0f} s per row on 2 CPU cores)", "",
                  "| setting | recipe (sized schedule) | σ | FID | FID 95 % CI | PSNR dB | accuracy | calib s | seeds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in t["rows"]:
            ci = r.get("fid_ci95")
            lines.append(
                f"| {r['setting']} | `{r['recipe']}`{' (over budget)' if r.get('over_budget') else ''} | "
                f"{r.get('sigma') if r.get('sigma') is not None else '-'} | {_f(r.get('fid'))} | "
                f"{f'[{ci[0]:.4g}, {ci[1]:.4g}]' if ci else '-'} | {_f(r.get('psnr'))} | {_f(r.get('accuracy'))} | "
                f"{_f(r.get('calib_s'))} | {r.get('calib_seeds', 1)} |")
        pairs = t["resolution"].get("fid", {}).get("pairs", [])
        unresolved = [p for p in pairs if not p["resolved"]]
        lines += ["", f"{len(pairs) - len(unresolved)} of {len(pairs)} same-setting FID pairs resolved.", ""]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(tables, out.with_suffix(".png"))
    print("\n".join(lines))
    return 0


def _f(v) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def _plot(tables: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 4), squeeze=False)
    for ax, t in zip(axes[0], tables):
        for preset in sorted({r["recipe"].split(":")[0] for r in t["rows"] if not r["recipe"].startswith("fp32")}):
            pts = [(SETTINGS.index(r["setting"]) if r["setting"] in SETTINGS else 99, r["setting"], r.get("fid"),
                    r.get("fid_std", 0.0)) for r in t["rows"] if r["recipe"].split(":")[0] == preset
                   and r.get("fid") is not None]
            pts.sort()
            if pts:
                ax.errorbar([p[1] for p in pts], [p[2] for p in pts], yerr=[p[3] for p in pts], marker="o",
                            capsize=3, label=preset)
        fp = next((r.get("fid") for r in t["rows"] if r["recipe"] == "fp32"), None)
        if fp is not None:
            ax.axhline(fp, color="k", ls="--", label="fp32")
        ax.set_title(f"{t['model']} ({t['budget_s']:.0f} s budget)")
        ax.set_xlabel("bit setting")
        ax.set_ylabel("FID (mean ± std over calibration seeds)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--presets", nargs="+", default=list(SCHEDULE_KNOBS), choices=list(SCHEDULE_KNOBS))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS))
    p.add_argument("--budget-s", type=float, default=600.0, help="calibration wall-clock budget per row")
    p.add_argument("--calib-seeds", type=int, default=3)
    p.add_argument("--calib-n", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--metrics", nargs="*", default=["fid", "sfid", "precision", "recall"])
    p.add_argument("--probes", type=float, nargs=2, default=list(PROBES))
    p.add_argument("--extra", type=json.loads, default={}, help='JSON {preset: "key=value,..."} added to every spec')
    p.add_argument("--out", default="benchmarks/results/leaderboard-run")
    p.add_argument("--summary", default=None, help="leaderboard stem (default: <out>/leaderboard)")
    p.add_argument("--summarize", nargs="+", type=Path, default=None, help="only merge these run directories")
    args = p.parse_args(argv)
    args.extra = {**default_extras(args.calib_n), **args.extra}
    if args.summarize:
        return summarize(args.summarize, Path(args.out))
    if args.budget_s <= 0 or args.calib_seeds < 1:
        p.error("--budget-s must be > 0 and --calib-seeds >= 1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
