"""UniformQuantizer: calibration policies, modes, per-timestep rows, QDrop, learnable parameters."""
import pytest
import torch

from diffquant.errors import ConfigError, DiffquantError
from diffquant.quant import (
    GridSpec,
    TimestepIndex,
    UniformQuantizer,
    edadm_grid_range,
    fake_quantize,
    lp_shrink_range,
    qparams_from_range,
)


def batch(lo, hi, n=16):
    """A batch whose min is ``lo`` and max is ``hi``."""
    return torch.linspace(lo, hi, n).reshape(2, n // 2)


def test_uninitialised_quantizer_raises_clear_error():
    q = UniformQuantizer(8)
    with pytest.raises(DiffquantError, match="initialised"):
        q(torch.randn(4))


def test_a_calibrated_quantizer_traces_without_graph_breaks():
    """torch.compile of a model with fake quantizers (e.g. the int8 model's attention) stays one graph:
    the data-dependent "initialised?" check breaks the graph, and every quantizer instance would then
    recompile until dynamo's limit, sending the model back to eager."""
    q = UniformQuantizer(8, init="minmax")
    q.observe(batch(-1.0, 3.0))
    q.mode = "quantize"
    x = torch.randn(4, 8)
    explanation = torch._dynamo.explain(q)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    assert torch.equal(q(x), q.quantize(x))


def test_minmax_per_tensor_and_global_union():
    q = UniformQuantizer(8, init="minmax")
    q.observe(batch(-1.0, 3.0))
    q.observe(batch(-3.0, 1.0))
    assert q.range_lo.item() == -3.0 and q.range_hi.item() == 3.0
    assert q.step.item() == pytest.approx(6.0 / 255)
    assert q.zero_point.item() == 128.0  # round(127.5) = 128 (half to even)
    # include_zero widens a positive range to [0, M]
    q = UniformQuantizer(4, init="minmax")
    q.observe(batch(1.0, 3.0))
    assert q.step.item() == pytest.approx(3.0 / 15) and q.zero_point.item() == 0.0


def test_minmax_per_channel_ranges():
    w = torch.tensor([[-1.0, 2.0, 0.5], [0.0, 3.0, 1.0], [-4.0, 4.0, 0.0]])
    q = UniformQuantizer(2, channel_axis=0, channels=3, init="minmax")
    q.init_from(w)
    assert torch.allclose(q.step[0], torch.tensor([1.0, 1.0, 8.0 / 3]))
    assert torch.equal(q.zero_point[0], torch.tensor([1.0, 0.0, 2.0]))
    s, z = q.params(w.dim())
    assert s.shape == (3, 1) and z.shape == (3, 1)
    rows = [fake_quantize(w[c], q.step[0, c], q.zero_point[0, c], 0, 3) for c in range(3)]
    expected = torch.stack(rows)
    assert torch.equal(q(w), expected)


def test_ema_minmax_after_two_batches_matches_hand_formula():
    q = UniformQuantizer(8, init="ema_minmax")
    assert q.momentum == 0.95
    q.observe(batch(-1.0, 3.0))
    assert q.range_lo.item() == -1.0 and q.range_hi.item() == 3.0  # first batch sets the range
    q.observe(batch(-3.0, 1.0))
    lo, hi = 0.95 * -1.0 + 0.05 * -3.0, 0.95 * 3.0 + 0.05 * 1.0  # -1.1, 2.9
    assert q.range_lo.item() == pytest.approx(lo) and q.range_hi.item() == pytest.approx(hi)
    assert q.step.item() == pytest.approx(4.0 / 255)
    assert q.zero_point.item() == 70.0  # round(1.1 / (4/255)) = round(70.125)
    assert int(q.batches_seen[0]) == 2


def test_edadm_smoothing_and_side_fixed_by_first_batch():
    gen = torch.Generator().manual_seed(0)
    first = torch.rand(64, generator=gen) * 2.0  # positive: side "pos"
    second = torch.randn(64, generator=gen)  # two-sided, but the side stays "pos"
    spec = GridSpec(4, "asymmetric")
    q = UniformQuantizer(4, init="edadm_grid")
    assert q.momentum == 0.9 and q.side() is None
    q.observe(first)
    assert q.side() == "pos"
    r1 = edadm_grid_range(first, spec, None)
    assert q.range_lo.item() == r1[0].item() and q.range_hi.item() == pytest.approx(r1[1].item())
    q.observe(second)
    r2 = edadm_grid_range(second, spec, None, side="pos")
    assert r2[0].item() == 0.0 and edadm_grid_range(second, spec, None)[0].item() < 0
    assert q.range_lo.item() == pytest.approx(0.9 * r1[0].item() + 0.1 * r2[0].item())
    assert q.range_hi.item() == pytest.approx(0.9 * r1[1].item() + 0.1 * r2[1].item())
    # the side is saved and restored with the state dict, and reset() forgets it
    fresh = UniformQuantizer(4, init="edadm_grid")
    fresh.load_state_dict(q.state_dict())
    assert fresh.side() == "pos"
    fresh.reset()
    assert fresh.side() is None and not bool(fresh.initialized[0])


def test_edadm_side_option_and_validation():
    q = UniformQuantizer(4, init="edadm_grid", init_options={"side": "two", "symmetric": True})
    q.observe(torch.rand(32))  # positive data, but the side is forced: symmetric 1-D search
    assert q.side() == "two" and q.range_lo.item() == -q.range_hi.item() < 0
    with pytest.raises(ConfigError):
        UniformQuantizer(4, init="edadm_grid", init_options={"side": "left"})
    with pytest.raises(ConfigError):
        UniformQuantizer(4, init="lp_shrink", init_options={"bogus": 1})
    with pytest.raises(ConfigError):
        UniformQuantizer(4, init="percentile")


def test_lp_shrink_quantizer_never_widens_to_zero():
    x = torch.linspace(1.0, 2.0, 101)
    spec = GridSpec(4, "asymmetric")
    lo, hi = lp_shrink_range(x, spec, None)
    s, z = qparams_from_range(lo, hi, spec, include_zero=False)
    for include_zero in (True, False):
        q = UniformQuantizer(4, init="lp_shrink", include_zero=include_zero)
        q.init_from(x)
        assert q.step.item() == s.item() and q.zero_point.item() == z.item()
    # widening would have given a different step
    assert qparams_from_range(lo, hi, spec)[0].item() != s.item()


def test_observe_mode_updates_then_quantize_mode_freezes():
    q = UniformQuantizer(8, init="minmax")
    q.mode = "observe"
    x = batch(-1.0, 1.0)
    y = q(x)
    assert bool(q.initialized[0]) and torch.equal(y, q.quantize(x))
    q(batch(-2.0, 2.0))
    assert q.range_lo.item() == -2.0
    q.mode = "quantize"
    q(batch(-5.0, 5.0))
    assert q.range_lo.item() == -2.0 and int(q.batches_seen[0]) == 2


def test_per_timestep_rows_follow_timestep_index():
    index = TimestepIndex([999, 500, 1])
    q = UniformQuantizer(4, num_steps=3)
    q.timestep_index = index
    for k, amax in enumerate([1.0, 2.0, 4.0]):
        q.set_range(torch.tensor(-amax), torch.tensor(amax), row=k)
    x = torch.linspace(-4, 4, 33)
    for t, k in [(999, 0), (500, 1), (1, 2)]:
        index.select(torch.tensor([t, t]))
        assert q.row() == k
        assert torch.equal(q(x), q.quantize(x, row=k))
    assert not torch.equal(q.quantize(x, row=0), q.quantize(x, row=2))
    with pytest.raises(DiffquantError):
        index.select(torch.tensor([498]))
    nearest = TimestepIndex([999, 500, 1], lookup="nearest")
    q.timestep_index = nearest
    nearest.select(480)
    assert torch.equal(q(x), q.quantize(x, row=1))


def test_per_timestep_quantizer_needs_an_index_and_observes_its_row():
    q = UniformQuantizer(8, num_steps=3)
    with pytest.raises(DiffquantError):
        q.row()
    index = TimestepIndex([30, 20, 10])
    q.timestep_index = index
    q.mode = "observe"
    index.select(20)
    q(batch(-1.0, 1.0))
    assert q.initialized.tolist() == [False, True, False]
    index.select(30)
    q.mode = "quantize"
    with pytest.raises(DiffquantError, match="initialised"):
        q(batch(-1.0, 1.0))


def test_copy_row_to_all():
    q = UniformQuantizer(8, init="edadm_grid", num_steps=4)
    q.observe(torch.randn(100), row=0)
    q.copy_row_to_all(0)
    for name in ("step", "zero_point", "range_lo", "range_hi"):
        t = getattr(q, name)
        assert torch.equal(t, t[0:1].expand_as(t))
    assert q.initialized.all() and (q.batches_seen == 1).all()
    assert all(q.side(k) == "two" for k in range(4))


def test_qdrop_in_training_and_ignored_in_inference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, generator=gen)
    q = UniformQuantizer(3)
    q.init_from(x)
    xq = q.quantize(x)
    q.train()
    q.qdrop_prob = 0.0
    assert torch.equal(q(x), x)
    q.qdrop_prob = 1.0
    assert torch.equal(q(x), xq)
    q.qdrop_prob = 0.5
    torch.manual_seed(0)
    y = q(x)
    from_q, from_fp = y == xq, y == x
    assert (from_q | from_fp).all()
    assert 0.4 < (from_q & ~from_fp).float().mean() < 0.6  # elements differ in Q(x) and x mostly
    q.eval()
    q.qdrop_prob = 0.0
    assert torch.equal(q(x), xq)


