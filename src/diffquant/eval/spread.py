"""Seed spread of a result and whether a difference between two results is resolved.

A benchmark row calibrated with K seeds (calibration data and reconstruction randomness) is
summarised by the mean of each metric over the seeds, its standard deviation (ddof = 1) and a
bootstrap 95 % interval of the mean (resampling the K values with replacement). Two rows are
*resolved* on a metric only when their intervals do not overlap and their difference exceeds the
sampling-noise floor — the same metric between two float runs from disjoint sampling seeds. With
one seed a row has no interval and a difference is resolved by the floor alone.
"""
from __future__ import annotations

import math
from itertools import combinations
from typing import Any, Sequence

import numpy as np

#: bootstrap resamples of the mean
BOOTSTRAP_SAMPLES = 2000
#: the interval's coverage
CONFIDENCE = 0.95
#: per-seed values that are not metrics (kept from the first seed only)
NOT_AVERAGED = ("recipe", "setting", "calib_seed")


def bootstrap_interval(values: Sequence[float], *, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES,
                       confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (deterministic given ``seed``)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("no values to bootstrap")
    if data.size == 1:
        return float(data[0]), float(data[0])
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(samples, data.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def aggregate_seeds(runs: list[dict], *, seed: int = 0) -> dict:
    """One row from the per-seed rows ``runs``: every numeric metric becomes its mean, with
    ``<metric>_std`` and ``<metric>_ci95`` ([lo, hi]) when there is more than one seed; the
    per-seed values are kept under ``per_seed``."""
    if not runs:
        raise ValueError("no runs to aggregate")
    row = {k: v for k, v in runs[0].items() if k in NOT_AVERAGED or not _is_number(v)}
    row.pop("calib_seed", None)
    keys = [k for k in runs[0] if k not in NOT_AVERAGED and _is_number(runs[0][k])]
    for key in keys:
        values = [float(r[key]) for r in runs if _is_number(r.get(key))]
        row[key] = float(np.mean(values))
        if len(runs) > 1:
            row[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            row[f"{key}_ci95"] = list(bootstrap_interval(values, seed=seed))
    row["calib_seeds"] = len(runs)
    if len(runs) > 1:
        row["per_seed"] = [dict(r) for r in runs]
    return row


def interval(row: dict, metric: str) -> tuple[float, float] | None:
    """The row's interval on ``metric`` ([v, v] for a single seed), None without the metric."""
    if not _is_number(row.get(metric)):
        return None
    ci = row.get(f"{metric}_ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return float(ci[0]), float(ci[1])
    return float(row[metric]), float(row[metric])


def noise_floor(rows: list[dict], metric: str, float_recipe: str = "fp32",
                floor_recipe: str = "fp32 (disjoint seeds)") -> float | None:
    """|metric(float) − metric(float from disjoint sampling seeds)|, None without both rows."""
    a = next((r.get(metric) for r in rows if r.get("recipe") == float_recipe), None)
    b = next((r.get(metric) for r in rows if r.get("recipe") == floor_recipe), None)
    return abs(float(a) - float(b)) if _is_number(a) and _is_number(b) else None


def resolution(rows: list[dict], metric: str = "fid", floor: float | None = None) -> list[dict]:
    """Every pair of quantized rows at the same setting, with the difference of ``metric`` and
    whether it is resolved (intervals disjoint and the difference above ``floor``)."""
    out = []
    quantized = [r for r in rows if not str(r.get("recipe", "")).startswith("fp32")]
    for a, b in combinations(quantized, 2):
        if a.get("setting") != b.get("setting"):
            continue
        ia, ib = interval(a, metric), interval(b, metric)
        if ia is None or ib is None:
            continue
        diff = float(b[metric]) - float(a[metric])
        overlap = ia[0] <= ib[1] and ib[0] <= ia[1]
        below_floor = floor is not None and abs(diff) <= floor
        single = a.get("calib_seeds", 1) == 1 or b.get("calib_seeds", 1) == 1
        reasons = (["intervals overlap"] if overlap and not single else []) + \
                  (["within the sampling-noise floor"] if below_floor else []) + \
                  (["single calibration seed: no seed interval"] if single else [])
        resolved = not (overlap and not single) and not below_floor and not single
        out.append({"setting": a["setting"], "a": a["recipe"], "b": b["recipe"], "metric": metric,
                    "difference": diff, "resolved": resolved, "why": reasons})
    return out


def resolution_markdown(pairs: list[dict], floor: float | None, metric: str = "fid") -> str:
    """The pairs as a Markdown list (empty string without pairs)."""
    if not pairs:
        return ""
    head = (f"Resolution on {metric} (sampling-noise floor: "
            f"{'not measured' if floor is None else f'{floor:.4g}'}; a pair is resolved only when its seed "
            "intervals are disjoint and the difference exceeds the floor):")
    lines = [head]
    for p in pairs:
        verdict = "resolved" if p["resolved"] else "not resolved (" + "; ".join(p["why"]) + ")"
        lines.append(f"- {p['setting']}: `{p['b']}` − `{p['a']}` = {p['difference']:+.4g}: {verdict}")
    return "\n".join(lines)


__all__ = ["BOOTSTRAP_SAMPLES", "CONFIDENCE", "aggregate_seeds", "bootstrap_interval", "interval", "noise_floor",
           "resolution", "resolution_markdown"]
