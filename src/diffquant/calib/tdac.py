"""TDAC: EDA-DM's temporal density- and diversity-aware calibration allocation (docs/methods.md §4.1).

TDAC decides **how many** calibration samples each sampler step k gets, from features F_k of the
first B trajectories at every step (the input of the UNet's middle-block attention):

- density   D_k = |{j ≠ k : mean((F_k − F_j)²) ≤ r}|, the mean over the whole tensor;
- diversity V_k = Σ_{j≠k} Σ_{b,h,w} (1 − cos_channel(F_k[b,:,h,w], F_j[b,:,h,w]));
- weights   w_k = D̂_k + λ·V̂_k with D̂, V̂ min-max normalised to [0, 1];
- counts    N_k = round(N·w_k/Σw) (half to even); if the total is short, the largest N_k get +1
  (ties to the lowest k); if it is over, 1 is taken from the last steps with N_k > 0 backwards;
- slots     a list holding each k N_k times, shuffled (seeded): sample j is trajectory j's x_t
  at step slot[j], so every trajectory gives exactly one sample.

All pairwise quantities come from two K×K Gram matrices accumulated over chunks of feature
positions (bounded memory, no Python loop over step pairs): ‖F_k − F_j‖² = ‖F_k‖² + ‖F_j‖² −
2⟨F_k, F_j⟩ in float64, and Σ_{b,h,w} cos = ⟨U_k, U_j⟩ with U = F / max(‖F‖_channel, 1e-6) (the
official ``nn.CosineSimilarity(dim=1, eps=1e-6)``).

Deviations from the official code, where it is undefined: a constant score vector normalises to
zeros (the code divides 0 by 0), and all-zero weights fall back to uniform weights.

Feature layer (``layer="auto"``, :func:`default_feature_layer`): found from the traced graph
(:meth:`~diffquant.model.trace.TraceResult.middle_feature_module`): the input of the block that
follows the first block of the network's middle — the outer residual blocks that run after the
last skip tensor is produced and before the first is consumed, at the lowest resolution. That is
the mid-block attention where there is one (diffusers ``mid_block.attentions.0``, DDIM
``mid.attn_1``, CompVis ``middle_block.1``, as the official code) and the second mid ResBlock
where there is none, whatever the modules are called; a model without skip connections (a DiT)
uses the block halfway through. ``layer=NAME`` overrides it.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from diffquant.calib.cache import UNCOND_SUFFIX, TrajectoryCache
from diffquant.calib.select import CalibrationSet, from_pairs
from diffquant.errors import ConfigError
from diffquant.jsonio import write_json

log = logging.getLogger("diffquant.calib")

#: eps of the channel-wise cosine similarity (official ``nn.CosineSimilarity(dim=1, eps=1e-6)``)
COS_EPS = 1e-6
#: float64 values per chunk of the Gram accumulation ([K, positions, C] slices)
CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------- features
def default_feature_layer(model: nn.Module, example_inputs: tuple[tuple, dict] | None = None) -> str:
    """The TDAC feature module of ``model`` from its traced graph (see the module docstring);
    ``example_inputs`` = ``(args, kwargs)`` of one call (default: built for diffusers models)."""
    from diffquant.model.trace import feature_modules

    name = feature_modules(model, example_inputs).get("middle")
    if name is None:
        raise ConfigError(f"no TDAC feature layer found in the traced graph of {type(model).__name__} (no blocks); "
                          "set EDADMConfig.tdac_feature_layer (recipe option tdac_feature_layer=MODULE_NAME)")
    return name


def feature_hooks(model: nn.Module, layer: str = "auto",
                  example_inputs: tuple[tuple, dict] | None = None) -> dict[str, nn.Module]:
    """``{name: module}`` for :func:`~diffquant.calib.capture.capture_trajectories`'s ``feature_hooks``."""
    name = default_feature_layer(model, example_inputs) if layer == "auto" else layer
    try:
        return {name: model.get_submodule(name)}
    except AttributeError:
        raise ConfigError(f"TDAC feature layer {name!r} is not a module of {type(model).__name__}") from None


