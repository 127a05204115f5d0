"""Model registry: named assets, local diffusers folders, errors that never reach for the hub."""
from __future__ import annotations

import json

import pytest
import torch

from diffquant.errors import DiffquantError
from diffquant.paths import assets_dir
from diffquant.bundle import CALL_DIFFUSERS, CALL_DIFFUSERS_CONDITION, DiffusionBundle, linear_ddpm_config
from diffquant.zoo.registry import load_model


def tiny_unet(num_class_embeds=None):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4, num_class_embeds=num_class_embeds,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def test_unet_folder_roundtrip(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    bundle = load_model(str(tmp_path / "unet"))
    assert bundle.sample_shape == (1, 8, 8)
    assert bundle.num_classes is None and bundle.call_convention == CALL_DIFFUSERS
    assert bundle.scheduler_config == linear_ddpm_config(clip_sample=True)
    args, kwargs = bundle.example_inputs(batch=3)
    with torch.no_grad():
        got = bundle.predict_noise(bundle.unet, *args, **kwargs)
        want = unet(*args).sample
    torch.testing.assert_close(got, want)


def test_class_conditional_folder_uses_last_id_as_null(tmp_path):
    tiny_unet(num_class_embeds=11).save_pretrained(tmp_path)
    bundle = load_model(tmp_path)
    assert bundle.num_classes == 10 and bundle.null_class == 10
    (x, t), kwargs = bundle.example_inputs(batch=4)
    assert kwargs["class_labels"].tolist() == [0, 1, 2, 3]
    with torch.no_grad():
        cond = bundle.predict_noise(bundle.unet, x, t, torch.tensor([3, 3, 3, 3]))
        null = bundle.predict_noise(bundle.unet, x, t, None)  # unconditional call → null class
        explicit_null = bundle.unet(x, t, class_labels=torch.full((4,), 10)).sample
    torch.testing.assert_close(null, explicit_null)
    assert not torch.allclose(cond, null)


def test_pipeline_folder_reads_scheduler_config(tmp_path):
    from diffusers import DDPMScheduler

    tiny_unet().save_pretrained(tmp_path / "unet")
    DDPMScheduler(num_train_timesteps=500, beta_end=0.03, clip_sample=False).save_pretrained(tmp_path / "scheduler")
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}))
    bundle = load_model(tmp_path)
    assert bundle.scheduler_config["num_train_timesteps"] == 500
    assert bundle.scheduler_config["beta_end"] == 0.03
    assert bundle.scheduler_config["clip_sample"] is False
    assert bundle.example_inputs()[0][1].tolist() == [250, 250]


def test_condition_unet_gets_zero_context(tmp_path):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                         layers_per_block=1, norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).save_pretrained(tmp_path)
    bundle = load_model(tmp_path)
    assert bundle.call_convention == CALL_DIFFUSERS_CONDITION
    args, kwargs = bundle.example_inputs(batch=2)
    assert kwargs["encoder_hidden_states"].shape == (2, 77, 12)
    with torch.no_grad():
        eps = bundle.predict_noise(bundle.unet, *args)
    assert eps.shape == (2, 1, 8, 8)


def test_a_user_folder_carries_no_model_card_facts_it_does_not_have(tmp_path):
    """A local folder names no training data set or classifier: FID and class accuracy then need
    the user's reference, never a guess from the model's name."""
    folder = tmp_path / "fmnist-unet"  # the bundled model's name, but not the bundled model
    tiny_unet().save_pretrained(folder)
    bundle = load_model(folder)
    assert bundle.reference_dataset is None and bundle.classifier_dir is None


def test_with_unet_swaps_only_the_denoiser(tmp_path):
    tiny_unet().save_pretrained(tmp_path)
    bundle = load_model(tmp_path)
    other = torch.nn.Identity()
    swapped = bundle.with_unet(other)
    assert swapped.unet is other and bundle.unet is not other
    assert swapped.scheduler_config == bundle.scheduler_config and swapped.name == bundle.name


def test_positional_convention_and_output_unwrapping():
    class Plain(torch.nn.Module):
        def forward(self, x, t):
            return (x * t[:, None, None, None].float(),)

    bundle = DiffusionBundle("plain", Plain(), linear_ddpm_config(), (1, 4, 4))
    (x, t), kwargs = bundle.example_inputs(batch=2)
    assert kwargs == {} and t.tolist() == [500, 500]
    torch.testing.assert_close(bundle.predict_noise(bundle.unet, x, t, torch.tensor([1, 2])), x * 500)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DiffquantError, match="not found"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(DiffquantError, match="unknown model 'no-such-model'"):
        load_model("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffquantError, match="config.json"):
        load_model(tmp_path / "empty")


def test_folder_without_weights_is_a_clear_error(tmp_path):
    tiny_unet().save_pretrained(tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(DiffquantError, match="cannot load UNet2DModel"):
        load_model(tmp_path)


def test_missing_assets_name_the_file_and_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "assets"
    empty.mkdir()
    with pytest.raises(DiffquantError) as err:
        load_model("mnist-resunet", assets=empty)
    msg = str(err.value)
    assert "models/mnist-resunet/ddpm_mnist.pth" in msg and "DIFFQUANT_ASSETS" in msg
    assert "\n" not in msg


def test_bundled_default_missing_or_loadable():
    from diffquant.paths import BUNDLED_DIR

    folder = BUNDLED_DIR / "fmnist-unet"
    if (folder / "config.json").is_file() or (folder / "model_index.json").is_file():
        bundle = load_model("default")
        assert bundle.name == "fmnist-unet"
        # its model card: trained on Fashion-MNIST, with the shipped classifier of that data
        assert bundle.reference_dataset == "fashion-mnist"
        classifier = BUNDLED_DIR / "fmnist-classifier"
        assert bundle.classifier_dir == (str(classifier) if classifier.is_dir() else None)
    else:
        with pytest.raises(DiffquantError, match="bundled default model is missing"):
            load_model("default")


@pytest.mark.skipif(assets_dir() is None, reason="assets absent")
@pytest.mark.parametrize("name", ["mnist-resunet", "mnist-convunet"])
def test_named_assets_load(name):
    if not (assets_dir() / "models" / name).is_dir():
        pytest.skip(f"{name} absent")
    bundle = load_model(name)
    assert bundle.name == name and bundle.sample_shape == (1, 28, 28) and bundle.num_classes is None
    assert bundle.reference_dataset == "mnist" and bundle.classifier_dir is None
    args, kwargs = bundle.example_inputs(batch=2)
    with torch.no_grad():
        assert bundle.predict_noise(bundle.unet, *args, **kwargs).shape == (2, 1, 28, 28)
