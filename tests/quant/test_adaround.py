"""AdaRound soft/hard rounding, regulariser and β schedule (docs/methods.md §1.3)."""
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffquant.errors import ConfigError
from diffquant.quant import GAMMA, ZETA, AdaRound, BetaSchedule, UniformQuantizer


def weight_and_quantizer(bits=4, seed=0):
    w = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(seed))
    q = UniformQuantizer(bits, channel_axis=0, channels=3, init="minmax")
    q.init_from(w)
    return w, q


def grid_scaled(w, q):
    s, z = q.params(w.dim())
    return w / s, s, z


def test_constants():
    assert (ZETA, GAMMA) == (1.1, -0.1)


def test_init_sets_soft_targets_to_fractional_part():
    w, q = weight_and_quantizer()
    ada = AdaRound(w.shape)
    ada.init_from(w, q)
    scaled, _, z = grid_scaled(w, q)
    assert ada.mode == "soft"
    assert torch.allclose(ada.soft_targets(), scaled - torch.floor(scaled), atol=1e-5)
    # so the soft weight is W itself wherever neither floor nor ceil is clipped
    floor = torch.floor(scaled) + z
    inside = (floor >= q.spec.qmin) & (floor + 1 <= q.spec.qmax)
    assert inside.float().mean() > 0.9
    assert torch.allclose(ada(w, q)[inside], w[inside], atol=1e-5)


def test_hard_rounding_is_a_floor_or_ceil_choice():
    w, q = weight_and_quantizer(bits=3, seed=1)
    ada = AdaRound(w.shape)
    ada.init_from(w, q)
    with torch.no_grad():
        ada.V.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(2)))
    ada.harden()
    assert ada.mode == "hard" and ada.hard_rounding.dtype == torch.bool
    assert torch.equal(ada.hard_rounding, ada.V >= 0)
    scaled, s, z = grid_scaled(w, q)
    spec = q.spec
    down = (torch.clamp(torch.floor(scaled) + z, spec.qmin, spec.qmax) - z) * s
    up = (torch.clamp(torch.floor(scaled) + 1 + z, spec.qmin, spec.qmax) - z) * s
    out = ada(w, q)
    assert torch.equal(out, torch.where(ada.V >= 0, up, down))
    assert ((out == up) | (out == down)).all()
    assert bool((out == up).any()) and bool((out == down).any())


def test_harden_right_after_init_is_round_to_nearest():
    w, q = weight_and_quantizer(seed=3)
    ada = AdaRound(w.shape)
    ada.init_from(w, q)
    ada.harden()
    assert torch.allclose(ada(w, q), q(w), atol=1e-6)  # no exact .5 ties in random data


def test_soft_and_hard_agree_when_soft_targets_are_saturated():
    w, q = weight_and_quantizer(seed=4)
    ada = AdaRound(w.shape)
    ada.init_from(w, q)
    signs = torch.randn(w.shape, generator=torch.Generator().manual_seed(5)).sign()
    with torch.no_grad():
        ada.V.copy_(signs * 10.0)  # h(±10) is exactly 1 or 0 after the clamp
    assert set(ada.soft_targets().unique().tolist()) == {0.0, 1.0}
    soft = ada(w, q)
    ada.harden()
    assert torch.equal(ada(w, q), soft)


def test_only_v_gets_gradients_and_hard_mode_has_none():
    w, q = weight_and_quantizer()
    ada = AdaRound(w.shape)
    ada.init_from(w, q)
    (ada(w, q).sum() + ada.regularizer(2.0)).backward()
    assert ada.V.grad is not None and ada.V.grad.abs().sum() > 0
    assert q.step.grad is None


def test_regularizer_hand_values():
    ada = AdaRound((3,))
    h_target = 0.75
    v_075 = math.log(((h_target - GAMMA) / (ZETA - GAMMA)) / (1 - (h_target - GAMMA) / (ZETA - GAMMA)))
    with torch.no_grad():
        ada.V.copy_(torch.tensor([0.0, 10.0, v_075]))  # h = 0.5, 1, 0.75
    assert torch.allclose(ada.soft_targets(), torch.tensor([0.5, 1.0, 0.75]), atol=1e-6)
    # terms 1 - |2h - 1|^beta: 1, 0, 1 - 0.5^beta
    assert ada.regularizer(2.0).item() == pytest.approx(1.0 + 0.0 + 0.75, abs=1e-5)
    assert ada.regularizer(20.0).item() == pytest.approx(2.0 - 0.5**20, abs=1e-5)


def test_beta_schedule_hand_picked_iterations():
    sched = BetaSchedule(iters=100)  # warmup 0.2, beta 20 -> 2
    assert sched(0)[0] is False and sched(19)[0] is False
    assert sched(20) == (True, 20.0)
    assert sched(60) == (True, pytest.approx(11.0))  # halfway through the decay
    assert sched(80) == (True, pytest.approx(6.5))
    assert sched(100) == (True, pytest.approx(2.0))
    assert sched(150) == (True, pytest.approx(2.0))
    no_warmup = BetaSchedule(iters=10, warmup=0.0, start=10, end=0)
    assert no_warmup(0) == (True, 10.0) and no_warmup(5) == (True, pytest.approx(5.0))
    with pytest.raises(ConfigError):
        BetaSchedule(iters=0)
    with pytest.raises(ConfigError):
        BetaSchedule(iters=10, warmup=1.0)


def test_hard_state_round_trips_through_safetensors(tmp_path):
    w, q = weight_and_quantizer(seed=6)
    ada = AdaRound(w.shape)
    ada.init_from(w, q)
    with torch.no_grad():
        ada.V.normal_(generator=torch.Generator().manual_seed(7))
    ada.harden()
    path = tmp_path / "ada.safetensors"
    save_file(ada.state_dict(), str(path))
    fresh = AdaRound(w.shape)
    fresh.load_state_dict(load_file(str(path)))
    assert fresh.mode == "hard"
    assert torch.equal(fresh(w, q), ada(w, q))


def test_bad_inputs():
    w, q = weight_and_quantizer()
    ada = AdaRound((3, 2))
    with pytest.raises(ConfigError):
        ada.init_from(w, q)
    with pytest.raises(ConfigError):
        ada.mode = "medium"
