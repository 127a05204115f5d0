"""End-to-end jobs: calibration capture → wrap → recipe → save, and the README's main job.

This is the only place that knows about models, calibration, recipes *and* evaluation at once;
each of those stays ignorant of the others.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .diffusion import distributed
from .config import QuantConfig, from_dict, load_yaml, parse_yaml, save_yaml, to_dict, checked
from .errors import ConfigError
from .fsutil import check_writable_dir
from .methods import RECIPES
from .recipes import Recipe, StageContext, load_recipe, run_recipe
from .quant.affine import validate_bits
from .model import QuantModel, quantize, save
from .jsonio import write_json


@dataclass
@checked
class CalibConfig:
    """Calibration data: trajectories captured in one full-precision sampling pass per batch."""

    n: int = 64  # trajectories
    steps: int = 50  # sampler steps (the evaluation schedule)
    every: int = 5  # uniform selection: every k-th step
    scheduler: str = "ddim"
    eta: float = 0.0
    guidance: float | None = None  # None: the model's default
    batch_size: int = 32
    seed: int = 10_000  # disjoint from evaluation seeds (which start at 0)
    #: in-memory budget (MB) of the reconstruction unit caches; beyond it they stream from disk.
    #: None: the recipe's own (``engine.cache_memory_mb``), at most a quarter of the machine's memory
    max_memory_mb: float | None = None


def calib_protocol(calib: CalibConfig) -> dict:
    """The calibration settings that move a number (the cache memory budget does not)."""
    return {k: v for k, v in to_dict(calib).items() if k != "max_memory_mb"}


@dataclass
class QuantizeResult:
    qmodel: QuantModel
    path: Path | None
    summary: str
    seconds: float
    timings: dict = field(default_factory=dict)


def default_guidance(bundle) -> float:
    """The model card's recommended guidance scale, else 1.5 for class-conditional models."""
    return bundle.default_guidance


def calibration_batches(bundle, calib: CalibConfig, device, cache_dir=None, select=None, capture_options=None):
    """Uniformly selected (x_t, t, labels) batches from captured FP trajectories; a recipe may
    bring its own selection ``select(cache) -> CalibrationSet`` (e.g. Q-Diffusion's policies) and
    extra ``capture_trajectories`` arguments ``capture_options`` (e.g. EDA-DM's TDAC feature
    hooks; a ``seed`` there replaces ``calib.seed``)."""
    from .calib.capture import capture_trajectories
    from .calib.select import uniform

    guidance = default_guidance(bundle) if calib.guidance is None else calib.guidance
    options = {"seed": calib.seed, **(capture_options or {})}
    cache = capture_trajectories(
        bundle, calib.n, steps=calib.steps, scheduler=calib.scheduler, eta=calib.eta, guidance=guidance,
        batch_size=calib.batch_size, device=device, cache_dir=cache_dir, **options,
    )
    if select is not None:
        return select(cache)
    n_steps = max(1, calib.steps // calib.every)
    return uniform(cache, n_per_step=calib.n, n_steps=n_steps)


def make_forward_loop(bundle, calib_set, batch_size: int, device, guidance: float):
    """``forward_loop(model)`` running every calibration batch through ``model``; class-conditional
    models sampled with guidance see each (x_t, t) once with its label and once with the null
    label (docs/methods.md §3.1)."""
    if bundle.is_conditional and guidance != 1.0:
        calib_set = calib_set.with_uncond()

    @torch.no_grad()
    def loop(model):
        for x, t, labels in calib_set.batches(batch_size, device=device):
            bundle.predict_noise(model, x, t, labels)

    return loop


def build_quant_config(wbits: int, abits: int, config_path: str | None, split: bool) -> QuantConfig:
    if config_path:
        return load_yaml(QuantConfig, config_path)
    return QuantConfig(
        weight_bits=wbits, act_bits=abits, quantize_weights=wbits <= 8, quantize_acts=abits <= 8, split=split
    )


def as_recipe(recipe: "str | Recipe", recipe_config=None) -> tuple[Recipe, object]:
    """(the stage list to run, the configuration recorded with the model) for a recipe name with
    its flat config (default: its defaults), a :class:`Recipe`, or a name with a Recipe as config."""
    if isinstance(recipe, Recipe):
        return recipe, None
    if isinstance(recipe_config, Recipe):
        return recipe_config, None
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; available: {', '.join(sorted(RECIPES))} "
                          "or a recipe file with stages")
    config_cls, _ = RECIPES[recipe]
    config = config_cls() if recipe_config is None else recipe_config
    if not isinstance(config, config_cls):
        raise ConfigError(f"recipe_config for {recipe} must be a {config_cls.__name__}, got {type(config).__name__}")
    return config.to_recipe(), config


