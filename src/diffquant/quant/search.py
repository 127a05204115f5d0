"""Range searches that pick [lo, hi] by minimising the Lp quantization error (docs/methods.md §1.2).

Both searches score a set of candidate ranges with mean |x − Q(x)|^p and keep the *first*
minimiser (a strict ``<`` in a loop over candidates, like the official code). Every candidate is
turned into (s, z) with :func:`qparams_from_range` — the very function the quantizer uses — so the
returned range reproduces the chosen step and zero point exactly:

- :func:`lp_shrink_range` scores candidates with ``include_zero=False``; a quantizer using it must
  not widen the range to 0 (``UniformQuantizer`` never does for ``lp_shrink``);
- :func:`edadm_grid_range` candidates always contain 0, so widening is a no-op for them.

Per-channel searches are independent per channel but vectorised over channels *and* candidates;
memory is bounded by processing candidates in chunks of at most ``CHUNK_ELEMENTS`` values.

Cost (docs/methods.md §1.2, "Search cost"): a row with more than ``bins`` elements is scored on
its histogram — ``bins`` equal-width bins over [min, max], each represented by the mean of its
elements and weighted by their count — so a search costs one pass over the data plus
candidates × bins, whatever the batch. Rows with at most ``bins`` elements (most weight
channels) are scored exactly. EDA-DM's 2-D search does not score all 2^b zero points of a width:
for a fixed step the error of every element is a discretely convex function of the zero point,
so their sum is too and a bisection finds its first minimiser in log₂(2^b) steps.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from .affine import GridSpec, qparams_from_range

#: Max number of values in one [candidates, channels, elements] chunk (float32: 1 MiB, so a
#: chunk stays in cache; larger chunks were slower in measurements on a 2-core CPU).
CHUNK_ELEMENTS = 1 << 18
#: Histogram bins a row is scored on when it has more elements (``bins`` option; None: exact).
HISTOGRAM_BINS = 4096
SIDES = ("pos", "neg", "two")
EDADM_STEPS = 100


def data_side(x: Tensor) -> str:
    """EDA-DM's side of a distribution: ``pos`` if min ≥ 0, ``neg`` if max ≤ 0, else ``two``."""
    if bool(x.min() >= 0):
        return "pos"
    if bool(x.max() <= 0):
        return "neg"
    return "two"


def channel_rows(x: Tensor, channel_axis: int | None) -> Tensor:
    """``x`` as [C, N] (one row per channel; C = 1 per tensor), detached, float32/float64."""
    x = x.detach()
    if x.dtype != torch.float64:
        x = x.float()
    if channel_axis is None:
        return x.reshape(1, -1)
    return x.movedim(channel_axis % x.dim(), 0).reshape(x.shape[channel_axis], -1)


def histogram_rows(rows: Tensor, bins: int | None) -> tuple[Tensor, Tensor | None]:
    """``rows`` [C, N] as (values, weights) to score on: the rows themselves (weights None) when
    N ≤ ``bins`` or ``bins`` is None, else per row ``bins`` equal-width bins over [min, max], each
    holding the mean of its elements (0 when empty) and weighted by their count."""
    if bins is not None and (isinstance(bins, bool) or not isinstance(bins, int) or bins < 2):
        raise ConfigError(f"histogram bins must be an integer >= 2 or null (exact), got {bins!r}")
    c, n = rows.shape
    if bins is None or n <= bins:
        return rows, None
    lo, hi = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)
    scale = bins / (hi - lo).clamp_min(torch.finfo(rows.dtype).tiny)
    index = ((rows - lo) * scale).to(torch.int32).clamp_(0, bins - 1)  # truncation = floor: x − lo ≥ 0
    index += torch.arange(c, dtype=torch.int32, device=rows.device).reshape(-1, 1) * bins  # one pass for all rows
    flat = index.reshape(-1)
    counts = torch.bincount(flat, minlength=c * bins).reshape(c, bins).double()
    sums = torch.zeros(c * bins, dtype=torch.float64, device=rows.device).index_add_(
        0, flat, rows.reshape(-1).double()).reshape(c, bins)
    values = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums)).to(rows.dtype)
    return values, counts.to(rows.dtype)


