"""CLI jobs on full diffusers pipeline folders: text-to-image (text encoder + VAE), DiT/PixArt
(``transformer/``) and other latent pipelines, run through diffusers itself.

A folder whose ``model_index.json`` lists more than a UNet and a scheduler is loaded with
``DiffusionPipeline.from_pretrained(local_files_only=True)``; calibration runs the pipeline on
prompts (``--prompts FILE``, default: the shipped set) or class labels (``--classes``), the
recipe is applied to its denoiser, and the quantized pipeline is saved with
:func:`~diffquant.model.pipeline_io.save_pipeline`. Sampling runs the pipeline, which decodes
latents through its VAE, so saved images are images, never raw latents. A cached hub id
(``org/name`` already in the local Hugging Face cache) resolves to its snapshot folder; nothing is
downloaded.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .errors import DiffquantError
from .zoo.registry import is_full_pipeline

def resolve_model_path(name: str) -> Path | None:
    """A local folder, or the cached snapshot of a hub id ``org/name`` (never downloaded)."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name.count("/") == 1 and not name.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, local_files_only=True))
        except Exception:  # not in the local cache (LocalEntryNotFoundError and friends)
            raise DiffquantError(f"{name!r} is neither a local folder nor a hub id in the local Hugging Face "
                                 "cache (diffquant never downloads; fetch it first with huggingface-cli)") from None
    return None


def load_pipeline_folder(path: Path, device="cpu"):
    from diffusers import DiffusionPipeline

    from .model.pipeline_io import QUANT_DIR, load_pipeline

    quantized = any((path / d / QUANT_DIR / "manifest.json").is_file() for d in ("unet", "transformer", "prior"))
    kwargs = dict(local_files_only=True)
    try:
        pipe = load_pipeline(DiffusionPipeline, path, **kwargs) if quantized else DiffusionPipeline.from_pretrained(
            path, **kwargs)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DiffquantError(f"{path}: cannot load the pipeline ({first[:300]})") from None
    if hasattr(pipe, "safety_checker") and getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # calibration and evaluation want the model's raw images
    return pipe.to(device)


def _conditioning_calls(pipe, n: int, prompts: str | None, classes: Sequence[int] | None,
                        per_call: int) -> list[dict[str, Any]]:
    """Keyword arguments of ``ceil(n / per_call)`` pipeline calls covering ``n`` images."""
    from .calib.pipeline_capture import read_prompts

    params = inspect.signature(pipe.__call__).parameters
    if "prompt" in params:
        if classes is not None:
            raise DiffquantError(f"{type(pipe).__name__} is text-conditioned: pass --prompts FILE, not --classes")
        texts = read_prompts(prompts)
        texts = [texts[i % len(texts)] for i in range(n)]
        return [{"prompt": texts[i:i + per_call]} for i in range(0, n, per_call)]
    if "class_labels" in params:
        if prompts is not None:
            raise DiffquantError(f"{type(pipe).__name__} is class-conditional: pass --classes 1,2,..., not --prompts")
        labels = list(classes) if classes else list(range(10))
        wanted = [int(labels[i % len(labels)]) for i in range(n)]
        return [{"class_labels": wanted[i:i + per_call]} for i in range(0, n, per_call)]
    if prompts is not None or classes is not None:
        raise DiffquantError(f"{type(pipe).__name__} takes neither prompts nor class labels")
    if "batch_size" in params:
        return [{"batch_size": min(per_call, n - i)} for i in range(0, n, per_call)]
    raise DiffquantError(f"{type(pipe).__name__}: diffquant cannot tell how to condition this pipeline "
                         "(it takes no prompt, class_labels or batch_size); use the Python API (capture_pipeline)")


def _steps_kwargs(pipe, steps: int, guidance: float | None) -> dict[str, Any]:
    params = inspect.signature(pipe.__call__).parameters
    kwargs: dict[str, Any] = {"num_inference_steps": steps}
    if guidance is not None:
        if "guidance_scale" not in params:
            raise DiffquantError(f"{type(pipe).__name__} takes no guidance scale")
        kwargs["guidance_scale"] = float(guidance)
    return kwargs


def quantize_pipeline_folder(path: Path, *, recipe: str, recipe_config, quant, n: int, steps: int, every: int,
                             prompts: str | None, classes: Sequence[int] | None, guidance: float | None,
                             out: str, device="cpu", seed: int = 10_000):
    """Calibrate a pipeline folder's denoiser with ``recipe`` and save the quantized pipeline to ``out``."""
    from .calib.pipeline_capture import capture_pipeline, denoiser_of
    from .model.pipeline_io import save_pipeline
    from .pipeline import apply_recipe

    pipe = load_pipeline_folder(path, device)
    name, denoiser = denoiser_of(pipe)
    calls = _conditioning_calls(pipe, n, prompts, classes, per_call=min(n, 4))
    calib = capture_pipeline(pipe, calls, seed=seed, every=every, out=Path(out) / "calibration",
                             output_type="latent" if _takes_latent(pipe) else "np", **_steps_kwargs(pipe, steps, guidance))
    qmodel = apply_recipe(denoiser, calib, recipe, quant, recipe_config=recipe_config,
                          work_dir=str(Path(out) / "work"), device=device)
    setattr(pipe, name, qmodel)
    save_pipeline(pipe, out)
    return qmodel, name, len(calib)