def cached_feature_layer(cache: TrajectoryCache, layer: str = "auto") -> str:
    """The feature name to read from ``cache``: ``layer``, or for ``auto`` the one hook it holds."""
    held = [n for n in cache.feature_names if not n.endswith(UNCOND_SUFFIX)]
    if layer != "auto":
        if layer not in held:
            raise ConfigError(f"the trajectory cache holds no features of {layer!r} (has {held or 'none'}); "
                              "capture it with feature_hooks=feature_hooks(unet, layer)")
        return layer
    if len(held) == 1:
        return held[0]
    raise ConfigError(f"cannot tell the TDAC feature layer among the cached features {held or 'none'}; "
                      "capture with feature_hooks=feature_hooks(unet) or name the layer")


def step_features(cache: TrajectoryCache, layer: str, batch: int) -> Tensor:
    """F_k of the first ``batch`` trajectories at every step: [K, B(×2 under CFG), ...].

    Under classifier-free guidance the cond and uncond halves are concatenated along the batch,
    as the official hook sees the doubled batch.
    """
    k, b = cache.num_steps, min(batch, cache.num_samples)
    steps = torch.arange(k).repeat_interleave(b)
    samples = torch.arange(b).repeat(k)
    parts = [cache.read(f"feature:{layer}", steps, samples)]
    if layer + UNCOND_SUFFIX in cache.feature_names:
        parts.append(cache.read(f"feature:{layer}{UNCOND_SUFFIX}", steps, samples))
    return torch.cat([p.reshape(k, b, *p.shape[1:]) for p in parts], dim=1)


def _default_channel_axis(features: Tensor) -> int:
    """Channel axis of [K, B, ...] features: the last one for token tensors [K, B, L, C], else 2
    ([K, B, C, H, W] and [K, B, C]), as :func:`diffquant.recon.loss.channel_axis_of` per step."""
    return 3 if features.dim() == 4 else 2


def _positions_by_channel(features: Tensor, channel_axis: int) -> Tensor:
    """[K, B, ...] features as [K, P, C]: P positions (batch × spatial/tokens) × C channels."""
    if features.dim() < 3:
        raise ConfigError(f"TDAC features must be [steps, batch, channels, ...], got {tuple(features.shape)}")
    axis = channel_axis % features.dim()
    if axis < 2:
        raise ConfigError("the TDAC channel axis must lie after the step and batch axes")
    moved = features.movedim(axis, -1)
    return moved.reshape(features.shape[0], -1, features.shape[axis])


