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
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ConfigError
from .affine import GridSpec, qparams_from_range

#: Max number of values in one [candidates, channels, elements] chunk (float32: 1 MiB, so a
#: chunk stays in cache; larger chunks were slower in measurements on a 2-core CPU).
CHUNK_ELEMENTS = 1 << 18
#: Default work bound (candidates × elements per channel) of ``edadm_grid_range``; above it the
#: elements are subsampled (see ``max_elements``). 2^27 ≈ 1.3e8 keeps an 8-bit 2-D search on a
#: large activation tensor around a second on a 2-core CPU.
EDADM_EVAL_BUDGET = 1 << 27
#: Seed of the deterministic subsample.
SUBSAMPLE_SEED = 0
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


def subsample_columns(rows: Tensor, max_elements: int | None) -> Tensor:
    """Keep at most ``max_elements`` columns of ``rows`` ([C, N]), the same random positions
    (fixed seed, without replacement) for every row; unchanged when N is small enough."""
    n = rows.shape[1]
    if max_elements is None or n <= max_elements:
        return rows
    gen = torch.Generator(device="cpu").manual_seed(SUBSAMPLE_SEED)
    idx = torch.randperm(n, generator=gen)[:max_elements].sort().values
    return rows[:, idx.to(rows.device)]


def lp_scores(
    rows: Tensor,
    lo: Tensor,
    hi: Tensor,
    spec: GridSpec,
    *,
    p: float,
    include_zero: bool,
    clamp_zero_point: bool = True,
) -> Tensor:
    """mean |x − Q(x)|^p per candidate and channel: rows [C, N], lo/hi [K, C] → scores [K, C].

    Q(x) equals the quantizer's forward bit for bit (z is an integer in every search).
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
        scores.append(q.mean(dim=-1))
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
    max_elements: int | None = None,
) -> tuple[Tensor, Tensor]:
    """LAPQ-style shrinking search (Q-Diffusion ``mse``): for i = 0…candidates−1 try
    (1 − shrink·i)·[min x, max x] and keep the first range with the smallest mean |x − Q(x)|^p.

    Grids: asymmetric → (s, z) of the shrunk range without widening to 0; ``unsigned`` (or
    ``zero_anchored=True``) → [0, M_i], i.e. s = M_i/(2^b−1), z = 0; ``symmetric`` → shrink
    max|x|, returned as [−A_i, A_i]. Per channel (``channel_axis`` set) each channel is searched
    independently. Returns (lo, hi): 0-d tensors per tensor, [C] per channel, such that
    ``qparams_from_range(lo, hi, spec, include_zero=False, clamp_zero_point=clamp_zero_point)``
    gives the chosen step and zero point. ``max_elements`` optionally scores on a fixed-seed
    subsample of that many elements per channel (default: all elements, as the official code).
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
    scores = lp_scores(
        subsample_columns(rows, max_elements), lo, hi, spec,
        p=p, include_zero=False, clamp_zero_point=clamp_zero_point,
    )
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


def edadm_grid_range(
    x: Tensor,
    spec: GridSpec,
    channel_axis: int | None,
    p: float = 2.4,
    side: str | None = None,
    symmetric: bool = False,
    *,
    clamp_zero_point: bool = True,
    max_elements: int | None = None,
) -> tuple[Tensor, Tensor]:
    """EDA-DM's 1-D / 2-D range search (see :func:`edadm_candidates`), scored with mean
    |x − Q(x)|^p per channel (weights) or per tensor, first minimiser kept.

    ``side`` is the side fixed by the first calibration batch (``pos``/``neg``/``two``); None
    takes it from ``x`` (:func:`data_side`, over the whole tensor as in the official code).
    Each candidate becomes (s, z) by widening to contain 0, s = (M⁺−m⁻)/(2^b−1),
    z = clamp(−⌊m⁻/s⌉, 0, 2^b−1), i.e. ``qparams_from_range(lo, hi, spec)``.

    Cost is candidates × elements per channel (25,600 candidates at 8 bit in 2-D). When that
    exceeds ``EDADM_EVAL_BUDGET`` the scores are computed on a fixed-seed random subsample of
    ``max_elements`` elements per channel (default: budget / candidates, e.g. 5,243 for the 8-bit
    2-D search, 1.3 M for the 1-D search); min and max still come from all elements.
    """
    side = data_side(x) if side is None else side
    if side not in SIDES:
        raise ConfigError(f"edadm_grid side must be one of {SIDES}, got {side!r}")
    rows = channel_rows(x, channel_axis)
    lo, hi = edadm_candidates(rows, spec, side, symmetric)
    if max_elements is None:
        max_elements = max(1, math.ceil(EDADM_EVAL_BUDGET / lo.shape[0]))
    scores = lp_scores(
        subsample_columns(rows, max_elements), lo, hi, spec,
        p=p, include_zero=True, clamp_zero_point=clamp_zero_point,
    )
    best = first_argmin(scores)
    return _shape_result(pick(lo, best).float(), pick(hi, best).float(), channel_axis)
