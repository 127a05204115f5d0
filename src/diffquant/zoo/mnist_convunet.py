"""The plain convolutional MNIST UNet ("mnist-convunet", 0.61 M parameters).

Written from the architecture description in ``shared/README.md``. The checkpoint's keys carry a
``network.`` prefix, which :func:`load_mnist_convunet` strips before a strict load, so module
names read ``b1.0.conv1``, ``te_mid.0`` and so on.

Each stage is three :class:`ConvBlock` (LayerNorm → conv → SiLU → conv → SiLU) and receives its
own time MLP output added to its input; the decoder stages take ``cat([encoder_out, up(x)])``.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from diffquant.errors import DiffquantError
from diffquant.safeload import load_state_strict, load_tensor_dict
from diffquant.zoo.mnist_resunet import sinusoidal_table, timesteps_for_batch

NUM_TRAIN_TIMESTEPS = 1000
TIME_TABLE_DIM = 100
CHECKPOINT_PREFIX = "network."


class ConvBlock(nn.Module):
    """``ln`` (LayerNorm over C,H,W; skipped when ``normalize=False``) → conv1 → SiLU → conv2 → SiLU."""

    def __init__(self, in_channels: int, out_channels: int, size: int, normalize: bool = True):
        super().__init__()
        self.normalize = normalize
        # The parameters exist even when unused, because the checkpoint stores them.
        self.ln = nn.LayerNorm((in_channels, size, size))
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln(x) if self.normalize else x
        h = self.act(self.conv1(h))
        return self.act(self.conv2(h))


def _stage(channels: tuple[int, int, int, int], size: int, last_normalize: bool = True) -> nn.Sequential:
    c = channels
    return nn.Sequential(
        ConvBlock(c[0], c[1], size),
        ConvBlock(c[1], c[2], size),
        ConvBlock(c[2], c[3], size, normalize=last_normalize),
    )


def _time_mlp(out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(TIME_TABLE_DIM, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))


class MnistConvUNet(nn.Module):
    """ε-prediction UNet for 1×28×28 images; ``forward(x, t) -> ε``."""

    sample_shape = (1, 28, 28)

    def __init__(self):
        super().__init__()
        self.time_embed = nn.Embedding(NUM_TRAIN_TIMESTEPS, TIME_TABLE_DIM)
        with torch.no_grad():  # placeholder: the checkpoint stores its own (frozen) table
            self.time_embed.weight.copy_(sinusoidal_table(NUM_TRAIN_TIMESTEPS, TIME_TABLE_DIM))
        self.time_embed.requires_grad_(False)

        self.te1 = _time_mlp(1)
        self.b1 = _stage((1, 10, 10, 10), 28)
        self.down1 = nn.Conv2d(10, 10, 4, 2, 1)
        self.te2 = _time_mlp(10)
        self.b2 = _stage((10, 20, 20, 20), 14)
        self.down2 = nn.Conv2d(20, 20, 4, 2, 1)
        self.te3 = _time_mlp(20)
        self.b3 = _stage((20, 40, 40, 40), 7)
        self.down3 = nn.Sequential(nn.Conv2d(40, 40, 2, 1), nn.SiLU(), nn.Conv2d(40, 40, 4, 2, 1))

        self.te_mid = _time_mlp(40)
        self.b_mid = _stage((40, 20, 20, 40), 3)

        self.up1 = nn.Sequential(
            nn.ConvTranspose2d(40, 40, 4, 2, 1), nn.SiLU(), nn.ConvTranspose2d(40, 40, 2, 1)
        )
        self.te4 = _time_mlp(80)
        self.b4 = _stage((80, 40, 20, 20), 7)
        self.up2 = nn.ConvTranspose2d(20, 20, 4, 2, 1)
        self.te5 = _time_mlp(40)
        self.b5 = _stage((40, 20, 10, 10), 14)
        self.up3 = nn.ConvTranspose2d(10, 10, 4, 2, 1)
        self.te_out = _time_mlp(20)
        self.b_out = _stage((20, 10, 10, 10), 28, last_normalize=False)
        self.conv_out = nn.Conv2d(10, 1, 3, 1, 1)

    def concat_splits(self) -> dict[str, int]:
        """Decoder stages whose input is ``cat([encoder_out, x])`` (+ time), with the split index."""
        return {"b4": 40, "b5": 20, "b_out": 10}

    def forward(self, x: Tensor, t: Tensor | int) -> Tensor:
        t = timesteps_for_batch(t, x.shape[0], x.device)
        temb = self.time_embed(t)

        def add_time(h: Tensor, mlp: nn.Module) -> Tensor:
            return h + mlp(temb)[:, :, None, None]

        out1 = self.b1(add_time(x, self.te1))
        out2 = self.b2(add_time(self.down1(out1), self.te2))
        out3 = self.b3(add_time(self.down2(out2), self.te3))
        mid = self.b_mid(add_time(self.down3(out3), self.te_mid))
        out4 = self.b4(add_time(torch.cat([out3, self.up1(mid)], dim=1), self.te4))
        out5 = self.b5(add_time(torch.cat([out2, self.up2(out4)], dim=1), self.te5))
        out = self.b_out(add_time(torch.cat([out1, self.up3(out5)], dim=1), self.te_out))
        return self.conv_out(out)


def load_mnist_convunet(path: str | os.PathLike, device: str | torch.device = "cpu") -> MnistConvUNet:
    """Build :class:`MnistConvUNet` and load the pretrained state dict strictly (prefix stripped)."""
    state = load_tensor_dict(path, "mnist-convunet weights file")
    foreign = [k for k in state if not k.startswith(CHECKPOINT_PREFIX)]
    if foreign:
        raise DiffquantError(f"{path}: unexpected key {foreign[0]!r}: expected every key to start with 'network.'")
    state = {k[len(CHECKPOINT_PREFIX):]: v for k, v in state.items()}
    model = MnistConvUNet()
    load_state_strict(model, state, path)
    return model.to(device).eval()
