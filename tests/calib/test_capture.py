"""Trajectory capture (one pass, K calls per batch), the disk cache and the selection policies."""
from __future__ import annotations

import json

import pytest
import torch

from diffquant.calib import select
from diffquant.calib.cache import TrajectoryCache
from diffquant.calib.capture import capture_module_io, capture_trajectories
from diffquant.diffusion.sampling import sample, scheduler_timesteps
from diffquant.errors import ConfigError, DiffquantError
from diffquant.bundle import CALL_DIFFUSERS, DiffusionBundle, linear_ddpm_config


def tiny_bundle(num_class_embeds=None) -> DiffusionBundle:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4, num_class_embeds=num_class_embeds,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    n = None if num_class_embeds is None else num_class_embeds - 1
    return DiffusionBundle("tiny", unet, linear_ddpm_config(), (1, 8, 8), num_classes=n, null_class=n,
                           call_convention=CALL_DIFFUSERS)


class Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.timesteps = []

    def forward(self, x, t, **kwargs):
        self.calls += 1
        self.timesteps.append(int(t[0]))
        return self.inner(x, t, **kwargs)


def reference_trajectories(bundle, n, steps, **kwargs):
    """x_t of every step from an independent sampling run, [K, n, ...]."""
    xs = []
    sample(bundle, n, steps=steps, batch_size=n, progress=False,
           step_callback=lambda k, t, x, c: xs.append(x.clone()), **kwargs)
    return torch.stack(xs)


def test_one_pass_records_every_step(tmp_path):
    bundle = tiny_bundle()
    counter = Counting(bundle.unet)
    cache = capture_trajectories(bundle.with_unet(counter), 5, steps=4, batch_size=2, cache_dir=tmp_path,
                                 progress=False)
    assert counter.calls == 4 * 3  # steps × batches, nothing re-sampled
    want_ts = scheduler_timesteps(bundle.scheduler_config, "ddim", 4)
    assert counter.timesteps == want_ts.tolist() * 3
    assert cache.num_steps == 4 and cache.num_samples == 5
    assert cache.timesteps.tolist() == want_ts.tolist()
    assert cache.labels is None
    ref = reference_trajectories(bundle, 5, 4)
    for k in range(4):
        # batch 2 vs batch 5 take different conv kernels: float32 rounding differs by ~1e-5 on some CPUs
        torch.testing.assert_close(cache.xs(k), ref[k], atol=1e-4, rtol=1e-4)


def test_cfg_capture_is_one_doubled_call_and_keeps_labels(tmp_path):
    bundle = tiny_bundle(num_class_embeds=11)
    counter = Counting(bundle.unet)
    hooked = {"mid": bundle.unet.mid_block}
    cache = capture_trajectories(bundle.with_unet(counter), 3, steps=3, guidance=2.0, classes=[4, 6],
                                 batch_size=3, cache_dir=tmp_path, feature_hooks=hooked, progress=False)
    assert counter.calls == 3
    assert cache.labels.tolist() == [4, 6, 4] and cache.null_class == 10
    assert cache.xs(0).shape == (3, 1, 8, 8)  # before CFG duplication
    assert sorted(cache.feature_names) == ["mid", "mid@uncond"]
    # the recorded feature is the mid block's input at that step
    step = 1
    records = capture_module_io(bundle.unet, hooked, lambda: bundle.unet(
        torch.cat([cache.xs(step)] * 2), cache.timesteps[step].repeat(6),
        class_labels=torch.tensor([4, 6, 4, 10, 10, 10])))
    inputs, _ = records["mid"]
    torch.testing.assert_close(cache.features("mid", step), inputs[0][:3], atol=1e-5, rtol=0)
    torch.testing.assert_close(cache.features("mid@uncond", step), inputs[0][3:], atol=1e-5, rtol=0)


