"""OMQ, MPQ-DM's outlier-driven mixed quantization of one layer's weight (docs/methods.md §6.2).

Steps, on the layer's calibration input X (the Stage-1 batch):

1. SmoothQuant scales s_c = max|X_c|^α / max|W_c|^(1−α) per input channel (α = 0.5:
   sqrt(max|X_c| / max|W_c|)); the layer then computes Q(X/s)·Q(W·s) (:func:`smooth_scales`);
2. Pearson kurtosis per output channel of Ŵ = W·s (:func:`kurtosis`);
3. for each candidate k, the top-k channels get N+1 bits and the bottom-k N−1, the rest N (the
   average stays exactly N, :func:`assign_bits`); every channel is quantized on its own ``minmax``
   grid of its own width and the layer output error MSE(f(X/s, Q(Ŵ)), f(X, W)) is measured with
   activations unquantized; the first lowest error wins (:func:`search_split`).

The candidates are evaluated together: the quantized weights of several candidates are stacked
along the output-channel axis and run through one convolution / matmul.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError

CRITERIA = ("kurtosis", "random", "head_tail")
CANDIDATE_MODES = ("paper", "code")
#: values per chunk of stacked candidate outputs (bounds the memory of the vectorised search)
CHUNK_ELEMENTS = 1 << 25
EPS = 1e-5


def _channel_rows(t: Tensor, axis: int) -> Tensor:
    """``t`` as [C, N] with one row per index of ``axis``."""
    return t.detach().movedim(axis % t.dim(), 0).reshape(t.shape[axis], -1).float()


def smooth_scales(x: Tensor, weight: Tensor, *, act_axis: int, in_axis: int, alpha: float = 0.5) -> Tensor:
    """SmoothQuant per-input-channel scales s_c = max|X_c|^α / max|W_c|^(1−α).

    X's maximum runs over everything but its channel axis (batch and space for convs, all leading
    axes for linears); W's over output channels and kernel positions. Both maxima are floored at
    1e-5 so dead channels get a finite scale.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"smoothing alpha must lie in [0, 1], got {alpha}")
    x_max = _channel_rows(x, act_axis).abs().amax(dim=1).clamp_min(EPS)
    w_max = _channel_rows(weight, in_axis).abs().amax(dim=1).clamp_min(EPS)
    if x_max.numel() != w_max.numel():
        raise ConfigError(f"input has {x_max.numel()} channels but the weight expects {w_max.numel()}")
    return x_max.pow(alpha) / w_max.pow(1.0 - alpha)


def kurtosis(weight: Tensor, out_axis: int = 0) -> Tensor:
    """Pearson kurtosis per output channel: mean((w−μ)⁴) / σ⁴ with the unbiased σ.

    A constant channel (σ = 0) gets kurtosis 0.
    """
    rows = _channel_rows(weight, out_axis).double()
    if rows.shape[1] < 2:
        return torch.zeros(rows.shape[0], dtype=torch.float32, device=weight.device)
    mu = rows.mean(dim=1, keepdim=True)
    var = rows.var(dim=1, unbiased=True)
    m4 = (rows - mu).pow(4).mean(dim=1)
    kappa = torch.where(var > 0, m4 / var.clamp_min(1e-300).pow(2), torch.zeros_like(m4))
    return kappa.float()


def channel_scores(weight: Tensor, out_axis: int, criterion: str, seed: int = 0) -> Tensor:
    """The ranking score per output channel: higher = more bits.

    ``kurtosis`` (MPQ-DM); ``random`` (a seeded permutation); ``head_tail`` (the first channels
    get N+1 bits and the last N−1, i.e. selection by position).
    """
    c = weight.shape[out_axis]
    if criterion == "kurtosis":
        return kurtosis(weight, out_axis)
    if criterion == "random":
        gen = torch.Generator().manual_seed(int(seed))
        return torch.randperm(c, generator=gen).float().to(weight.device)
    if criterion == "head_tail":
        return torch.arange(c, 0, -1, dtype=torch.float32, device=weight.device)
    raise ConfigError(f"OMQ criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")


def assign_bits(scores: Tensor, k: int, n_bits: int) -> Tensor:
    """int8 bits per channel: the k highest scores → N+1, the k lowest → N−1, the rest N.

    Ties are broken by channel index (stable sort), so the result is deterministic.
    """
    c = scores.numel()
    if not 0 <= 2 * k <= c:
        raise ConfigError(f"split size {k} needs 0 <= 2k <= {c} channels")
    if k and not 2 <= n_bits <= 7:
        raise ConfigError(f"a mixed split of N={n_bits} bits needs 2 <= N <= 7 (channels get N±1)")
    bits = torch.full((c,), n_bits, dtype=torch.int8, device=scores.device)
    if k:
        order = torch.sort(scores.reshape(-1), descending=True, stable=True).indices
        bits[order[:k]] = n_bits + 1
        bits[order[c - k:]] = n_bits - 1
    return bits