def quantize_bundle(bundle, recipe: "str | Recipe", quant: QuantConfig, calib: CalibConfig, device="cpu",
                    cache_dir=None, *, recipe_config=None, work_dir=None, seed_offset: int = 0) -> QuantizeResult:
    """Capture calibration trajectories of ``bundle``, wrap its denoiser and run ``recipe``.

    ``seed_offset`` k > 0 gives another calibration seed: trajectories from seeds disjoint from
    those of offset 0 (``calib.seed + k·calib.n`` on) and the recipe's engine seed + k (the
    randomness of selection picks, reconstruction and fine-tuning); 0 is the recipe as given.
    """
    stages, recorded = as_recipe(recipe, recipe_config)
    if calib.max_memory_mb is not None:
        if calib.max_memory_mb <= 0:
            raise ConfigError(f"max_memory_mb must be > 0, got {calib.max_memory_mb}")
        stages = dataclasses.replace(stages, engine=dataclasses.replace(stages.engine,
                                                                       cache_memory_mb=float(calib.max_memory_mb)))
    if seed_offset:
        calib = dataclasses.replace(calib, seed=calib.seed + seed_offset * calib.n)
        stages = dataclasses.replace(stages, engine=dataclasses.replace(stages.engine,
                                                                       seed=stages.engine.seed + seed_offset))
        if recorded is not None and hasattr(recorded, "seed"):
            recorded = dataclasses.replace(recorded, seed=recorded.seed + seed_offset)
    stages.check_calibration(calib.steps)  # schedule-dependent options, before any capture
    quant = stages.wrap_config(quant)
    t0 = time.perf_counter()
    guidance = default_guidance(bundle) if calib.guidance is None else calib.guidance
    args, kwargs = bundle.example_inputs(2, device=device)
    capture = stages.capture_options(bundle.unet, (args, kwargs))
    select = stages.select if stages.has_selection else None
    calib_set = calibration_batches(bundle, calib, device, cache_dir, select=select, capture_options=capture)
    t1 = time.perf_counter()
    qmodel = quantize(bundle.unet, quant, (args, kwargs))
    recipe_set = calib_set.with_uncond() if bundle.is_conditional and guidance != 1.0 else calib_set
    ctx = StageContext(calib_set=recipe_set, call=bundle.predict_noise, fp_model=bundle.unet, bundle=bundle,
                       forward_loop=make_forward_loop(bundle, calib_set, calib.batch_size, device, guidance),
                       guidance=guidance, work_dir=work_dir, device=device)
    run_recipe(qmodel, stages, ctx, recipe_config=recorded)
    t2 = time.perf_counter()
    return QuantizeResult(qmodel, None, qmodel.summary(), t2 - t0, {"capture_s": t1 - t0, "recipe_s": t2 - t1})


