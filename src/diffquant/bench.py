"""``diffquant bench``: a matrix of recipes × bit settings on one model, same seeds for every row.

Writes ``results.json`` (every knob that moves a number, plus library versions), ``results.md``
(FID, sFID, precision, recall, ε-MSE, calibration time, peak memory, model size), plots (FID vs
bits per recipe; per-timestep ε-MSE) and a grid comparing samples from the same noise.
"""
from __future__ import annotations

import json
import resource
import sys
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import checked, knob, save_yaml
from .errors import ConfigError
from .eval.spread import aggregate_seeds, noise_floor, resolution, resolution_markdown
from .fsutil import check_writable_dir
from .jsonio import dumps, write_json
from .pipeline import (
    CalibConfig,
    calib_protocol,
    bundled_classifier,
    build_quant_config,
    default_guidance,
    parse_recipe_spec,
    parse_setting,
    quantize_bundle,
    reference_dataset,
)


@dataclass
@checked
class BenchConfig:
    model: str = "mnist-resunet"
    recipes: list[str] = field(default_factory=lambda: ["naive"])
    settings: list[str] = field(default_factory=lambda: ["W8A8", "W4A8"])
    n: int = 1000
    steps: int = 50
    scheduler: str = "ddim"
    eta: float = 0.0
    guidance: float | None = None
    seed: int = 0
    batch_size: int = 100
    #: reference images (None = the whole test split)
    ref_n: int | None = None
    metrics: list[str] = field(default_factory=lambda: ["fid", "sfid", "precision", "recall"])
    fd_method: str = "sqrtm"
    #: samples whose trajectories give the per-timestep ε-MSE curve
    eps_n: int = 64
    split: bool = False
    #: extra (setting, recipe spec) rows after the recipes × settings matrix, for ablations that
    #: only make sense at one setting (e.g. ``["W4A8", "qdiffusion:split=false"]``)
    rows: list[list[str]] = field(default_factory=list)
    calib: CalibConfig = field(default_factory=CalibConfig)
    out: str = "runs/bench"
    #: keep the float row and the finished rows already in ``out`` (same protocol) and run only the
    #: rows that are missing: resumes an interrupted run, or adds rows to a finished one
    resume: bool = False
    #: K: calibration seeds per row (disjoint calibration trajectories, engine seed + k); K > 1
    #: reports mean ± std and a bootstrap 95 % interval of every metric
    calib_seeds: int = knob(1, ge=1, doc="calibration seeds per row")
    #: also sample the float model from disjoint seeds (N … 2N−1): the sampling-noise floor row
    noise_floor: bool = True


#: the recipe name of the sampling-noise floor row
NOISE_FLOOR_ROW = "fp32 (disjoint seeds)"


