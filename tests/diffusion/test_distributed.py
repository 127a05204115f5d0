"""Sharded sampling and capture over 2 gloo processes equal a single-process run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffquant.diffusion.distributed import DistInfo, dist_info, gather_numpy, shard_indices

N, STEPS, BATCH = 5, 3, 2


def tiny_bundle():
    from diffusers import UNet2DModel

    from diffquant.bundle import CALL_DIFFUSERS, DiffusionBundle, linear_ddpm_config

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4, num_class_embeds=11,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    return DiffusionBundle("tiny", unet, linear_ddpm_config(), (1, 8, 8), num_classes=10, null_class=10,
                           call_convention=CALL_DIFFUSERS)


def run_both(bundle, cache_dir):
    from diffquant.calib.capture import capture_trajectories
    from diffquant.diffusion.sampling import sample

    result = sample(bundle, N, steps=STEPS, eta=1.0, guidance=2.0, seed=3, batch_size=BATCH, progress=False)
    cache = capture_trajectories(bundle, N, steps=STEPS, eta=1.0, guidance=2.0, seed=3, batch_size=BATCH,
                                 cache_dir=cache_dir, progress=False,
                                 feature_hooks={"mid": bundle.unet.mid_block})
    return {
        "samples": result.samples, "images": torch.from_numpy(result.images),
        "labels": torch.from_numpy(result.labels), "indices": torch.from_numpy(result.indices),
        "xs": torch.stack([cache.xs(k) for k in range(STEPS)]),
        "mid": torch.stack([cache.features("mid", k) for k in range(STEPS)]),
        "ts": cache.timesteps, "cache_labels": cache.labels,
    }


def _worker(rank, world, tmp):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        assert dist_info() == DistInfo(rank, world, int(__import__("os").environ.get("LOCAL_RANK", rank)))
        out = run_both(tiny_bundle(), f"{tmp}/cache")
        if rank == 0:
            torch.save(out, f"{tmp}/dist.pt")
    finally:
        dist.destroy_process_group()


def test_shard_indices_cover_range_in_order():
    for n, world in [(5, 2), (7, 3), (2, 4), (0, 2)]:
        parts = [shard_indices(n, r, world) for r in range(world)]
        assert [i for p in parts for i in p] == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        shard_indices(4, 2, 2)


def test_single_process_helpers_are_identity():
    assert dist_info() == DistInfo(0, 1, 0)
    a = np.arange(6).reshape(3, 2)
    assert gather_numpy(a) is a


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    distributed = torch.load(tmp_path / "dist.pt", weights_only=True)
    torch.set_num_threads(1)
    single = run_both(tiny_bundle(), tmp_path / "single-cache")

    assert distributed["indices"].tolist() == list(range(N))
    assert distributed["labels"].tolist() == single["labels"].tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(distributed["samples"], single["samples"], atol=1e-4, rtol=0)
    assert (distributed["images"].int() - single["images"].int()).abs().max() <= 1
    torch.testing.assert_close(distributed["xs"], single["xs"], atol=1e-4, rtol=0)
    torch.testing.assert_close(distributed["mid"], single["mid"], atol=1e-4, rtol=0)
    assert distributed["ts"].tolist() == single["ts"].tolist()
    assert distributed["cache_labels"].tolist() == single["cache_labels"].tolist()
    # both runs wrote a cache with the same settings hash
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == \
        sorted(p.name for p in (tmp_path / "single-cache").iterdir())
