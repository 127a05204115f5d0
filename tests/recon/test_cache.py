"""Per-unit caches: every argument of the unit call, x_in^q vs x_in^fp, y^fp, early abort, storage."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffquant.calib.select import CalibrationSet
from diffquant.config import QuantConfig
from diffquant.errors import DiffquantError
from diffquant.methods.stages import init_weight_quantizers
from diffquant.model import quantize
from diffquant.recon.cache import CacheOptions, CalibrationCalls, build_unit_cache

N = 10


def calib_set(n: int = N, shape=(3, 8, 8), classes: int | None = 3, seed: int = 0) -> CalibrationSet:
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, *shape, generator=gen)
    ts = torch.randint(0, 1000, (n,), generator=gen)
    labels = None if classes is None else torch.randint(0, classes, (n,), generator=gen)
    return CalibrationSet(xs, ts, labels, torch.zeros(n, dtype=torch.long), torch.arange(n))


def wrapped(float_model, unet_inputs, bits: int = 4):
    qmodel = quantize(float_model, QuantConfig(weight_bits=bits, act_bits=8), unet_inputs())
    init_weight_quantizers(qmodel)
    return qmodel


def float_io(model, name, data: CalibrationCalls):
    """The unit's (args, kwargs, output) per sample from ordinary full forwards, one sample each."""
    seen = []
    module = model.get_submodule(name)
    h1 = module.register_forward_hook(lambda m, a, k, o: seen.append((a, k, o)), with_kwargs=True)
    try:
        for i in range(len(data)):
            data.run(model, slice(i, i + 1))
    finally:
        h1.remove()
    return seen


