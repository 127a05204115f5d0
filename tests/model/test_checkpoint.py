"""save()/load(): bit-identical round trips, no forward while loading, clear errors."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from diffquant.config import QuantConfig
from diffquant.errors import CheckpointError, DiffquantError
from diffquant.methods.naive import run_naive
from diffquant.model import load, quantize, read_manifest, save
from diffquant.model.checkpoint import FORMAT_VERSION, MANIFEST_FILE, STATE_FILE

TIMESTEPS = [999, 500, 1]


def calibration_loop(unet_inputs, timesteps=(10,), batches: int = 2):
    """Calibration data for the tiny UNet: a few batches at each timestep, larger inputs at
    larger t (so per-timestep tables really differ)."""

    def loop(model):
        for t in timesteps:
            for b in range(batches):
                (x, ts), kw = unet_inputs(batch=2, t=t, seed=100 * b + t)
                model(x * (1 + t / 250), ts, **kw)

    return loop


def out(model, t=10, seed=7, unet_inputs=None, device="cpu"):
    (x, ts), kw = unet_inputs(batch=3, t=t, seed=seed, device=device)
    with torch.no_grad():
        return model(x, ts, **kw).sample


@pytest.fixture
def calibrated(make_unet, unet_inputs):
    def build(weight_bits=8, act_bits=8, timesteps=None, split=True):
        qmodel = quantize(make_unet(), QuantConfig(weight_bits=weight_bits, act_bits=act_bits, split=split),
                          timesteps=timesteps)
        run_naive(qmodel, calibration_loop(unet_inputs, timesteps or (10, 600)))
        return qmodel

    return build


def count_forwards(model) -> list[int]:
    calls = [0]
    for m in model.modules():
        m.register_forward_pre_hook(lambda mod, inp: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("bits", [(8, 8), (4, 8)])
def test_round_trip_is_bit_identical_without_a_forward(bits, calibrated, make_unet, unet_inputs, tmp_path, device):
    qmodel = calibrated(*bits)
    expected = out(qmodel, unet_inputs=unet_inputs)
    save(qmodel, tmp_path / "ckpt")

    fresh = make_unet()
    calls = count_forwards(fresh)
    loaded = load(fresh, tmp_path / "ckpt", device=device)
    assert calls[0] == 0, "load ran a forward"
    assert not any(type(m).__name__ == "QuantLayer" for m in fresh.modules())  # inplace=False
    got = out(loaded, unet_inputs=unet_inputs, device=device)
    if device == "cpu":
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)
    assert loaded.recipe == "naive" and loaded.quant_config.weight_bits == bits[0]
    assert [lp.split for lp in loaded.plan.layers] == [lp.split for lp in qmodel.plan.layers]
    assert loaded.quant_state_dict().keys() == qmodel.quant_state_dict().keys()
    assert all(a.enabled == b.enabled and a.bits == b.bits
               for a, b in zip(loaded.quantizers().values(), qmodel.quantizers().values()))
    # the quantized output really differs from the float model's
    assert not torch.equal(expected, out(make_unet(), unet_inputs=unet_inputs))


def test_load_inplace(calibrated, make_unet, unet_inputs, tmp_path):
    qmodel = calibrated()
    save(qmodel, tmp_path / "c")
    fresh = make_unet()
    loaded = load(fresh, tmp_path / "c", inplace=True)
    assert loaded.model is fresh
    assert torch.equal(out(loaded, unet_inputs=unet_inputs), out(qmodel, unet_inputs=unet_inputs))


def test_manifest_contents(calibrated, tmp_path):
    qmodel = calibrated(4, 8)
    path = save(qmodel, tmp_path / "ckpt", extra={"note": "test"})
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["recipe"] == "naive"
    assert manifest["config"]["weight_bits"] == 4 and manifest["config"]["act_bits"] == 8
    assert [lp["name"] for lp in manifest["plan"]["layers"]] == [lp.name for lp in qmodel.plan.layers]
    splits = {lp["name"]: lp["split"] for lp in manifest["plan"]["layers"] if lp["split"]}
    assert splits and all(name.endswith("conv_shortcut") for name in splits)
    assert manifest["plan"]["units"] and manifest["plan"]["attention"] == qmodel.plan.attention
    assert manifest["extra"] == {"note": "test"}
    assert set(manifest["tensors"]) == set(qmodel.quant_state_dict())
    assert (path / "config.yaml").is_file() and (path / STATE_FILE).is_file()
    # only quantizer state is saved, never the float weights
    assert not any(k.endswith(".weight") or k.endswith(".bias") for k in manifest["tensors"])
    assert read_manifest(path) == manifest


def one_line_error(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg
    return msg


def test_other_architecture_is_refused(calibrated, make_cond_unet, tmp_path):
    save(calibrated(), tmp_path / "ckpt")
    with pytest.raises(CheckpointError) as exc:
        load(make_cond_unet(), tmp_path / "ckpt")
    assert "architecture" in one_line_error(exc)

    from diffusers import UNet2DModel

    torch.manual_seed(0)
    wider = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 24),
                        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                        attention_head_dim=8, num_class_embeds=3)
    with pytest.raises(CheckpointError) as exc:
        load(wider, tmp_path / "ckpt")
    # says what differs: the first tensor whose shape changed, with both shapes
    assert "down_blocks.1" in one_line_error(exc) and "24" in one_line_error(exc)


def test_truncated_state_file(calibrated, make_unet, tmp_path):
    path = save(calibrated(), tmp_path / "ckpt")
    data = (path / STATE_FILE).read_bytes()
    (path / STATE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as exc:
        load(make_unet(), path)
    assert STATE_FILE in one_line_error(exc)


def test_missing_state_file_and_directory(calibrated, make_unet, tmp_path):
    path = save(calibrated(), tmp_path / "ckpt")
    (path / STATE_FILE).unlink()
    with pytest.raises(CheckpointError) as exc:
        load(make_unet(), path)
    one_line_error(exc)
    with pytest.raises(CheckpointError) as exc:
        load(make_unet(), tmp_path / "does_not_exist")
    one_line_error(exc)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as exc:
        load(make_unet(), tmp_path / "empty")
    one_line_error(exc)


@pytest.mark.parametrize("edit", ["version", "format", "garbage", "truncated_json"])
def test_bad_manifest(edit, calibrated, make_unet, tmp_path):
    path = save(calibrated(), tmp_path / "ckpt")
    file = path / MANIFEST_FILE
    manifest = json.loads(file.read_text())
    if edit == "version":
        manifest["format_version"] = FORMAT_VERSION + 41
        file.write_text(json.dumps(manifest))
    elif edit == "format":
        manifest["format"] = "something-else"
        file.write_text(json.dumps(manifest))
    elif edit == "garbage":
        file.write_bytes(b"\x00\xff not json")
    else:
        text = file.read_text()
        file.write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError) as exc:
        load(make_unet(), path)
    msg = one_line_error(exc)
    if edit == "version":
        assert str(FORMAT_VERSION + 41) in msg


def test_a_tampered_tensor_shape_is_refused(calibrated, make_unet, tmp_path):
    from safetensors.torch import load_file, save_file

    path = save(calibrated(), tmp_path / "ckpt")
    tensors = load_file(str(path / STATE_FILE))
    key = next(k for k in tensors if k.endswith("weight_quantizers.0.step"))
    tensors[key] = torch.ones(1, 3)
    save_file(tensors, str(path / STATE_FILE))
    with pytest.raises(CheckpointError) as exc:
        load(make_unet(), path)
    assert key in one_line_error(exc)


def test_per_timestep_tables(calibrated, make_unet, unet_inputs, tmp_path):
    qmodel = calibrated(timesteps=TIMESTEPS)
    act = [q for q in qmodel.quantizers("act").values() if q.active]
    assert act and all(q.num_steps == 3 and bool(q.initialized.all()) for q in act)
    assert any(not torch.equal(q.step[0], q.step[2]) for q in act)  # the rows really differ
    expected = {t: out(qmodel, t=t, unet_inputs=unet_inputs) for t in TIMESTEPS}

    path = save(qmodel, tmp_path / "ckpt")
    assert read_manifest(path)["plan"]["timesteps"] == TIMESTEPS
    loaded = load(make_unet(), path)
    assert loaded.timestep_index.timesteps == TIMESTEPS
    for k, t in enumerate(TIMESTEPS):
        assert torch.equal(out(loaded, t=t, unet_inputs=unet_inputs), expected[t])
        assert loaded.timestep_index.index == k

    # the row of t = 500 is what a call at t = 500 uses: copying it to every row changes nothing
    # there, but changes the result at t = 999
    pinned = copy.deepcopy(loaded)
    for q in pinned.quantizers("act").values():
        q.copy_row_to_all(1)
    pinned.clear_weight_cache()
    assert torch.equal(out(pinned, t=500, unet_inputs=unet_inputs), expected[500])
    assert not torch.equal(out(pinned, t=999, unet_inputs=unet_inputs), expected[999])

    with pytest.raises(DiffquantError, match="not in the calibrated schedule"):
        out(loaded, t=250, unet_inputs=unet_inputs)


def test_layer_with_float_weights_and_quantized_input_round_trips(tmp_path):
    """A rule keeping a layer's weights FP (16 bit) while its input is quantized saves and loads."""
    from diffusers import UNet2DModel

    import diffquant as dq

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    cfg = dq.QuantConfig(rules=[dq.LayerRule("conv_in", weight_bits=16)])
    qmodel = dq.quantize(unet, cfg)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 3])
    dq.run_naive(qmodel, lambda m: m(x, t))
    with torch.no_grad():
        before = qmodel(x, t).sample
    assert not any(k.endswith("_cache") for k in qmodel.state_dict())
    dq.save(qmodel, tmp_path / "q")
    with torch.no_grad():
        after = dq.load(unet, tmp_path / "q")(x, t).sample
    assert torch.equal(before, after)


