"""Dense bit packing of small unsigned integers into a uint8 stream.

Values of ``bits`` bits (1–8) are laid out back to back, least significant bit first, with no
padding except at the very end of the stream: ``count`` values take ``ceil(count·bits / 8)``
bytes. 8-bit values are one per byte; 4-bit values are two per byte (low nibble first) — both
are just special cases of the same layout, taken on fast paths.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError

MAX_BITS = 8


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes of a stream holding ``count`` values of ``bits`` bits."""
    return (int(count) * int(bits) + 7) // 8


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ConfigError(f"can only pack 1-8 bit values, got bits={bits!r}")
    return bits


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Pack the unsigned integers ``values`` (any shape, each in [0, 2^bits)) into a uint8 stream."""
    _check_bits(bits)
    v = values.detach().reshape(-1).cpu().to(torch.int64).numpy()
    if v.size and (v.min() < 0 or v.max() >= 1 << bits):
        raise ConfigError(f"values outside 0..{(1 << bits) - 1} cannot be packed in {bits} bits")
    v = v.astype(np.uint8)
    if bits == 8:
        return torch.from_numpy(v.copy())
    if bits == 4:
        if v.size % 2:
            v = np.concatenate([v, np.zeros(1, np.uint8)])
        return torch.from_numpy((v[0::2] | (v[1::2] << 4)).astype(np.uint8))
    planes = (v[:, None] >> np.arange(bits, dtype=np.uint8)) & 1  # [count, bits], LSB first
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_bits(stream: Tensor, bits: int, count: int) -> Tensor:
    """The ``count`` values of ``bits`` bits stored in ``stream`` (int16, 1-D)."""
    _check_bits(bits)
    data = stream.detach().reshape(-1).cpu().numpy()
    if data.dtype != np.uint8:
        raise ConfigError(f"a packed stream must be uint8, got {data.dtype}")
    if data.size != packed_nbytes(count, bits):
        raise ConfigError(
            f"a stream of {count} {bits}-bit values needs {packed_nbytes(count, bits)} bytes, got {data.size}"
        )
    if bits == 8:
        out = data.astype(np.int16)
    elif bits == 4:
        out = np.stack([data & 0x0F, data >> 4], axis=1).reshape(-1)[:count].astype(np.int16)
    else:
        planes = np.unpackbits(data, bitorder="little", count=count * bits).reshape(count, bits)
        out = (planes.astype(np.int16) << np.arange(bits, dtype=np.int16)).sum(axis=1, dtype=np.int16)
    return torch.from_numpy(np.ascontiguousarray(out))
