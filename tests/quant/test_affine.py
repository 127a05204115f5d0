"""Grids, bit validation and the STE / LSQ gradients of fake_quantize (docs/methods.md §1.1)."""
import pytest
import torch

from diffquant.errors import ConfigError
from diffquant.quant import (
    MIN_STEP,
    GridSpec,
    UniformQuantizer,
    fake_quantize,
    qparams_from_range,
    quantize_to_int,
    round_ste,
    validate_bits,
)


@pytest.mark.parametrize(
    "bits,grid,qmin,qmax",
    [
        (2, "asymmetric", 0, 3),
        (3, "asymmetric", 0, 7),
        (4, "asymmetric", 0, 15),
        (2, "symmetric", -2, 1),
        (3, "symmetric", -4, 3),
        (4, "symmetric", -8, 7),
        (2, "unsigned", 0, 3),
        (4, "unsigned", 0, 15),
    ],
)
def test_grid_integer_ranges(bits, grid, qmin, qmax):
    spec = GridSpec(bits, grid)
    assert (spec.qmin, spec.qmax) == (qmin, qmax)
    assert spec.zero_fixed == (grid != "asymmetric")


@pytest.mark.parametrize("bits", [0, 9, 12, -1, 64])
def test_bad_bits_rejected(bits):
    with pytest.raises(ConfigError):
        validate_bits(bits)
    with pytest.raises(ConfigError):
        GridSpec(bits, "asymmetric")
    with pytest.raises(ConfigError):
        UniformQuantizer(bits)


def test_non_integer_bits_and_bad_grid_rejected():
    for bits in (True, 4.0, "8"):
        with pytest.raises(ConfigError):
            validate_bits(bits)
    with pytest.raises(ConfigError):
        GridSpec(4, "sym")
    with pytest.raises(ConfigError):
        UniformQuantizer(4, grid="log2")


@pytest.mark.parametrize("bits", [16, 32])
def test_float_bits_pass_through(bits):
    assert validate_bits(bits) == bits
    q = UniformQuantizer(bits)
    x = torch.randn(3, 5)
    assert torch.equal(q(x), x)  # no calibration needed, input unchanged
    q.observe(x)
    assert torch.equal(q(x), x)


def test_asymmetric_2bit_hand_values():
    step, zero = qparams_from_range(torch.tensor(-1.0), torch.tensor(2.0), GridSpec(2, "asymmetric"))
    assert step.item() == 1.0 and zero.item() == 1.0
    x = torch.tensor([-2.0, -1.0, -0.4, 0.5, 1.5, 2.6, 3.0])
    # x/s rounded half to even: -2, -1, -0, 0, 2, 3, 3; + z, clamp to [0, 3], - z
    expected = torch.tensor([-1.0, -1.0, 0.0, 0.0, 2.0, 2.0, 2.0])
    assert torch.equal(fake_quantize(x, step, zero, 0, 3), expected)
    assert torch.equal(quantize_to_int(x, step, zero, 0, 3), torch.tensor([0.0, 0, 1, 1, 3, 3, 3]))


def test_symmetric_3bit_hand_values():
    spec = GridSpec(3, "symmetric")
    step, zero = qparams_from_range(torch.tensor(-1.5), torch.tensor(1.0), spec)
    assert step.item() == 0.5 and zero.item() == 0.0  # max|x| / (2^(b-1) - 1)
    x = torch.tensor([-3.0, -2.25, -1.0, 0.25, 0.75, 1.3, 2.0])
    # x/s: -6, -4.5, -2, 0.5, 1.5, 2.6, 4 -> round: -6, -4, -2, 0, 2, 3, 4 -> clamp [-4, 3]
    expected = torch.tensor([-2.0, -2.0, -1.0, 0.0, 1.0, 1.5, 1.5])
    assert torch.equal(fake_quantize(x, step, zero, spec.qmin, spec.qmax), expected)


def test_unsigned_4bit_hand_values():
    spec = GridSpec(4, "unsigned")
    step, zero = qparams_from_range(torch.tensor(-7.0), torch.tensor(3.75), spec)
    assert step.item() == 0.25 and zero.item() == 0.0  # M / (2^b - 1), lower end ignored
    x = torch.tensor([-0.5, 0.125, 0.375, 0.6, 5.0])
    # x/s: -2, 0.5, 1.5, 2.4, 20 -> round: -2, 0, 2, 2, 20 -> clamp [0, 15]
    expected = torch.tensor([0.0, 0.0, 0.5, 0.5, 3.75])
    assert torch.equal(fake_quantize(x, step, zero, spec.qmin, spec.qmax), expected)