def split_candidates(channels: int, mode: str = "paper") -> list[int]:
    """Split sizes k to try, with g = ⌊C_out/10⌋: ``paper`` k = 0, g, 2g, … ≤ C_out/2; ``code`` {0, g}."""
    if mode not in CANDIDATE_MODES:
        raise ConfigError(f"omq_candidates must be one of {', '.join(CANDIDATE_MODES)}, got {mode!r}")
    g = channels // 10
    if g == 0:
        return [0]
    if mode == "code":
        return [0, g]
    return [k for k in range(0, channels // 2 + 1, g)]


def minmax_mixed_quantize(weight: Tensor, bits: Tensor, out_axis: int = 0) -> Tensor:
    """Fake-quantize each output channel on its own asymmetric ``minmax`` grid (range widened to
    contain 0) of ``bits[c]`` bits; ``bits`` may carry leading candidate dimensions:
    [..., C] → result [..., *weight.shape]."""
    w = weight.detach().movedim(out_axis % weight.dim(), 0).float()
    c = w.shape[0]
    flat = w.reshape(c, -1)
    lo = flat.amin(dim=1).clamp_max(0.0)
    hi = flat.amax(dim=1).clamp_min(0.0)
    lead = bits.shape[:-1]
    levels = (2.0 ** bits.float()) - 1.0  # [..., C]
    step = ((hi - lo) / levels).clamp_min(1e-8)
    zero = torch.round(-lo / step).clamp(min=torch.zeros_like(levels), max=levels)
    shape = (*lead, c) + (1,) * (w.dim() - 1)
    s, z, q_hi = step.reshape(shape), zero.reshape(shape), levels.reshape(shape)
    q = torch.clamp(torch.round(w / s) + z, min=torch.zeros_like(q_hi), max=q_hi)
    out = (q - z) * s  # [..., C, *rest]
    return out.movedim(len(lead), len(lead) + out_axis % weight.dim())


def layer_output(kind: str, op_args: dict, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """f(x, W): the float op of a :class:`~diffquant.nn.layers.QuantLayer` of ``kind``."""
    if kind == "Linear":
        return F.linear(x, weight, bias)
    if kind == "Conv2d":
        return F.conv2d(x, weight, bias, **op_args)
    if kind == "Conv1d":
        return F.conv1d(x, weight, bias, **op_args)
    if kind == "ConvTranspose2d":
        return F.conv_transpose2d(x, weight, bias, **op_args)
    raise ConfigError(f"OMQ does not support {kind} layers")


def _stacked_outputs(kind: str, op_args: dict, x: Tensor, weights: Tensor, bias: Tensor | None,
                     out_axis: int) -> list[Tensor]:
    """Outputs of several candidate weights ([K, *weight.shape]) in one op call (groups = 1)."""
    k_count = weights.shape[0]
    if op_args.get("groups", 1) != 1:
        return [layer_output(kind, op_args, x, w, bias) for w in weights]
    merged = torch.cat(list(weights), dim=out_axis)
    b = None if bias is None else bias.repeat(k_count)
    y = layer_output(kind, op_args, x, merged, b)
    return list(torch.chunk(y, k_count, dim=-1 if kind == "Linear" else 1))


@dataclass
class SplitResult:
    """The outcome of one layer's split search."""

    bits: Tensor
    k: int
    candidates: list[int]
    errors: list[float]
    scores: Tensor
    counts: dict[int, int] = field(default_factory=dict)


@torch.no_grad()
def search_split(
    *,
    kind: str,
    op_args: dict,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    scaled_weight: Tensor,
    input_scale: Tensor | None,
    n_bits: int,
    out_axis: int = 0,
    act_axis: int = 1,
    candidates: list[int] | str = "paper",
    criterion: str = "kurtosis",
    seed: int = 0,
) -> SplitResult:
    """OMQ's split search for one layer (see the module docstring).

    ``weight`` is the float W (reference f(X, W)); ``scaled_weight`` is Ŵ = W·s and
    ``input_scale`` s (None without smoothing), so the candidates compute f(X/s, Q(Ŵ)).
    Returns the winning per-channel bits (int8) with every candidate's error.
    """
    c_out = scaled_weight.shape[out_axis]
    if isinstance(candidates, str):
        candidates = split_candidates(c_out, candidates)
    if not 2 <= n_bits <= 7:
        candidates = [0]  # N−1 or N+1 would leave 1..8 bits: nothing to mix
    scores = channel_scores(scaled_weight, out_axis, criterion, seed)
    bits_all = torch.stack([assign_bits(scores, k, n_bits) for k in candidates])  # [K, C]
    x = x.detach().float()
    reference = layer_output(kind, op_args, x, weight.detach().float(), None if bias is None else bias.detach())
    xs = x
    if input_scale is not None:
        shape = [1] * x.dim()
        shape[act_axis % x.dim()] = -1
        xs = x / input_scale.reshape(shape).to(x)
    per_candidate = max(1, reference.numel())
    chunk = max(1, CHUNK_ELEMENTS // per_candidate)
    errors: list[float] = []
    b = None if bias is None else bias.detach()
    for start in range(0, len(candidates), chunk):
        part = bits_all[start:start + chunk]
        wq = minmax_mixed_quantize(scaled_weight, part, out_axis)
        for y in _stacked_outputs(kind, op_args, xs, wq, b, out_axis):
            errors.append(float(torch.mean((y - reference) ** 2)))
    best = min(range(len(errors)), key=errors.__getitem__)  # first minimiser
    bits = bits_all[best].clone()
    counts = {int(v): int((bits == v).sum()) for v in torch.unique(bits)}
    return SplitResult(bits=bits, k=candidates[best], candidates=list(candidates), errors=errors,
                       scores=scores, counts=counts)


__all__ = [
    "CANDIDATE_MODES",
    "CRITERIA",
    "SplitResult",
    "assign_bits",
    "channel_scores",
    "kurtosis",
    "layer_output",
    "minmax_mixed_quantize",
    "search_split",
    "smooth_scales",
    "split_candidates",
]
