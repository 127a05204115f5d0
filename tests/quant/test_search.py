"""lp_shrink and edadm_grid range searches against brute-force loops (docs/methods.md §1.2)."""

import pytest
import torch

import diffquant.quant.search as search
from diffquant.errors import ConfigError
from diffquant.quant import (
    GridSpec,
    data_side,
    edadm_grid_range,
    fake_quantize,
    lp_shrink_range,
    qparams_from_range,
)

P = 2.4


def lp_score(x, lo, hi, spec, include_zero):
    s, z = qparams_from_range(lo, hi, spec, include_zero=include_zero)
    s, z = s.to(x.dtype), z.to(x.dtype)
    return (x - fake_quantize(x, s, z, spec.qmin, spec.qmax)).abs().pow(P).mean().item()


def first_minimiser(x, candidates, spec, include_zero):
    """Reference: a plain loop with a strict '<', like the official code."""
    best, best_range, best_i = float("inf"), None, None
    for i, (lo, hi) in enumerate(candidates):
        score = lp_score(x, lo, hi, spec, include_zero)
        if score < best:
            best, best_range, best_i = score, (lo, hi), i
    return best_range, best_i, best


def lp_shrink_reference(x, spec):
    """One channel (or the whole tensor) searched with a Python loop over 80 candidates."""
    x_min, x_max = x.min(), x.max()
    candidates = []
    for i in range(80):
        f = 1.0 - 0.01 * i
        if spec.grid == "symmetric":
            a = torch.maximum(x_min.abs(), x_max)
            candidates.append((-a * f, a * f))
        elif spec.grid == "unsigned":
            candidates.append((torch.zeros(()), x_max * f))
        else:
            candidates.append((x_min * f, x_max * f))
    return first_minimiser(x, candidates, spec, include_zero=False)


def edadm_reference(x, spec, side, symmetric=False):
    x_min, x_max = x.min(), x.max()
    candidates = []
    if side != "two" or symmetric:
        for i in range(1, 101):
            thr = torch.maximum(x_min.abs(), x_max) / 100 * i
            lo = torch.zeros(()) if side == "pos" else -thr
            hi = torch.zeros(()) if side == "neg" else thr
            candidates.append((lo, hi))
    else:
        neg, pos = torch.clamp(x_min, max=0), torch.clamp(x_max, min=0)
        for i in range(1, 101):
            width = (pos - neg) / 100 * i
            delta = width / spec.levels
            for z in range(spec.levels + 1):
                candidates.append((-z * delta, width - z * delta))
    return first_minimiser(x, candidates, spec, include_zero=True)


def assert_same_range(found, expected):
    """Searches return float32 ranges; the reference candidates may be float64."""
    assert torch.allclose(found[0], expected[0].float(), rtol=1e-6, atol=1e-12)
    assert torch.allclose(found[1], expected[1].float(), rtol=1e-6, atol=1e-12)


def outlier_tensor():
    x = torch.linspace(-1.0, 1.0, 401, dtype=torch.float64)
    x[-1] = 8.0  # one huge outlier: shrinking the range wins
    return x


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lp_shrink_outlier_matches_brute_force_and_shrinks(bits):
    x = outlier_tensor()
    spec = GridSpec(bits, "asymmetric")
    found = lp_shrink_range(x, spec, None)
    expected, i, best = lp_shrink_reference(x, spec)
    assert_same_range(found, expected)
    assert i > 0  # the full range is not the winner
    assert best < lp_score(x, x.min(), x.max(), spec, include_zero=False)
    # the returned range reproduces the winning step and zero point
    assert lp_score(x, *found, spec, include_zero=False) == pytest.approx(best, rel=1e-12)


def test_lp_shrink_keeps_full_range_when_data_sits_on_the_grid():
    x = torch.arange(16, dtype=torch.float32) * 0.25 - 1.0  # exactly the 4-bit grid of [-1, 2.75]
    lo, hi = lp_shrink_range(x, GridSpec(4, "asymmetric"), None)
    assert lo.item() == -1.0 and hi.item() == 2.75  # zero error at i = 0