def test_cache_reopens_and_is_reused(tmp_path):
    bundle = tiny_bundle()
    first = capture_trajectories(bundle, 3, steps=3, batch_size=3, cache_dir=tmp_path, progress=False)
    reopened = TrajectoryCache.open(first.path)
    torch.testing.assert_close(reopened.xs(2), first.xs(2))
    assert reopened.settings["steps"] == 3 and reopened.hash == first.hash

    counter = Counting(bundle.unet)
    again = capture_trajectories(bundle.with_unet(counter), 3, steps=3, batch_size=2, cache_dir=tmp_path,
                                 progress=False)
    assert counter.calls == 0 and again.path == first.path  # batch size does not change the data

    other = capture_trajectories(bundle.with_unet(counter), 3, steps=3, seed=1, batch_size=3,
                                 cache_dir=tmp_path, progress=False)
    assert counter.calls == 3 and other.path != first.path


def test_cache_with_more_features_is_reused_without_sampling(tmp_path):
    bundle = tiny_bundle()
    hooks = {"mid": bundle.unet.mid_block}
    with_features = capture_trajectories(bundle, 3, steps=3, batch_size=3, cache_dir=tmp_path,
                                         feature_hooks=hooks, progress=False)
    counter = Counting(bundle.unet)
    plain = capture_trajectories(bundle.with_unet(counter), 3, steps=3, batch_size=3, cache_dir=tmp_path,
                                 progress=False)
    assert counter.calls == 0 and plain.path == with_features.path
    torch.testing.assert_close(plain.xs(1), reference_trajectories(bundle, 3, 3)[1])
    # the reverse does not hold: a plain cache cannot serve a request for features
    capture_trajectories(bundle, 3, steps=3, seed=5, batch_size=3, cache_dir=tmp_path, progress=False)
    featured = capture_trajectories(bundle.with_unet(counter), 3, steps=3, seed=5, batch_size=3,
                                    cache_dir=tmp_path, feature_hooks=hooks, progress=False)
    assert counter.calls == 3 and featured.feature_names == ["mid"]
    # other settings (seed) never match a cache made with more features
    capture_trajectories(bundle.with_unet(counter), 3, steps=3, seed=6, batch_size=3, cache_dir=tmp_path,
                         progress=False)
    assert counter.calls == 6


def test_memory_bound_is_respected_by_flushing(tmp_path):
    bundle = tiny_bundle()
    step_bytes = 4 * 1 * 8 * 8 * 4  # batch 4, float32 x_t
    limit_mb = (2.5 * step_bytes) / 2**20
    cache = capture_trajectories(bundle, 4, steps=6, batch_size=4, cache_dir=tmp_path,
                                 memory_limit_mb=limit_mb, progress=False)
    assert cache.peak_buffer_bytes <= limit_mb * 2**20
    spans = [(s.step_start, s.step_end) for s in cache.shards]
    assert spans == [(0, 2), (2, 4), (4, 6)]
    ref = reference_trajectories(bundle, 4, 6)
    torch.testing.assert_close(cache.read("x", [5, 0, 3], [1, 3, 2]), ref[[5, 0, 3], [1, 3, 2]],
                               atol=1e-5, rtol=0)


def test_float16_storage(tmp_path):
    bundle = tiny_bundle()
    cache = capture_trajectories(bundle, 2, steps=2, cache_dir=tmp_path, dtype=torch.float16, progress=False)
    assert cache.xs(0).dtype == torch.float16
    index = json.loads((cache.path / "index.json").read_text())
    assert index["dtype"] == "float16"
    ref = reference_trajectories(bundle, 2, 2)
    torch.testing.assert_close(cache.xs(1).float(), ref[1], atol=2e-3, rtol=1e-3)


@pytest.fixture(scope="module")
def cache10(tmp_path_factory):
    torch.set_num_threads(1)
    return capture_trajectories(tiny_bundle(num_class_embeds=11), 6, steps=10, batch_size=6,
                                cache_dir=tmp_path_factory.mktemp("c10"), progress=False)