def lp_scores(
    rows: Tensor,
    lo: Tensor,
    hi: Tensor,
    spec: GridSpec,
    *,
    p: float,
    include_zero: bool,
    clamp_zero_point: bool = True,
    weights: Tensor | None = None,
) -> Tensor:
    """mean |x − Q(x)|^p per candidate and channel: rows [C, N], lo/hi [K, C] → scores [K, C].

    Q(x) equals the quantizer's forward bit for bit (z is an integer in every search). With
    ``weights`` [C, N] (a histogram's counts) the mean is weighted.
    """
    step, zero = qparams_from_range(
        lo, hi, spec, include_zero=include_zero, clamp_zero_point=clamp_zero_point
    )
    step = step.to(rows.dtype)
    zero = zero.to(rows.dtype)
    # clamp(⌊x/s⌉ + z, q_min, q_max) − z == clamp(⌊x/s⌉, q_min − z, q_max − z) for integer z.
    low, high = spec.qmin - zero, spec.qmax - zero
    k_total = lo.shape[0]
    c, n = rows.shape
    chunk = max(1, CHUNK_ELEMENTS // max(1, c * n))
    scores = []
    for start in range(0, k_total, chunk):
        part = slice(start, start + chunk)
        s = step[part, :, None]
        q = torch.round(rows / s)
        q = torch.maximum(q, low[part, :, None], out=q)
        q = torch.minimum(q, high[part, :, None], out=q)
        q.mul_(s).sub_(rows).abs_().pow_(p)
        scores.append(q.mean(dim=-1) if weights is None else (q * weights).sum(dim=-1) / weights.sum(dim=-1))
    return torch.cat(scores, dim=0)


def first_argmin(scores: Tensor) -> Tensor:
    """Index of the first minimum along dim 0 (ties go to the earliest candidate)."""
    return torch.argmin(scores, dim=0)


def pick(candidates: Tensor, index: Tensor) -> Tensor:
    """candidates [K, C], index [C] → [C]."""
    return candidates.gather(0, index.reshape(1, -1)).reshape(-1)


def _shape_result(lo: Tensor, hi: Tensor, channel_axis: int | None) -> tuple[Tensor, Tensor]:
    if channel_axis is None:
        return lo.reshape(()), hi.reshape(())
    return lo, hi


def lp_shrink_range(
    x: Tensor,
    spec: GridSpec,
    channel_axis: int | None,
    p: float = 2.4,
    candidates: int = 80,
    shrink: float = 0.01,
    zero_anchored: bool | None = None,
    *,
    clamp_zero_point: bool = True,
    bins: int | None = HISTOGRAM_BINS,
) -> tuple[Tensor, Tensor]:
    """LAPQ-style shrinking search (Q-Diffusion ``mse``): for i = 0…candidates−1 try
    (1 − shrink·i)·[min x, max x] and keep the first range with the smallest mean |x − Q(x)|^p.

    Grids: asymmetric → (s, z) of the shrunk range without widening to 0; ``unsigned`` (or
    ``zero_anchored=True``) → [0, M_i], i.e. s = M_i/(2^b−1), z = 0; ``symmetric`` → shrink
    max|x|, returned as [−A_i, A_i]. Per channel (``channel_axis`` set) each channel is searched
    independently. Returns (lo, hi): 0-d tensors per tensor, [C] per channel, such that
    ``qparams_from_range(lo, hi, spec, include_zero=False, clamp_zero_point=clamp_zero_point)``
    gives the chosen step and zero point. Rows longer than ``bins`` are scored on their
    histogram (module docstring); ``bins=None`` scores every element, as the official code.
    """
    if candidates < 1:
        raise ConfigError(f"lp_shrink needs at least one candidate, got {candidates}")
    if zero_anchored is None:
        zero_anchored = spec.grid == "unsigned"
    rows = channel_rows(x, channel_axis)
    x_min, x_max = rows.amin(dim=1), rows.amax(dim=1)
    factors = torch.tensor(
        [1.0 - shrink * i for i in range(candidates)], dtype=rows.dtype, device=rows.device
    ).reshape(-1, 1)
    if spec.grid == "symmetric":
        amax = torch.maximum(x_min.abs(), x_max)
        lo, hi = -factors * amax, factors * amax
    elif zero_anchored:
        hi = factors * x_max
        lo = torch.zeros_like(hi)
    else:
        lo, hi = factors * x_min, factors * x_max
    values, weights = histogram_rows(rows, bins)
    scores = lp_scores(values, lo, hi, spec, p=p, include_zero=False, clamp_zero_point=clamp_zero_point,
                       weights=weights)
    best = first_argmin(scores)
    return _shape_result(pick(lo, best).float(), pick(hi, best).float(), channel_axis)


def edadm_candidates(
    rows: Tensor, spec: GridSpec, side: str, symmetric: bool, steps: int = EDADM_STEPS
) -> tuple[Tensor, Tensor]:
    """Candidate ranges [K, C] of EDA-DM's search, in the official loop order.

    1-D (one-sided data, ``symmetric``, or a non-asymmetric grid): thr_i = max(|min|, max)·i/steps,
    candidates [−thr, thr] / [0, thr] / [−thr, 0]. 2-D (two-sided data, asymmetric grid):
    w_i = (M⁺ − m⁻)·i/steps, δ_i = w_i/(2^b−1), candidates [−zδ_i, w_i − zδ_i] for z = 0…2^b−1,
    ordered i-major (all z for i = 1, then i = 2, …).
    """
    x_min, x_max = rows.amin(dim=1), rows.amax(dim=1)
    i = torch.arange(1, steps + 1, dtype=rows.dtype, device=rows.device).reshape(-1, 1)
    if side != "two" or symmetric or spec.grid != "asymmetric":
        thr = (torch.maximum(x_min.abs(), x_max) / steps) * i  # [steps, C]
        lo = torch.zeros_like(thr) if side == "pos" else -thr
        hi = torch.zeros_like(thr) if side == "neg" else thr
        return lo, hi
    neg = torch.minimum(x_min, torch.zeros_like(x_min))
    pos = torch.maximum(x_max, torch.zeros_like(x_max))
    width = ((pos - neg) / steps) * i  # [steps, C]
    delta = width / spec.levels
    z = torch.arange(spec.levels + 1, dtype=rows.dtype, device=rows.device).reshape(1, -1, 1)
    lo = -z * delta[:, None, :]  # [steps, 2^b, C]
    hi = width[:, None, :] + lo
    c = rows.shape[0]
    return lo.reshape(-1, c), hi.reshape(-1, c)


def _bisect_zero_points(values: Tensor, weights: Tensor | None, lo: Tensor, hi: Tensor, spec: GridSpec, *,
                        p: float, clamp_zero_point: bool) -> tuple[Tensor, Tensor]:
    """The first minimiser over the zero points of each width of EDA-DM's 2-D candidates.

    ``lo``/``hi`` [W·Z, C] are i-major (:func:`edadm_candidates`): Z = 2^b zero points per width.
    For one step δ an element's error |x − Q(x)|^p is constant while it is inside the clipping
    range and grows convexly with the distance once clipped, so as a function of the integer zero
    point it is discretely convex, and so is the mean. Bisection on the sign of f(z+1) − f(z)
    (ties go left) finds the first minimiser of every (width, channel) at once in ⌈log₂ Z⌉ rounds
    of 2·W candidates. Returns (scores [W, C], index [W, C] into the flat candidate list).
    """
    z_count = spec.levels + 1
    widths = lo.shape[0] // z_count
    c = lo.shape[1]
    lo3, hi3 = lo.reshape(widths, z_count, c), hi.reshape(widths, z_count, c)

    def score(*zs: Tensor) -> Tensor:  # each z [W, C] → f(z) [W, C], all stacked on dim 0 in one scoring
        cand_lo = torch.cat([lo3.gather(1, z.unsqueeze(1)).squeeze(1) for z in zs])
        cand_hi = torch.cat([hi3.gather(1, z.unsqueeze(1)).squeeze(1) for z in zs])
        return lp_scores(values, cand_lo, cand_hi, spec, p=p, include_zero=True, clamp_zero_point=clamp_zero_point,
                         weights=weights)

    left = torch.zeros(widths, c, dtype=torch.long, device=lo.device)
    right = torch.full_like(left, z_count - 1)
    while bool((left < right).any()):
        mid = (left + right) // 2
        nxt = torch.minimum(mid + 1, right)
        both = score(mid, nxt)
        f_mid, f_next = both[:widths], both[widths:]
        active = left < right
        go_right = active & (f_next < f_mid)
        left = torch.where(go_right, mid + 1, left)
        right = torch.where(active & ~go_right, mid, right)
    best_scores = score(left)
    flat = torch.arange(widths, device=lo.device).reshape(-1, 1) * z_count + left
    return best_scores, flat


def edadm_grid_range(
    x: Tensor,
    spec: GridSpec,
    channel_axis: int | None,
    p: float = 2.4,
    side: str | None = None,
    symmetric: bool = False,
    *,
    clamp_zero_point: bool = True,
    bins: int | None = HISTOGRAM_BINS,
) -> tuple[Tensor, Tensor]:
    """EDA-DM's 1-D / 2-D range search (see :func:`edadm_candidates`), scored with mean
    |x − Q(x)|^p per channel (weights) or per tensor, first minimiser kept.

    ``side`` is the side fixed by the first calibration batch (``pos``/``neg``/``two``); None
    takes it from ``x`` (:func:`data_side`, over the whole tensor as in the official code).
    Each candidate becomes (s, z) by widening to contain 0, s = (M⁺−m⁻)/(2^b−1),
    z = clamp(−⌊m⁻/s⌉, 0, 2^b−1), i.e. ``qparams_from_range(lo, hi, spec)``.

    The 2-D search (25,600 candidates at 8 bit) bisects over the zero points of each width
    (:func:`_bisect_zero_points`), 1,700 candidates scored instead; rows longer than ``bins`` are
    scored on their histogram (module docstring), ``bins=None`` scores every element.
    """
    side = data_side(x) if side is None else side
    if side not in SIDES:
        raise ConfigError(f"edadm_grid side must be one of {SIDES}, got {side!r}")
    rows = channel_rows(x, channel_axis)
    lo, hi = edadm_candidates(rows, spec, side, symmetric)
    values, weights = histogram_rows(rows, bins)
    two_d = side == "two" and not symmetric and spec.grid == "asymmetric"
    if two_d:
        per_width, flat = _bisect_zero_points(values, weights, lo, hi, spec, p=p, clamp_zero_point=clamp_zero_point)
        best = flat.gather(0, first_argmin(per_width).reshape(1, -1)).reshape(-1)
    else:
        scores = lp_scores(values, lo, hi, spec, p=p, include_zero=True, clamp_zero_point=clamp_zero_point,
                           weights=weights)
        best = first_argmin(scores)
    return _shape_result(pick(lo, best).float(), pick(hi, best).float(), channel_axis)
