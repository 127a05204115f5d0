"""Sharding sample indices over ``torch.distributed`` processes (torchrun, gloo or nccl).

Every rank works on a contiguous block of global sample indices; since all randomness is seeded
per sample index, the gathered result equals a single-process run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank and world size of the initialised process group (a single process otherwise)."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return DistInfo(dist.get_rank(), dist.get_world_size(), local)
    return DistInfo()


def init_from_env(device: str | torch.device = "cpu") -> DistInfo:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    Uses nccl for CUDA devices and gloo otherwise; a no-op when already initialised or when
    running as a single process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist_info()


def device_for_rank(device: str | torch.device, info: DistInfo | None = None) -> torch.device:
    """``cuda`` becomes ``cuda:<local rank>`` under torchrun; other devices are unchanged."""
    device = torch.device(device)
    info = info or dist_info()
    if device.type == "cuda" and device.index is None and info.is_distributed:
        return torch.device("cuda", info.local_rank)
    return device


def shard_indices(n: int, rank: int, world: int) -> range:
    """The contiguous block of ``range(n)`` that ``rank`` of ``world`` processes handles.

    Blocks differ in size by at most one and, concatenated in rank order, give ``range(n)``.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def my_shard(n: int, what: str = "samples") -> range | None:
    """This rank's contiguous block of ``n`` items under torch.distributed (None in one process).

    Raises a one-line :class:`~diffquant.errors.ConfigError` when there are fewer items than ranks.
    """
    info = dist_info()
    if not info.is_distributed:
        return None
    if n < info.world_size:
        raise ConfigError(f"{n} {what} cannot be shared by {info.world_size} processes")
    return shard_indices(n, info.rank, info.world_size)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_numpy(array: np.ndarray) -> np.ndarray:
    """Concatenate every rank's array along axis 0 in rank order; every rank gets the result.

    The arrays must agree in dtype and trailing shape; their lengths may differ.
    Returns ``array`` unchanged when not running distributed.
    """
    info = dist_info()
    if not info.is_distributed:
        return array
    array = np.ascontiguousarray(array)
    device = _collective_device()
    length = torch.tensor([array.shape[0]], dtype=torch.long, device=device)
    lengths = [torch.zeros_like(length) for _ in range(info.world_size)]
    dist.all_gather(lengths, length)
    lengths_int = [int(x.item()) for x in lengths]
    longest = max(lengths_int)
    as_bool = array.dtype == np.bool_
    tensor = torch.from_numpy(array.astype(np.uint8) if as_bool else array).to(device)
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.zeros_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    out = torch.cat([p[:m] for p, m in zip(parts, lengths_int)]).cpu().numpy()
    return out.astype(np.bool_) if as_bool else out


def barrier() -> None:
    if dist_info().is_distributed:
        dist.barrier()


def all_agree(flag: bool) -> bool:
    """True only when ``flag`` is true on every rank."""
    if not dist_info().is_distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.long, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (every rank gets the sum); unchanged when single-process."""
    if not dist_info().is_distributed:
        return tensor
    device = _collective_device()
    buffer = tensor.detach().to(device)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    tensor.copy_(buffer.to(tensor.device))
    return tensor


def sum_gradients(params: list[torch.Tensor]) -> None:
    """Replace every parameter's ``.grad`` by its sum over all ranks (data parallelism by hand).

    One flattened all-reduce for all parameters; a parameter without a gradient on this rank (its
    share of the batch was empty) contributes zeros, so every rank takes part in the same call.
    """
    if not dist_info().is_distributed or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    all_reduce_sum(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def global_to_local(index: torch.Tensor, shard: range) -> torch.Tensor:
    """The positions inside this rank's contiguous ``shard`` of those global sample indices that fall in it."""
    inside = (index >= shard.start) & (index < shard.stop)
    return index[inside] - shard.start