def gram_matrices(features: Tensor, channel_axis: int | None = None) -> tuple[Tensor, Tensor, int, int]:
    """(G, C, P, D): G[k, j] = ⟨F_k, F_j⟩ and C[k, j] = Σ_positions cos_channel(F_k, F_j), float64;
    P positions per step, D elements per step. Accumulated over position chunks."""
    axis = _default_channel_axis(features) if channel_axis is None else channel_axis
    x = _positions_by_channel(features, axis)
    k, p, c = x.shape
    gram = torch.zeros(k, k, dtype=torch.float64)
    cos = torch.zeros(k, k, dtype=torch.float64)
    chunk = max(1, CHUNK_ELEMENTS // max(1, k * c))
    for start in range(0, p, chunk):
        part = x[:, start:start + chunk].to(torch.float64)
        flat = part.reshape(k, -1)
        gram += flat @ flat.T
        unit = part / part.norm(dim=-1, keepdim=True).clamp_min(COS_EPS)
        flat_unit = unit.reshape(k, -1)
        cos += flat_unit @ flat_unit.T
    return gram, cos, p, p * c


def pairwise_mse(features: Tensor, channel_axis: int | None = None) -> Tensor:
    """M[k, j] = mean((F_k − F_j)²) over the whole per-step tensor, [K, K] float64."""
    gram, _, _, d = gram_matrices(features, channel_axis)
    return _mse_from_gram(gram, d)


def _mse_from_gram(gram: Tensor, elements: int) -> Tensor:
    sq = gram.diagonal()
    return ((sq[:, None] + sq[None, :] - 2 * gram) / elements).clamp_min(0.0)


def density(mse: Tensor, radius: float) -> Tensor:
    """D_k = number of steps j ≠ k with mse[k, j] ≤ r."""
    close = mse <= radius
    close.fill_diagonal_(False)
    return close.sum(dim=1)


def diversity(cos: Tensor, positions: int) -> Tensor:
    """V_k = Σ_{j≠k} Σ_positions (1 − cos) = (K−1)·P − Σ_{j≠k} C[k, j]."""
    k = cos.shape[0]
    return (k - 1) * positions - (cos.sum(dim=1) - cos.diagonal())


def min_max(x: Tensor) -> Tensor:
    """(x − min)/(max − min) in float64; a constant vector gives zeros."""
    x = x.to(torch.float64)
    span = x.max() - x.min()
    if span <= 0:
        return torch.zeros_like(x)
    return (x - x.min()) / span


def allocate_counts(weights: Tensor, n: int) -> Tensor:
    """N_k = round(n·w_k/Σw) with the official fix-up (module docstring); sums to ``n`` exactly."""
    if n < 1:
        raise ConfigError(f"TDAC needs at least one sample, got N={n}")
    w = weights.to(torch.float64)
    if w.dim() != 1 or w.numel() == 0:
        raise ConfigError("TDAC weights must be a non-empty vector")
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise ConfigError("TDAC weights must be finite and non-negative")
    if float(w.sum()) == 0.0:
        w = torch.ones_like(w)
    counts = torch.round(w / w.sum() * n).long()
    error = n - int(counts.sum())
    k = counts.numel()
    if error > 0:
        # stable descending sort: equal counts keep ascending k (ties to the lowest k)
        order = torch.sort(counts, descending=True, stable=True).indices
        for i in range(error):
            counts[order[i % k]] += 1
    while error < 0:
        for i in reversed(range(k)):
            if error == 0:
                break
            if counts[i] > 0:
                counts[i] -= 1
                error += 1
    return counts


def assign_steps(counts: Tensor, seed: int = 0) -> Tensor:
    """slot[j] for j = 0 … N−1: each k repeated N_k times, shuffled with a seeded permutation."""
    steps = torch.repeat_interleave(torch.arange(counts.numel()), counts.long())
    perm = torch.randperm(steps.numel(), generator=torch.Generator().manual_seed(seed))
    return steps[perm]


# ---------------------------------------------------------------------------------- result
@dataclass
class TDACResult:
    """Per-step scores and counts of one allocation, and the step of every sample."""

    counts: Tensor
    slots: Tensor
    density: Tensor | None = None
    diversity: Tensor | None = None
    weights: Tensor | None = None
    timesteps: list[int] | None = None
    settings: dict | None = None

    def to_dict(self) -> dict:
        out = {}
        for key, value in asdict(self).items():
            out[key] = value.tolist() if isinstance(value, Tensor) else value
        return out

    def save(self, directory: str | Path) -> Path:
        """Write ``tdac.json`` and (with matplotlib) ``tdac_counts.png`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / "tdac.json", self.to_dict(), indent=1)
        plot_counts(self.counts, directory / "tdac_counts.png", self.timesteps)
        return directory


def plot_counts(counts: Tensor, path: str | Path, timesteps: Sequence[int] | None = None) -> Path | None:
    """Line plot of N_k over the steps; None (nothing written) when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.info("matplotlib is not installed: TDAC plot skipped")
        return None
    fig = Figure(figsize=(6, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(range(len(counts)), [int(c) for c in counts], marker=".")
    ax.set_xlabel("sampler step k (0 = noisiest)" if timesteps is None else
                  f"sampler step k (t = {timesteps[0]} … {timesteps[-1]})")
    ax.set_ylabel("samples N_k")
    ax.set_title(f"TDAC allocation, N = {int(sum(int(c) for c in counts))}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    return Path(path)


def tdac(features: Tensor, n: int, *, lam: float = 1.2, radius: float = 3.0, seed: int = 0,
         channel_axis: int | None = None) -> TDACResult:
    """The TDAC allocation of ``n`` samples from per-step features [K, B, C, ...]."""
    if features.shape[0] < 2:
        raise ConfigError("TDAC needs features of at least two steps")
    gram, cos, positions, elements = gram_matrices(features, channel_axis)
    mse = _mse_from_gram(gram, elements)
    dens = density(mse, radius)
    if bool((dens == dens[0]).all()):
        _warn_constant_density(mse, radius)
    div = diversity(cos, positions)
    weights = min_max(dens) + lam * min_max(div)
    counts = allocate_counts(weights, n)
    return TDACResult(counts, assign_steps(counts, seed), dens, div, weights,
                      settings={"n": n, "lambda": lam, "radius": radius, "seed": seed})


def _warn_constant_density(mse: Tensor, radius: float) -> None:
    """The paper's r is in units of the feature MSE, which differs between models: a radius above
    (or below) every pairwise distance makes density constant and the allocation diversity-only."""
    off = mse[~torch.eye(mse.shape[0], dtype=torch.bool, device=mse.device)]
    low, mid, high = (float(off.quantile(q)) for q in (0.0, 0.5, 1.0))
    warnings.warn(
        f"TDAC density is the same for every step at radius r={radius:g} (pairwise feature MSE "
        f"{low:.3g}..{high:.3g}, median {mid:.3g}): the allocation follows diversity only; "
        "set tdac_radius inside that range to use density", stacklevel=3)


def uniform_allocation(num_steps: int, n: int, seed: int = 0) -> TDACResult:
    """TDAC switched off: the same N spread evenly over the steps, same fix-up and shuffle."""
    counts = allocate_counts(torch.ones(num_steps), n)
    return TDACResult(counts, assign_steps(counts, seed), weights=torch.ones(num_steps, dtype=torch.float64),
                      settings={"n": n, "seed": seed, "tdac": False})


def select_tdac(cache: TrajectoryCache, n: int, *, batch: int = 64, lam: float = 1.2, radius: float = 3.0,
                layer: str = "auto", seed: int = 0, enabled: bool = True) -> tuple[CalibrationSet, TDACResult]:
    """The calibration set of ``n`` trajectories (one sample each) at TDAC-allocated steps.

    ``n`` must not exceed the trajectories in the cache; ``batch`` trajectories give the features.
    With ``enabled=False`` the counts are uniform and no features are needed.
    """
    if not 1 <= n <= cache.num_samples:
        raise ConfigError(f"TDAC N={n} must be between 1 and the cache's {cache.num_samples} trajectories")
    if batch < 1:
        raise ConfigError(f"TDAC feature batch B must be >= 1, got {batch}")
    if enabled:
        name = cached_feature_layer(cache, layer)
        result = tdac(step_features(cache, name, batch), n, lam=lam, radius=radius, seed=seed)
        result.settings.update({"layer": name, "batch": min(batch, cache.num_samples)})
    else:
        result = uniform_allocation(cache.num_steps, n, seed)
    result.timesteps = cache.timesteps.tolist()
    return from_pairs(cache, result.slots, torch.arange(n)), result


__all__ = [
    "TDACResult",
    "allocate_counts",
    "assign_steps",
    "cached_feature_layer",
    "default_feature_layer",
    "density",
    "diversity",
    "feature_hooks",
    "gram_matrices",
    "min_max",
    "pairwise_mse",
    "plot_counts",
    "select_tdac",
    "step_features",
    "tdac",
    "uniform_allocation",
]
