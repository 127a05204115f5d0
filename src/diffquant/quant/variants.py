"""Quantizer variants that recipes swap in for a :class:`UniformQuantizer` at calibration time.

- :class:`MixedBitQuantizer` (MPQ-DM's OMQ, docs/methods.md §6.2): per-output-channel bit tags, each
  channel on its own asymmetric grid of 2^b_c − 1 levels. Summing MPQ-DM's three group quantizers
  Σ_g Q_g(mask_g ⊙ W) equals quantizing each channel with its own group's (s, z, bits), which is
  what this module does with one (s, z) per channel and an int8 bit tag per channel.
- :class:`PTSQuantizer` (DMQ's power-of-two scaling, docs/methods.md §5.3): a per-tensor activation
  quantizer whose step is multiplied per channel by a power-of-two factor m_c ≤ 1, with the same
  integer zero point, per table row.

Both keep every tensor of the base class, so the state dict is a superset and checkpoints
record the class name (``describe()["class"]``) to rebuild them before loading.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import Registry
from .affine import GridSpec, broadcast_shape, qparams_from_range, round_ste
from .quantizer import UniformQuantizer
from .ranges import batch_range


def _clamp_ste_free(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    return torch.minimum(torch.maximum(x, lo), hi)


class MixedBitQuantizer(UniformQuantizer):
    """Per-channel weight quantizer whose channels may use different bit-widths (asymmetric grid).

    ``bits`` stays the layer's nominal N (the average when the tags are balanced);
    ``channel_bits`` holds each channel's own width, 1–8.
    """

    def __init__(self, bits: int, channel_axis: int, channels: int, **kwargs):
        if channel_axis is None:
            raise ConfigError("a mixed-bit quantizer is per channel")
        if kwargs.get("grid", "asymmetric") != "asymmetric":
            raise ConfigError("mixed-bit quantization uses the asymmetric grid")
        super().__init__(bits, channel_axis=channel_axis, channels=channels, **kwargs)
        self.register_buffer("channel_bits", torch.full((self.channels,), bits, dtype=torch.int8))

    @classmethod
    def from_quantizer(cls, q: UniformQuantizer) -> "MixedBitQuantizer":
        """A mixed quantizer with ``q``'s settings and state, every channel at ``q.bits``."""
        new = cls(
            q.bits, q.channel_axis, q.channels, init=q.init, num_steps=q.num_steps,
            include_zero=q.include_zero, clamp_zero_point=q.clamp_zero_point, momentum=q.momentum,
            init_options=q.init_options,
        ).to(q.step.device)
        new.load_state_dict(q.state_dict(), strict=False)
        new.enabled, new.timestep_index = q.enabled, q.timestep_index
        return new

    @torch.no_grad()
    def set_channel_bits(self, bits: Tensor) -> None:
        bits = torch.as_tensor(bits).reshape(-1)
        if bits.numel() != self.channels:
            raise ConfigError(f"need {self.channels} channel bit-widths, got {bits.numel()}")
        if int(bits.min()) < 1 or int(bits.max()) > 8:
            raise ConfigError(f"channel bit-widths must lie in 1..8, got {int(bits.min())}..{int(bits.max())}")
        self.channel_bits.copy_(bits.to(self.channel_bits))
        self.initialized.zero_()

    @property
    def average_bits(self) -> float:
        return float(self.channel_bits.float().mean())

    def _qmax(self, x_dim: int) -> Tensor:
        levels = (2 ** self.channel_bits.long() - 1).to(self.step.dtype)
        return levels.reshape(broadcast_shape(x_dim, self.channel_axis, self.channels))

    def quantize(self, x: Tensor, row: int | None = None) -> Tensor:
        s, z = self.params(x.dim(), row)
        s, z = s.to(x.dtype), z.to(x.dtype)
        qmax = self._qmax(x.dim()).to(x.dtype)
        q = _clamp_ste_free(round_ste(x / s) + z, torch.zeros_like(qmax), qmax)
        return (q - z) * s

    def _groups(self) -> list[tuple[int, Tensor]]:
        bits = self.channel_bits.long()
        return [(int(b), torch.nonzero(bits == b).reshape(-1)) for b in torch.unique(bits)]

    @torch.no_grad()
    def set_range(self, lo: Tensor, hi: Tensor, row: int | None = None) -> None:
        lo, hi = lo.reshape(-1).float(), hi.reshape(-1).float()
        s = torch.empty_like(lo)
        z = torch.empty_like(lo)
        for b, idx in self._groups():
            s[idx], z[idx] = qparams_from_range(
                lo[idx], hi[idx], GridSpec(b, "asymmetric"),
                include_zero=self.widens_to_zero, clamp_zero_point=self.clamp_zero_point,
            )
        for k in range(self.num_steps) if row is None else [row]:
            self.range_lo[k], self.range_hi[k] = lo.to(self.range_lo), hi.to(self.range_hi)
            self.step.data[k] = s.to(self.step)
            self.zero_point.data[k] = z.to(self.zero_point)
            self.initialized[k] = True

    def _batch_range(self, x: Tensor, rows: list[int]) -> tuple[Tensor, Tensor]:
        if self.init not in ("minmax", "ema_minmax", "lp_shrink"):
            raise ConfigError(f"mixed-bit quantizers support minmax / ema_minmax / lp_shrink, not {self.init}")
        axis = self.channel_axis % x.dim()
        lo = torch.empty(self.channels, device=x.device)
        hi = torch.empty(self.channels, device=x.device)
        options = dict(self.init_options)
        if self.init == "lp_shrink":
            options["clamp_zero_point"] = self.clamp_zero_point
        for b, idx in self._groups():
            part = x.index_select(axis, idx.to(x.device))
            glo, ghi = batch_range(part, self.init, GridSpec(b, "asymmetric"), axis, **options)
            lo[idx.to(x.device)], hi[idx.to(x.device)] = glo.reshape(-1).float(), ghi.reshape(-1).float()
        return lo, hi

    def describe(self) -> dict:
        return {**super().describe(), "class": "MixedBitQuantizer"}

    def extra_repr(self) -> str:
        counts = {b: len(i) for b, i in self._groups()}
        return super().extra_repr() + f", mixed={counts}"


