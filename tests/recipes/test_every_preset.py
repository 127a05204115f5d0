"""The contract every preset passes, at tiny settings on the tiny conditional UNet: saved and
loaded it is bit-identical, and killed after its second checkpoint and rerun on the same work
dir it ends exactly where an uninterrupted run ends."""
from __future__ import annotations

import pytest
import torch

from diffquant.config import QuantConfig
from diffquant.finetune.qalora import FinetuneCheckpoint
from diffquant.methods import RECIPES
from diffquant.model import load, save
from diffquant.pipeline import CalibConfig, parse_recipe_spec, quantize_bundle
from diffquant.recon import ReconProgress

CALIB = CalibConfig(n=4, steps=4, every=1, batch_size=4)
_QDIFF = "iters_w=3,iters_a=2,cali_n=4,cali_st=2,act_init_n=4,batch_size=4,eval_samples=4"
_EDADM = "iters=3,tdac_n=4,tdac_b=4,batch_size=4,eval_samples=4,act_init_n=4"
_DMQ = "les_iters=3,iters_w=2,cali_n=2,act_init_n=2,act_batch=4,batch_size=4,eval_samples=4"
_MPQ = "epochs=2,pool_n=2,batch_size=2,lora_rank=2,stage1_batch=8"
TINY = {"naive": ("naive", (4, 8)), "qdiffusion": (_QDIFF, (4, 8)), "qdiffusion_official": (_QDIFF, (4, 8)),
        "edadm": (_EDADM, (4, 6)), "edadm_official": (_EDADM, (4, 6)), "dmq": (_DMQ, (4, 6)),
        "dmq_official": (_DMQ, (4, 6)), "mpqdm": (_MPQ, (3, 4)), "mpqdm_official": (_MPQ, (3, 4)),
        "efficientdm": (_MPQ, (3, 4))}


def run(bundle, name, work_dir=None):
    options, (wbits, abits) = TINY[name]
    recipe, config = parse_recipe_spec(name if options == "naive" else f"{name}:{options}")
    quant = QuantConfig(weight_bits=wbits, act_bits=abits)
    return quantize_bundle(bundle, recipe, quant, CALIB, "cpu", recipe_config=config,
                           work_dir=None if work_dir is None else str(work_dir)).qmodel


def same_state(a, b) -> bool:
    sa, sb = a.quant_state_dict(), b.quant_state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def uninterrupted(bundle):
    cache: dict = {}

    def get(name):
        if name not in cache:
            cache[name] = run(bundle, name)
        return cache[name]

    return get


def test_every_recipe_is_covered():
    assert set(TINY) == set(RECIPES)


@pytest.mark.parametrize("name", sorted(TINY))
class TestEveryPreset:
    def test_save_and_load_are_bit_identical(self, name, bundle, uninterrupted, tmp_path):
        qmodel = uninterrupted(name)
        save(qmodel, tmp_path / "q")
        loaded = load(bundle.unet, tmp_path / "q")
        assert same_state(loaded, qmodel) and loaded.recipe == qmodel.recipe == name
        x = torch.randn(2, *bundle.sample_shape, generator=torch.Generator().manual_seed(0))
        step = qmodel.plan.timesteps[0] if qmodel.plan.timesteps else 10  # per-step tables: a calibrated step
        t, labels = torch.tensor([step, step]), torch.tensor([0, 1])
        with torch.no_grad():
            assert torch.equal(bundle.predict_noise(loaded, x, t, labels), bundle.predict_noise(qmodel, x, t, labels))

    def test_kill_and_resume_equals_the_uninterrupted_run(self, name, bundle, uninterrupted, tmp_path, monkeypatch):
        class Killed(Exception):
            pass

        saves = []

        def killing(original):
            def save_then_maybe_stop(self, *args, **kwargs):
                original(self, *args, **kwargs)
                saves.append(type(self).__name__)
                if len(saves) == 2:
                    raise Killed

            return save_then_maybe_stop

        with monkeypatch.context() as patch:
            patch.setattr(ReconProgress, "save", killing(ReconProgress.save))
            patch.setattr(FinetuneCheckpoint, "save", killing(FinetuneCheckpoint.save))
            if name == "naive":  # nothing to checkpoint: a rerun is the same
                run(bundle, name, work_dir=tmp_path)
                assert saves == []
            else:
                with pytest.raises(Killed):
                    run(bundle, name, work_dir=tmp_path)
        resumed = run(bundle, name, work_dir=tmp_path)
        assert same_state(resumed, uninterrupted(name))
