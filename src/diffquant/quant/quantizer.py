"""The tensor-level quantizer module shared by every recipe.

A :class:`UniformQuantizer` holds explicit state — step and zero point per table row and
channel, the running range used to initialise them, and whether each row is initialised — all
created in ``__init__`` with their final shapes, so a checkpoint can be loaded into a freshly
wrapped model with no dummy forward.

Modes:
- ``quantize`` (default): fake-quantize with the stored parameters;
- ``observe``: update the running range from the incoming batch under the init policy, refresh
  step and zero point from it, then fake-quantize (Q-Diffusion's init forward behaves this way);
- with ``enabled = False`` or 16/32 bits the input passes through unchanged.

Range searches: ``lp_shrink`` never widens its range to contain 0 (whatever ``include_zero``
says, docs/methods.md §1.2), so the stored range reproduces the searched step and zero point;
``edadm_grid`` remembers the side (pos/neg/two) fixed by the first batch in the ``search_side``
buffer (saved with the state dict; cleared by :meth:`reset`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DiffquantError
from .affine import (
    FLOAT_BITS,
    GridSpec,
    broadcast_shape,
    fake_quantize,
    qparams_from_range,
    validate_bits,
    validate_grid,
)
from .qdrop import mix_inputs
from .ranges import (
    batch_range,
    combine_ranges,
    minmax_range,
    validate_init_options,
    validate_policy,
)
from .search import SIDES, data_side
from .timestep import TimestepIndex

MODES = ("quantize", "observe")
#: Codes of the ``search_side`` buffer: 0 = not fixed yet, then the sides of :data:`SIDES`.
SIDE_CODES = ("",) + SIDES


class UniformQuantizer(nn.Module):
    """Uniform affine fake quantizer, per tensor or per channel, optionally per timestep.

    Args:
        bits: 1–8, or 16/32 for "not quantized".
        grid: ``asymmetric`` | ``symmetric`` | ``unsigned`` (zero-anchored).
        channel_axis: None for per-tensor, else the axis carrying ``channels``.
        channels: number of channels (1 for per-tensor).
        init: range init policy (``minmax``, ``ema_minmax``, ``lp_shrink``, ``edadm_grid``).
        num_steps: rows of the per-timestep table (1 = shared by all timesteps).
        include_zero / clamp_zero_point: see :func:`qparams_from_range` (``lp_shrink`` ranges are
            never widened to 0).
        momentum: EMA momentum for ``ema_minmax`` (0.95) or ``edadm_grid`` (0.9).
        init_options: extra keyword arguments for the range search (e.g. ``p``, ``candidates``).
    """

    def __init__(
        self,
        bits: int,
        grid: str = "asymmetric",
        channel_axis: int | None = None,
        channels: int = 1,
        init: str = "minmax",
        num_steps: int = 1,
        include_zero: bool = True,
        clamp_zero_point: bool = True,
        momentum: float | None = None,
        init_options: dict | None = None,
    ):
        super().__init__()
        self.bits = validate_bits(bits)
        self.grid = validate_grid(grid)
        self.init = validate_policy(init)
        self.channel_axis = channel_axis
        self.channels = int(channels) if channel_axis is not None else 1
        self.num_steps = int(num_steps)
        self.include_zero = include_zero
        self.clamp_zero_point = clamp_zero_point
        self.momentum = momentum if momentum is not None else (0.9 if init == "edadm_grid" else 0.95)
        self.init_options = validate_init_options(self.init, dict(init_options or {}))
        if "side" in self.init_options and self.init_options["side"] not in SIDES:
            side = self.init_options["side"]
            raise ConfigError(f"edadm_grid side must be one of {SIDES}, got {side!r}")
        self.enabled = True
        self.mode = "quantize"
        #: probability of quantizing each element while training (QDrop); 1.0 = always.
        self.qdrop_prob = 1.0
        self.timestep_index: TimestepIndex | None = None

        shape = (self.num_steps, self.channels)
        self.step = nn.Parameter(torch.ones(shape), requires_grad=False)
        self.zero_point = nn.Parameter(torch.zeros(shape), requires_grad=False)
        self.register_buffer("initialized", torch.zeros(self.num_steps, dtype=torch.bool))
        self.register_buffer("range_lo", torch.zeros(shape))
        self.register_buffer("range_hi", torch.zeros(shape))
        self.register_buffer("batches_seen", torch.zeros(self.num_steps, dtype=torch.long))
        self.register_buffer("search_side", torch.zeros(self.num_steps, dtype=torch.int8))

    # ------------------------------------------------------------------ properties
    @property
    def spec(self) -> GridSpec:
        return GridSpec(self.bits, self.grid)

    @property
    def is_float(self) -> bool:
        return self.bits in FLOAT_BITS

    @property
    def active(self) -> bool:
        return self.enabled and not self.is_float

    @property
    def widens_to_zero(self) -> bool:
        """Whether ranges are widened to contain 0 (never for ``lp_shrink``, see module doc)."""
        return self.include_zero and self.init != "lp_shrink"

    def side(self, row: int = 0) -> str | None:
        """The ``edadm_grid`` side (``pos``/``neg``/``two``): ``init_options["side"]`` if given,
        else the one fixed by the first batch; None before calibration."""
        return self.init_options.get("side") or SIDE_CODES[int(self.search_side[row])] or None

    def row(self) -> int:
        """The table row for the current denoiser call (0 when the table is shared)."""
        if self.num_steps == 1:
            return 0
        if self.timestep_index is None:
            raise DiffquantError("a per-timestep quantizer was called outside a quantized model")
        k = self.timestep_index.index
        if not 0 <= k < self.num_steps:
            raise DiffquantError(f"timestep row {k} out of range for a table of {self.num_steps}")
        return k

    def set_bits(self, bits: int) -> None:
        self.bits = validate_bits(bits)

    def set_learnable(self, step: bool = True, zero_point: bool = False) -> None:
        self.step.requires_grad_(step)
        self.zero_point.requires_grad_(zero_point)

    # ------------------------------------------------------------------ parameters
    def params(self, x_dim: int, row: int | None = None) -> tuple[Tensor, Tensor]:
        """Step and zero point of ``row``, shaped to broadcast against a ``x_dim``-d tensor."""
        k = self.row() if row is None else row
        s, z = self.step[k], self.zero_point[k]
        if self.channel_axis is None:
            return s.reshape(()), z.reshape(())
        shape = broadcast_shape(x_dim, self.channel_axis, self.channels)
        return s.reshape(shape), z.reshape(shape)

    @torch.no_grad()
    def set_range(self, lo: Tensor, hi: Tensor, row: int | None = None) -> None:
        """Store a range and the step / zero point it implies for one row (or all rows)."""
        rows = range(self.num_steps) if row is None else [row]
        s, z = qparams_from_range(
            lo,
            hi,
            self.spec,
            include_zero=self.widens_to_zero,
            clamp_zero_point=self.clamp_zero_point,
        )
        for k in rows:
            self.range_lo[k] = lo.reshape(-1).to(self.range_lo)
            self.range_hi[k] = hi.reshape(-1).to(self.range_hi)
            self.step.data[k] = s.reshape(-1).to(self.step)
            self.zero_point.data[k] = z.reshape(-1).to(self.zero_point)
            self.initialized[k] = True

    @torch.no_grad()
    def observe(self, x: Tensor, row: int | None = None) -> None:
        """Fold one batch into the running range of ``row`` and refresh its step/zero point."""
        if self.is_float:
            return
        k = self.row() if row is None else row
        new = self._batch_range(x, [k])
        old = None
        if int(self.batches_seen[k]) > 0:
            old = (self.range_lo[k].reshape(new[0].shape), self.range_hi[k].reshape(new[1].shape))
        lo, hi = combine_ranges(self.init, old, new, int(self.batches_seen[k]), self.momentum)
        self.set_range(lo, hi, row=k)
        self.batches_seen[k] += 1

    @torch.no_grad()
    def init_from(self, x: Tensor) -> None:
        """One-shot initialisation of every row from ``x`` (used for weights)."""
        self.reset()
        lo, hi = self._batch_range(x, list(range(self.num_steps)))
        self.set_range(lo, hi)
        self.batches_seen.fill_(1)

    def _batch_range(self, x: Tensor, rows: list[int]) -> tuple[Tensor, Tensor]:
        """The range ``x`` suggests under the init policy; fixes the edadm side of ``rows``."""
        if self.is_float:  # nothing is quantized: skip the (costly) searches
            return minmax_range(x, self.channel_axis)
        options = dict(self.init_options)
        if self.init in ("lp_shrink", "edadm_grid"):
            options["clamp_zero_point"] = self.clamp_zero_point
        if self.init == "edadm_grid" and "side" not in options:
            code = int(self.search_side[rows[0]])
            if code == 0:
                code = SIDE_CODES.index(data_side(x))
                for k in rows:
                    self.search_side[k] = code
            options["side"] = SIDE_CODES[code]
        return batch_range(x, self.init, self.spec, self.channel_axis, **options)

    @torch.no_grad()
    def reset(self) -> None:
        """Forget calibration: rows become uninitialised; running ranges and edadm side restart."""
        self.initialized.zero_()
        self.batches_seen.zero_()
        self.search_side.zero_()

    @torch.no_grad()
    def copy_row_to_all(self, row: int = 0) -> None:
        """Broadcast one row's parameters to every row (start of per-step calibration)."""
        for name in ("step", "zero_point", "range_lo", "range_hi"):
            t = getattr(self, name)
            t.data[:] = t.data[row]
        self.initialized[:] = self.initialized[row]
        self.batches_seen[:] = self.batches_seen[row]
        self.search_side[:] = self.search_side[row]

    # ------------------------------------------------------------------ forward
    def quantize(self, x: Tensor, row: int | None = None) -> Tensor:
        """Fake-quantize ``x`` with stored parameters, ignoring mode and QDrop."""
        s, z = self.params(x.dim(), row)
        spec = self.spec
        return fake_quantize(x, s.to(x.dtype), z.to(x.dtype), spec.qmin, spec.qmax)

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return x
        k = self.row()
        if self.mode == "observe":
            self.observe(x, row=k)
        elif not torch.compiler.is_compiling() and not bool(self.initialized[k]):
            # (a data-dependent check: skipped while torch.compile traces, where it would break the graph)
            raise DiffquantError(
                "quantizer used before its range was initialised; run a calibration stage first"
            )
        xq = self.quantize(x, row=k)
        if self.training and self.qdrop_prob < 1.0:
            return mix_inputs(xq, x, self.qdrop_prob)
        return xq

    def extra_repr(self) -> str:
        gran = "tensor" if self.channel_axis is None else f"channel(axis={self.channel_axis})"
        table = f", steps={self.num_steps}" if self.num_steps > 1 else ""
        return f"bits={self.bits}, grid={self.grid}, {gran}, init={self.init}{table}"

    def describe(self) -> dict:
        """Static description saved in the manifest (everything needed to rebuild it)."""
        return {
            "bits": self.bits,
            "grid": self.grid,
            "channel_axis": self.channel_axis,
            "channels": self.channels,
            "init": self.init,
            "num_steps": self.num_steps,
            "include_zero": self.include_zero,
            "clamp_zero_point": self.clamp_zero_point,
            "momentum": self.momentum,
            "enabled": self.enabled,
        }
