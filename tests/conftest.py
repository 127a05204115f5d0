"""Shared fixtures: the ``device`` parametrisation and tiny config-built diffusers models.

The tiny models are built from configs (no download), with a fixed seed, sample size ≤ 16 and
at most 32 channels, so a forward takes milliseconds on a CPU. Each fixture returns a factory
that builds a fresh model, so a test may modify what it gets.
"""
from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session", autouse=True)
def _one_cpu_thread():
    """Tiny models gain nothing from intra-op threads, and on a CPU shared with other jobs two
    OpenMP threads waiting on each other make a millisecond forward take seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """``cpu``, and also ``cuda`` when a GPU is present."""
    return request.param


def _seeded(build):
    def factory(device: str = "cpu"):
        torch.manual_seed(0)
        return build().to(device).eval()

    return factory


def tiny_unet():
    """UNet2DModel: a plain and an attention level, class embedding, up-block concatenations."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
        num_class_embeds=3,
    )


def tiny_cond_unet():
    """UNet2DConditionModel with cross-attention down and up blocks."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=4,
        norm_num_groups=4,
    )


def tiny_dit():
    """DiT-style transformer: patch embedding, adaLN-Zero blocks with class labels."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=4,
    )


@pytest.fixture(scope="session")
def make_unet():
    return _seeded(tiny_unet)


@pytest.fixture(scope="session")
def make_cond_unet():
    return _seeded(tiny_cond_unet)


@pytest.fixture(scope="session")
def make_dit():
    return _seeded(tiny_dit)


@pytest.fixture(params=["unet", "cond_unet", "dit"])
def any_tiny_model(request, make_unet, make_cond_unet, make_dit):
    """Each tiny diffusers architecture in turn (a factory, as above)."""
    return {"unet": make_unet, "cond_unet": make_cond_unet, "dit": make_dit}[request.param]


def _unet_inputs(batch: int = 2, t: int = 10, seed: int = 0, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 8, 8, generator=gen).to(device)
    ts = torch.full((batch,), t, dtype=torch.long, device=device)
    labels = torch.arange(batch, device=device) % 3
    return (x, ts), {"class_labels": labels}


@pytest.fixture(scope="session")
def unet_inputs():
    """``unet_inputs(batch, t, seed, device) -> (args, kwargs)`` for the tiny UNet2DModel."""
    return _unet_inputs


@pytest.fixture(scope="module")
def bundle(make_unet):
    """The tiny UNet as a class-conditional DiffusionBundle: classes 0, 1 and the null class 2."""
    from diffquant.bundle import CALL_DIFFUSERS, DiffusionBundle, linear_ddpm_config

    return DiffusionBundle("tiny", make_unet(), linear_ddpm_config(), (3, 8, 8), num_classes=2, null_class=2,
                           call_convention=CALL_DIFFUSERS)
