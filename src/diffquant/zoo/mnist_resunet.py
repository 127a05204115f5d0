"""The residual MNIST UNet ("mnist-resunet", 0.85 M parameters).

Written from the architecture description in ``shared/README.md`` so that its parameter names
and shapes match the pretrained ``ddpm_mnist.pth`` exactly (``load_state_dict(strict=True)``).

Layout (channels @ resolution): ``conv_in`` 1→10 @28; encoder levels 10@28, 20@14, 40@7, each
two :class:`ResBlock` then a 2×2 stride-2 ``downs`` conv; ``mid`` 40→80→80 @3; decoder levels
40@7, 20@14, 10@28, each a 2×2 stride-2 ``ups`` ConvTranspose (zero-padded right/bottom to the
skip's size) and two ResBlocks fed ``cat([skip, x])``; SiLU → ``conv_out`` 10→1.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffquant.safeload import load_state_strict, load_tensor_dict

NUM_TRAIN_TIMESTEPS = 1000
TIME_TABLE_DIM = 128
TIME_DIM = 40
LEVEL_CHANNELS = (10, 20, 40)
MID_CHANNELS = 80
LEVEL_SIZES = (28, 14, 7)
MID_SIZE = 3
BLOCKS_PER_LEVEL = 2


def timesteps_for_batch(t: Tensor | int, batch: int, device: torch.device) -> Tensor:
    """Return ``t`` as a LongTensor of shape [batch].

    Accepts a Python int, a scalar tensor, or a tensor of shape [B] or [B, 1]; a single value is
    broadcast to the whole batch.
    """
    t = torch.as_tensor(t, device=device).reshape(-1)
    if t.numel() == 1 and batch != 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"timestep tensor has {t.numel()} values for a batch of {batch}")
    return t.long()


def sinusoidal_table(num_steps: int, dim: int) -> Tensor:
    """Interleaved sin/cos table: row p holds sin(p/10000^(2i/dim)), cos(...) for i < dim/2."""
    pos = torch.arange(num_steps, dtype=torch.float32)[:, None]
    two_i = torch.arange(0, dim, 2, dtype=torch.float32)[None, :]
    angle = pos / 10000 ** (two_i / dim)
    return torch.stack((angle.sin(), angle.cos()), dim=2).reshape(num_steps, dim)


class TimestepTable(nn.Module):
    """A frozen lookup table of sinusoidal timestep features (stored in the checkpoint)."""

    def __init__(self, num_steps: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_steps, dim)
        with torch.no_grad():
            self.embedding.weight.copy_(sinusoidal_table(num_steps, dim))
        self.embedding.requires_grad_(False)

    def forward(self, t: Tensor) -> Tensor:
        return self.embedding(t)


class ResBlock(nn.Module):
    """LayerNorm residual block with an additive time embedding.

    ``norm1 → SiLU → conv1 → + time_layer(SiLU(temb)) → norm2 → SiLU → conv2 → + residual_conv(x)``.
    ``residual_conv`` is a 1×1 conv when the channel count changes, the identity otherwise; in the
    decoder it sees the raw ``cat([skip, x])``.
    """

    def __init__(self, in_channels: int, out_channels: int, size: int, time_dim: int = TIME_DIM):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = nn.LayerNorm((in_channels, size, size))
        self.norm2 = nn.LayerNorm((out_channels, size, size))
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.time_layer = nn.Linear(time_dim, out_channels)
        self.act = nn.SiLU()
        if in_channels == out_channels:
            self.residual_conv: nn.Module = nn.Identity()
        else:
            self.residual_conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.time_layer(self.act(temb))[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h)))
        return h + self.residual_conv(x)


class LevelBlock(nn.Module):
    """One encoder/decoder entry; holds a :class:`ResBlock` as ``res_block`` (checkpoint layout)."""

    def __init__(self, in_channels: int, out_channels: int, size: int):
        super().__init__()
        self.res_block = ResBlock(in_channels, out_channels, size)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        return self.res_block(x, temb)


class MidBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, size: int):
        super().__init__()
        self.res_block1 = ResBlock(in_channels, out_channels, size)
        self.res_block2 = ResBlock(out_channels, out_channels, size)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        return self.res_block2(self.res_block1(x, temb), temb)


class MnistResUNet(nn.Module):
    """ε-prediction UNet for 1×28×28 images in [-1, 1]; ``forward(x, t) -> ε``."""

    sample_shape = (1, 28, 28)

    def __init__(self):
        super().__init__()
        c0 = LEVEL_CHANNELS[0]
        self.position_embedding = TimestepTable(NUM_TRAIN_TIMESTEPS, TIME_TABLE_DIM)
        self.pe_linear = nn.Sequential(
            nn.Linear(TIME_TABLE_DIM, TIME_DIM), nn.SiLU(), nn.Linear(TIME_DIM, TIME_DIM)
        )
        self.conv_in = nn.Conv2d(1, c0, 3, padding=1)

        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        prev = c0
        for ch, size in zip(LEVEL_CHANNELS, LEVEL_SIZES):
            level = nn.ModuleList()
            for i in range(BLOCKS_PER_LEVEL):
                level.append(LevelBlock(prev if i == 0 else ch, ch, size))
            self.encoders.append(level)
            self.downs.append(nn.Conv2d(ch, ch, 2, stride=2))
            prev = ch

        self.mid = MidBlock(prev, MID_CHANNELS, MID_SIZE)
        prev = MID_CHANNELS

        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for ch, size in zip(LEVEL_CHANNELS[::-1], LEVEL_SIZES[::-1]):
            self.ups.append(nn.ConvTranspose2d(prev, ch, 2, stride=2))
            self.decoders.append(
                nn.ModuleList(LevelBlock(2 * ch, ch, size) for _ in range(BLOCKS_PER_LEVEL))
            )
            prev = ch

        self.act = nn.SiLU()
        self.conv_out = nn.Conv2d(c0, 1, 3, padding=1)

    def concat_splits(self) -> dict[str, int]:
        """Decoder ResBlocks whose input is ``cat([skip, x])``, with the skip's channel count.

        The split index is where the second operand starts, for split-shortcut quantization.
        """
        splits = {}
        for level, ch in enumerate(LEVEL_CHANNELS[::-1]):
            for i in range(BLOCKS_PER_LEVEL):
                splits[f"decoders.{level}.{i}.res_block"] = ch
        return splits

    def forward(self, x: Tensor, t: Tensor | int) -> Tensor:
        t = timesteps_for_batch(t, x.shape[0], x.device)
        temb = self.pe_linear(self.position_embedding(t))
        h = self.conv_in(x)

        skips: list[list[Tensor]] = []
        for level, down in zip(self.encoders, self.downs):
            outs = []
            for block in level:
                h = block(h, temb)
                outs.append(h)
            skips.append(outs[::-1])
            h = down(h)

        h = self.mid(h, temb)

        for up, level, level_skips in zip(self.ups, self.decoders, skips[::-1]):
            h = up(h)
            pad_w = level_skips[0].shape[3] - h.shape[3]
            pad_h = level_skips[0].shape[2] - h.shape[2]
            if pad_h or pad_w:
                h = F.pad(h, (0, pad_w, 0, pad_h))
            for block, skip in zip(level, level_skips):
                h = torch.cat([skip, h], dim=1)
                h = block(h, temb)

        return self.conv_out(self.act(h))


def load_mnist_resunet(path: str | os.PathLike, device: str | torch.device = "cpu") -> MnistResUNet:
    """Build :class:`MnistResUNet` and load the pretrained state dict strictly."""
    model = MnistResUNet()
    load_state_strict(model, load_tensor_dict(path, "mnist-resunet weights file"), path)
    return model.to(device).eval()