def peak_rss_mb() -> float:
    """Process high-water mark of resident memory (MiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / 1024 if sys.platform == "darwin" else rss / 1024


def model_size_mb(qmodel) -> float:
    """Size the weights would take at their bit-widths (other tensors at fp32)."""
    quantized = {}
    for name, layer in qmodel.layers().items():
        if layer.use_weight_quant:
            bits = [q.bits for q in layer.weight_quantizers if q.active]
            if bits:
                quantized[f"{name}.weight"] = float(np.mean(bits))
    total = 0.0
    for key, value in qmodel.denoiser_state_dict().items():
        if key not in set(qmodel.float_keys):
            continue
        total += value.numel() * quantized.get(key, 32) / 8
    return total / 2**20


def float_size_mb(model) -> float:
    return sum(v.numel() * v.element_size() for v in model.state_dict().values()) / 2**20


def _eps_curve(bundle, qmodel, cfg: BenchConfig, guidance: float, device) -> dict:
    from .diffusion.sampling import sample
    from .eval.fidelity import EpsErrorRecorder

    def fn(unet):
        def call(x, t, labels):
            tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
            return bundle.predict_noise(unet, x, tt, labels)

        return call

    recorder = EpsErrorRecorder(fn(bundle.unet), fn(qmodel))
    sample(bundle, min(cfg.eps_n, cfg.n), seed=cfg.seed, scheduler=cfg.scheduler, steps=cfg.steps, eta=cfg.eta,
           guidance=guidance, batch_size=cfg.batch_size, device=device, progress=False, step_callback=recorder)
    return recorder.curve()


def run_bench(cfg: BenchConfig, device="cpu", assets=None) -> dict:
    from .diffusion.grid import save_grid
    from .diffusion.sampling import sample, save_samples
    from .eval.fid import reference_stats
    from .eval.inception import InceptionFeatures
    from .eval.report import environment_record, evaluate_images
    from .zoo.registry import load_model

    # bad settings, specs and output folders fail before any work
    plan = [(spec, *parse_recipe_spec(spec), s.upper(), *parse_setting(s)) for spec in cfg.recipes for s in cfg.settings]
    for pair in cfg.rows:
        if len(pair) != 2:
            raise ConfigError(f"a bench row is [SETTING, RECIPE_SPEC], got {pair!r}")
        plan.append((pair[1], *parse_recipe_spec(pair[1]), pair[0].upper(), *parse_setting(pair[0])))
    out = check_writable_dir(cfg.out)
    bundle = load_model(cfg.model, assets=assets, device=device)
    dataset = reference_dataset(bundle)
    needs_reference = bool(set(cfg.metrics) & {"fid", "sfid", "precision", "recall"})
    if dataset is None and needs_reference:
        raise ConfigError(f"no reference data set is known for {bundle.name}; pass --metrics with no FID metrics")
    guidance = default_guidance(bundle) if cfg.guidance is None else cfg.guidance
    extractor = InceptionFeatures(device=device) if needs_reference else None
    reference = None
    if needs_reference:
        reference = reference_stats(dataset, "test", n=cfg.ref_n, extractor=extractor, device=device,
                                    spatial="sfid" in cfg.metrics)
    classifier = bundled_classifier(bundle, device)
    sample_kw = dict(seed=cfg.seed, scheduler=cfg.scheduler, steps=cfg.steps, eta=cfg.eta, guidance=guidance,
                     batch_size=cfg.batch_size, device=device)
    protocol = _normalised({
        "n": cfg.n, "scheduler": cfg.scheduler, "steps": cfg.steps, "eta": cfg.eta, "guidance": guidance,
        "seeds": f"{cfg.seed}..{cfg.seed + cfg.n - 1} (per-sample generators)",
        "reference": None if reference is None else {"dataset": dataset, "split": "test", **reference.meta},
        "fd_method": cfg.fd_method, "pr_k": 3, "calib": calib_protocol(cfg.calib), "metrics": list(cfg.metrics),
        "split": cfg.split, "calib_seeds": cfg.calib_seeds, "noise_floor": cfg.noise_floor})
    command = " ".join(sys.argv)
    previous = load_previous_run(out, bundle.name, protocol, cfg.n) if cfg.resume else None
    save_yaml(cfg, out / "bench_config.yaml")

    def evaluate(images, labels, fp_images=None):
        metrics = list(cfg.metrics)
        if classifier is not None and labels is not None:
            metrics.append("accuracy")
        if fp_images is not None:
            metrics += ["mse", "psnr"]
        return evaluate_images(images, labels, reference=reference, extractor=extractor, classifier=classifier,
                               fp_images=fp_images, metrics=metrics, device=device, fd_method=cfg.fd_method)["metrics"]

    def write(complete: bool) -> dict:
        """results.json / results.md so far: rewritten after every row, so an interrupted run keeps
        the rows it finished (``complete`` says whether every row is there)."""
        results = {
            "model": bundle.name,
            "complete": complete,
            "protocol": protocol,
            "rows": rows,
            "eps_mse_curves": curves,
            "environment": environment_record(),
            "command": command,
            "commands": commands,
            "resolution": resolution_pairs(rows, cfg.metrics),  # the resolved / not-resolved pairs
        }
        write_json(out / "results.json", results, indent=1, default=str)
        status = "" if complete else "\n\n(partial: the run has not finished every row yet)"
        shown = "\n".join(f"Command: `{c}`" for c in commands)
        spread = (f"{cfg.calib_seeds} calibration seeds per row: metrics are means, `_std` their standard "
                  "deviation, `_ci95` a bootstrap 95 % interval of the mean"
                  if cfg.calib_seeds > 1 else "one calibration seed per row (no seed interval)")
        notes = resolution_notes(results["resolution"])
        (out / "results.md").write_text(
            f"# {bundle.name}: {title}\n\n"
            f"N = {cfg.n}, {cfg.scheduler} {cfg.steps} steps, η = {cfg.eta}, guidance {guidance}, "
            f"reference: {dataset} test ({'all' if cfg.ref_n is None else cfg.ref_n} images); {spread}."
            f"\n\n{rows_markdown(rows)}{status}\n\n{notes}{shown}\n"
        )
        return results

    title = "; ".join(([f"{', '.join(cfg.recipes)} × {', '.join(cfg.settings)}"] if cfg.recipes else [])
                      + [f"{spec} {setting.upper()}" for setting, spec in cfg.rows])
    per_row = min(10, cfg.n)
    if previous is not None:
        print(f"[bench] {bundle.name}: resuming {out} ({len(previous.rows) - 1} finished row(s) kept)")
        fp_images = previous.fp_images
        rows, curves = previous.rows, previous.curves
        commands = previous.commands + [command]
        grids = [previous.images(row, per_row) for row in rows]
    else:
        print(f"[bench] {bundle.name}: full precision, {cfg.n} samples")
        t0 = time.perf_counter()
        fp = sample(bundle, cfg.n, **sample_kw)
        fp_sample_s = time.perf_counter() - t0
        save_samples(fp, out / "samples" / "fp32")
        fp_images = fp.images
        rows = [{"recipe": "fp32", "setting": "W32A32", **evaluate(fp.images, fp.labels),
                 "calib_s": 0.0, "sample_s": round(fp_sample_s, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
                 "size_mb": round(float_size_mb(bundle.unet), 3), "load_1m": round(os.getloadavg()[0], 2)}]
        if cfg.noise_floor:
            print(f"[bench] {bundle.name}: full precision again from disjoint seeds (the sampling-noise floor)")
            other = sample(bundle, cfg.n, **{**sample_kw, "seed": cfg.seed + cfg.n})
            save_samples(other, row_samples_dir(out, NOISE_FLOOR_ROW, "W32A32"))
            rows.append({"recipe": NOISE_FLOOR_ROW, "setting": "W32A32", **evaluate(other.images, other.labels),
                         "calib_s": 0.0, "size_mb": rows[0]["size_mb"], "load_1m": round(os.getloadavg()[0], 2)})
        curves = {}
        commands = [command]
        grids = [fp.images[:per_row]] + ([other.images[:per_row]] if cfg.noise_floor else [])
    for recipe, name, recipe_config, tag, wbits, abits in plan:
        done = [i for i, r in enumerate(rows) if (r["recipe"], r["setting"]) == (recipe, tag)]
        if done and (row_samples_dir(out, recipe, tag) / "samples.npz").is_file():
            print(f"[bench] {recipe} {tag}: already in {out}, kept")
            continue
        quant = build_quant_config(wbits, abits, None, split=cfg.split)
        runs = []
        for k in range(cfg.calib_seeds):
            which = f" (calibration seed {k + 1}/{cfg.calib_seeds})" if cfg.calib_seeds > 1 else ""
            print(f"[bench] {recipe} {tag}: calibrating{which}")
            res = quantize_bundle(bundle, name, quant, cfg.calib, device, recipe_config=recipe_config, seed_offset=k)
            calib_load = os.getloadavg()[0]  # timings are only comparable at a known machine load
            qbundle = bundle.with_unet(res.qmodel)
            t0 = time.perf_counter()
            qs = sample(qbundle, cfg.n, **sample_kw)
            sample_s = time.perf_counter() - t0
            save_samples(qs, row_samples_dir(out, recipe, tag, k))
            curve = _eps_curve(bundle, res.qmodel, cfg, guidance, device)
            if k == 0:
                curves[f"{recipe} {tag}"] = curve
                first_images = qs.images[:per_row]
            runs.append({"recipe": recipe, "setting": tag, "calib_seed": k, **evaluate(qs.images, qs.labels, fp_images),
                         "eps_mse": float(np.mean(curve["eps_mse"])), "calib_s": round(res.seconds, 1),
                         "capture_s": round(res.timings.get("capture_s", 0.0), 1),
                         "sample_s": round(sample_s, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
                         "size_mb": round(model_size_mb(res.qmodel), 3), "load_1m": round(calib_load, 2)})
        row = aggregate_seeds(runs, seed=cfg.seed)
        if done:  # a kept row whose samples were lost: replaced in place
            rows[done[0]], grids[done[0]] = row, first_images
        else:
            rows.append(row)
            grids.append(first_images)
        write(complete=False)
    results = write(complete=True)
    table = rows_markdown(rows)
    save_grid(out / "comparison.png", np.concatenate(grids), nrow=per_row)
    _plots(rows, curves, out)
    print(table)
    return results


def row_samples_dir(out: Path, recipe: str, setting: str, calib_seed: int = 0) -> Path:
    """Where a bench row's samples (of calibration seed ``calib_seed``) live inside ``out``."""
    if recipe == NOISE_FLOOR_ROW:
        return out / "samples" / "fp32-disjoint-seeds"
    return out / "samples" / (f"{recipe}-{setting}" + (f"-seed{calib_seed}" if calib_seed else ""))


