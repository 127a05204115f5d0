"""The model and classifier shipped inside the package."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffquant.paths import BUNDLED_DIR

MODEL_DIR = BUNDLED_DIR / "fmnist-unet"
CLASSIFIER_DIR = BUNDLED_DIR / "fmnist-classifier"


def test_shipped_files_are_small_diffusers_folders():
    assert (MODEL_DIR / "config.json").is_file() and (MODEL_DIR / "scheduler_config.json").is_file()
    weights = MODEL_DIR / "diffusion_pytorch_model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= 10 * 2**20
    assert (MODEL_DIR / "README.md").is_file()  # the model card
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["num_class_embeds"] == 11
    # guided DDIM saturates when x0 is clipped at every step (see zoo/train.py build_scheduler)
    assert json.loads((MODEL_DIR / "scheduler_config.json").read_text())["clip_sample"] is False
    assert any("Attn" in b for b in config["down_block_types"]) and any("Attn" in b for b in config["up_block_types"])


def test_default_model_loads_and_samples_the_requested_classes():
    from diffquant.diffusion.sampling import sample
    from diffquant.zoo.registry import load_model

    bundle = load_model("default")
    assert bundle.name == "fmnist-unet" and bundle.num_classes == 10 and bundle.null_class == 10
    result = sample(bundle, 4, steps=4, guidance=1.5, classes=[0, 1, 8, 9], progress=False)
    assert result.images.shape == (4, 28, 28, 1) and result.images.dtype == np.uint8
    assert result.labels.tolist() == [0, 1, 8, 9]
    assert result.images.std() > 10  # not a blank image


def test_classifier_scores_real_test_images_at_its_reported_accuracy():
    from diffquant.data import find_dataset, load_split
    from diffquant.errors import DiffquantError
    from diffquant.eval.classify import class_accuracy
    from diffquant.zoo.classifier import load_classifier

    try:
        find_dataset("fashion-mnist")
    except DiffquantError:
        pytest.skip("Fashion-MNIST not available")
    reported = json.loads((CLASSIFIER_DIR / "config.json").read_text())["test_accuracy"]
    assert reported >= 0.90
    images, labels = load_split("fashion-mnist", "test")
    torch.manual_seed(0)
    acc = class_accuracy(images[:5000], labels[:5000], load_classifier(CLASSIFIER_DIR))["accuracy"]
    assert abs(acc - reported) <= 0.01


def test_main_job_on_the_default_model_runs_end_to_end(tmp_path, monkeypatch, capsys):
    from diffquant import cli

    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    code = cli.main(["main", "--n", "4", "--steps", "4", "--no-fid", "--out", str(tmp_path / "main")])
    out = capsys.readouterr().out
    assert code == 0
    from diffquant.pipeline import MAIN_CHOICE

    results = json.loads((tmp_path / "main" / "results.json").read_text())
    rows = results["rows"]
    chosen = MAIN_CHOICE["recipe"]
    assert [(r["setting"], r["recipe"]) for r in rows] == [
        ("FP32", "-"), ("W8A8", "naive"), ("W8A8", chosen), ("W4A8", "naive"), ("W4A8", chosen)]
    assert all(0.0 <= r["class_acc"] <= 1.0 for r in rows)
    assert "class_acc" in out and "comparison.png" in out and f"recipe: {chosen}" in out
    assert "columns: the same seeds and classes" in out  # class names label the grid's columns
