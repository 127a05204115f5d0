"""Helpers shared by the export tests (imported by name: tests/ has no packages)."""
from __future__ import annotations

import torch
from torch import nn

from diffquant.config import QuantConfig
from diffquant.methods.naive import run_naive
from diffquant.model import quantize

TIMESTEPS = [999, 500, 1]


def mixed_rules():
    """Layer rules giving one fp-weight layer, one fp-input layer and one layer with 16-bit input."""
    from diffquant.config import LayerRule

    return [LayerRule("time_embedding.linear_1", weight_bits=16), LayerRule("conv_in", quantize_input=False),
            LayerRule("conv_out", act_bits=16)]


MIXED_RULE_REASONS = {"time_embedding.linear_1": "weight not quantized", "conv_in": "input not quantized",
                      "conv_out": "input not quantized"}


def rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


def float64_copy(model):
    """A float64 copy of a (fake-quant) model: the same quantized network with other float rounding."""
    import copy

    return copy.deepcopy(model).double()


def model_dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters()), torch.float32) if isinstance(model, nn.Module) else torch.float32


def assert_matches_fake_quant(got, fake, float_out, *, fake64=None, rel=1e-3, share=0.25):
    """Integer paths differ from the fake-quant model only by float rounding in the accumulation
    (single layers are checked to float rounding elsewhere). Now and then that rounding moves an
    activation across a rounding boundary (one code, one step s), and the change propagates and
    multiplies downstream within that sample. So: the relative RMS difference is ≤ ``rel``
    (1e-3), or, where one such cascade lifts it above, the median sample is within ``rel``, or the
    fake-quant model itself differs as much from its own float64 copy ``fake64`` (the same
    quantized network, other float rounding: 2× that spread is allowed). A kernel bug (e.g.
    saturating int16 products) fails all three. Always below ``share`` of the quantization
    error itself (fake-quant vs float)."""
    diff = rms(got - fake) / rms(fake)
    quant_error = rms(fake - float_out) / rms(float_out)
    if diff > rel:
        per_sample = sorted(rms(g - f) / rms(f) for g, f in zip(got, fake))
        median = per_sample[len(per_sample) // 2]
        spread = None if fake64 is None else rms(fake64.float() - fake) / rms(fake)
        assert median <= rel or (spread is not None and diff <= 2 * spread), (
            f"relative RMS difference {diff:.3g} > {rel}, median sample {median:.3g}, fake-quant float32-vs-float64 "
            f"spread {spread if spread is None else f'{spread:.3g}'}")
    assert diff <= share * quant_error, f"difference {diff:.3g} not small against the quantization error {quant_error:.3g}"
    return diff


class CatNet(nn.Module):
    """Convs, a transposed conv, a linear, and a conv fed by a channel concatenation (split)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 10, 3, padding=1)
        self.fuse = nn.Conv2d(16, 12, 3, padding=1)
        self.up = nn.ConvTranspose2d(12, 5, 2, stride=2)
        self.head = nn.Linear(5, 7)

    def forward(self, x, t=None):
        h = self.fuse(torch.cat([self.a(x), torch.relu(self.b(x))], dim=1))
        return self.head(torch.relu(self.up(h)).permute(0, 2, 3, 1))


def catnet_inputs(seed: int = 0, batch: int = 2):
    x = torch.randn(batch, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    return (x,), {}


class Saturating(nn.Module):
    """Weights of ±1 (8-bit codes ±127) in same-sign pairs and inputs near the top of the range
    (8-bit codes near 255): u8×s8 pairs of up to 2·255·127 = 64770, beyond int16."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 3, 3, padding=1, bias=False)
        self.lin = nn.Linear(32, 3, bias=False)
        with torch.no_grad():
            for layer in (self.conv, self.lin):
                w = layer.weight
                w[0] = 1.0
                w[1] = -1.0
                w[2] = torch.sign(torch.randn_like(w[2])) + 0.0

    def forward(self, x):
        return self.conv(x), self.lin(x.flatten(1)[:, :32])


def saturating_case(weight_grid="symmetric", weight_bits=8):
    torch.manual_seed(0)
    net = Saturating().eval()
    x = 0.9 + 0.1 * torch.rand(4, 16, 6, 6)  # asymmetric 8-bit inputs: codes 229..255
    qmodel = quantize(net, QuantConfig(weight_bits=weight_bits, act_bits=8, weight_grid=weight_grid),
                      example_inputs=((x,), {}))
    run_naive(qmodel, lambda m: m(x))
    return qmodel, x
