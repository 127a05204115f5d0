"""Seed spread and the "not resolved" marking."""
from __future__ import annotations

import numpy as np
import pytest

from diffquant.eval.spread import aggregate_seeds, bootstrap_interval, noise_floor, resolution, resolution_markdown


def test_bootstrap_interval_is_deterministic_and_brackets_the_mean():
    values = [10.0, 12.0, 17.0]
    lo, hi = bootstrap_interval(values, seed=3)
    assert (lo, hi) == bootstrap_interval(values, seed=3)
    assert min(values) <= lo < np.mean(values) < hi <= max(values)
    assert bootstrap_interval([5.0]) == (5.0, 5.0)


def test_aggregate_seeds_means_std_and_keeps_the_runs():
    runs = [{"recipe": "r", "setting": "W4A8", "calib_seed": k, "fid": f, "note": "x"} for k, f in enumerate([30.0, 34.0, 41.0])]
    row = aggregate_seeds(runs)
    assert row["fid"] == pytest.approx(35.0) and row["fid_std"] == pytest.approx(np.std([30, 34, 41], ddof=1))
    assert row["calib_seeds"] == 3 and len(row["per_seed"]) == 3 and row["note"] == "x" and "calib_seed" not in row
    single = aggregate_seeds(runs[:1])
    assert single["fid"] == 30.0 and "fid_std" not in single and "per_seed" not in single


def _row(recipe, fid, ci, seeds=3):
    return {"recipe": recipe, "setting": "W4A8", "fid": fid, "fid_ci95": list(ci), "calib_seeds": seeds}


def test_overlapping_intervals_are_not_resolved_and_disjoint_ones_are():
    rows = [{"recipe": "fp32", "setting": "W32A32", "fid": 34.0},
            {"recipe": "fp32 (disjoint seeds)", "setting": "W32A32", "fid": 35.0},
            _row("a", 50.0, (45.0, 55.0)), _row("b", 53.0, (50.0, 56.0)), _row("c", 70.0, (66.0, 74.0)),
            {**_row("d", 90.0, (80.0, 100.0)), "setting": "W3A4"}]
    floor = noise_floor(rows, "fid")
    assert floor == pytest.approx(1.0)
    pairs = {(p["a"], p["b"]): p for p in resolution(rows, "fid", floor)}
    assert set(pairs) == {("a", "b"), ("a", "c"), ("b", "c")}  # only the same setting is compared
    assert not pairs[("a", "b")]["resolved"] and pairs[("a", "b")]["why"] == ["intervals overlap"]
    assert pairs[("a", "c")]["resolved"] and pairs[("b", "c")]["difference"] == pytest.approx(17.0)
    text = resolution_markdown(list(pairs.values()), floor)
    assert "`b` − `a` = +3: not resolved (intervals overlap)" in text and "`c` − `a` = +20: resolved" in text


def test_a_difference_inside_the_noise_floor_or_from_single_seeds_is_not_resolved():
    rows = [_row("a", 50.0, (49.9, 50.1)), _row("b", 50.5, (50.4, 50.6))]
    (pair,) = resolution(rows, "fid", floor=1.0)
    assert not pair["resolved"] and pair["why"] == ["within the sampling-noise floor"]
    singles = [_row("a", 50.0, (50.0, 50.0), seeds=1), _row("b", 80.0, (80.0, 80.0), seeds=1)]
    (pair,) = resolution(singles, "fid", floor=1.0)
    assert not pair["resolved"] and "single calibration seed" in pair["why"][0]
