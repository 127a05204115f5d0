"""Sampling loops: determinism per sample index, every scheduler, CFG, outputs and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffquant.diffusion.grid import make_grid
from diffquant.diffusion.sampling import SCHEDULERS, sample, save_samples, scheduler_timesteps
from diffquant.errors import ConfigError, DiffquantError
from diffquant.bundle import CALL_DIFFUSERS, DiffusionBundle, linear_ddpm_config


def tiny_bundle(num_class_embeds=None, **config) -> DiffusionBundle:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4, num_class_embeds=num_class_embeds,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    n = None if num_class_embeds is None else num_class_embeds - 1
    return DiffusionBundle("tiny", unet, {**linear_ddpm_config(), **config}, (1, 8, 8),
                           num_classes=n, null_class=n, call_convention=CALL_DIFFUSERS)


class CallLog(torch.nn.Module):
    """Wraps a denoiser and records the batch size, timesteps and labels of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, x, t, **kwargs):
        self.calls.append((x.shape[0], t.clone(), kwargs.get("class_labels")))
        return self.inner(x, t, **kwargs)


@pytest.mark.parametrize("scheduler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_same_images_whatever_the_batch_size(scheduler, eta):
    bundle = tiny_bundle()
    one = sample(bundle, 3, scheduler=scheduler, eta=eta, steps=5, seed=7, batch_size=1, progress=False)
    three = sample(bundle, 3, scheduler=scheduler, eta=eta, steps=5, seed=7, batch_size=3, progress=False)
    torch.testing.assert_close(one.samples, three.samples, atol=1e-4, rtol=0)
    # sample 2 on its own (start_index) is the same image again
    alone = sample(bundle, 1, scheduler=scheduler, eta=eta, steps=5, seed=7, start_index=2, progress=False)
    torch.testing.assert_close(alone.samples[0], three.samples[2], atol=1e-4, rtol=0)
    assert alone.indices.tolist() == [2]
    other_seed = sample(bundle, 3, scheduler=scheduler, eta=eta, steps=5, seed=8, batch_size=3, progress=False)
    assert not torch.allclose(other_seed.samples, three.samples)


def test_stochastic_steps_draw_fresh_noise():
    bundle = tiny_bundle()
    deterministic = sample(bundle, 2, scheduler="ddim", eta=0.0, steps=5, progress=False)
    stochastic = sample(bundle, 2, scheduler="ddim", eta=1.0, steps=5, progress=False)
    assert not torch.allclose(deterministic.samples, stochastic.samples)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_each_scheduler_runs_with_expected_call_count(scheduler):
    bundle = tiny_bundle()
    log = CallLog(bundle.unet)
    result = sample(bundle.with_unet(log), 2, scheduler=scheduler, steps=4, progress=False)
    timesteps = scheduler_timesteps(bundle.scheduler_config, scheduler, 4)
    assert len(timesteps) == (5 if scheduler == "pndm" else 4)
    assert [int(t[0]) for _, t, _ in log.calls] == timesteps.tolist()
    assert result.images.shape == (2, 8, 8, 1) and result.images.dtype == np.uint8
    assert result.samples.shape == (2, 1, 8, 8) and torch.isfinite(result.samples).all()


def test_step_callback_sees_every_step_before_the_denoiser():
    bundle = tiny_bundle()
    log = CallLog(bundle.unet)
    seen = []

    def callback(k, t, x_t, labels):
        seen.append((k, t, x_t.shape[0], len(log.calls)))

    sample(bundle.with_unet(log), 3, steps=4, batch_size=2, step_callback=callback, progress=False)
    ts = scheduler_timesteps(bundle.scheduler_config, "ddim", 4).tolist()
    expected = [(k, ts[k], b, i * 4 + k) for i, b in enumerate([2, 1]) for k in range(4)]
    assert seen == expected


def test_classifier_free_guidance_doubles_one_call():
    bundle = tiny_bundle(num_class_embeds=11)
    log = CallLog(bundle.unet)
    guided = sample(bundle.with_unet(log), 3, steps=3, guidance=3.0, progress=False)
    assert len(log.calls) == 3  # one doubled call per step
    size, t, labels = log.calls[0]
    assert size == 6 and labels.tolist() == [0, 1, 2, 10, 10, 10] and t.tolist() == [t[0].item()] * 6
    assert guided.labels.tolist() == [0, 1, 2]

    log.calls.clear()
    cond_only = sample(bundle.with_unet(log), 3, steps=3, guidance=1.0, progress=False)
    assert log.calls[0][0] == 3 and log.calls[0][2].tolist() == [0, 1, 2]
    assert not torch.allclose(guided.samples, cond_only.samples)


def test_guidance_formula_matches_manual_combination():
    """One DDIM step from x_T: the guided ε equals ε_u + g(ε_c − ε_u) computed by hand."""
    bundle = tiny_bundle(num_class_embeds=11)
    captured = {}

    def grab(k, t, x_t, labels):
        captured.setdefault("x", x_t.clone())
        captured.setdefault("t", t)

    one_step = sample(bundle, 2, steps=1, guidance=2.5, step_callback=grab, progress=False)
    x, t = captured["x"], torch.tensor([captured["t"]] * 2)
    with torch.no_grad():
        eps_c = bundle.unet(x, t, class_labels=torch.tensor([0, 1])).sample
        eps_u = bundle.unet(x, t, class_labels=torch.tensor([10, 10])).sample
    eps = eps_u + 2.5 * (eps_c - eps_u)
    from diffquant.diffusion.sampling import build_scheduler

    sched = build_scheduler(bundle.scheduler_config, "ddim")
    sched.set_timesteps(1)
    want = sched.step(eps, sched.timesteps[0], x).prev_sample
    torch.testing.assert_close(one_step.samples, want, atol=1e-4, rtol=0)


def test_classes_cycle_over_global_indices():
    bundle = tiny_bundle(num_class_embeds=11)
    result = sample(bundle, 4, steps=1, classes=[5, 7], start_index=1, progress=False)
    assert result.labels.tolist() == [7, 5, 7, 5]
    default = sample(bundle, 3, steps=1, start_index=9, progress=False)
    assert default.labels.tolist() == [9, 0, 1]


def test_save_samples_writes_npz_and_grid(tmp_path):
    result = sample(tiny_bundle(num_class_embeds=11), 5, steps=2, progress=False)
    paths = save_samples(result, tmp_path / "out")
    data = np.load(paths["npz"])
    np.testing.assert_array_equal(data["images"], result.images)
    np.testing.assert_array_equal(data["labels"], [0, 1, 2, 3, 4])
    grid = np.asarray(Image.open(paths["grid"]))
    np.testing.assert_array_equal(grid, make_grid(result.images)[:, :, 0])
    assert grid.shape == (2 + 2 * 10, 2 + 3 * 10)  # 5 images, 3 per row, 2 px padding


def test_make_grid_places_images():
    images = np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3)
    grid = make_grid(images, nrow=2, padding=1, pad_value=9)
    assert grid.shape == (7, 7, 3)
    np.testing.assert_array_equal(grid[1:3, 1:3], images[0])
    np.testing.assert_array_equal(grid[4:6, 4:6], images[3])
    assert (grid[0] == 9).all()


