"""Fixtures for the export tests: calibrated tiny models."""
from __future__ import annotations

import pytest
import torch

from diffquant.config import QuantConfig
from diffquant.methods.naive import run_naive
from diffquant.model import quantize
from export_testing import CatNet, catnet_inputs


@pytest.fixture(scope="session")
def calibrated_unet(make_unet, unet_inputs):
    """``calibrated_unet(weight_bits, act_bits, timesteps=None, **config)`` → (float unet, QuantModel)."""

    def build(weight_bits=8, act_bits=8, timesteps=None, **options):
        unet = make_unet()
        options.setdefault("split", True)
        qmodel = quantize(unet, QuantConfig(weight_bits=weight_bits, act_bits=act_bits, **options), timesteps=timesteps)

        def loop(model):
            for t in timesteps or (10, 600):
                for b in range(2):
                    (x, ts), kw = unet_inputs(batch=2, t=t, seed=100 * b + t)
                    model(x * (1 + t / 250), ts, **kw)

        run_naive(qmodel, loop)
        return unet, qmodel

    return build


@pytest.fixture
def calibrated_catnet():
    """``calibrated_catnet(weight_bits, act_bits, **config)`` → (float CatNet, QuantModel)."""

    def build(weight_bits=4, act_bits=8, **options):
        torch.manual_seed(0)
        net = CatNet().eval()
        options.setdefault("split", True)
        qmodel = quantize(net, QuantConfig(weight_bits=weight_bits, act_bits=act_bits, **options),
                          example_inputs=catnet_inputs())

        def loop(model):
            for seed in range(3):
                model(*catnet_inputs(seed)[0])

        run_naive(qmodel, loop)
        return net, qmodel

    return build
