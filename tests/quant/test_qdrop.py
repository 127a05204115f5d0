"""QDrop mixing (docs/methods.md §1.4)."""
import pytest
import torch

from diffquant.quant import mix_inputs


def pair(n=10_000):
    gen = torch.Generator().manual_seed(0)
    x_fp = torch.randn(n, generator=gen)
    return x_fp.round(), x_fp


def test_prob_one_and_zero():
    x_q, x_fp = pair()
    assert torch.equal(mix_inputs(x_q, x_fp, 1.0), x_q)
    assert torch.equal(mix_inputs(x_q, x_fp, 0.0), x_fp)


def test_mixing_is_elementwise_where_u_below_prob():
    x_q, x_fp = pair()
    out = mix_inputs(x_q, x_fp, 0.3, generator=torch.Generator().manual_seed(1))
    u = torch.rand(x_q.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, torch.where(u < 0.3, x_q, x_fp))
    took_q = (out == x_q) & (x_q != x_fp)
    assert 0.25 < took_q.float().mean() < 0.35


def test_fresh_draws_per_call_and_reproducible_with_seed():
    x_q, x_fp = pair()
    gen = torch.Generator().manual_seed(2)
    first, second = mix_inputs(x_q, x_fp, 0.5, gen), mix_inputs(x_q, x_fp, 0.5, gen)
    assert not torch.equal(first, second)
    again = mix_inputs(x_q, x_fp, 0.5, torch.Generator().manual_seed(2))
    assert torch.equal(first, again)


def test_shape_mismatch():
    with pytest.raises(ValueError):
        mix_inputs(torch.zeros(3), torch.zeros(4), 0.5)