def _takes_latent(pipe) -> bool:
    return getattr(pipe, "vae", None) is not None


def sample_pipeline_folder(path: Path, *, n: int, steps: int, guidance: float | None, prompts: str | None,
                           classes: Sequence[int] | None, seed: int, batch_size: int, out: str, device="cpu"):
    """Images from a (quantized or float) pipeline folder, decoded by the pipeline, saved as samples.npz."""
    from .diffusion.sampling import SampleResult, save_samples

    pipe = load_pipeline_folder(path, device)
    calls = _conditioning_calls(pipe, n, prompts, classes, per_call=max(1, min(batch_size, n)))
    images, labels, texts = [], [], []
    for i, call in enumerate(calls):
        result = pipe(**call, **_steps_kwargs(pipe, steps, guidance), output_type="np",
                      generator=torch.Generator().manual_seed(seed + i))
        batch = np.asarray(result.images)
        images.append(np.clip(np.round(batch * 255.0), 0, 255).astype(np.uint8))
        labels += list(call.get("class_labels", []))
        texts += list(call.get("prompt", []))
    stacked = np.concatenate(images)[:n]
    settings = {"model": str(path), "pipeline": type(pipe).__name__, "n": int(len(stacked)), "steps": steps,
                "guidance": guidance, "seed": seed, "prompts": texts[:n] or None}
    sample = SampleResult(images=stacked, samples=torch.from_numpy(stacked).permute(0, 3, 1, 2).float() / 127.5 - 1,
                          labels=np.asarray(labels[:n], dtype=np.int64) if labels else None,
                          indices=np.arange(len(stacked), dtype=np.int64), settings=settings)
    return save_samples(sample, out)


def pipeline_folder_or_none(model: str) -> Path | None:
    """``model`` as a full pipeline folder (see :func:`is_full_pipeline`), else None."""
    if model in ("default",) or not isinstance(model, (str, os.PathLike)):
        return None
    from .zoo.registry import MODELS

    if str(model) in MODELS:
        return None
    path = resolve_model_path(str(model))
    return path if path is not None and is_full_pipeline(path) else None


