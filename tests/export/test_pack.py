"""Packed integer checkpoints: dense bit packing, exact weights, standalone files, clear errors."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from diffquant.config import QuantConfig
from diffquant.errors import CheckpointError, ConfigError
from diffquant.methods.naive import run_naive
from diffquant.model import quantize
from diffquant.nn.layers import attach_adaround
from diffquant.export.bitpack import pack_bits, packed_nbytes, unpack_bits
from diffquant.export.codes import ExportError, WeightCodes
from diffquant.export.pack import (
    freeze,
    load_packed,
    pack_weight_codes,
    read_packed,
    save_packed,
    unpack_weight_codes,
    unpack_weights,
)

from export_testing import catnet_inputs, mixed_rules


def _outputs(model, unet_inputs, t=10):
    (x, ts), kw = unet_inputs(batch=3, t=t, seed=7)
    with torch.no_grad():
        return model(x, ts, **kw).sample


# ------------------------------------------------------------------------------- bit packing
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 64, 1001])
def test_bitstream_round_trip_and_size(bits, count):
    values = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(bits * count))
    stream = pack_bits(values, bits)
    assert stream.dtype == torch.uint8
    assert stream.numel() == packed_nbytes(count, bits) == math.ceil(count * bits / 8)
    assert torch.equal(unpack_bits(stream, bits, count).long(), values)


def test_bitstream_layout_is_lsb_first():
    # two 4-bit values per byte, low nibble first; 3-bit values run across byte borders
    assert pack_bits(torch.tensor([0x3, 0xA]), 4).tolist() == [0xA3]
    assert pack_bits(torch.tensor([0b101, 0b011, 0b110]), 3).tolist() == [0b10011101, 0b1]  # 5 | 3 << 3 | 6 << 6


def test_bitstream_rejects_bad_input():
    with pytest.raises(ConfigError, match="outside"):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(ConfigError, match="1-8"):
        pack_bits(torch.tensor([1]), 9)
    with pytest.raises(ConfigError, match="needs 2 bytes"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 3, 5)


# ------------------------------------------------------------------------------- exact weights
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("grid", ["asymmetric", "symmetric"])
def test_unpacked_weights_are_the_fake_quant_weights(bits, grid, calibrated_catnet):
    _, qmodel = calibrated_catnet(weight_bits=bits, act_bits=8, weight_grid=grid)
    packed = freeze(qmodel)
    weights = unpack_weights(packed)
    layers = qmodel.layers()
    assert set(weights) == {f"{n}.weight" for n in layers}
    assert layers["fuse"].split == 6  # the split layer is packed as two parts
    assert len(packed.manifest["layers"]["fuse"]["parts"]) == 2
    for name, layer in layers.items():
        assert torch.equal(weights[f"{name}.weight"], layer.effective_weight()), name
        assert packed.manifest["layers"][name]["parts"][0]["bits"] == bits


def test_hardened_adaround_weights_are_packed_exactly(calibrated_catnet):
    _, qmodel = calibrated_catnet(weight_bits=3)
    layer = qmodel.layers()["fuse"]
    for module, w, q in zip(attach_adaround(layer), layer.weight_parts(), layer.weight_quantizers):
        module.init_from(w.detach(), q)
        module.V.data.normal_(generator=torch.Generator().manual_seed(0))
        module.harden()
    weights = unpack_weights(freeze(qmodel))
    assert torch.equal(weights["fuse.weight"], layer.effective_weight())
    # learned rounding really differs from round-to-nearest here
    plain = torch.cat([q(w) for w, q in zip(layer.weight_parts(), layer.weight_quantizers)], dim=1)
    assert not torch.equal(plain, layer.effective_weight())


def test_soft_adaround_and_real_zero_points_are_refused(calibrated_catnet):
    _, qmodel = calibrated_catnet(weight_bits=4)
    layer = qmodel.layers()["a"]
    attach_adaround(layer)[0].init_from(layer.weight.detach(), layer.weight_quantizers[0])
    with pytest.raises(ExportError, match="not on its quantizer's grid"):
        freeze(qmodel)
    _, qmodel = calibrated_catnet(weight_bits=4)
    qmodel.layers()["b"].weight_quantizers[0].zero_point.data += 0.3
    qmodel.clear_weight_cache()
    with pytest.raises(ExportError, match="real-valued weight zero points"):
        freeze(qmodel)


def test_unknown_recipe_state_is_refused(calibrated_catnet):
    _, qmodel = calibrated_catnet()
    from diffquant.nn.layers import attach_lora

    attach_lora(qmodel.layers()["a"], rank=1)
    with pytest.raises(ExportError, match="lora"):
        freeze(qmodel)


def test_unfolded_input_scale_is_refused(calibrated_catnet):
    from diffquant.nn.layers import attach_input_scale

    _, qmodel = calibrated_catnet()
    attach_input_scale(qmodel.layers()["a"])
    with pytest.raises(ExportError, match="fold"):
        freeze(qmodel)


def test_mixed_per_channel_bits_round_trip():
    """A hand-made weight with 2/3/4/8-bit channels: one stream per bit-width group."""
    gen = torch.Generator().manual_seed(0)
    bits = torch.tensor([2, 3, 4, 3, 8, 2, 4, 3], dtype=torch.uint8)
    channels, shape = len(bits), (8, 5, 3, 3)
    codes = torch.stack([torch.randint(0, 2 ** int(b), shape[1:], generator=gen) for b in bits]).to(torch.int16)
    zero = torch.stack([torch.randint(0, 2 ** int(b), (), generator=gen) for b in bits])
    wc = WeightCodes(codes=codes, step=torch.rand(channels, generator=gen) + 0.01, zero_point=zero,
                     bits=bits, grid="asymmetric", axis=0)
    entry, tensors = pack_weight_codes(wc, "w/x/0")
    assert entry["bits"] is None and sorted(entry["streams"]) == ["2", "3", "4", "8"]
    per_channel = 5 * 3 * 3
    for b, info in entry["streams"].items():
        n = int((bits == int(b)).sum())
        assert info["channels"] == n
        assert tensors[info["key"]].numel() == math.ceil(n * per_channel * int(b) / 8)
    back = unpack_weight_codes(entry, tensors, "w/x/0")
    assert torch.equal(back.codes, codes) and torch.equal(back.bits, bits)
    assert torch.equal(back.dequantize(), wc.dequantize())
    # the same on the output-channel axis 1 (ConvTranspose layout), symmetric grid
    sym = WeightCodes(codes=(codes.long() - (1 << (bits.long() - 1)).reshape(-1, 1, 1, 1)).to(torch.int16).transpose(0, 1),
                      step=wc.step, zero_point=torch.zeros(channels, dtype=torch.int64), bits=bits,
                      grid="symmetric", axis=1)
    entry, tensors = pack_weight_codes(sym, "w/y/0")
    assert torch.equal(unpack_weight_codes(entry, tensors, "w/y/0").codes, sym.codes)


# ------------------------------------------------------------------------------- whole files
@pytest.mark.parametrize("bits", [(8, 8), (4, 8), (3, 6)])
def test_packed_file_reproduces_the_quantized_model_exactly(bits, calibrated_unet, make_unet, unet_inputs, tmp_path):
    _, qmodel = calibrated_unet(*bits)
    expected = _outputs(qmodel, unet_inputs)
    path = save_packed(qmodel, tmp_path / "model.safetensors")
    for skeleton in (make_unet(), None):  # onto a given architecture, or rebuilt from the file alone
        loaded = load_packed(skeleton, path)
        assert torch.equal(_outputs(loaded, unet_inputs), expected)
    assert loaded.quant_config.weight_bits == bits[0] and loaded.recipe == "naive"
    assert any(lp.split for lp in loaded.plan.layers)
    assert not torch.equal(expected, _outputs(make_unet(), unet_inputs))


def test_packed_and_plain_checkpoints_share_one_quantizer_restore(calibrated_unet, make_unet, tmp_path, monkeypatch):
    """load() and load_packed() restore quantizer objects through model.checkpoint.restore_quantizers."""
    from diffquant.model import checkpoint, load, save

    _, qmodel = calibrated_unet(4, 8)
    packed = save_packed(qmodel, tmp_path / "model.safetensors")
    save(qmodel, tmp_path / "plain")
    calls = []
    original = checkpoint.restore_quantizers

    def spy(qm, descriptions, where, variants=None):
        calls.append((len(descriptions), variants))
        return original(qm, descriptions, where, variants)

    monkeypatch.setattr(checkpoint, "restore_quantizers", spy)
    monkeypatch.setattr("diffquant.export.pack.restore_quantizers", spy)
    load_packed(make_unet(), packed)
    load(make_unet(), tmp_path / "plain")
    n = len(qmodel.quantizers())
    assert calls == [(n, ("PTSQuantizer",)), (n, None)]


def test_mixed_bit_quantizers_pack_by_group_and_reload_exactly(calibrated_unet, make_unet, unet_inputs, tmp_path):
    """MPQ-DM's OMQ layers (2/3/4-bit channels around a nominal 3) pack one stream per group."""
    from diffquant.quant.variants import MixedBitQuantizer, replace_module

    _, qmodel = calibrated_unet(3, 8)
    mixed_layers = []
    for name, layer in list(qmodel.layers().items())[1:4]:
        q = MixedBitQuantizer.from_quantizer(layer.weight_quantizers[0])
        bits = torch.full((q.channels,), 3)
        bits[: q.channels // 4], bits[q.channels - q.channels // 4:] = 4, 2
        q.set_channel_bits(bits)
        q.init_from(layer.weight_parts()[0])
        replace_module(qmodel.model, f"{name}.weight_quantizers.0", q)
        layer.clear_cache()
        mixed_layers.append(name)
    expected = _outputs(qmodel, unet_inputs)
    packed = freeze(qmodel)
    part = packed.manifest["layers"][mixed_layers[0]]["parts"][0]
    assert sorted(int(b) for b in unpack_weight_codes(part, packed.tensors, f"w/{mixed_layers[0]}/0").bits.unique()) == [2, 3, 4]
    path = save_packed(qmodel, tmp_path / "mixed.safetensors")
    assert torch.equal(_outputs(load_packed(make_unet(), path), unet_inputs), expected)


def test_layers_left_in_float_by_rules_are_stored_in_float(calibrated_unet, unet_inputs, tmp_path):
    _, qmodel = calibrated_unet(4, 8, rules=mixed_rules())
    _outputs(qmodel, unet_inputs)  # fills the weight caches (a cached fp weight must not leak into the file)
    packed = freeze(qmodel)
    assert "time_embedding.linear_1" not in packed.manifest["layers"]
    assert "f/time_embedding.linear_1.weight" in packed.tensors and "w/conv_in/0/s4" in packed.tensors
    loaded = load_packed(None, save_packed(qmodel, tmp_path / "rules.safetensors"))
    assert torch.equal(_outputs(loaded, unet_inputs), _outputs(qmodel, unet_inputs))


def test_per_timestep_tables_survive_packing(calibrated_unet, unet_inputs, tmp_path):
    from export_testing import TIMESTEPS

    _, qmodel = calibrated_unet(4, 8, timesteps=TIMESTEPS)
    loaded = load_packed(None, save_packed(qmodel, tmp_path / "m.safetensors"))
    for t in TIMESTEPS:
        assert torch.equal(_outputs(loaded, unet_inputs, t), _outputs(qmodel, unet_inputs, t))


def test_float16_option_halves_the_float_part(calibrated_unet, unet_inputs, tmp_path):
    _, qmodel = calibrated_unet(4, 8)
    fp32 = read_packed(save_packed(qmodel, tmp_path / "a.safetensors")).nbytes()
    fp16 = read_packed(save_packed(qmodel, tmp_path / "b.safetensors", float_dtype="float16")).nbytes()
    assert fp16["float"] * 2 == fp32["float"] and fp16["weight_streams"] == fp32["weight_streams"]
    loaded = load_packed(None, tmp_path / "b.safetensors")
    torch.testing.assert_close(_outputs(loaded, unet_inputs), _outputs(qmodel, unet_inputs), atol=5e-2, rtol=0)
    with pytest.raises(ConfigError, match="float_dtype"):
        freeze(qmodel, float_dtype="int8")


def test_w4_file_is_about_an_eighth_of_fp32(tmp_path):
    """A layer-heavy model: the W4 file is ≈ 1/8 of the fp32 weights (plus per-channel scales)."""
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)]).eval()
    example = ((torch.randn(4, 256),), {})
    qmodel = quantize(net, QuantConfig(weight_bits=4, quantize_acts=False), example_inputs=example)
    run_naive(qmodel, None)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "fp32.safetensors"))
    path = save_packed(qmodel, tmp_path / "w4.safetensors")
    sizes = read_packed(path).nbytes()
    weight_fp32 = 4 * 256 * 256 * 4
    assert sizes["weight_streams"] == weight_fp32 // 8
    ratio = path.stat().st_size / (tmp_path / "fp32.safetensors").stat().st_size
    assert 0.125 < ratio < 0.145, ratio  # 1/8 plus scales, zero points, biases and the manifest
    x = example[0][0]
    with torch.no_grad():
        assert torch.equal(load_packed(nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)]), path)(x), qmodel(x))