def test_uniform_selects_qdiffusion_steps(cache10):
    cs = select.uniform(cache10, n_per_step=2, n_steps=3)  # interval 10 // 3 = 3
    assert cs.steps.tolist() == [0, 0, 3, 3, 6, 6]
    assert cs.sample_ids.tolist() == [0, 1] * 3
    assert cs.ts.tolist() == cache10.timesteps[[0, 0, 3, 3, 6, 6]].tolist()
    assert cs.labels.tolist() == [0, 1] * 3
    torch.testing.assert_close(cs.xs[2:4], cache10.xs(3, [0, 1]))

    rnd = select.uniform(cache10, n_per_step=2, n_steps=3, pick="random", seed=3)
    assert rnd.steps.tolist() == [0, 0, 3, 3, 6, 6]
    assert rnd.sample_ids.tolist() != [0, 1] * 3
    assert rnd.sample_ids.tolist() == select.uniform(cache10, 2, 3, pick="random", seed=3).sample_ids.tolist()


def test_other_policies(cache10):
    last = select.last_step(cache10, 4)
    assert last.steps.tolist() == [9] * 4 and last.sample_ids.tolist() == [0, 1, 2, 3]
    assert last.ts.tolist() == [cache10.timesteps[9].item()] * 4

    rnd = select.random(cache10, 7, seed=5)
    pairs = list(zip(rnd.steps.tolist(), rnd.sample_ids.tolist()))
    assert len(set(pairs)) == 7
    assert pairs == list(zip(*[t.tolist() for t in (select.random(cache10, 7, seed=5).steps,
                                                    select.random(cache10, 7, seed=5).sample_ids)]))
    for (k, i), x in zip(pairs, rnd.xs):
        torch.testing.assert_close(x, cache10.xs(k, [i])[0])

    every = select.all_steps(cache10, n_per_step=2)
    assert len(every) == 20 and every.steps.tolist() == [k for k in range(10) for _ in range(2)]


def test_calibration_set_access(cache10):
    cs = select.all_steps(cache10)
    x, t, c = cs[[5, 0]]
    assert x.shape == (2, 1, 8, 8) and t.tolist() == [cs.ts[5].item(), cs.ts[0].item()]
    batches = list(cs.batches(16))
    assert [len(b[0]) for b in batches] == [16, 16, 16, 12]
    shuffled = torch.cat([b[1] for b in cs.batches(16, shuffle=True, seed=0)])
    assert sorted(shuffled.tolist()) == sorted(cs.ts.tolist()) and shuffled.tolist() != cs.ts.tolist()
    doubled = select.last_step(cache10, 2).with_uncond()
    assert doubled.labels.tolist() == [0, 1, 10, 10]


def test_selection_errors(cache10):
    with pytest.raises(ConfigError):
        select.uniform(cache10, n_per_step=7, n_steps=2)
    with pytest.raises(ConfigError):
        select.uniform(cache10, n_per_step=2, n_steps=11)
    with pytest.raises(ConfigError):
        select.uniform(cache10, 2, 2, pick="middle")
    with pytest.raises(DiffquantError):
        cache10.read("x", [10], [0])


def test_capture_module_io_records_and_stops_early():
    bundle = tiny_bundle()
    unet = bundle.unet
    args, kwargs = bundle.example_inputs(batch=2)
    calls = []
    handle = unet.conv_out.register_forward_hook(lambda m, i, o: calls.append("conv_out"))
    try:
        got = capture_module_io(unet, {"conv_in": unet.conv_in, "mid": unet.mid_block},
                                lambda: unet(*args, **kwargs), stop_after="mid")
    finally:
        handle.remove()
    assert calls == []  # aborted after the mid block
    inputs, output = got["conv_in"]
    torch.testing.assert_close(inputs[0], args[0])
    torch.testing.assert_close(output, unet.conv_in(args[0]))
    assert got["mid"].output.shape == (2, 16, 4, 4)
    assert not unet.conv_in._forward_hooks and not unet.mid_block._forward_hooks

    with pytest.raises(ValueError, match="not part of the model"):
        capture_module_io(unet, {"x": torch.nn.Conv2d(1, 1, 1)}, lambda: None)