@pytest.mark.parametrize("grid", ["symmetric", "unsigned"])
def test_lp_shrink_symmetric_and_zero_anchored_variants(grid):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, generator=gen, dtype=torch.float64)
    x = x.abs() if grid == "unsigned" else x
    x[7] = 9.0
    spec = GridSpec(3, grid)
    found = lp_shrink_range(x, spec, None)
    expected, i, _ = lp_shrink_reference(x, spec)
    assert_same_range(found, expected)
    assert i > 0
    if grid == "unsigned":
        assert found[0].item() == 0.0
    else:
        assert found[0].item() == -found[1].item()


def test_zero_anchored_on_asymmetric_grid_gives_zero_point_zero():
    x = torch.rand(200, generator=torch.Generator().manual_seed(2)) * 3
    spec = GridSpec(4, "asymmetric")
    lo, hi = lp_shrink_range(x, spec, None, zero_anchored=True)
    s, z = qparams_from_range(lo, hi, spec, include_zero=False)
    assert lo.item() == 0.0 and z.item() == 0.0 and s.item() == pytest.approx(hi.item() / 15)


@pytest.mark.parametrize("axis", [0, 1])
def test_lp_shrink_per_channel_equals_channel_by_channel(axis):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 5, 3, 3, generator=gen)
    w[2, 0, 0, 0] = 12.0
    w[4, 1, 1, 1] = -9.0
    spec = GridSpec(3, "asymmetric")
    lo, hi = lp_shrink_range(w, spec, axis)
    assert lo.shape == (w.shape[axis],)
    for c in range(w.shape[axis]):
        clo, chi = lp_shrink_range(w.select(axis, c), spec, None)
        assert lo[c] == clo and hi[c] == chi
    # and channel 2 (the outlier channel) matches the brute-force loop
    if axis == 0:
        expected, _, _ = lp_shrink_reference(w[2], spec)
        assert_same_range((lo[2], hi[2]), expected)


def test_data_side():
    assert data_side(torch.tensor([0.0, 1.0])) == "pos"
    assert data_side(torch.tensor([-1.0, 0.0])) == "neg"
    assert data_side(torch.tensor([-1.0, 1.0])) == "two"


@pytest.mark.parametrize("side", ["pos", "neg"])
def test_edadm_1d_one_sided_matches_brute_force(side):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(500, generator=gen, dtype=torch.float64).abs() ** 2
    x = x if side == "pos" else -x
    spec = GridSpec(4, "asymmetric")
    found = edadm_grid_range(x, spec, None)
    expected, _, _ = edadm_reference(x, spec, side)
    assert_same_range(found, expected)
    assert (found[0].item() == 0.0) if side == "pos" else (found[1].item() == 0.0)