#: metrics on which pairs of rows are checked for resolution (where measured), in this order
RESOLVED_METRICS = ("fid", "psnr", "eps_mse")


def resolution_pairs(rows: list[dict], metrics: list[str]) -> dict:
    """For FID (when measured), PSNR and ε-MSE: the noise floor and every same-setting pair."""
    out = {}
    for metric in RESOLVED_METRICS:
        if metric == "fid" and "fid" not in metrics:
            continue
        floor = noise_floor(rows, metric, floor_recipe=NOISE_FLOOR_ROW)
        pairs = resolution(rows, metric, floor)
        if pairs:
            out[metric] = {"noise_floor": floor, "pairs": pairs}
    return out


def resolution_notes(pairs: dict) -> str:
    """The Markdown of :func:`resolution_pairs`'s result (FID's floor from the disjoint-seed float
    row; PSNR and ε-MSE are measured against the float model from the same noise, so no floor)."""
    blocks = [resolution_markdown(v["pairs"], v["noise_floor"], metric) for metric, v in pairs.items()]
    return "".join(b + "\n\n" for b in blocks if b)


@dataclass
class PreviousRun:
    """What ``--resume`` keeps from a results directory: its rows, ε-MSE curves, commands and the
    float samples every quantized row is compared with."""

    out: Path
    rows: list[dict]
    curves: dict
    commands: list[str]
    fp_images: np.ndarray

    def images(self, row: dict, count: int) -> np.ndarray:
        """The first ``count`` saved images of ``row`` (for the comparison grid)."""
        if row["recipe"] == "fp32":
            return self.fp_images[:count]
        file = row_samples_dir(self.out, row["recipe"], row["setting"]) / "samples.npz"
        if not file.is_file():
            return np.zeros_like(self.fp_images[:count])
        with np.load(file) as saved:
            return saved["images"][:count]


