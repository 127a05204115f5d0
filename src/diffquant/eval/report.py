"""One call from generated images to a results record, and writing it as JSON + Markdown.

Every record holds what moves the numbers: sample count, reference set and size, extractor and
resize mode, Fréchet-distance method, k of precision/recall, library versions, and the caller's
sampler ``protocol`` (steps, η, guidance, seed policy...) stored verbatim.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from diffquant.errors import DiffquantError
from diffquant.eval.classify import class_accuracy
from diffquant.eval.fid import FD_EPS, FeatureStats, ReferenceStats
from diffquant.eval.fidelity import image_mse_psnr
from diffquant.eval.inception import as_image_batch
from diffquant.eval.prdc import DEFAULT_K, precision_recall
from diffquant.jsonio import write_json

ALL_METRICS = ("fid", "sfid", "precision", "recall", "accuracy", "mse", "psnr")
INCEPTION_METRICS = {"fid", "sfid", "precision", "recall"}


#: CPU features whose kernels give other float (and int8) results: recorded with every result
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "fma")
#: environment switches that cap the kernels PyTorch and oneDNN dispatch to
ISA_SWITCHES = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def cpu_record() -> dict[str, str]:
    """The CPU model, which of :data:`ISA_FLAGS` it has, the ISA switches set, and the threads:
    the same calibration gives other bits on another instruction set (e.g. AVX2 vs AVX-512)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"cpu": model, "isa": " ".join(f for f in ISA_FLAGS if f in flags) or "unknown",
            "isa_switches": " ".join(f"{k}={os.environ[k]}" for k in ISA_SWITCHES if k in os.environ) or "none",
            "torch_threads": str(torch.get_num_threads())}


def environment_record() -> dict[str, str]:
    """Versions of everything that can move a metric, plus the platform and the CPU's ISA."""
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": version("diffusers"),
        "numpy": np.__version__,
        "scipy": version("scipy"),
        "diffquant": version("diffquant"),
        **cpu_record(),
    }


def _check_metrics(metrics: Iterable[str] | None, *, have_labels: bool, classifier: Any, fp_images: Any,
                   reference: ReferenceStats | None) -> list[str]:
    """The metrics to compute; ``None`` means every metric the given inputs allow."""
    if metrics is None:
        chosen = [m for m in ALL_METRICS if m in INCEPTION_METRICS and reference is not None]
        if reference is not None and reference.spatial is None:
            chosen.remove("sfid")
        if reference is not None and reference.pool.features is None:
            chosen = [m for m in chosen if m not in ("precision", "recall")]
        if classifier is not None and have_labels:
            chosen.append("accuracy")
        if fp_images is not None:
            chosen += ["mse", "psnr"]
        return chosen
    chosen = list(dict.fromkeys(metrics))
    unknown = [m for m in chosen if m not in ALL_METRICS]
    if unknown:
        raise DiffquantError(f"unknown metric(s) {unknown}; choose from {list(ALL_METRICS)}")
    needs = {
        "reference statistics": (INCEPTION_METRICS & set(chosen), reference is not None),
        "a classifier and class labels": ({"accuracy"} & set(chosen), classifier is not None and have_labels),
        "full-precision images (fp_images)": ({"mse", "psnr"} & set(chosen), fp_images is not None),
    }
    for what, (asked, ok) in needs.items():
        if asked and not ok:
            raise DiffquantError(f"metric(s) {sorted(asked)} need {what}")
    if "sfid" in chosen and reference.spatial is None:
        raise DiffquantError("sFID needs reference statistics computed with spatial features")
    if {"precision", "recall"} & set(chosen) and reference.pool.features is None:
        raise DiffquantError("precision/recall need the reference's raw pool features")
    return chosen