def test_uint8_conversion_clamps_and_rounds():
    from diffquant.diffusion.sampling import to_uint8

    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 1, 5)
    assert to_uint8(x).reshape(-1).tolist() == [0, 0, 128, 255, 255]
    bad = torch.tensor([float("nan"), float("inf"), float("-inf")]).reshape(1, 1, 1, 3)
    assert to_uint8(bad).reshape(-1).tolist() == [0, 255, 0]


def test_diverged_samples_are_counted_and_warned():
    class Diverges(torch.nn.Module):
        """NaN noise prediction for the second sample of every batch."""

        def forward(self, x, t):
            out = torch.zeros_like(x)
            out[1:2] = float("nan")
            return out

    plain = DiffusionBundle("diverges", Diverges(), linear_ddpm_config(), (1, 8, 8))
    with pytest.warns(UserWarning, match="1 of 3 samples from diverges contain NaN"):
        result = sample(plain, 3, steps=2, batch_size=3, progress=False)
    assert result.settings["non_finite"] == 1
    assert (result.images[1] == 0).all()
    healthy = sample(tiny_bundle(), 2, steps=2, progress=False)
    assert healthy.settings["non_finite"] == 0


def test_bad_inputs_are_clear_errors():
    bundle = tiny_bundle()
    with pytest.raises(ConfigError, match="unknown scheduler 'euler'"):
        sample(bundle, 1, scheduler="euler", progress=False)
    with pytest.raises(ConfigError, match="unconditional"):
        sample(bundle, 1, guidance=2.0, progress=False)
    with pytest.raises(ConfigError, match="unconditional"):
        sample(bundle, 1, classes=[1], progress=False)
    with pytest.raises(ConfigError, match="eta"):
        sample(bundle, 1, scheduler="pndm", eta=0.5, progress=False)
    with pytest.raises(ConfigError, match="outside"):
        sample(tiny_bundle(num_class_embeds=11), 1, classes=[11], progress=False)


def test_wrong_image_shape_is_a_clear_error():
    bundle = tiny_bundle()
    bundle.sample_shape = (3, 8, 8)  # the UNet takes one channel
    with pytest.raises(DiffquantError, match=r"shape \(1, 3, 8, 8\)"):
        sample(bundle, 1, steps=2, progress=False)

    class Shrinks(torch.nn.Module):
        def forward(self, x, t):
            return x[:, :, :4, :4]

    plain = DiffusionBundle("shrinks", Shrinks(), linear_ddpm_config(), (1, 8, 8))
    with pytest.raises(DiffquantError, match="returned shape"):
        sample(plain, 1, steps=2, progress=False)