def load_previous_run(out: Path, model: str, protocol: dict, n: int) -> PreviousRun | None:
    """The run already in ``out``, or None when there is none; a :class:`ConfigError` when it was
    made with another model or protocol (its numbers would not be comparable)."""
    file = out / "results.json"
    if not file.is_file():
        print(f"[bench] nothing to resume in {out}: starting a fresh run")
        return None
    try:
        saved = json.loads(file.read_text())
        rows = saved["rows"]
        old = dict(saved["protocol"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{file} is not a diffquant bench result ({exc}); use another --out") from None
    if saved.get("model") != model:
        raise ConfigError(f"{out} holds results for {saved.get('model')!r}, not {model!r}; use another --out")
    # results written before these keys were recorded: read them off the float row and the command
    if rows and rows[0].get("recipe") == "fp32":
        old.setdefault("metrics", [m for m in ("fid", "sfid", "precision", "recall") if m in rows[0]])
    old.setdefault("split", " --split" in saved.get("command", ""))
    old.setdefault("calib_seeds", 1)
    old.setdefault("noise_floor", any(r.get("recipe") == NOISE_FLOOR_ROW for r in rows))
    differ = sorted(k for k in set(protocol) | set(old) if protocol.get(k) != old.get(k))
    if differ:
        detail = "; ".join(f"{k}: {old.get(k)!r} there, {protocol.get(k)!r} now" for k in differ)
        raise ConfigError(f"cannot resume {out}: it was run with another protocol ({detail}); "
                          "use another --out or the same settings")
    fp_file = out / "samples" / "fp32" / "samples.npz"
    if not rows or rows[0].get("recipe") != "fp32" or not fp_file.is_file():
        raise ConfigError(f"cannot resume {out}: its float row or {fp_file} is missing; use another --out")
    with np.load(fp_file) as fp:
        fp_images = fp["images"]
    if len(fp_images) != n:
        raise ConfigError(f"cannot resume {out}: {fp_file} holds {len(fp_images)} samples, not {n}")
    commands = list(saved.get("commands") or [saved.get("command", "")])
    return PreviousRun(out, rows, dict(saved.get("eps_mse_curves", {})), commands, fp_images)


def _normalised(value):
    """``value`` as it reads back from results.json (tuples as lists, numpy scalars as numbers)."""
    return json.loads(dumps(value, default=str))


def format_cell(v) -> str:
    """A Markdown table cell: ``-`` for missing, 4 significant digits for floats, [lo, hi] for an
    interval."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
        return f"[{v[0]:.4g}, {v[1]:.4g}]"
    return str(v)


#: row fields kept in results.json only (not table columns)
JSON_ONLY = ("per_seed",)


def rows_markdown(rows: list[dict]) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys and k not in JSON_ONLY]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(format_cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _plots(rows: list[dict], curves: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for recipe in sorted({r["recipe"] for r in rows if not r["recipe"].startswith("fp32")}):
        pts = [(parse_setting(r["setting"])[0] * 100 + parse_setting(r["setting"])[1], r["setting"], r.get("fid"),
                r.get("fid_std", 0.0)) for r in rows if r["recipe"] == recipe and r.get("fid") is not None]
        pts.sort()
        if pts:
            ax.errorbar([p[1] for p in pts], [p[2] for p in pts], yerr=[p[3] for p in pts], marker="o",
                        capsize=3, label=recipe)
    fp = [r.get("fid") for r in rows if r["recipe"] == "fp32"]
    if fp and fp[0] is not None:
        ax.axhline(fp[0], color="k", ls="--", label="fp32")
    ax.set_ylabel("FID")
    ax.set_xlabel("bit setting")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fid_vs_bits.png", dpi=120)
    plt.close(fig)
    if curves:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, c in curves.items():
            ax.plot(c["timestep"], c["eps_mse"], label=name)
        ax.set_xlabel("timestep t")
        ax.set_ylabel("ε MSE vs full precision")
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "eps_mse_per_step.png", dpi=120)
        plt.close(fig)


def add_bench_parser(sub) -> None:
    from .diffusion.sample_cli import class_list

    p = sub.add_parser("bench", help="recipes × bit settings on one model, same seeds, one table",
                       description="Runs a matrix of recipes and bit settings on one model with the same seeds and "
                                   "writes results.json, results.md, plots and a comparison grid.")
    p.add_argument("--model", default="mnist-resunet")
    p.add_argument("--assets", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--recipes", nargs="+", default=None,
                   help="recipe specs: NAME, NAME@config.yaml, NAME:key=value,key=value (e.g. qdiffusion:split=false); "
                        "default naive, or none when --row is given")
    p.add_argument("--settings", nargs="+", default=["W8A8", "W4A8"])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--ref-n", type=int, default=None, help="reference images (default: the whole test split)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--metrics", nargs="*", default=["fid", "sfid", "precision", "recall"],
                   help="Inception metrics (fid sfid precision recall); empty: fidelity to FP only")
    p.add_argument("--fd-method", default="sqrtm", choices=["sqrtm", "eigh"])
    p.add_argument("--calib-n", type=int, default=64)
    p.add_argument("--calib-seeds", type=int, default=1, metavar="K",
                   help="calibration seeds per row (disjoint calibration trajectories, engine seed + k): "
                        "mean ± std and a bootstrap 95%% interval of every metric; pairs whose intervals overlap "
                        "are marked not resolved")
    p.add_argument("--max-memory", type=float, default=None, metavar="MB",
                   help="in-memory budget of the reconstruction unit caches (beyond it they stream from disk)")
    p.add_argument("--no-noise-floor", action="store_true",
                   help="skip the float row sampled from disjoint seeds (the sampling-noise floor)")
    p.add_argument("--calib-every", type=int, default=5)
    p.add_argument("--split", action="store_true")
    p.add_argument("--row", nargs=2, action="append", default=[], metavar=("SETTING", "RECIPE_SPEC"),
                   help="one extra row after the recipes × settings matrix (repeatable), e.g. "
                        "--row W4A8 qdiffusion:split=false")
    p.add_argument("--prompts", default=None, help="text-to-image pipeline folders: prompts file (one per line)")
    p.add_argument("--classes", type=class_list, default=None, help="class-conditional pipeline folders: labels")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale of the samples (default: the model's / the pipeline's own)")
    p.add_argument("--reference", default=None,
                   help="pipeline folders: reference images (folder) or statistics (STEM.json) for FID-type metrics")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--resume", action="store_true",
                   help="keep the float row and finished rows already in --out (same protocol) and run only "
                        "the missing ones: resumes an interrupted run or adds rows to a finished one")
    p.set_defaults(handler=_run)


def _run(args) -> int:
    if args.n <= 0 or (args.ref_n is not None and args.ref_n <= 0):
        raise ConfigError("--n and --ref-n must be positive")
    recipes = args.recipes if args.recipes is not None else ([] if args.row else ["naive"])
    from .pipeline_folders import bench_pipeline_folder, pipeline_folder_or_none

    folder = pipeline_folder_or_none(args.model)
    if args.calib_seeds < 1:
        raise ConfigError(f"--calib-seeds must be >= 1, got {args.calib_seeds}")
    if folder is not None:  # a full diffusers pipeline: sampled through diffusers
        if args.calib_seeds != 1:
            raise ConfigError("--calib-seeds applies to named models and denoiser folders, not full pipeline folders")
        rows = [(spec, *parse_recipe_spec(spec), s.upper(), *parse_setting(s)) for spec in recipes
                for s in args.settings]
        rows += [(spec, *parse_recipe_spec(spec), setting.upper(), *parse_setting(setting))
                 for setting, spec in args.row]
        check_writable_dir(args.out)
        bench_pipeline_folder(folder, rows=rows, n=args.n, steps=args.steps, calib_n=args.calib_n,
                              calib_every=args.calib_every, prompts=args.prompts, classes=args.classes,
                              guidance=args.guidance, reference=args.reference, metrics=args.metrics, out=args.out,
                              device=args.device, fd_method=args.fd_method)
        print((Path(args.out) / "results.md").read_text())
        return 0
    if args.prompts is not None or args.classes is not None or args.reference is not None:
        raise ConfigError("--prompts, --classes and --reference apply to full diffusers pipeline folders")
    cfg = BenchConfig(model=args.model, recipes=recipes, rows=[list(r) for r in args.row], settings=args.settings, n=args.n, steps=args.steps,
                      ref_n=args.ref_n, metrics=args.metrics, fd_method=args.fd_method, split=args.split,
                      calib=CalibConfig(n=args.calib_n, steps=args.steps, every=args.calib_every,
                                        max_memory_mb=args.max_memory), out=args.out,
                      resume=args.resume, guidance=args.guidance, calib_seeds=args.calib_seeds,
                      noise_floor=not args.no_noise_floor)
    run_bench(cfg, device=args.device, assets=args.assets)
    return 0