def test_include_zero_and_zero_point_clamp():
    spec = GridSpec(2, "asymmetric")
    lo, hi = torch.tensor(0.5), torch.tensor(2.0)
    step, zero = qparams_from_range(lo, hi, spec)  # widened to [0, 2]
    assert torch.allclose(step, torch.tensor(2.0 / 3)) and zero.item() == 0.0
    step, zero = qparams_from_range(lo, hi, spec, include_zero=False)
    assert step.item() == 0.5 and zero.item() == 0.0  # round(-1) clamped to 0
    step, zero = qparams_from_range(lo, hi, spec, include_zero=False, clamp_zero_point=False)
    assert step.item() == 0.5 and zero.item() == -1.0
    step, zero = qparams_from_range(torch.tensor(-5.0), torch.tensor(-2.0), spec, include_zero=False)
    assert step.item() == 1.0 and zero.item() == 3.0  # round(5) clamped to q_max


def test_per_channel_qparams():
    lo = torch.tensor([-1.0, 0.0, -4.0])
    hi = torch.tensor([2.0, 3.0, 4.0])
    step, zero = qparams_from_range(lo, hi, GridSpec(2, "asymmetric"))
    assert torch.allclose(step, torch.tensor([1.0, 1.0, 8.0 / 3]))
    assert torch.equal(zero, torch.tensor([1.0, 0.0, 2.0]))  # round(1.5) = 2


def test_step_floor():
    step, zero = qparams_from_range(torch.tensor(0.0), torch.tensor(0.0), GridSpec(8, "asymmetric"))
    assert step.item() == pytest.approx(MIN_STEP) and zero.item() == 0.0
    step, _ = qparams_from_range(torch.tensor(0.0), torch.tensor(0.0), GridSpec(8, "symmetric"))
    assert step.item() == pytest.approx(MIN_STEP)


def test_round_ste_rounds_half_to_even_and_passes_gradient():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, 0.7], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.tensor([0.0, 2.0, 2.0, -0.0, 1.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(5))


# x values on a 2-bit asymmetric grid with s = 0.5, z = 1: representable [-0.5, 1.0]
GRAD_X = torch.tensor([-2.0, -0.3, 0.1, 0.4, 0.9, 3.0])
INSIDE = torch.tensor([False, True, True, True, True, False])


def test_ste_gradient_of_x():
    x = GRAD_X.clone().requires_grad_(True)
    fake_quantize(x, torch.tensor(0.5), torch.tensor(1.0), 0, 3).sum().backward()
    assert torch.equal(x.grad, INSIDE.float())


def test_lsq_gradient_of_step():
    s0, z = 0.5, 1.0
    step = torch.full_like(GRAD_X, s0, requires_grad=True)  # one step per element: per-element grads
    fake_quantize(GRAD_X, step, torch.tensor(z), 0, 3).sum().backward()
    v = GRAD_X / s0
    expected = torch.where(INSIDE, torch.round(v) - v, torch.zeros_like(v))
    expected[0] = 0 - z  # clipped low: q_min - z
    expected[-1] = 3 - z  # clipped high: q_max - z
    assert torch.allclose(step.grad, expected, atol=1e-6)
    # hand values: -2 -> -1, -0.3 -> round(-0.6) + 0.6 = -0.4, 0.1 -> -0.2, 0.4 -> 0.2, 0.9 -> 0.2, 3 -> 2
    assert torch.allclose(step.grad, torch.tensor([-1.0, -0.4, -0.2, 0.2, 0.2, 2.0]), atol=1e-6)


def test_learnable_zero_point_gradient():
    s = 0.5
    zero = torch.full_like(GRAD_X, 1.0, requires_grad=True)
    fake_quantize(GRAD_X, torch.tensor(s), zero, 0, 3).sum().backward()
    expected = torch.where(INSIDE, torch.zeros(6), torch.full((6,), -s))
    assert torch.equal(zero.grad, expected)