def test_round_trip_with_recipe_extensions(calibrated, make_unet, unet_inputs, tmp_path):
    """τ, LoRA, mixed-bit and PTS quantizers are rebuilt from the manifest and restored exactly."""
    from diffquant.nn.layers import attach_input_scale, attach_lora
    from diffquant.quant.variants import MixedBitQuantizer, PTSQuantizer, replace_module

    qmodel = calibrated(4, 8)
    layers = list(qmodel.layers().items())
    (n1, l1), (n2, l2) = layers[1], layers[2]
    attach_input_scale(l1, torch.linspace(0.5, 2.0, l1.in_channels))
    with torch.no_grad():
        attach_lora(l2, rank=2).lora_B.normal_(std=1e-3)
    mixed = MixedBitQuantizer.from_quantizer(l2.weight_quantizers[0])
    bits = torch.full((mixed.channels,), 4)
    bits[0], bits[-1] = 5, 3
    mixed.set_channel_bits(bits)
    mixed.init_from(l2.weight_parts()[0])
    replace_module(qmodel.model, f"{n2}.weight_quantizers.0", mixed)
    pts = PTSQuantizer.from_quantizer(l1.act_quantizers[0], 1, l1.in_channels)
    pts.multiplier[0, 0] = 0.25
    replace_module(qmodel.model, f"{n1}.act_quantizers.0", pts)
    l1.weight_quantizers[0].init_from(l1.weight_parts()[0])
    expected = out(qmodel, unet_inputs=unet_inputs)
    save(qmodel, tmp_path / "ext")
    manifest = read_manifest(tmp_path / "ext")
    assert manifest["layers"][n1]["input_scale"] and manifest["layers"][n2]["lora_rank"] == 2
    loaded = load(make_unet(), tmp_path / "ext")
    got = loaded.layers()
    assert isinstance(got[n2].weight_quantizers[0], MixedBitQuantizer)
    assert torch.equal(got[n2].weight_quantizers[0].channel_bits, mixed.channel_bits)
    assert isinstance(got[n1].act_quantizers[0], PTSQuantizer)
    assert torch.equal(out(loaded, unet_inputs=unet_inputs), expected)