# ------------------------------------------------------------------------------- damaged files
@pytest.fixture
def packed_file(calibrated_catnet, tmp_path):
    net, qmodel = calibrated_catnet()
    return net, qmodel, save_packed(qmodel, tmp_path / "catnet.safetensors")


def _one_line_error(fn, match):
    with pytest.raises(CheckpointError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def _rewrite(path, out, edit_tensors=None, edit_metadata=None):
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_metadata:
        edit_metadata(metadata)
    save_file(tensors, str(out), metadata=metadata)
    return out


def test_damaged_files_raise_one_line_checkpoint_errors(packed_file, tmp_path):
    net, qmodel, path = packed_file
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    _one_line_error(lambda: load_packed(net, tmp_path / "trunc.safetensors"), "truncated")
    (tmp_path / "junk.safetensors").write_bytes(b"\x07" * 100)
    _one_line_error(lambda: load_packed(net, tmp_path / "junk.safetensors"), "truncated")
    _one_line_error(lambda: load_packed(net, tmp_path / "missing.safetensors"), "no packed checkpoint")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    _one_line_error(lambda: load_packed(net, tmp_path / "plain.safetensors"), "not a diffquant packed")

    def shorten(tensors):
        key = next(k for k in tensors if k.startswith("w/fuse/1/s"))
        tensors[key] = tensors[key][:-1].clone()

    _one_line_error(lambda: load_packed(net, _rewrite(path, tmp_path / "short.safetensors", shorten)), "w/fuse/1")
    _one_line_error(lambda: load_packed(net, _rewrite(path, tmp_path / "gone.safetensors",
                                                      lambda t: t.pop("w/a/0/step"))), "missing")

    def bad_json(meta):
        meta["manifest"] = meta["manifest"][:-5]

    _one_line_error(lambda: load_packed(net, _rewrite(path, tmp_path / "json.safetensors", edit_metadata=bad_json)),
                    "manifest is corrupt")

    def future(meta):
        manifest = json.loads(meta["manifest"])
        manifest["format_version"] = 99
        meta["manifest"] = json.dumps(manifest)

    _one_line_error(lambda: load_packed(net, _rewrite(path, tmp_path / "v99.safetensors", edit_metadata=future)),
                    "version 99")
    other = nn.Sequential(nn.Linear(3, 3))
    _one_line_error(lambda: load_packed(other, path), "packed from a CatNet")
    _one_line_error(lambda: load_packed(None, path), "cannot be rebuilt from the file")


def test_catnet_round_trip_with_transposed_and_linear_layers(packed_file):
    net, qmodel, path = packed_file
    (x,), _ = catnet_inputs(5)
    with torch.no_grad():
        assert torch.equal(load_packed(net, path)(x), qmodel(x))
    with pytest.raises(ConfigError, match="directory"):
        save_packed(qmodel, path.parent)