class PTSQuantizer(UniformQuantizer):
    """Per-tensor activation quantizer with per-channel power-of-two step multipliers (DMQ PTS)
    and an optional folded input divisor (DMQ's LES τ in deployment form).

    Codes of channel c in row k: q = clamp(⌊x / (s_k·m_kc·τ_c)⌉ + z_k); output s_k·m_kc·(q − z_k).
    With τ = 1 this is PTS alone; with m = 1 it equals Q(x/τ; s, z) of a layer whose τ has been
    folded into its stored weight (W·τ) — the paper's deployment form. ``pts_axis`` is the
    activation's channel axis (1 for conv inputs, −1 for linear inputs).
    """

    def __init__(self, bits: int, pts_axis: int, pts_channels: int, **kwargs):
        super().__init__(bits, **kwargs)
        if self.channel_axis is not None:
            raise ConfigError("PTS applies to per-tensor activation quantizers")
        self.pts_axis = int(pts_axis)
        self.pts_channels = int(pts_channels)
        self.register_buffer("multiplier", torch.ones(self.num_steps, self.pts_channels))
        self.register_buffer("input_divisor", torch.ones(self.pts_channels))

    @classmethod
    def from_quantizer(cls, q: UniformQuantizer, pts_axis: int, pts_channels: int) -> "PTSQuantizer":
        new = cls(
            q.bits, pts_axis, pts_channels, grid=q.grid, init=q.init, num_steps=q.num_steps,
            include_zero=q.include_zero, clamp_zero_point=q.clamp_zero_point, momentum=q.momentum,
            init_options=q.init_options,
        ).to(q.step.device)
        new.load_state_dict(q.state_dict(), strict=False)
        new.enabled, new.timestep_index = q.enabled, q.timestep_index
        return new

    def channel_steps(self, x_dim: int, row: int) -> Tensor:
        m = self.multiplier[row].reshape(broadcast_shape(x_dim, self.pts_axis, self.pts_channels))
        return self.step[row].reshape(()) * m

    def quantize(self, x: Tensor, row: int | None = None) -> Tensor:
        k = self.row() if row is None else row
        s = self.channel_steps(x.dim(), k).to(x.dtype)
        z = self.zero_point[k].reshape(()).to(x.dtype)
        spec = self.spec
        divisor = self.input_divisor.reshape(broadcast_shape(x.dim(), self.pts_axis, self.pts_channels)).to(x.dtype)
        q = torch.clamp(round_ste(x / (s * divisor)) + z, spec.qmin, spec.qmax)
        return (q - z) * s

    def describe(self) -> dict:
        return {**super().describe(), "class": "PTSQuantizer", "pts_axis": self.pts_axis, "pts_channels": self.pts_channels}


QUANTIZER_CLASSES: dict[str, type[UniformQuantizer]] = {
    "UniformQuantizer": UniformQuantizer,
    "MixedBitQuantizer": MixedBitQuantizer,
    "PTSQuantizer": PTSQuantizer,
}


#: quantizer classes a manifest may name, each with how it is rebuilt from the plain quantizer the
#: wrap plan makes: ``build(like, desc)``
QUANTIZER_VARIANTS: Registry = Registry("quantizer class")


def _plain(like: UniformQuantizer, desc: dict) -> UniformQuantizer:
    raise ConfigError("cannot turn a variant quantizer back into a plain one")


QUANTIZER_VARIANTS.add("UniformQuantizer", _plain)
QUANTIZER_VARIANTS.add("MixedBitQuantizer", lambda like, desc: MixedBitQuantizer.from_quantizer(like))
QUANTIZER_VARIANTS.add("PTSQuantizer",
                       lambda like, desc: PTSQuantizer.from_quantizer(like, desc["pts_axis"], desc["pts_channels"]))


def rebuild_quantizer(desc: dict, like: UniformQuantizer) -> UniformQuantizer:
    """A quantizer of the class named in a manifest ``desc``, built from ``like`` (same shapes)."""
    cls_name = desc.get("class", "UniformQuantizer")
    if cls_name == type(like).__name__:
        return like
    return QUANTIZER_VARIANTS.get(cls_name)(like, desc)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at dotted ``name`` (inside diffquant's own wrappers) for ``new``."""
    parent_name, _, last = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, last, new)