def apply_recipe(model, calibration, recipe: "str | Recipe" = "naive", quant: QuantConfig | None = None, *,
                 recipe_config=None, work_dir: str | Path | None = None, device="cpu",
                 batch_size: int = 32) -> QuantModel:
    """Quantize the float denoiser ``model`` with ``recipe`` on recorded calibration inputs.

    ``calibration`` is a :class:`~diffquant.calib.pipeline_capture.PipelineCalibration` (from
    :func:`~diffquant.calib.pipeline_capture.capture_pipeline` or its ``load``): every recorded
    argument of every denoiser call — text embeddings, CFG halves, class labels — is fed back
    during calibration. ``recipe``: a preset name (with ``recipe_config`` its flat options) or a
    :class:`~diffquant.recipes.Recipe`; ``quant``: bit-widths and coverage (default W8A8).
    MPQ-DM / EfficientDM fine-tune along the recorded trajectories instead of sampling new ones.
    ``model`` itself is left float; the returned :class:`QuantModel` drops into the pipeline
    (``pipe.unet = qmodel``).
    """
    from .calib.conditioning import conditioned_call

    stages, recorded = as_recipe(recipe, recipe_config)
    if len(calibration) == 0:
        raise ConfigError("the calibration holds no inputs")
    quant = stages.wrap_config(quant or QuantConfig())
    qmodel = quantize(model, quant, calibration.example_inputs())
    ctx = StageContext(calib_set=calibration.calib_set, call=conditioned_call, fp_model=model,
                       forward_loop=calibration.forward_loop(batch_size, device), work_dir=work_dir, device=device)
    run_recipe(qmodel, stages, ctx, recipe_config=recorded)
    return qmodel


def _is_recipe_file(name: str) -> bool:
    """A stage-list recipe file (``NAME@flat.yaml`` is a preset with a flat option file)."""
    return "@" not in name and (name.endswith((".yaml", ".yml")) or "/" in name)


def parse_recipe_spec(spec: str):
    """``name``, ``name@config.yaml`` and/or ``name:key=value,key=value`` → (name, config object).

    Values are YAML scalars (``split=false``, ``iters_w=500``, ``calib_policy=last_n``); inline
    overrides apply after the YAML file. Used by ``diffquant bench`` to put ablations and
    shortened schedules side by side in one table, each row labelled with its spec.
    """
    import yaml

    head, _, overrides = spec.partition(":")
    if _is_recipe_file(head):
        recipe = load_recipe(head)
        if overrides:
            recipe = recipe.replace_options(_parse_overrides(spec, overrides))
        return recipe.name, recipe
    name, _, path = head.partition("@")
    config = load_recipe_config(name, path or None)
    if overrides:
        data = dataclasses.asdict(config)
        for item in overrides.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"recipe spec {spec!r}: expected key=value, got {item!r}")
            try:
                data[key.strip()] = parse_yaml(value)
            except yaml.YAMLError:
                raise ConfigError(f"recipe spec {spec!r}: cannot read the value of {key!r}") from None
            if key.strip() not in {f.name for f in dataclasses.fields(config)}:
                raise ConfigError(f"recipe spec {spec!r}: {name} has no option {key.strip()!r}")
        config = from_dict(type(config), data)
    return name, config


def _parse_overrides(spec: str, overrides: str) -> dict:
    import yaml

    out = {}
    for item in overrides.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"recipe spec {spec!r}: expected key=value, got {item!r}")
        try:
            out[key.strip()] = parse_yaml(value)
        except yaml.YAMLError:
            raise ConfigError(f"recipe spec {spec!r}: cannot read the value of {key!r}") from None
    return out


def resolve_recipe(recipe: str, config_path: str | None = None):
    """``--recipe`` (a name or a ``NAME:key=value,...`` spec) plus ``--recipe-config`` → (name, config)."""
    head, colon, overrides = recipe.partition(":")
    if config_path:
        if "@" in head:
            raise ConfigError("give the recipe's YAML file either as NAME@file.yaml or with --recipe-config, not both")
        head = f"{head}@{config_path}"
    return parse_recipe_spec(head + (colon + overrides if colon else ""))


def load_recipe_config(recipe: str, path: str | None):
    """The recipe's config dataclass, from a YAML file when given (unknown keys are an error);
    a recipe file with stages gives its :class:`Recipe`."""
    if _is_recipe_file(recipe) and path is None:
        return load_recipe(recipe)
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; available: {', '.join(sorted(RECIPES))}")
    config_cls, _ = RECIPES[recipe]
    return load_yaml(config_cls, path) if path else config_cls()


