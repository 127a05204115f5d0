"""Training code of the bundled models, on a tiny synthetic data set (seconds on a CPU)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffquant import data
from diffquant.zoo.classifier import FashionClassifier, load_classifier, save_classifier
from diffquant.zoo.train import (
    ClassifierTrainConfig, TrainConfig, UNetConfig, build_unet, count_parameters,
    export_diffusion, load_checkpoint, lr_at, train_classifier, train_diffusion,
)

TINY = UNetConfig(block_out_channels=(8, 16), layers_per_block=1, attn_levels=(1,),
                  norm_num_groups=4, attention_head_dim=8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fm")
    rng = np.random.default_rng(0)
    for split, n in (("train", 32), ("test", 16)):
        img_name, lbl_name = data.SPLIT_FILES[split]
        data.write_idx(root / img_name, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        data.write_idx(root / lbl_name, (np.arange(n) % 10).astype(np.uint8))
    return root


def _cfg(out, data_dir, **kw):
    base = dict(out_dir=str(out), model=TINY, data_dir=str(data_dir), steps=4, batch_size=8,
                warmup_steps=2, lr_schedule="cosine", log_every=0, progress=False,
                checkpoint_minutes=1e9, num_threads=1)
    base.update(kw)
    return TrainConfig(**base)


def test_unet_has_attention_and_class_embedding():
    model = build_unet(UNetConfig())
    kinds = [type(b).__name__ for b in model.down_blocks] + [type(b).__name__ for b in model.up_blocks]
    assert "AttnDownBlock2D" in kinds and "AttnUpBlock2D" in kinds
    assert model.config.num_class_embeds == 11 and model.config.sample_size == 28
    assert count_parameters(model) <= 2_400_000


def test_lr_schedule():
    cfg = TrainConfig(out_dir="x", steps=100, warmup_steps=10, lr=1.0, lr_schedule="cosine",
                      min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 100) == pytest.approx(0.1)


def test_resume_matches_uninterrupted_run(tmp_path, data_dir):
    full = train_diffusion(_cfg(tmp_path / "full", data_dir, export=False))
    # the same 4-step run killed right after its step-2 checkpoint, then resumed to the end
    _train_until(_cfg(tmp_path / "part", data_dir, export=False, checkpoint_every=1), 2)
    resumed = train_diffusion(_cfg(tmp_path / "part", data_dir, resume=True, export=False))
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(resumed / "checkpoint.pt")
    assert a["step"] == b["step"] == 4
    assert a["loss_avg"] == b["loss_avg"]
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=0, atol=0, msg=name)  # bit-identical


def _train_until(cfg: TrainConfig, stop: int) -> None:
    """Run ``cfg`` but kill it (exception) right after the checkpoint of step ``stop``."""
    import diffquant.zoo.train as train_mod

    real_save = train_mod._save_diffusion_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(path, cfg_, step, *args):
        real_save(path, cfg_, step, *args)
        if step == stop:
            raise Killed

    train_mod._save_diffusion_checkpoint = save_then_die
    try:
        with pytest.raises(Killed):
            train_diffusion(cfg)
    finally:
        train_mod._save_diffusion_checkpoint = real_save
    assert load_checkpoint(cfg.out_dir + "/checkpoint.pt")["step"] == stop


def test_existing_checkpoint_needs_resume(tmp_path, data_dir):
    from diffquant.errors import DiffquantError

    train_diffusion(_cfg(tmp_path / "r", data_dir, steps=1, export=False))
    with pytest.raises(DiffquantError, match="--resume"):
        train_diffusion(_cfg(tmp_path / "r", data_dir, steps=2))


def test_max_minutes_stops_and_exports(tmp_path, data_dir):
    from diffusers import DDPMScheduler, UNet2DModel

    out = train_diffusion(_cfg(tmp_path / "t", data_dir, max_minutes=0.0))
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 0
    export = out / "model"
    unet = UNet2DModel.from_pretrained(export / "unet")
    sched = DDPMScheduler.from_pretrained(export / "scheduler")
    assert sched.config.num_train_timesteps == 1000 and sched.config.beta_schedule == "linear"
    assert (export / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    meta = json.loads((export / "diffquant_model.json").read_text())
    assert meta["null_class"] == 10 and len(meta["classes"]) == 10
    x = torch.zeros(2, 1, 28, 28)
    out_eps = unet(x, torch.tensor([5, 999]), class_labels=torch.tensor([3, 10])).sample
    assert out_eps.shape == x.shape
    # export_diffusion can be re-run on the checkpoint alone
    assert export_diffusion(out, tmp_path / "again").is_dir()


def test_classifier_shapes_and_roundtrip(tmp_path):
    model = FashionClassifier().eval()
    assert 100_000 <= count_parameters(model) <= 300_000
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    logits = model(x)
    assert logits.shape == (3, 10)
    save_classifier(model, tmp_path / "c", extra={"test_accuracy": 0.5})
    back = load_classifier(tmp_path / "c")
    torch.testing.assert_close(back(x), logits)


def test_train_classifier_runs(tmp_path, data_dir):
    out, acc = train_classifier(ClassifierTrainConfig(
        out_dir=str(tmp_path / "clf"), channels=(4, 8, 8), data_dir=str(data_dir), epochs=1,
        batch_size=8, progress=False, num_threads=1))
    assert 0.0 <= acc <= 1.0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["test_accuracy"] == acc and cfg["channels"] == [4, 8, 8]
    assert load_classifier(out)(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_cli_parser_registers_train(tmp_path):
    import argparse

    from diffquant.zoo.train_cli import add_train_parser, main

    parser = argparse.ArgumentParser(prog="diffquant")
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "diffusion", "--out", str(tmp_path), "--steps", "7",
                              "--max-minutes", "1.5", "--channels", "8,16", "--attn-levels", "1",
                              "--resume"])
    assert args.handler is not None and args.steps == 7 and args.max_minutes == 1.5
    assert args.channels == (8, 16) and args.resume
    args = parser.parse_args(["train", "classifier", "--out", str(tmp_path), "--epochs", "1"])
    assert args.epochs == 1
    # a bad config is a one-line error with exit code 2, not a traceback
    assert main(["diffusion", "--out", str(tmp_path), "--channels", "10,16"]) == 2