def test_edadm_1d_symmetric_matches_brute_force():
    x = torch.randn(500, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    spec = GridSpec(4, "asymmetric")
    found = edadm_grid_range(x, spec, None, symmetric=True)
    expected, _, _ = edadm_reference(x, spec, "two", symmetric=True)
    assert_same_range(found, expected)
    assert found[0].item() == -found[1].item()


@pytest.mark.parametrize("bits", [2, 3])
def test_edadm_2d_matches_brute_force(bits):
    gen = torch.Generator().manual_seed(6)
    x = torch.cat([torch.randn(150, generator=gen) * 0.3 - 0.2, torch.rand(50, generator=gen) * 2])
    x = x.double()
    spec = GridSpec(bits, "asymmetric")
    found = edadm_grid_range(x, spec, None)
    expected, i, best = edadm_reference(x, spec, "two")
    assert_same_range(found, expected)
    assert lp_score(x, *found, spec, include_zero=True) == pytest.approx(best, rel=1e-12)


def test_edadm_2d_per_channel_matches_channel_by_channel_brute_force():
    gen = torch.Generator().manual_seed(7)
    scales = torch.tensor([[0.1], [1.0], [3.0], [0.5]], dtype=torch.float64)
    w = torch.randn(4, 40, generator=gen, dtype=torch.float64) * scales
    w[3] = w[3].abs()  # one channel is one-sided; the side comes from the whole tensor ("two")
    spec = GridSpec(2, "asymmetric")
    lo, hi = edadm_grid_range(w, spec, 0)
    for c in range(4):
        expected, _, _ = edadm_reference(w[c], spec, "two")
        assert_same_range((lo[c], hi[c]), expected)


def test_edadm_side_argument_overrides_data():
    x = torch.randn(300, generator=torch.Generator().manual_seed(8))
    lo, hi = edadm_grid_range(x, GridSpec(4, "asymmetric"), None, side="pos")
    assert lo.item() == 0.0 and hi.item() > 0
    with pytest.raises(ConfigError):
        edadm_grid_range(x, GridSpec(4, "asymmetric"), None, side="up")


def _exhaustive_2d(x, spec, channel_axis=None):
    """Every one of the 2^b × 100 candidates scored on every element (the search before bisection)."""
    rows = search.channel_rows(x, channel_axis)
    lo, hi = search.edadm_candidates(rows, spec, "two", False)
    best = search.first_argmin(search.lp_scores(rows, lo, hi, spec, p=P, include_zero=True))
    return search.pick(lo, best), search.pick(hi, best)


@pytest.mark.parametrize("bits,axis", [(4, None), (8, None), (4, 0), (6, 1)])
def test_edadm_2d_bisection_finds_the_exhaustive_first_minimiser(bits, axis):
    gen = torch.Generator().manual_seed(bits)
    x = torch.cat([torch.randn(600, generator=gen), torch.rand(200, generator=gen) * 6 - 1]).reshape(8, 100)
    spec = GridSpec(bits, "asymmetric")
    found = edadm_grid_range(x, spec, axis, bins=None)
    expected = _exhaustive_2d(x, spec, axis)
    if axis is None:
        expected = (expected[0].reshape(()), expected[1].reshape(()))
    assert_same_range(found, expected)


def _lp_error(x, lo, hi, spec, include_zero):
    rows = search.channel_rows(x, None)
    return search.lp_scores(rows, lo.reshape(1, 1), hi.reshape(1, 1), spec, p=P, include_zero=include_zero).item()


@pytest.mark.parametrize("kind", ["gauss", "laplace", "silu", "cubed"])
@pytest.mark.parametrize("bits", [4, 8])
def test_histogram_scoring_picks_a_range_as_good_as_scoring_every_element(kind, bits):
    gen = torch.Generator().manual_seed(bits)
    base = torch.randn(40_000, generator=gen)
    x = {"gauss": base, "laplace": torch.sign(base) * torch.rand(40_000, generator=gen).log().neg(),
         "silu": torch.nn.functional.silu(2 * base), "cubed": base ** 3}[kind]
    spec = GridSpec(bits, "asymmetric")
    for name, fn, zero in [("lp_shrink", lp_shrink_range, False), ("edadm_grid", edadm_grid_range, True)]:
        exact = _lp_error(x, *fn(x, spec, None, bins=None), spec, zero)
        fast = _lp_error(x, *fn(x, spec, None), spec, zero)  # 4,096 bins for 40,000 elements
        assert fast <= exact * 1.002, (name, fast, exact)


def test_histogram_cost_is_bounded_and_small_rows_are_scored_exactly(monkeypatch):
    seen = []
    original = search.lp_scores

    def spy(rows, lo, hi, *args, **kwargs):
        seen.append((rows.shape[1], lo.shape[0], kwargs.get("weights") is not None))
        return original(rows, lo, hi, *args, **kwargs)

    monkeypatch.setattr(search, "lp_scores", spy)
    spec = GridSpec(8, "asymmetric")
    big = torch.randn(4, 8, 32, 32, generator=torch.Generator().manual_seed(9))  # 32,768 elements
    edadm_grid_range(big, spec, None)
    # histogram of 4,096 bins; 2 · 100 candidates per bisection round (8 rounds for 256 zero points) + the final one
    assert all(cols == search.HISTOGRAM_BINS and weighted for cols, _, weighted in seen)
    assert sum(k for _, k, _ in seen) == 100 * (2 * 8 + 1)
    seen.clear()
    lp_shrink_range(big, spec, None)
    assert seen == [(search.HISTOGRAM_BINS, 80, True)]
    seen.clear()
    weights = torch.randn(16, 3, 3, 3)  # 27 elements per output channel: scored exactly
    edadm_grid_range(weights, spec, 0)
    assert all(cols == 27 and not weighted for cols, _, weighted in seen)
    with pytest.raises(ConfigError):
        lp_shrink_range(big, spec, None, bins=1)