def quantize_model(*, model: str, recipe: str, wbits: int, abits: int, config_path: str | None, split: bool,
                   calib: CalibConfig, out: str, assets=None, device="cpu", recipe_config_path: str | None = None,
                   work_dir: str | None = None) -> QuantizeResult:
    """Quantize a named model or folder and save the result into ``out``.

    ``work_dir`` keeps per-unit progress of reconstruction recipes: rerunning the same command
    after an interruption resumes at the next unit (default: ``<out>/work``)."""
    from .zoo.registry import load_model

    # every argument is checked before any work: configs, the output folder, the work dir
    recipe, recipe_config = resolve_recipe(recipe, recipe_config_path)
    quant = build_quant_config(wbits, abits, config_path, split)
    check_writable_dir(out)
    work_dir = work_dir or str(Path(out) / "work")
    # under torchrun every rank runs the recipe (reconstruction and fine-tuning on its shard of the
    # calibration set, gradients summed; docs/methods.md §1.6) and rank 0 writes
    info = distributed.init_from_env(device)
    device = distributed.device_for_rank(device, info)
    bundle = load_model(model, assets=assets, device=device)
    if info.is_main:
        claim_work_dir(work_dir, {"model": model, "recipe": recipe, "recipe_config": recipe_dict(recipe_config),
                                  "quant": to_dict(quant), "calib": calib_protocol(calib)})
    distributed.barrier()
    result = quantize_bundle(bundle, recipe, quant, calib, device, recipe_config=recipe_config,
                             work_dir=work_dir)
    result.path = Path(out)
    if info.is_main:
        result.path = save(result.qmodel, out, extra={"model": model, "calib": to_dict(calib),
                                                      "timings": result.timings, "world_size": info.world_size})
        save_yaml(calib, Path(out) / "calib.yaml")
        if isinstance(recipe_config, Recipe):
            recipe_config.save(Path(out) / "recipe.yaml")
        else:
            save_yaml(recipe_config, Path(out) / "recipe.yaml")
    distributed.barrier()
    return result


def recipe_dict(config) -> dict:
    """A recipe configuration (flat config or :class:`Recipe`) as plain data."""
    return config.to_dict() if isinstance(config, Recipe) else to_dict(config)


RUN_SETTINGS_FILE = "run_settings.json"


def claim_work_dir(work_dir: str | Path, settings: dict) -> None:
    """Refuse, before capture, a work dir that holds progress of a run with other settings
    (naming the first setting that differs); record these settings in a fresh one."""
    from .errors import CheckpointError
    from .jsonio import to_json_value

    file = Path(work_dir) / RUN_SETTINGS_FILE
    settings = to_json_value(settings)
    has_progress = Path(work_dir).is_dir() and any(p.name != RUN_SETTINGS_FILE for p in Path(work_dir).iterdir())
    if file.is_file() and has_progress:
        try:
            saved = json.loads(file.read_text())
        except (OSError, ValueError):
            saved = None
        if saved != settings:
            diff = _first_difference(saved, settings) if isinstance(saved, dict) else "its settings file is unreadable"
            raise CheckpointError(f"work dir {work_dir} holds progress of a run with other settings ({diff}); "
                                  "use a fresh --work-dir or the original settings")
        return
    check_writable_dir(work_dir, "--work-dir")
    write_json(file, settings)


