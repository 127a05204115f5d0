"""DMQ's power-of-two channel scaling (docs/methods.md §5.3): the vectorised vote and MSE choice."""
from __future__ import annotations

import pytest
import torch

from diffquant.errors import ConfigError
from diffquant.quant.pts import PTSStatistics, candidate_errors, pts_multipliers
from diffquant.quant.quantizer import UniformQuantizer
from diffquant.quant.variants import PTSQuantizer

STEP, ZERO = 8.0 / 255, 128.0  # 8-bit asymmetric grid of the range [-4, 4]


def constructed(n: int = 40) -> torch.Tensor:
    """Channel 0: full range; 1: a tiny range in every sample; 2: tiny in half the samples, full
    range in the others (the samples disagree)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.empty(n, 3, 4, 4)
    x[:, 0] = torch.rand(n, 4, 4, generator=gen) * 8 - 4
    x[:, 1] = torch.rand(n, 4, 4, generator=gen) * 0.05
    x[:, 2] = torch.rand(n, 4, 4, generator=gen) * 0.05
    x[n // 2:, 2] = torch.rand(n - n // 2, 4, 4, generator=gen) * 8 - 4
    return x


def test_vote_on_a_constructed_tensor():
    m = pts_multipliers(constructed(), STEP, ZERO, 0, 255)
    assert m.tolist() == [1.0, 1 / 8, 1.0]
    # with a lower agreement threshold the half that agrees wins for channel 2
    assert pts_multipliers(constructed(), STEP, ZERO, 0, 255, kappa=0.5).tolist() == [1.0, 1 / 8, 1 / 8]
    # D = 1: only s/2 and s are candidates
    assert pts_multipliers(constructed(), STEP, ZERO, 0, 255, depth=1).tolist() == [1.0, 0.5, 1.0]


def test_mse_selection_uses_the_summed_error():
    x = constructed()
    err = candidate_errors(x, STEP, ZERO, 0, 255)
    m = pts_multipliers(x, STEP, ZERO, 0, 255, select="mse")
    assert m.tolist() == (2.0 ** (err.sum(0).argmin(-1).float() - 3)).tolist()
    assert m[1] == 1 / 8 and m[2] == 1.0  # the full-range half's clipping dominates channel 2
    with pytest.raises(ConfigError, match="selection"):
        pts_multipliers(x, STEP, ZERO, 0, 255, select="median")


def test_candidate_errors_match_an_explicit_loop():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, 3, 2, generator=gen)
    s, z = 0.05, 7.0
    err = candidate_errors(x, s, z, 0, 15, depth=3)
    assert err.shape == (5, 4, 4)
    for i in range(5):
        for c in range(4):
            for j in range(4):
                sj = s * 2.0 ** (j - 3)
                q = (torch.clamp(torch.round(x[i, c] / sj) + z, 0, 15) - z) * sj
                assert err[i, c, j].item() == pytest.approx(((x[i, c] - q) ** 2).mean().item(), rel=1e-6)


def test_linear_inputs_use_the_last_axis_and_streaming_equals_one_shot():
    x = constructed().permute(0, 2, 3, 1).reshape(40, 16, 3)  # [n, L, C]
    assert pts_multipliers(x, STEP, ZERO, 0, 255, channel_axis=-1).tolist() == [1.0, 1 / 8, 1.0]
    stats = PTSStatistics(3)
    for part in x.split(7):
        stats.add(part, STEP, ZERO, 0, 255, channel_axis=-1)
    assert stats.samples == 40
    one = PTSStatistics(3)
    one.add(x, STEP, ZERO, 0, 255, channel_axis=-1)
    assert torch.equal(stats.counts, one.counts) and torch.equal(stats.multipliers(), one.multipliers())


def test_factors_refine_the_small_channel_in_a_pts_quantizer():
    x = constructed()
    base = UniformQuantizer(8)
    base.set_range(torch.tensor(-4.0), torch.tensor(4.0))
    q = PTSQuantizer.from_quantizer(base, pts_axis=1, pts_channels=3)
    before = (q(x) - x).pow(2).mean(dim=(0, 2, 3))
    q.multiplier[0] = pts_multipliers(x, q.step[0], q.zero_point[0], 0, 255)
    after = (q(x) - x).pow(2).mean(dim=(0, 2, 3))
    assert after[1] < before[1] / 10 and after[0] == before[0] and after[2] == before[2]