def evaluate_images(
    images_uint8: Any,
    labels: Any = None,
    *,
    reference: ReferenceStats | None = None,
    extractor: Any = None,
    fid_weights: str | os.PathLike | None = None,
    classifier: torch.nn.Module | None = None,
    fp_images: Any = None,
    metrics: Iterable[str] | None = ALL_METRICS,
    device: str | torch.device = "cpu",
    batch_size: int = 50,
    protocol: dict | None = None,
    pr_k: int = DEFAULT_K,
    fd_method: str = "sqrtm",
    progress: bool = True,
) -> dict:
    """Compute the requested metrics of generated uint8 images; returns a JSON-ready record.

    ``metrics=None`` computes every metric the inputs allow; an explicit list raises when an input
    it needs is missing. Inception features are computed once for FID, sFID and precision/recall.
    """
    images = as_image_batch(images_uint8)
    have_labels = labels is not None
    chosen = _check_metrics(metrics, have_labels=have_labels, classifier=classifier, fp_images=fp_images,
                            reference=reference)
    results: dict[str, Any] = {"metrics": {}, "n_samples": int(images.shape[0]),
                               "image_shape": list(images.shape[1:])}
    details: dict[str, Any] = {}
    timings: dict[str, float] = {}

    if INCEPTION_METRICS & set(chosen):
        if extractor is None:
            from diffquant.eval.inception import InceptionFeatures

            extractor = InceptionFeatures(fid_weights, device=device)
        identity = extractor.identity()
        ref_identity = reference.meta.get("extractor")
        if ref_identity is not None and ref_identity != identity:
            raise DiffquantError("reference statistics were computed with a different feature extractor or resize mode")
        t0 = time.perf_counter()
        feats = extractor.extract(images, batch_size=batch_size, device=device, progress=progress,
                                  spatial="sfid" in chosen)
        timings["features"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if "fid" in chosen:
            results["metrics"]["fid"] = FeatureStats.from_features(feats["pool"]).frechet_distance(
                reference.pool, method=fd_method)
        if "sfid" in chosen:
            results["metrics"]["sfid"] = FeatureStats.from_features(feats["spatial"]).frechet_distance(
                reference.spatial, method=fd_method)
        timings["frechet"] = time.perf_counter() - t0
        if {"precision", "recall"} & set(chosen):
            t0 = time.perf_counter()
            pr = precision_recall(reference.pool.features, feats["pool"], k=pr_k, device=device)
            results["metrics"].update({m: pr[m] for m in ("precision", "recall") if m in chosen})
            timings["precision_recall"] = time.perf_counter() - t0
        results["extractor"] = identity
        results["reference"] = {k: v for k, v in reference.meta.items() if k != "extractor"}
        results["reference"]["n"] = reference.pool.n

    if "accuracy" in chosen:
        acc = class_accuracy(images, labels, classifier, device=device)
        results["metrics"]["accuracy"] = acc["accuracy"]
        details["accuracy_per_class"] = acc["per_class"]

    if {"mse", "psnr"} & set(chosen):
        fid_ = image_mse_psnr(images, as_image_batch(fp_images))
        results["metrics"].update({m: fid_[m] for m in ("mse", "psnr") if m in chosen})
        details["psnr_mean_per_image"] = fid_["psnr_mean_per_image"]

    results["settings"] = {
        "metrics": chosen,
        "fd_method": fd_method,
        "fd_eps": FD_EPS,
        "precision_recall_k": pr_k,
        "precision_recall_space": "inception pool3 (2048-d)",
        "sfid_features": "mixed_6/conv first 7 channels, 17x17, NHWC-flattened (2023-d)",
        "mse_psnr": "uint8 0..255 scale, vs full-precision samples from the same noise; psnr from mean MSE",
        "accuracy_input": "uint8 -> [-1,1] float [B,1,H,W]",
        "batch_size": batch_size,
        "device": str(device),
    }
    results["details"] = details
    results["timings_s"] = timings
    results["protocol"] = dict(protocol) if protocol else {}
    results["environment"] = environment_record()
    return results


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and math.isfinite(value) and abs(value) < 1e-3:
            return f"{value:.3g}"
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def metrics_table(results: dict) -> str:
    """The metrics alone as a Markdown table (also what the CLI prints)."""
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in results.get("metrics", {}).items()]
    return "\n".join(lines)


def describe_reference(ref: dict) -> str:
    """One line naming a reference set: data set and split, image folder, or statistics file."""
    where = f"folder {ref.get('folder')}" if ref.get("dataset") == "folder" else (
        f"{ref.get('dataset')} / {ref.get('split')}")
    text = f"{where} / n={ref.get('n')} ({ref.get('subset', '')})"
    return f"{text}, from statistics file {ref['stats_file']}" if ref.get("stats_file") else text


def results_markdown(results: dict) -> str:
    """A readable Markdown report: metrics first, then everything that produced them."""
    lines = ["# Evaluation results", "", metrics_table(results)]
    setup = {"samples (N)": results.get("n_samples"), "image shape": results.get("image_shape")}
    ref = results.get("reference")
    if ref:
        setup["reference"] = describe_reference(ref)
        setup["reference key"] = str(ref.get("key", ""))[:16]
    ext = results.get("extractor")
    if ext:
        setup["extractor"] = ext.get("name")
        setup["extractor sha256"] = str(ext.get("weights_sha256", ""))[:16]
        setup["resize"] = ext.get("resize")
    setup.update({f"setting: {k}": v for k, v in results.get("settings", {}).items()})
    for title, table in (("Setup", setup), ("Protocol (sampler)", results.get("protocol", {})),
                         ("Environment", results.get("environment", {}))):
        if table:
            lines += ["", f"## {title}", "", "| key | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v).replace('|', '/')} |" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``out_dir``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    write_json(json_path, results)
    md_path.write_text(results_markdown(results))
    return json_path, md_path
