"""TDAC (docs/methods.md §4.1): scores, counts with the official fix-up, assignment, capture integration."""
from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from diffquant.calib import tdac as tdac_mod
from diffquant.calib.capture import capture_trajectories
from diffquant.calib.tdac import (
    allocate_counts,
    assign_steps,
    default_feature_layer,
    density,
    diversity,
    feature_hooks,
    gram_matrices,
    pairwise_mse,
    plot_counts,
    select_tdac,
    step_features,
    tdac,
    uniform_allocation,
)
from diffquant.errors import ConfigError
from diffquant.bundle import CALL_DIFFUSERS, DiffusionBundle, linear_ddpm_config


def loop_reference(features: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official double loop: mse, density and diversity per step ([K, B, C, ...] features)."""
    k = features.shape[0]
    mse = torch.zeros(k, k, dtype=torch.float64)
    dens = torch.zeros(k, dtype=torch.long)
    div = torch.zeros(k, dtype=torch.float64)
    for i in range(k):
        for j in range(k):
            if i == j:
                continue
            fi, fj = features[i].double(), features[j].double()
            mse[i, j] = torch.mean((fi - fj) ** 2)
            dens[i] += int(mse[i, j] <= radius)
            div[i] += torch.sum(1 - F.cosine_similarity(fi, fj, dim=1, eps=1e-6))
    return mse, dens, div


def test_vectorised_distances_equal_the_loop_reference(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(7, 3, 5, 4, 4, generator=gen)
    features[2] = features[5] + 0.01 * torch.randn(3, 5, 4, 4, generator=gen)  # a close pair
    features[0, :, :, 0, 0] = 0.0  # zero vectors along channels: the cosine eps matters
    radius = 1.0
    mse, dens, div = loop_reference(features, radius)
    got = pairwise_mse(features)
    off = ~torch.eye(7, dtype=torch.bool)
    assert torch.allclose(got[off], mse[off], rtol=1e-10, atol=1e-12)
    gram, cos, positions, _ = gram_matrices(features)
    assert torch.equal(density(got, radius), dens)
    assert torch.allclose(diversity(cos, positions), div, rtol=1e-9)
    assert 0 < int(dens.sum()) < 7 * 6  # the radius separates some pairs and not others
    # chunking over positions changes nothing
    monkeypatch.setattr(tdac_mod, "CHUNK_ELEMENTS", 7 * 5 * 3)
    gram2, cos2, _, _ = gram_matrices(features)
    assert torch.allclose(gram2, gram) and torch.allclose(cos2, cos)


def test_token_features_use_the_last_axis_as_channels():
    features = torch.randn(4, 2, 6, 3, generator=torch.Generator().manual_seed(1))  # [K, B, L, C]
    _, _, div = loop_reference(features.transpose(2, 3), radius=0.0)  # channels on axis 1 per step
    _, cos, positions, _ = gram_matrices(features)
    assert positions == 2 * 6
    assert torch.allclose(diversity(cos, positions), div, rtol=1e-9)


def test_identical_steps_dominate_through_density():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(2, 4, 3, 3, generator=gen)
    far = [10 * torch.randn(2, 4, 3, 3, generator=gen) for _ in range(2)]
    features = torch.stack([base, base, base, base, *far])  # steps 0-3 identical, 4-5 far apart
    result = tdac(features, 8, lam=0.0, radius=0.5)
    assert result.density.tolist() == [3, 3, 3, 3, 0, 0]
    assert result.counts.tolist() == [2, 2, 2, 2, 0, 0]
    # identical steps add no diversity to each other
    assert (result.diversity[:4] < result.diversity[4:].min()).all()


def test_orthogonal_features_dominate_through_diversity():
    e = torch.eye(4)
    # steps 0-2: scaled copies of e0 (cos = 1, far apart in MSE); steps 3-4 orthogonal to all
    vectors = [e[0], 10 * e[0], 100 * e[0], e[1], e[2]]
    features = torch.stack([v.reshape(1, 4, 1, 1).expand(2, 4, 2, 2) for v in vectors])
    with pytest.warns(UserWarning, match="diversity only"):
        result = tdac(features, 10, lam=1.2, radius=1e-3)
    assert result.density.tolist() == [0, 0, 0, 0, 0]
    positions = 2 * 2 * 2
    assert result.diversity.tolist() == pytest.approx([2 * positions] * 3 + [4 * positions] * 2)
    assert result.counts.tolist() == [0, 0, 0, 5, 5]


def test_a_radius_outside_the_distances_warns_with_their_range():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]).reshape(3, 1, 2, 1, 1)  # MSE 0.5, 1, 2.5
    with pytest.warns(UserWarning, match=r"r=3 \(pairwise feature MSE 0.5\.\.2.5, median 1\)"):
        result = tdac(features, 6, lam=1.2, radius=3.0)
    assert result.density.tolist() == [2, 2, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tdac(features, 6, lam=1.2, radius=1.0).density.tolist() == [2, 1, 1]


def test_hand_computed_small_case():
    # F0 = (1, 0), F1 = (0, 1), F2 = (2, 0): one position, two channels
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]).reshape(3, 1, 2, 1, 1)
    # MSE: d01 = 1, d02 = 0.5, d12 = 2.5; r = 1 → D = [2, 1, 1] → D̂ = [1, 0, 0]
    # cos: c01 = 0, c02 = 1, c12 = 0 → V = [1, 2, 1] → V̂ = [0, 1, 0]; λ = 1 → w = [1, 1, 0]
    # N = 5: round(2.5) = 2 (half to even) twice → total 4, short by 1 → +1 to the largest,
    # ties to the lowest k → [3, 2, 0]
    result = tdac(features, 5, lam=1.0, radius=1.0, seed=3)
    assert pairwise_mse(features)[0].tolist() == pytest.approx([0.0, 1.0, 0.5])
    assert result.density.tolist() == [2, 1, 1]
    assert result.diversity.tolist() == pytest.approx([1.0, 2.0, 1.0])
    assert result.weights.tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert result.counts.tolist() == [3, 2, 0]
    assert sorted(result.slots.tolist()) == [0, 0, 0, 1, 1]
    assert torch.equal(result.slots, assign_steps(torch.tensor([3, 2, 0]), seed=3))


def test_fix_up_rule():
    # short: each of the largest counts gets one more, ties to the lowest k
    assert allocate_counts(torch.tensor([1.0, 1.0, 1.0]), 4).tolist() == [2, 1, 1]
    # 5·[1/6, 2/6, 2/6, 1/6] = [0.83, 1.67, 1.67, 0.83] → [1, 2, 2, 1] = 6: over by 1 → the last step
    assert allocate_counts(torch.tensor([1.0, 2.0, 2.0, 1.0]), 5).tolist() == [1, 2, 2, 0]
    # over: taken from the last steps backwards, skipping empty ones
    assert allocate_counts(torch.tensor([1.0, 1.0, 1.0]), 2).tolist() == [1, 1, 0]
    assert allocate_counts(torch.tensor([1.0, 1.0, 1.0, 0.0]), 2).tolist() == [1, 1, 0, 0]
    # all-zero weights: uniform
    assert allocate_counts(torch.zeros(4), 8).tolist() == [2, 2, 2, 2]
    with pytest.raises(ConfigError):
        allocate_counts(torch.tensor([1.0, -1.0]), 3)


def test_counts_always_sum_to_n():
    gen = torch.Generator().manual_seed(4)
    for trial in range(200):
        k = int(torch.randint(2, 40, (1,), generator=gen))
        n = int(torch.randint(1, 300, (1,), generator=gen))
        w = torch.rand(k, generator=gen) * (torch.rand(k, generator=gen) > 0.3)
        counts = allocate_counts(w, n)
        assert int(counts.sum()) == n and bool((counts >= 0).all()), (trial, w, n)


def test_uniform_allocation_and_assignment():
    result = uniform_allocation(4, 10, seed=0)
    assert result.counts.tolist() == [3, 3, 2, 2]  # 2.5 → 2 each, short by 2 → k = 0, 1
    slots = result.slots
    assert torch.bincount(slots, minlength=4).tolist() == [3, 3, 2, 2]
    assert not torch.equal(slots, slots.sort().values)  # shuffled
    assert torch.equal(uniform_allocation(4, 10, seed=0).slots, slots)  # seeded
    assert not torch.equal(uniform_allocation(4, 10, seed=1).slots, slots)


def test_plot_is_written_and_skipped_without_matplotlib(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    assert plot_counts(torch.tensor([1, 3, 2]), tmp_path / "a.png").stat().st_size > 0
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    assert plot_counts(torch.tensor([1, 3, 2]), tmp_path / "b.png") is None
    assert not (tmp_path / "b.png").exists()


# ------------------------------------------------------------------------------ with a capture
@pytest.fixture(scope="module")
def bundle(make_unet):
    return DiffusionBundle("tiny", make_unet(), linear_ddpm_config(), (3, 8, 8), num_classes=2, null_class=2,
                           call_convention=CALL_DIFFUSERS)


def test_default_feature_layers(bundle):
    from diffquant.zoo.mnist_resunet import MnistResUNet

    # found from the traced graph: the official code's hook points, whatever the modules are called
    assert default_feature_layer(bundle.unet) == "mid_block.attentions.0"
    zoo_inputs = ((torch.randn(2, 1, 28, 28), torch.tensor([5, 5])), {})
    assert default_feature_layer(MnistResUNet().eval(), zoo_inputs) == "mid.res_block2"
    with pytest.raises(ConfigError, match="no TDAC feature layer"):
        default_feature_layer(torch.nn.Linear(2, 2), ((torch.randn(1, 2),), {}))
    with pytest.raises(ConfigError, match="not a module"):
        feature_hooks(bundle.unet, "nope")


def test_select_tdac_on_a_cfg_capture(bundle, tmp_path):
    hooks = feature_hooks(bundle.unet)
    cache = capture_trajectories(bundle, 6, steps=5, guidance=2.0, batch_size=3, progress=False,
                                 cache_dir=tmp_path, feature_hooks=hooks)
    feats = step_features(cache, "mid_block.attentions.0", batch=4)
    assert feats.shape == (5, 8, 16, 4, 4)  # [K, 2B (cond + uncond), C, h, w]
    assert torch.equal(feats[2, :4], cache.features("mid_block.attentions.0", 2, range(4)))
    assert torch.equal(feats[2, 4:], cache.features("mid_block.attentions.0@uncond", 2, range(4)))

    calib, result = select_tdac(cache, 6, batch=4, lam=1.2, radius=0.05, seed=0)
    assert int(result.counts.sum()) == 6 and result.settings["layer"] == "mid_block.attentions.0"
    assert calib.sample_ids.tolist() == list(range(6))  # one sample per trajectory
    assert torch.equal(calib.steps, result.slots)
    for j in range(6):
        k = int(result.slots[j])
        assert torch.equal(calib.xs[j], cache.xs(k, [j])[0])
        assert int(calib.ts[j]) == int(cache.timesteps[k])
    out = result.save(tmp_path / "report")
    assert (out / "tdac.json").is_file()

    off, uniform = select_tdac(cache, 6, enabled=False)
    assert uniform.counts.tolist() == [2, 1, 1, 1, 1] and len(off) == 6
    with pytest.raises(ConfigError, match="between 1 and"):
        select_tdac(cache, 7)
    plain = capture_trajectories(bundle, 2, steps=3, guidance=2.0, progress=False, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="feature"):
        select_tdac(plain, 2)