def _first_difference(old, new, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')} was {old!r}, now {new!r}"


def parse_setting(tag: str) -> tuple[int, int]:
    """'W4A8' -> (4, 8); 'W4A32' means weights only."""
    t = tag.upper()
    if not (t.startswith("W") and "A" in t):
        raise ConfigError(f"bit setting {tag!r} must look like W4A8")
    try:
        w, a = t[1:].split("A")
        wbits, abits = int(w), int(a)
    except ValueError:
        raise ConfigError(f"bit setting {tag!r} must look like W4A8") from None
    validate_bits(wbits, f"bit setting {tag}: weight bits")
    validate_bits(abits, f"bit setting {tag}: activation bits")
    return wbits, abits


#: ``diffquant main --recipe auto``: the recipe the main job runs, with the calibration it is
#: sized for. Provisional: MPQ-DM at a short schedule (the fastest recipe with class accuracy
#: within 0.03 of float at W3A6 in benchmarks/results/recipes_fmnist-unet.md); the equal-budget
#: leaderboard that is to choose it is not measured yet (MAIN_CHOICE_SOURCE)
MAIN_CHOICE = {
    "recipe": "mpqdm:epochs=8,pool_n=32",
    "calib_n": 32,
    "calib_every": 1,
}
MAIN_CHOICE_SOURCE = "provisional, from benchmarks/results/recipes_fmnist-unet.md"
#: the baseline every main-job table shows, with the little calibration it needs
BASELINE = {"recipe": "naive", "calib_n": 16, "calib_every": 5}
#: below this many samples an FID is biased high and noisy: the table says so
FID_RELIABLE_N = 1000


def _main_rows(recipe_arg: str, calib_n: int | None, calib_every: int | None) -> list[dict]:
    """The (label, recipe spec, calibration) of every quantized row of the main job: the naive
    baseline first unless the chosen recipe is naive itself."""
    if recipe_arg == "auto":
        chosen = dict(MAIN_CHOICE)
    else:
        chosen = {"recipe": recipe_arg, "calib_n": CalibConfig.n, "calib_every": CalibConfig.every}
    if calib_n is not None:
        chosen["calib_n"] = calib_n
    if calib_every is not None:
        chosen["calib_every"] = calib_every
    rows = [] if chosen["recipe"] == BASELINE["recipe"] else [dict(BASELINE)]
    return rows + [chosen]


def main_job(*, model: str, n: int, steps: int, settings: list[str], recipe: str, fid: bool, out: str,
             assets=None, device="cpu", calib_n: int | None = None, calib_every: int | None = None) -> dict:
    """Quantize ``model`` at each setting with the naive baseline and ``recipe`` (``auto``: the
    best recipe that fits the job's budget, :data:`MAIN_CHOICE`), sample the same seeds as FP,
    print a table and write a labelled image grid."""
    from .diffusion.grid import save_labelled_grid
    from .diffusion.sampling import sample, save_samples
    from .eval.fidelity import image_mse_psnr
    from .zoo.registry import load_model

    parsed = [(s.upper(), *parse_setting(s)) for s in settings]  # bad settings fail before any work
    plan = _main_rows(recipe, calib_n, calib_every)
    resolved = [(entry, *resolve_recipe(entry["recipe"])) for entry in plan]
    out_dir = check_writable_dir(out)
    t_start = time.perf_counter()
    bundle = load_model(model, assets=assets, device=device)
    guidance = default_guidance(bundle)
    sample_kw = dict(seed=0, scheduler="ddim", steps=steps, eta=0.0, guidance=guidance, batch_size=50, device=device)
    if recipe == "auto":
        print(f"[diffquant] recipe: {plan[-1]['recipe']} (chosen to fit the main job's budget; "
              f"{MAIN_CHOICE_SOURCE}); baseline: naive")

    print(f"[diffquant] model {bundle.name}: sampling {n} full-precision images (DDIM {steps}, guidance {guidance})")
    fp = sample(bundle, n, **sample_kw)
    save_samples(fp, out_dir / "fp")
    rows = [{"setting": "FP32", "recipe": "-", **_quality(fp, bundle, fid, device, assets)}]
    per_row = min(10, n)
    shown = [("FP32", fp.images[:per_row])]
    for tag, wbits, abits in parsed:
        for entry, name, recipe_config in resolved:
            spec = entry["recipe"]
            calib = CalibConfig(n=entry["calib_n"], steps=steps, every=entry["calib_every"])
            print(f"[diffquant] {tag}: calibrating ({spec}, {calib.n} trajectories)")
            quant = build_quant_config(wbits, abits, None, split=False)
            res = quantize_bundle(bundle, name, quant, calib, device, recipe_config=recipe_config)
            where = out_dir / tag / ("quant" if entry is plan[-1] else f"quant-{name}")
            save(res.qmodel, where, extra={"model": model, "calib": to_dict(calib)})
            print(f"[diffquant] {tag}: sampling {n} images from the same seeds")
            qs = sample(bundle.with_unet(res.qmodel), n, **sample_kw)
            save_samples(qs, out_dir / tag / ("samples" if entry is plan[-1] else f"samples-{name}"))
            row = {"setting": tag, "recipe": spec, **_quality(qs, bundle, fid, device, assets)}
            fidelity = image_mse_psnr(qs.images, fp.images)
            row["mse_vs_fp [0,1]²"] = fidelity["mse"] / 255.0 ** 2
            row["psnr_vs_fp dB"] = fidelity["psnr"]
            row["calib_s"] = round(res.seconds, 1)
            rows.append(row)
            shown.append((f"{tag} {name}", qs.images[:per_row]))
    columns = _column_labels(bundle, fp.labels, per_row)
    grid_path = save_labelled_grid(out_dir / "comparison.png", shown, column_labels=columns)
    notes = _main_notes(n, fid, rows)
    total_s = round(time.perf_counter() - t_start, 1)
    results = {"model": bundle.name, "protocol": {"n": n, **{k: v for k, v in sample_kw.items() if k != "device"}},
               "rows": rows, "grid": str(grid_path), "notes": notes, "total_s": total_s,
               "recipe": plan[-1]["recipe"], "baseline": BASELINE["recipe"] if len(plan) > 1 else None}
    write_json(out_dir / "results.json", results, default=float)
    table = _markdown_table(rows)
    (out_dir / "results.md").write_text(table + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n")
    print()
    print(table)
    for note in notes:
        print(f"note: {note}")
    print(f"\nimage grid (rows: {', '.join(label for label, _ in shown)}; columns: the same seeds"
          f"{' and classes' if columns else ''}): {grid_path}")
    print(f"[diffquant] main job done in {total_s:.0f} s")
    return results


def _column_labels(bundle, labels, count: int) -> list[str] | None:
    """The class names of the first ``count`` samples (None for unconditional models)."""
    names = bundle.extra.get("classes")
    if labels is None or not names:
        return None
    return [str(names[int(c)]) if 0 <= int(c) < len(names) else str(int(c)) for c in list(labels)[:count]]


def _main_notes(n: int, fid: bool, rows: list[dict]) -> list[str]:
    notes = ["mse_vs_fp: mean squared difference to the float image from the same noise, pixels in [0, 1]; "
             "psnr_vs_fp in dB; calib_s: wall-clock seconds of the calibration; class_acc: the shipped "
             "classifier's accuracy on the requested classes"]
    if fid and any(k.startswith("fid@") for r in rows for k in r):
        notes.append(f"fid@{n}: FID from {n} samples against 1000 test images is biased high and noisy below "
                     f"N = {FID_RELIABLE_N}; compare rows within this table only (diffquant bench for N = 1000)")
    return notes


def reference_dataset(bundle) -> str | None:
    """The real data set the model was trained on (its model card, set by the zoo), for FID."""
    return bundle.reference_dataset


def bundled_classifier(bundle, device="cpu"):
    """The classifier of the model's data that its model card names (None where there is none)."""
    if bundle.classifier_dir is None:
        return None
    from .zoo.classifier import load_classifier

    return load_classifier(bundle.classifier_dir, device=device)


def _quality(result, bundle, fid: bool, device, assets, ref_n: int = 1000) -> dict:
    """Class accuracy (bundled classifier) and FID at a modest N against ``ref_n`` test images."""
    from .errors import DiffquantError

    row: dict = {}
    classifier = bundled_classifier(bundle, device) if result.labels is not None else None
    if classifier is not None:
        from .eval.classify import class_accuracy

        row["class_acc"] = class_accuracy(result.images, result.labels, classifier, device=device)["accuracy"]
    dataset = reference_dataset(bundle)
    if fid and dataset is not None:
        try:
            from .eval.fid import reference_stats
            from .eval.report import evaluate_images

            ref = reference_stats(dataset, "test", n=ref_n, device=device, spatial=False, progress=True)
            ev = evaluate_images(result.images, reference=ref, metrics=("fid",), device=device,
                                 fd_method="eigh", progress=False)
            row[f"fid@{len(result.images)}"] = ev["metrics"]["fid"]
        except DiffquantError as exc:
            print(f"[diffquant] FID skipped: {exc}")
    return row


def _markdown_table(rows: list[dict]) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