def test_resnet_block_gets_hidden_and_temb_like_a_full_forward(make_unet, unet_inputs):
    float_model = make_unet()
    qmodel = wrapped(float_model, unet_inputs)
    data = CalibrationCalls(calib_set())
    name = "up_blocks.0.resnets.1"
    cache = build_unit_cache(qmodel, name, data, keep=("q", "fp"), options=CacheOptions(batch_size=4))
    reference = float_io(float_model, name, data)
    index = torch.tensor([7, 2, 5])
    args, kwargs = cache.inputs(index, "fp")
    assert len(args) == 2 and kwargs == {}  # ResnetBlock2D(hidden, temb)
    for j, i in enumerate(index.tolist()):
        ref_args, _, ref_out = reference[i]
        torch.testing.assert_close(args[0][j], ref_args[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(args[1][j], ref_args[1][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.target(index)[j], ref_out[0], atol=1e-5, rtol=1e-5)
    # y^fp is the FP unit applied to x_in^fp
    with torch.no_grad():
        torch.testing.assert_close(float_model.get_submodule(name)(*args), cache.target(index), atol=1e-5, rtol=1e-5)
    # the quantized prefix changes the inputs; the quantizers of the model are left as they were
    q_args, _ = cache.inputs(index, "q")
    assert not torch.allclose(q_args[0], args[0], atol=1e-4)
    assert all(layer.use_weight_quant and layer.use_act_quant for layer in qmodel.layers().values())


def test_attention_unit_keeps_its_keyword_arguments(make_unet, unet_inputs):
    qmodel = wrapped(make_unet(), unet_inputs)
    data = CalibrationCalls(calib_set())
    cache = build_unit_cache(qmodel, "mid_block.attentions.0", data, keep=("fp",))
    args, kwargs = cache.inputs(torch.tensor([0, 3]), "fp")
    assert args[0].shape == (2, 16, 4, 4)
    assert set(kwargs) == {"temb"} and kwargs["temb"].shape == (2, 32)
    qmodel.set_quant_state(False, False)
    with torch.no_grad():
        out = qmodel.model.get_submodule("mid_block.attentions.0")(*args, **kwargs)
    torch.testing.assert_close(out, cache.target(torch.tensor([0, 3])), atol=1e-5, rtol=1e-5)


def test_mnist_resunet_resblock_positional_temb():
    from diffquant.zoo.mnist_resunet import MnistResUNet

    torch.manual_seed(0)
    model = MnistResUNet().eval()
    x = torch.randn(2, 1, 28, 28)
    t = torch.tensor([10, 500])
    qmodel = quantize(model, QuantConfig(weight_bits=4, act_bits=8), ((x, t), {}))
    init_weight_quantizers(qmodel)
    names = [u.name for u in qmodel.plan.units if u.kind == "block"]
    assert "decoders.0.0.res_block" in names
    data = CalibrationCalls(calib_set(4, (1, 28, 28), classes=None), call=lambda m, x, t, c: m(x, t))
    cache = build_unit_cache(qmodel, "decoders.0.0.res_block", data, keep=("q",))
    args, kwargs = cache.inputs(torch.arange(4), "q")
    assert [tuple(a.shape) for a in args] == [(4, 80, 7, 7), (4, 40)] and kwargs == {}
    assert cache.target(torch.arange(4)).shape == (4, 40, 7, 7)


def test_the_forward_stops_right_after_the_unit(make_unet, unet_inputs):
    qmodel = wrapped(make_unet(), unet_inputs)
    calls = {"conv_out": 0, "unit_conv1": 0}

    def counter(key):
        return lambda *a: calls.__setitem__(key, calls[key] + 1)

    h1 = qmodel.model.conv_out.register_forward_pre_hook(counter("conv_out"))
    conv1 = qmodel.model.get_submodule("down_blocks.1.resnets.0.conv1")
    h2 = conv1.register_forward_pre_hook(counter("unit_conv1"))
    data = CalibrationCalls(calib_set())
    build_unit_cache(qmodel, "down_blocks.1.resnets.0", data, keep=("q",), options=CacheOptions(batch_size=5))
    # nothing after the unit ran; the unit itself ran only in the FP pass (for y^fp), 2 batches
    assert calls == {"conv_out": 0, "unit_conv1": 2}
    h1.remove(), h2.remove()


def test_inputs_are_equal_without_quantization_and_fp_model_matches(make_unet, unet_inputs):
    float_model = make_unet()
    qmodel = wrapped(float_model, unet_inputs)
    data = CalibrationCalls(calib_set())
    name = "up_blocks.1.resnets.0"
    a = build_unit_cache(qmodel, name, data, keep=("q", "fp"), q_state=(False, False))
    b = build_unit_cache(qmodel, name, data, keep=("fp",), fp_model=float_model)
    index = torch.arange(N)
    (qa, _), (fa, _), (fb, _) = a.inputs(index, "q"), a.inputs(index, "fp"), b.inputs(index, "fp")
    for x, y in zip(qa, fa):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    for x, y in zip(fa, fb):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.target(index), b.target(index), atol=1e-6, rtol=1e-6)


def test_fp16_and_disk_storage(make_unet, unet_inputs, tmp_path):
    qmodel = wrapped(make_unet(), unet_inputs)
    data = CalibrationCalls(calib_set())
    name = "down_blocks.0.resnets.0"
    mem = build_unit_cache(qmodel, name, data, options=CacheOptions(storage="memory"))
    half = build_unit_cache(qmodel, name, data, options=CacheOptions(storage="memory", dtype="float16"))
    disk = build_unit_cache(qmodel, name, data, options=CacheOptions(storage="disk", directory=str(tmp_path)))
    auto = build_unit_cache(qmodel, name, data, options=CacheOptions(memory_limit_mb=1e-3, directory=str(tmp_path)))
    assert not mem.on_disk and disk.on_disk and auto.on_disk
    assert half.nbytes * 2 == mem.nbytes
    index = torch.tensor([9, 0, 4, 4])
    (m_args, _), (h_args, _), (d_args, _) = (c.inputs(index, "q") for c in (mem, half, disk))
    for m, h, d in zip(m_args, h_args, d_args):
        assert h.dtype == torch.float32  # read back as the original dtype
        torch.testing.assert_close(d, m, rtol=0, atol=0)
        torch.testing.assert_close(h, m, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(disk.target(index), mem.target(index), rtol=0, atol=0)
    files = list(tmp_path.rglob("*.bin"))
    assert files
    # read back by positioned I/O: no cache file is mapped into the process (mapped pages would
    # count as resident memory and grow it by the whole cache)
    mapped = Path("/proc/self/maps")
    if mapped.is_file():
        maps = mapped.read_text()
        assert not any(str(f) in maps for f in files)
    disk.close()
    auto.close()
    assert not list(tmp_path.rglob("*.bin"))


def test_random_batches_are_distinct_and_seeded(make_unet, unet_inputs):
    qmodel = wrapped(make_unet(), unet_inputs)
    cache = build_unit_cache(qmodel, "conv_in", CalibrationCalls(calib_set()))
    batches = cache.random_batches(4, torch.Generator().manual_seed(3))
    first = [next(batches) for _ in range(5)]
    assert all(len(set(b.tolist())) == 4 for b in first)
    again = cache.random_batches(4, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, next(again)) for a in first)
    assert len(next(cache.random_batches(64, torch.Generator()))) == N  # at most the whole set


def test_a_unit_that_is_never_called_is_an_error(make_unet, unet_inputs):
    qmodel = wrapped(make_unet(), unet_inputs)
    data = CalibrationCalls(calib_set(2), call=lambda m, x, t, c: None)
    with pytest.raises(DiffquantError, match="not called"):
        build_unit_cache(qmodel, "conv_in", data)
