"""The one resumable-checkpoint format shared by reconstruction and fine-tuning."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from diffquant.config import QuantConfig
from diffquant.errors import CheckpointError
from diffquant.model import quantize
from diffquant.model.resume import STATE_FILE, ResumeCheckpoint


def _qmodel(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))
    return quantize(net, QuantConfig(weight_bits=4, quantize_acts=False), example_inputs=((torch.randn(1, 3, 8, 8),), {}))


def _quant_state(qmodel):
    return {k: v.clone() for k, v in qmodel.quant_state_dict().items()}


def test_round_trip_of_model_body_tensors_and_rng(tmp_path):
    saved = _qmodel()
    for q in saved.quantizers().values():
        q.step.data.mul_(1.5)
    store = ResumeCheckpoint(tmp_path / "ck", "finetune", "fp-1")
    assert store.read() is None
    torch.manual_seed(3)
    moments = {"0.0.exp_avg": torch.randn(4)}
    store.write(saved, {"epoch": 2, "history": [{"loss": 0.5}]}, moments)
    expected_next = torch.rand(2)

    other = _qmodel()
    assert any(not torch.equal(v, _quant_state(saved)[k]) for k, v in _quant_state(other).items())
    again = ResumeCheckpoint(tmp_path / "ck", "finetune", "fp-1")
    body = again.read({"epoch": int, "history": list})
    assert body == {"epoch": 2, "history": [{"loss": 0.5}]}
    torch.manual_seed(99)
    again.restore_model(other)
    assert torch.equal(torch.rand(2), expected_next)  # the global RNG continues where it was saved
    assert all(torch.equal(v, _quant_state(saved)[k]) for k, v in _quant_state(other).items())
    assert torch.equal(again.tensors()["0.0.exp_avg"], moments["0.0.exp_avg"])


def test_other_settings_another_kind_and_damaged_fields_are_refused_in_one_line(tmp_path):
    qmodel = _qmodel()
    ResumeCheckpoint(tmp_path / "ck", "reconstruction", "fp-a").write(qmodel, {"pass": "weights", "last_unit": 0})
    with pytest.raises(CheckpointError, match="other settings"):
        ResumeCheckpoint(tmp_path / "ck", "reconstruction", "fp-b").read()
    with pytest.raises(CheckpointError, match="not 'finetune'"):
        ResumeCheckpoint(tmp_path / "ck", "finetune", "fp-a").read()
    with pytest.raises(CheckpointError, match="'last_unit'"):
        ResumeCheckpoint(tmp_path / "ck", "reconstruction", "fp-a").read({"last_unit": str})
    file = tmp_path / "ck" / STATE_FILE
    state = json.loads(file.read_text())
    file.write_text(json.dumps({**state, "format_version": 1}))
    with pytest.raises(CheckpointError, match="not a diffquant progress file"):
        ResumeCheckpoint(tmp_path / "ck", "reconstruction", "fp-a").read()
    file.write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        ResumeCheckpoint(tmp_path / "ck", "reconstruction", "fp-a").read()


def test_reconstruction_and_finetuning_write_the_same_format(tmp_path):
    from diffquant.finetune import FinetuneCheckpoint
    from diffquant.recon import ReconProgress

    qmodel = _qmodel()
    ReconProgress(tmp_path, ["weights"], "fp").save(qmodel, "weights", 0, ["0"], [])
    FinetuneCheckpoint(tmp_path, "fp").save(qmodel, 1, [])
    recon = json.loads((tmp_path / "progress" / STATE_FILE).read_text())
    tune = json.loads((tmp_path / "finetune" / STATE_FILE).read_text())
    assert recon["format"] == tune["format"] and recon["format_version"] == tune["format_version"]
    assert (recon["kind"], tune["kind"]) == ("reconstruction", "finetune")
    assert sorted(p.name for p in (tmp_path / "progress").iterdir()) == ["model", STATE_FILE]
    assert (tmp_path / "finetune" / "model").is_dir()
