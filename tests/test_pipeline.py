"""pipeline.quantize_bundle's settings that change where data lives but no number: the unit-cache
memory budget (--max-memory)."""
from __future__ import annotations

import pytest
import torch

from diffquant.config import QuantConfig
from diffquant.errors import ConfigError
from diffquant.pipeline import CalibConfig, parse_recipe_spec, quantize_bundle

SPEC = "qdiffusion:iters_w=3,iters_a=2,cali_n=4,cali_st=2,act_init_n=4,batch_size=4,eval_samples=4"


def _run(bundle, calib, work_dir=None):
    recipe, config = parse_recipe_spec(SPEC)
    return quantize_bundle(bundle, recipe, QuantConfig(weight_bits=4, act_bits=8), calib, "cpu",
                           recipe_config=config, work_dir=work_dir).qmodel


def _state(qmodel):
    return {k: v.clone() for k, v in qmodel.quant_state_dict().items()}


def test_a_tiny_memory_budget_streams_caches_from_disk_with_the_same_result(bundle, tmp_path, monkeypatch):
    import diffquant.recon.cache as cache_module

    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    on_disk = []
    real = cache_module.TensorStore.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        on_disk.append(self.on_disk or self.nbytes <= 1e-3 * 2**20)  # a store within the budget may stay

    monkeypatch.setattr(cache_module.TensorStore, "__init__", spy)
    base = CalibConfig(n=4, steps=4, every=1, batch_size=4)
    in_memory = _state(_run(bundle, base))
    assert on_disk and not all(on_disk)
    on_disk.clear()
    streamed = _state(_run(bundle, CalibConfig(**{**base.__dict__, "max_memory_mb": 1e-3})))
    assert on_disk and all(on_disk)
    assert streamed.keys() == in_memory.keys() and all(torch.equal(streamed[k], in_memory[k]) for k in streamed)
    with pytest.raises(ConfigError, match="max_memory_mb"):
        _run(bundle, CalibConfig(**{**base.__dict__, "max_memory_mb": 0.0}))


def test_the_budget_never_exceeds_a_quarter_of_the_machine(monkeypatch):
    import diffquant.recipes.stage as stage_module
    from diffquant.recipes import StageContext
    from diffquant.recipes.stage import EngineSettings

    ctx = StageContext()
    ctx.engine = EngineSettings(cache_memory_mb=4096.0)
    monkeypatch.setattr(stage_module, "machine_memory_mb", lambda: 8000.0)
    assert ctx.cache_options().memory_limit_mb == 2000.0
    monkeypatch.setattr(stage_module, "machine_memory_mb", lambda: 64000.0)
    assert ctx.cache_options().memory_limit_mb == 4096.0


def test_another_memory_budget_resumes_the_same_run(bundle, tmp_path, monkeypatch):
    """The budget is left out of the resume fingerprint: a run interrupted with one budget resumes
    with another and ends where the uninterrupted run ends."""
    from diffquant.recon.progress import ReconProgress

    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    base = CalibConfig(n=4, steps=4, every=1, batch_size=4)
    whole = _state(_run(bundle, base))

    class Killed(Exception):
        pass

    real_save = ReconProgress.save
    calls = []

    def save_then_stop(self, *a, **k):
        real_save(self, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            raise Killed

    monkeypatch.setattr(ReconProgress, "save", save_then_stop)
    with pytest.raises(Killed):
        _run(bundle, base, work_dir=tmp_path / "w")
    monkeypatch.setattr(ReconProgress, "save", real_save)
    resumed = _state(_run(bundle, CalibConfig(**{**base.__dict__, "max_memory_mb": 1e-3}), work_dir=tmp_path / "w"))
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