def test_disabled_quantizer_passes_through():
    q = UniformQuantizer(4)
    q.enabled = False
    x = torch.randn(5)
    assert torch.equal(q(x), x)


def test_learnable_step_gets_lsq_gradient_through_module():
    q = UniformQuantizer(2)
    q.set_range(torch.tensor(-0.5), torch.tensor(1.0))  # s = 0.5, z = 1
    assert q.step.item() == 0.5 and q.zero_point.item() == 1.0
    q.set_learnable(step=True)
    x = torch.tensor([-2.0, -0.3, 0.1, 0.4, 0.9, 3.0])
    q(x).sum().backward()
    # per element: -1, -0.4, -0.2, 0.2, 0.2, 2 (see test_affine)
    assert q.step.grad.item() == pytest.approx(0.8, abs=1e-6)
    assert q.zero_point.grad is None


def test_learnable_real_zero_point_gradient_through_module():
    q = UniformQuantizer(2, channel_axis=0, channels=2)
    q.set_range(torch.tensor([-0.5, -1.0]), torch.tensor([1.0, 2.0]))  # s = [0.5, 1], z = [1, 1]
    q.set_learnable(step=False, zero_point=True)
    x = torch.tensor([[-2.0, 0.1, 3.0, 5.0], [-0.4, 0.3, 1.2, 9.0]])
    q(x).sum().backward()
    # row 0: three clipped elements (-2, 3, 5) -> 3 * -0.5; row 1: one clipped (9) -> -1
    assert torch.allclose(q.zero_point.grad, torch.tensor([[-1.5, -1.0]]))
    assert q.step.grad is None


def test_state_dict_round_trip_restores_quantization():
    w = torch.randn(4, 3, 3, 3)
    q = UniformQuantizer(4, channel_axis=0, channels=4, init="lp_shrink", include_zero=False)
    q.init_from(w)
    fresh = UniformQuantizer(**{k: v for k, v in q.describe().items() if k != "enabled"})
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(w), q(w))