def bench_pipeline_folder(path: Path, *, rows: list[tuple[str, str, object, str, int, int]], n: int, steps: int,
                          calib_n: int, calib_every: int, prompts: str | None, classes: Sequence[int] | None,
                          guidance: float | None, reference: str | None, metrics: Sequence[str], out: str,
                          device="cpu", seed: int = 0, calib_seed: int = 10_000, fd_method: str = "sqrtm",
                          on_images=None) -> dict:
    """``bench`` on a full pipeline folder: ``rows`` = (spec, recipe name, recipe config, setting tag,
    weight bits, activation bits). Float and every row sample the same
    prompts or labels from the same seeds through diffusers; fidelity to the float images (MSE,
    PSNR) always, FID/sFID/precision/recall against ``reference`` (a folder of images or a
    statistics file) when given. Writes ``results.json`` and ``results.md`` after every row.
    ``on_images(tag, images)`` receives each row's uint8 [N, H, W, C] samples (``W32A32`` first)."""
    import time

    from .bench import format_cell, peak_rss_mb
    from .calib.pipeline_capture import capture_pipeline, denoiser_of
    from .config import QuantConfig
    from .eval.report import environment_record, evaluate_images
    from .jsonio import write_json
    from .pipeline import apply_recipe

    out_dir = Path(out)
    pipe = load_pipeline_folder(path, device)
    name, float_denoiser = denoiser_of(pipe)
    extractor = ref = None
    inception = [m for m in metrics if m in ("fid", "sfid", "precision", "recall")]
    if inception:
        if reference is None:
            raise DiffquantError("FID-type metrics of a pipeline folder need --reference (a folder of images or a "
                                 "statistics file); or pass --metrics with none of them")
        from .eval.inception import InceptionFeatures
        from .eval.reference import resolve_reference

        extractor = InceptionFeatures(device=device)
        ref = resolve_reference(reference, extractor=extractor, spatial="sfid" in inception, device=device)
    eval_calls = _conditioning_calls(pipe, n, prompts, classes, per_call=max(1, min(n, 8)))
    steps_kw = _steps_kwargs(pipe, steps, guidance)

    def sample_images():
        images = []
        for i, call in enumerate(eval_calls):
            result = pipe(**call, **steps_kw, output_type="np", generator=torch.Generator().manual_seed(seed + i))
            images.append(np.clip(np.round(np.asarray(result.images) * 255.0), 0, 255).astype(np.uint8))
        return np.concatenate(images)[:n]

    def evaluate(images, fp_images=None):
        chosen = list(inception) + (["mse", "psnr"] if fp_images is not None else [])
        if not chosen:
            return {}
        return evaluate_images(images, reference=ref, extractor=extractor, fp_images=fp_images, metrics=chosen,
                               device=device, fd_method=fd_method, progress=False)["metrics"]

    t0 = time.perf_counter()
    fp_images = sample_images()
    if on_images is not None:
        on_images("W32A32", fp_images)
    table = [{"recipe": "fp32", "setting": "W32A32", **evaluate(fp_images), "calib_s": 0.0,
              "sample_s": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}]
    calls = _conditioning_calls(pipe, calib_n, prompts, classes, per_call=min(calib_n, 4))
    calib = capture_pipeline(pipe, calls, seed=calib_seed, every=calib_every, progress=False,
                             output_type="latent" if _takes_latent(pipe) else "np", **steps_kw)
    protocol = {"model": str(path), "pipeline": type(pipe).__name__, "n": n, "steps": steps, "guidance": guidance,
                "seeds": f"{seed}..", "calibration": {"calls": len(calls), "rows": len(calib), "every": calib_every},
                "reference": None if ref is None else ref.meta, "metrics": list(metrics)}

    def write() -> dict:
        results = {"model": str(path), "protocol": protocol, "rows": table, "environment": environment_record()}
        write_json(out_dir / "results.json", results, default=str)
        keys: list[str] = []
        for row in table:
            keys += [k for k in row if k not in keys]
        lines = [f"# {type(pipe).__name__} ({path.name}): {', '.join(f'{r[0]} {r[3]}' for r in rows)}", "",
                 f"N = {n}, {steps} steps, guidance {guidance if guidance is not None else 'pipeline default'}; "
                 f"calibration {len(calib)} recorded inputs", "",
                 "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(format_cell(r.get(k)) for k in keys) + " |" for r in table]
        (out_dir / "results.md").write_text("\n".join(lines) + "\n")
        return results

    write()
    for spec, recipe, config, tag, wbits, abits in rows:
        t0 = time.perf_counter()
        qmodel = apply_recipe(float_denoiser, calib, recipe,
                              QuantConfig(weight_bits=wbits, act_bits=abits, quantize_weights=wbits <= 8,
                                          quantize_acts=abits <= 8), recipe_config=config, device=device)
        calib_s = time.perf_counter() - t0
        setattr(pipe, name, qmodel)
        t0 = time.perf_counter()
        images = sample_images()
        sample_s = time.perf_counter() - t0
        setattr(pipe, name, float_denoiser)
        if on_images is not None:
            on_images(tag, images)
        table.append({"recipe": spec, "setting": tag, **evaluate(images, fp_images), "calib_s": round(calib_s, 1),
                      "sample_s": round(sample_s, 1), "peak_rss_mb": round(peak_rss_mb(), 1)})
        write()
    return write()


def main_pipeline_folder(path: Path, *, n: int, steps: int, settings: Sequence[str], recipe: str, fid: bool,
                         out: str, prompts: str | None, classes: Sequence[int] | None, reference: str | None,
                         calib_n: int = 64, calib_every: int = 5, device="cpu") -> dict:
    """``diffquant main`` on a full pipeline folder: ``recipe`` (a name or ``NAME:key=value`` spec)
    at every setting, sampled through diffusers from the same prompts/labels and seeds as float;
    fidelity to the float images always, FID against ``reference`` when given (and ``fid``); a
    table, ``results.json`` and a labelled image grid (one row per setting, same seed per column)."""
    from .diffusion.grid import save_labelled_grid
    from .fsutil import check_writable_dir
    from .pipeline import parse_recipe_spec, parse_setting

    parsed = [(s.upper(), *parse_setting(s)) for s in settings]  # bad settings fail before any work
    name, config = parse_recipe_spec(recipe)
    out_dir = check_writable_dir(out)
    if fid and reference is None:
        print("[diffquant] no --reference given: FID skipped (fidelity to the float images only)")
    metrics = ["fid"] if fid and reference is not None else []
    per_row = min(8, n)
    shown: dict[str, np.ndarray] = {}
    results = bench_pipeline_folder(path, rows=[(recipe, name, config, tag, w, a) for tag, w, a in parsed], n=n,
                                    steps=steps, calib_n=calib_n, calib_every=min(calib_every, steps), prompts=prompts, classes=classes,
                                    guidance=None, reference=reference if metrics else None, metrics=metrics,
                                    out=str(out_dir), device=device,
                                    on_images=lambda tag, images: shown.__setitem__(tag, images[:per_row]))
    grid = save_labelled_grid(out_dir / "comparison.png", list(shown.items()))
    results["grid"] = str(grid)
    print((out_dir / "results.md").read_text())
    print(f"image grid (rows: {', '.join(shown)}; same seed per column): {grid}")
    return results
