"""The unit-by-unit reconstruction loop: AdaRound and LSQ passes, order, skipping, resume, seeds."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from diffquant.calib.select import CalibrationSet
from diffquant.config import LayerRule, QuantConfig
from diffquant.errors import CheckpointError
from diffquant.methods.stages import init_weight_quantizers, observe_activations
from diffquant.model import quantize
from diffquant.recon import (
    AdaRoundPass,
    CalibrationCalls,
    EngineOptions,
    LSQPass,
    ReconProgress,
    make_units,
    reconstruct,
)

N = 48
QUIET = EngineOptions(progress=False)


class ToyBlock(nn.Module):
    """Two convs with a side input (a per-sample scale from t), like a ResBlock with temb."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, scale):
        return x + self.conv2(torch.relu(self.conv1(x))) * scale[:, None, None, None]


class Toy(nn.Module):
    """stem → block1 → block2 → head; ``head`` is registered first, so registration ≠ execution."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.head = nn.Conv2d(c, 2, 1)
        self.stem = nn.Conv2d(2, c, 3, padding=1)
        self.block1 = ToyBlock(c)
        self.block2 = ToyBlock(c)

    def forward(self, x, t):
        s = t.float() / 1000 + 0.5
        return self.head(self.block2(self.block1(self.stem(x), s), s))


def toy_data(n: int = N) -> CalibrationCalls:
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(n, 2, 6, 6, generator=gen)
    xs[0, 0, 0, 0] = 12.0  # an outlier that stretches min/max activation ranges
    ts = torch.randint(0, 1000, (n,), generator=gen)
    cs = CalibrationSet(xs, ts, None, torch.zeros(n, dtype=torch.long), torch.arange(n))
    return CalibrationCalls(cs, call=lambda m, x, t, c: m(x, t))


def toy_qmodel(float_model=None, **config):
    torch.manual_seed(0)
    float_model = float_model or Toy().eval()
    data = toy_data()
    x, t, _ = data.calib_set[0:2]
    qmodel = quantize(float_model, QuantConfig(block_types=["ToyBlock"], **config), ((x, t), {}))
    for p in qmodel.parameters():
        p.requires_grad_(False)
    init_weight_quantizers(qmodel)
    return qmodel, float_model, data


def output_error(qmodel, float_model, data) -> float:
    with torch.no_grad():
        x, t, _ = data.calib_set[:]
        return float((qmodel(x, t) - float_model(x, t)).pow(2).mean())


def test_adaround_beats_round_to_nearest():
    qmodel, float_model, data = toy_qmodel(weight_bits=3, quantize_acts=False)
    rtn_error = output_error(qmodel, float_model, data)
    units = make_units(qmodel)
    records = reconstruct(qmodel, units, data, AdaRoundPass(iters=150, batch_size=16, lr=1e-2), options=QUIET)
    assert [r.name for r in records] == ["stem", "block1", "block2", "head"]
    blocks = [r for r in records if r.kind == "block"]
    # per unit: the hardened rounding reconstructs the block output better than round-to-nearest
    assert all(r.final_loss < 0.8 * r.initial_loss for r in blocks)
    assert all(r.iterations == 150 and not r.skipped for r in records)
    # every rounding is hard and frozen, and the whole model's output error went down
    for layer in qmodel.layers().values():
        assert [r.mode for r in layer.adaround] == ["hard"] and not layer.adaround[0].V.requires_grad
    assert output_error(qmodel, float_model, data) < 0.8 * rtn_error
    # hardened weights lie on the quantizer's grid: at most 2^3 levels per output channel
    w = qmodel.layers()["block1.conv1"].effective_weight()
    assert max(len(torch.unique(row)) for row in w.reshape(w.shape[0], -1)) <= 8


def test_lsq_step_learning_lowers_activation_error():
    qmodel, float_model, data = toy_qmodel(weight_bits=8, act_bits=4)
    observe_activations(qmodel, lambda m: data.run(m, slice(0, N)))
    steps_before = {n: q.step.detach().clone() for n, q in qmodel.quantizers("act").items()}
    before = output_error(qmodel, float_model, data)
    records = reconstruct(qmodel, make_units(qmodel), data, LSQPass(iters=100, batch_size=16, lr=1e-3),
                          options=QUIET)
    assert all(r.final_loss < r.initial_loss for r in records)
    assert output_error(qmodel, float_model, data) < before
    for name, q in qmodel.quantizers("act").items():
        assert not q.step.requires_grad and not torch.equal(q.step, steps_before[name]), name
        assert q.zero_point.grad is None


def test_weightless_units_are_skipped_by_the_weight_pass_but_learn_their_act_steps():
    rules = [LayerRule("block2.*", weight_bits=32)]
    qmodel, _, data = toy_qmodel(weight_bits=4, act_bits=4, rules=rules)
    units = make_units(qmodel)
    assert not units[2].has_weights and units[2].act_quantizers()
    records = reconstruct(qmodel, units, data, AdaRoundPass(iters=5, batch_size=8), options=QUIET)
    assert [r.skipped for r in records] == [False, False, True, False]
    assert records[2].initial_loss is None and qmodel.layers()["block2.conv1"].adaround is None
    observe_activations(qmodel, lambda m: data.run(m, slice(0, N)))
    acts = reconstruct(qmodel, units, data, LSQPass(iters=5, batch_size=8), options=QUIET)
    assert not acts[2].skipped and acts[2].final_loss is not None


def test_unit_orders_and_granularity(make_unet, unet_inputs):
    qmodel, _, _ = toy_qmodel()
    assert [u.name for u in make_units(qmodel)] == ["stem", "block1", "block2", "head"]
    assert [u.name for u in make_units(qmodel, order="registration")] == ["head", "stem", "block1", "block2"]
    unet = quantize(make_unet(), QuantConfig(weight_bits=4, act_bits=8), unet_inputs())
    layer_units = make_units(unet, granularity="layer")
    names = [u.name for u in layer_units]
    attn = "mid_block.attentions.0"
    # each attention's matmul unit right after its own layers, weightless
    assert names.index(attn) == names.index(attn + ".to_out.0") + 1
    unit = layer_units[names.index(attn)]
    assert not unit.has_weights and len(unit.act_quantizers()) == 4
    assert len(layer_units) == len(unet.plan.layers) + len(unet.plan.attention)


def _two_passes(qmodel, data, progress=None, seed=0):
    units = make_units(qmodel)
    options = EngineOptions(seed=seed, progress=False)
    out = reconstruct(qmodel, units, data, AdaRoundPass(iters=8, batch_size=8), options=options, progress=progress)
    if progress is None or not progress.started("acts"):
        observe_activations(qmodel, lambda m: data.run(m, slice(0, N)))
    out += reconstruct(qmodel, units, data, LSQPass(iters=8, batch_size=8, lr=1e-3), options=options,
                       progress=progress)
    return out


def _state(qmodel):
    return {k: v.clone() for k, v in qmodel.quant_state_dict().items()}


@pytest.mark.parametrize("stop_pass,stop_unit", [("weights", 1), ("acts", 2)])
def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path, monkeypatch, stop_pass, stop_unit):
    qmodel, float_model, data = toy_qmodel(weight_bits=4, act_bits=4)
    expected_records = _two_passes(qmodel, data)
    expected = _state(qmodel)

    class Interrupted(Exception):
        pass

    original = ReconProgress.save

    def save_then_stop(self, qm, pass_name, last_unit, *args, **kwargs):
        original(self, qm, pass_name, last_unit, *args, **kwargs)
        if (pass_name, last_unit) == (stop_pass, stop_unit):
            raise Interrupted

    first, _, _ = toy_qmodel(float_model, weight_bits=4, act_bits=4)
    monkeypatch.setattr(ReconProgress, "save", save_then_stop)
    with pytest.raises(Interrupted):
        _two_passes(first, data, ReconProgress(tmp_path, ["weights", "acts"], "fp"))
    monkeypatch.setattr(ReconProgress, "save", original)

    # a new process: fresh wrap of the float model, same work dir
    second, _, _ = toy_qmodel(float_model, weight_bits=4, act_bits=4)
    progress = ReconProgress(tmp_path, ["weights", "acts"], "fp")
    assert progress.restore(second)
    records = _two_passes(second, data, progress)
    got = _state(second)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert [(r.name, r.pass_name, r.final_loss) for r in records] == \
        [(r.name, r.pass_name, r.final_loss) for r in expected_records]
    x, t, _ = data.calib_set[:4]
    with torch.no_grad():
        assert torch.equal(second(x, t), qmodel(x, t))


def test_time_based_checkpoints_write_less_and_a_resume_from_an_earlier_unit_is_exact(tmp_path, monkeypatch):
    """With ``min_interval_s`` only the first unit's checkpoint is written in a fast run; killed in
    the second pass, the rerun restores that early checkpoint, redoes every later unit and ends
    exactly where the uninterrupted run ends (records included)."""
    from diffquant.model.resume import ResumeCheckpoint

    qmodel, float_model, data = toy_qmodel(weight_bits=4, act_bits=4)
    expected_records = _two_passes(qmodel, data)
    expected = _state(qmodel)
    writes = []
    real_write = ResumeCheckpoint.write
    monkeypatch.setattr(ResumeCheckpoint, "write", lambda self, qm, body, *a, **k: writes.append(
        (body["pass"], body["last_unit"])) or real_write(self, qm, body, *a, **k))

    class Interrupted(Exception):
        pass

    original = ReconProgress.save

    def save_then_stop(self, qm, pass_name, last_unit, *args, **kwargs):
        original(self, qm, pass_name, last_unit, *args, **kwargs)
        if (pass_name, last_unit) == ("acts", 2):
            raise Interrupted

    first, _, _ = toy_qmodel(float_model, weight_bits=4, act_bits=4)
    monkeypatch.setattr(ReconProgress, "save", save_then_stop)
    with pytest.raises(Interrupted):
        _two_passes(first, data, ReconProgress(tmp_path, ["weights", "acts"], "fp", min_interval_s=3600))
    monkeypatch.setattr(ReconProgress, "save", original)
    assert writes == [("weights", 0)]  # one write instead of one per unit

    second, _, _ = toy_qmodel(float_model, weight_bits=4, act_bits=4)
    progress = ReconProgress(tmp_path, ["weights", "acts"], "fp", min_interval_s=3600)
    assert progress.restore(second) and progress.state["last_unit"] == 0
    records = _two_passes(second, data, progress)
    got = _state(second)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert [(r.name, r.pass_name, r.final_loss) for r in records] == \
        [(r.name, r.pass_name, r.final_loss) for r in expected_records]


def test_progress_of_other_settings_is_refused(tmp_path):
    qmodel, _, data = toy_qmodel(weight_bits=4, quantize_acts=False)
    progress = ReconProgress(tmp_path, ["weights"], "settings-a")
    reconstruct(qmodel, make_units(qmodel)[:1], data, AdaRoundPass(iters=2, batch_size=4), options=QUIET,
                progress=progress)
    other, _, _ = toy_qmodel(weight_bits=4, quantize_acts=False)
    with pytest.raises(CheckpointError, match="other settings"):
        ReconProgress(tmp_path, ["weights"], "settings-b").restore(other)


def test_deterministic_given_a_seed():
    states = []
    for seed in (0, 0, 1):
        qmodel, _, data = toy_qmodel(weight_bits=3, quantize_acts=False)
        reconstruct(qmodel, make_units(qmodel), data, AdaRoundPass(iters=20, batch_size=8, lr=1e-2),
                    options=EngineOptions(seed=seed, progress=False))
        states.append(_state(qmodel))
    v_keys = [k for k in states[0] if k.endswith(".V")]
    assert v_keys and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in v_keys)
    # the caller's global RNG is untouched by the passes
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    qmodel, _, data = toy_qmodel(weight_bits=3, quantize_acts=False)
    torch.manual_seed(5)
    reconstruct(qmodel, make_units(qmodel), data, AdaRoundPass(iters=3, batch_size=8), options=QUIET)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("fresh_complete", [True, False])
def test_a_kill_between_the_two_renames_of_a_checkpoint_swap_keeps_progress(tmp_path, monkeypatch, fresh_complete):
    """``progress`` → ``progress.old`` happened, ``progress.new`` → ``progress`` did not: the next
    run restores the new copy when it is complete, else the old one — never starts from zero."""
    from pathlib import Path

    qmodel, float_model, data = toy_qmodel(weight_bits=4, quantize_acts=False)
    units = make_units(qmodel)
    progress = ReconProgress(tmp_path, ["weights"], "fp")
    reconstruct(qmodel, units[:1], data, AdaRoundPass(iters=2, batch_size=4), options=QUIET, progress=progress)
    after_first = _state(qmodel)

    real_rename = Path.rename

    def killed_after_first_rename(self, target):
        if Path(target).name == "progress":  # the second rename of the swap never happens
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        progress.save(qmodel, "weights", 1, [u.name for u in units[:2]], [])
    monkeypatch.setattr(Path, "rename", real_rename)
    assert not (tmp_path / "progress").exists() and (tmp_path / "progress.old").is_dir()
    if not fresh_complete:  # killed while the new copy was still being written
        (tmp_path / "progress.new" / "state.json").unlink()

    resumed, _, _ = toy_qmodel(float_model, weight_bits=4, quantize_acts=False)
    again = ReconProgress(tmp_path, ["weights"], "fp")
    assert again.restore(resumed)
    assert again.state["last_unit"] == (1 if fresh_complete else 0)
    if not fresh_complete:
        assert all(torch.equal(v, after_first[k]) for k, v in _state(resumed).items())
    assert (tmp_path / "progress").is_dir()
