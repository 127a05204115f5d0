"""One propagation through the units (recon/propagate.py) gives bit for bit the caches — hence the
result — of rebuilding every unit's cache from the input, with one forward per batch and side."""
from __future__ import annotations

import logging
import threading

import pytest
import torch

from diffquant.calib.select import CalibrationSet
from diffquant.config import QuantConfig
from diffquant.methods.stages import init_weight_quantizers, observe_activations
from diffquant.model import quantize
from diffquant.recon import AdaRoundPass, CalibrationCalls, EngineOptions, LSQPass, make_units, reconstruct
from diffquant.recon.cache import CacheOptions

from test_engine import N, toy_qmodel


def _options(mode: str, **cache) -> EngineOptions:
    return EngineOptions(seed=5, progress=False, cache=CacheOptions(propagation=mode, batch_size=10, **cache))


def _two_passes(qmodel, data, units, options):
    records = reconstruct(qmodel, units, data, AdaRoundPass(iters=12, batch_size=8, lr=1e-2), options=options)
    observe_activations(qmodel, lambda m: data.run(m, slice(0, len(data))))
    records += reconstruct(qmodel, units, data, LSQPass(iters=8, batch_size=8, lr=1e-3), options=options)
    state = {k: v.clone() for k, v in qmodel.quant_state_dict().items()}
    return state, [(r.name, r.pass_name, r.initial_loss, r.final_loss) for r in records]


def _count_forwards(model):
    calls = [0]
    handle = model.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls, handle


def _propagation_threads():
    return [t for t in threading.enumerate() if t.name.startswith("diffquant-propagation")]


def _assert_same(a, b):
    assert a[1] == b[1]
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def test_toy_model_propagation_equals_rerun_and_runs_the_network_once():
    results, forwards = {}, {}
    for mode in ("auto", "rerun"):
        qmodel, _, data = toy_qmodel(weight_bits=4, act_bits=4)
        calls, handle = _count_forwards(qmodel.model)
        results[mode] = _two_passes(qmodel, data, make_units(qmodel), _options(mode))
        handle.remove()
        forwards[mode] = calls[0]
    _assert_same(results["auto"], results["rerun"])
    batches = -(-N // 10)
    # per pass: each side (float, plus quantized where the pass trains on x_in^q) once per batch and
    # once for the memory probe; the activation observation in between is one more call
    sides = [1 + ("q" in p.keep) for p in (AdaRoundPass(iters=1), LSQPass(iters=1))]
    assert forwards["auto"] == sum(s * (batches + 1) for s in sides) + 1
    assert forwards["rerun"] > 2 * forwards["auto"]
    assert not _propagation_threads()


def _unet_data(unet_inputs, n=12):
    gen = torch.Generator().manual_seed(1)
    (x, _), _ = unet_inputs(n)
    xs = torch.randn(n, *x.shape[1:], generator=gen)
    ts = torch.tensor([999, 500, 20] * (n // 3))
    cs = CalibrationSet(xs, ts, torch.arange(n) % 3, torch.zeros(n, dtype=torch.long), torch.arange(n))
    return CalibrationCalls(cs)  # model(x, t, class_labels=...)


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_diffusers_unet_with_skips_and_attention_propagates_like_rerun(make_unet, unet_inputs, granularity):
    results = {}
    for mode in ("auto", "rerun"):
        torch.manual_seed(0)
        qmodel = quantize(make_unet(), QuantConfig(weight_bits=4, act_bits=8), unet_inputs())
        for p in qmodel.parameters():
            p.requires_grad_(False)
        init_weight_quantizers(qmodel)
        units = make_units(qmodel, granularity=granularity)
        results[mode] = _two_passes(qmodel, _unet_data(unet_inputs), units, _options(mode))
    _assert_same(results["auto"], results["rerun"])
    assert not _propagation_threads()


@pytest.mark.parametrize("why", ["order", "memory"])
def test_falls_back_to_rerun_with_a_message_and_the_same_result(why, caplog):
    qmodel, _, data = toy_qmodel(weight_bits=4, act_bits=4)
    order = "registration" if why == "order" else "execution"  # registration puts the head first
    cache = {"memory_limit_mb": 1e-6} if why == "memory" else {}
    with caplog.at_level(logging.INFO, logger="diffquant.recon"):
        got = _two_passes(qmodel, data, make_units(qmodel, order=order), _options("auto", **cache))
    expected_message = "0 of 5 calibration batches propagated" if why == "memory" else \
        "building each unit cache from the input"
    assert expected_message in caplog.text
    qmodel, _, data = toy_qmodel(weight_bits=4, act_bits=4)
    _assert_same(got, _two_passes(qmodel, data, make_units(qmodel, order=order), _options("rerun", **cache)))
    assert not _propagation_threads()


def test_batches_beyond_the_memory_limit_are_run_from_the_input(monkeypatch, caplog):
    """Paused forwards measured at 1 MB per sample, limit 25 MB: the first two batches of 10 are
    propagated, the other three rebuilt per unit, and the caches are still bit-identical."""
    import diffquant.recon.engine as engine

    monkeypatch.setattr(engine, "frontier_bytes", lambda model, names, data, index: (index.stop - index.start) * 2**19)
    qmodel, _, data = toy_qmodel(weight_bits=4, act_bits=4)
    calls, handle = _count_forwards(qmodel.model)
    with caplog.at_level(logging.INFO, logger="diffquant.recon"):
        got = _two_passes(qmodel, data, make_units(qmodel), _options("auto", memory_limit_mb=25))
    handle.remove()
    assert "2 of 5 calibration batches propagated" in caplog.text
    qmodel, _, data = toy_qmodel(weight_bits=4, act_bits=4)
    rerun_calls, handle = _count_forwards(qmodel.model)
    _assert_same(got, _two_passes(qmodel, data, make_units(qmodel), _options("rerun", memory_limit_mb=25)))
    handle.remove()
    assert calls[0] < rerun_calls[0]
    assert not _propagation_threads()


def test_an_interrupted_pass_leaves_no_suspended_forward(tmp_path, monkeypatch):
    from diffquant.recon import ReconProgress

    qmodel, _, data = toy_qmodel(weight_bits=4, act_bits=4)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ReconProgress, "save", interrupt)
    with pytest.raises(KeyboardInterrupt):
        reconstruct(qmodel, make_units(qmodel), data, AdaRoundPass(iters=2, batch_size=8), options=_options("auto"),
                    progress=ReconProgress(tmp_path, ["weights"], "fp"))
    assert not _propagation_threads()
    # and the model still runs normally afterwards (its activation ranges were never observed)
    qmodel.set_quant_state(weights=True, acts=False)
    with torch.no_grad():
        assert data.run(qmodel, slice(0, 4)).shape == (4, 2, 6, 6)


def test_bad_propagation_setting_is_refused():
    from diffquant.errors import ConfigError

    with pytest.raises(ConfigError, match="propagation"):
        CacheOptions(propagation="twice")
