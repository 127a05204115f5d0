"""The two pretrained MNIST denoisers: strict loading, call conventions, golden sampling statistics."""
from __future__ import annotations

import pytest
import torch

from diffquant.paths import assets_dir
from diffquant.zoo.mnist_convunet import MnistConvUNet, load_mnist_convunet
from diffquant.zoo.mnist_resunet import MnistResUNet, ResBlock, load_mnist_resunet, sinusoidal_table

ASSETS = assets_dir()
RESUNET = ASSETS / "models/mnist-resunet/ddpm_mnist.pth" if ASSETS else None
CONVUNET = ASSETS / "models/mnist-convunet/ddpm_mnist.pt" if ASSETS else None
needs_resunet = pytest.mark.skipif(RESUNET is None or not RESUNET.is_file(), reason="mnist-resunet asset absent")
needs_convunet = pytest.mark.skipif(CONVUNET is None or not CONVUNET.is_file(), reason="mnist-convunet asset absent")


def _key_list(path):
    rows = [line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {name: tuple(int(d) for d in shape.strip("()").split(",") if d.strip()) for name, shape, _ in rows}


def test_resunet_matches_key_list_without_weights():
    """Parameter names and shapes equal the published key list (also checks without the .pth)."""
    if ASSETS is None or not (ASSETS / "models/mnist-resunet/state_dict_keys.txt").is_file():
        pytest.skip("key list absent")
    expected = _key_list(ASSETS / "models/mnist-resunet/state_dict_keys.txt")
    got = {k: tuple(v.shape) for k, v in MnistResUNet().state_dict().items()}
    assert got == expected


def test_convunet_matches_key_list_without_weights():
    if ASSETS is None or not (ASSETS / "models/mnist-convunet/state_dict_keys.txt").is_file():
        pytest.skip("key list absent")
    expected = {k.removeprefix("network."): v
                for k, v in _key_list(ASSETS / "models/mnist-convunet/state_dict_keys.txt").items()}
    got = {k: tuple(v.shape) for k, v in MnistConvUNet().state_dict().items()}
    assert got == expected


@needs_resunet
def test_resunet_strict_load_and_time_table():
    model = load_mnist_resunet(RESUNET)
    assert sum(p.numel() for p in model.parameters()) == 847_291
    # the stored frozen table is the interleaved sinusoid our module builds
    torch.testing.assert_close(model.position_embedding.embedding.weight, sinusoidal_table(1000, 128))
    blocks = [name for name, m in model.named_modules() if isinstance(m, ResBlock)]
    assert len(blocks) == 6 + 2 + 6
    assert set(model.concat_splits()) <= set(blocks)


@needs_convunet
def test_convunet_strict_load():
    model = load_mnist_convunet(CONVUNET)
    assert sum(p.numel() for p in model.parameters()) == 606_852
    assert not model.b_out[2].normalize and model.b_out[1].normalize


@needs_resunet
@needs_convunet
@pytest.mark.parametrize("loader,path", [(load_mnist_resunet, "RESUNET"), (load_mnist_convunet, "CONVUNET")])
def test_timestep_shapes_agree(loader, path):
    model = loader(globals()[path])
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x, torch.tensor([7, 7, 7]))
        for t in (torch.tensor([[7], [7], [7]]), torch.tensor(7), 7):
            torch.testing.assert_close(model(x, t), ref)
        assert ref.shape == x.shape
        # a different t changes the prediction
        assert not torch.allclose(model(x, torch.tensor([500, 500, 500])), ref)


@needs_resunet
def test_resunet_predicts_noise_on_real_digits():
    """A correctly wired model predicts the added noise far better than chance (MSE 1)."""
    from diffquant.data import read_idx

    data = ASSETS / "datasets/mnist/t10k-images-idx3-ubyte.gz"
    if not data.is_file():
        pytest.skip("MNIST test set absent")
    x0 = torch.from_numpy(read_idx(data)[:32]).float()[:, None] / 127.5 - 1
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    model = load_mnist_resunet(RESUNET)
    t = 300
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    xt = alpha_bar[t].sqrt() * x0 + (1 - alpha_bar[t]).sqrt() * eps
    with torch.no_grad():
        mse = ((model(xt, t) - eps) ** 2).mean().item()
    assert mse < 0.15


@needs_resunet
def test_resunet_golden_ddim_statistics():
    """Golden values measured once (CPU, torch 2.13, diffusers 0.42.1) with exactly this call:
    sample(load_model("mnist-resunet"), 8, seed=0, scheduler="ddim", steps=50, eta=0.0);
    identical for batch sizes 8 and 3 and for 1 or 2 threads.
    """
    from diffquant.diffusion.sampling import sample
    from diffquant.zoo.registry import load_model

    bundle = load_model("mnist-resunet")
    s = sample(bundle, 8, seed=0, scheduler="ddim", steps=50, eta=0.0, batch_size=8, progress=False).samples
    measured = [s.mean().item(), s.std().item(), s.min().item(), s.max().item()]
    golden = [-0.724248, 0.608516, -1.063524, 1.191219]
    assert measured == pytest.approx(golden, abs=1e-3)
