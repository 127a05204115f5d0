"""TRD (MPQ-DM §6.4): the relation KL, its windows and where its gradient goes."""
from __future__ import annotations

import math

import pytest
import torch

from diffquant.errors import ConfigError
from diffquant.finetune.trd import FeatureHook, TRDWindow, default_feature_module, relation_kl, trd_loss


def _features(seed: int, shape=(2, 4, 3, 3)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_identical_features_give_zero_loss():
    f = _features(0)
    assert trd_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-5)
    assert trd_loss(f, f.clone(), kind="l2_feature").item() == pytest.approx(0.0, abs=1e-10)
    assert trd_loss(f, _features(1)).item() > 1e-3
    with pytest.raises(ConfigError):
        trd_loss(f, f, kind="cosine")


def test_relation_kl_matches_a_hand_computation():
    f_q, f_fp = _features(2, (1, 3, 1, 2)), _features(3, (1, 3, 1, 2))
    tau = 0.7

    def probs(f):
        cols = [f[0, :, 0, j] / f[0, :, 0, j].norm() for j in range(2)]
        rows = []
        for a in cols:
            logits = [float(a @ b) / tau for b in cols]
            z = sum(math.exp(v) for v in logits)
            rows.append([math.exp(v) / z for v in logits])
        return rows

    p, q = probs(f_fp), probs(f_q)
    expected = sum(p[i][j] * math.log(p[i][j] / q[i][j]) for i in range(2) for j in range(2))
    assert relation_kl(f_q, f_fp, tau).item() == pytest.approx(expected, rel=1e-5)
    assert trd_loss(f_q, f_fp, tau=tau, weight=100.0).item() == pytest.approx(100 * expected, rel=1e-5)


def _window_run(grad: str):
    q0, q1 = _features(4).requires_grad_(), _features(5).requires_grad_()
    fp0, fp1 = _features(6), _features(7)
    window = TRDWindow(n=2, grad=grad)
    assert window.add(0, q0, fp0) is None  # first step of the pair: no loss yet
    loss = window.add(1, q1, fp1)
    return loss, q0, q1, (q0, q1, fp0, fp1)


def test_window_averages_the_pair_and_current_grad_reaches_only_this_step():
    loss, q0, q1, (a, b, c, d) = _window_run("current")
    expected = trd_loss((a.detach() + b.detach()) / 2, (c + d) / 2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert q1.grad is not None and q1.grad.abs().sum() > 0
    assert q0.grad is None  # the earlier step enters detached


def test_window_grad_reaches_both_steps():
    loss, q0, q1, _ = _window_run("window")
    loss.backward()
    assert q0.grad.abs().sum() > 0 and q1.grad.abs().sum() > 0


def test_grad_none_is_the_official_detached_loss():
    loss, _, _, _ = _window_run("none")
    assert loss.item() > 0 and not loss.requires_grad


def test_trailing_incomplete_window_and_bad_options():
    window = TRDWindow(n=3)
    f = _features(0)
    assert window.add(0, f, f) is None and window.add(1, f, f) is None
    assert window.add(2, f, f) is not None
    assert window.add(3, f, f) is None  # a new window starts at k = 3
    for kwargs in ({"n": 0}, {"grad": "both"}, {"kind": "x"}, {"tau": 0.0}):
        with pytest.raises(ConfigError):
            TRDWindow(**kwargs)


def test_default_feature_module_is_the_block_before_the_output_head(make_unet, unet_inputs):
    from diffquant.zoo.mnist_convunet import MnistConvUNet
    from diffquant.zoo.mnist_resunet import MnistResUNet

    unet = make_unet()
    assert default_feature_module(unet) == "up_blocks.1"  # found from the traced graph
    res, conv = MnistResUNet().eval(), MnistConvUNet().eval()
    zoo_inputs = ((torch.randn(2, 1, 28, 28), torch.tensor([5, 5])), {})
    assert default_feature_module(res, zoo_inputs) == "decoders.2.1"
    assert default_feature_module(conv, zoo_inputs) == "b_out"  # a network without residual additions
    from diffquant.model import quantize

    assert default_feature_module(quantize(res, example_inputs=zoo_inputs)) == "decoders.2.1"  # from the plan
    # the hooked output has exactly the channels conv_out consumes
    args, kwargs = unet_inputs(2)
    cases = [(unet, args, kwargs), (res, (torch.randn(2, 1, 28, 28), torch.tensor([5, 5])), {}),
             (conv, (torch.randn(2, 1, 28, 28), torch.tensor([5, 5])), {})]
    for model, a, kw in cases:
        hook = FeatureHook(model.get_submodule(default_feature_module(model, (a, kw))))
        with torch.no_grad():
            model(*a, **kw)
        feat = hook.pop()
        hook.remove()
        assert feat.shape[1] == model.conv_out.in_channels and feat.shape[0] == 2
    with pytest.raises(ConfigError):
        default_feature_module(torch.nn.Linear(2, 2), ((torch.randn(1, 2),), {}))
