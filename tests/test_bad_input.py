"""Every bad input ends in one clean line before any work is done; nothing silently wrong.

One table of cases: each runs the CLI through ``cli.main(argv)`` or the Python API and asserts
exit code 2 (or the library's error class), a one-line message that names the problem, no
traceback, and no half-written output. Cases marked ``before_work`` also assert that neither
calibration capture nor sampling started.
"""
from __future__ import annotations

import copy
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffquant import cli
from diffquant.errors import ConfigError, DiffquantError

WORK_SIGNS = ("capture_trajectories", "sample")


# ---------------------------------------------------------------------- shared inputs
def _tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8)


class _Touch:
    """A pickle that would create ``marker`` when unpickled: it must never run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFQUANT_CACHE", str(root / "cache"))
        yield _build_world(root)


def _build_world(root: Path) -> dict:
    folder = root / "tiny"
    _tiny_unet().save_pretrained(folder)
    # config.json that disagrees with the weights
    bad = root / "mismatch"
    _tiny_unet().save_pretrained(bad)
    config = json.loads((bad / "config.json").read_text())
    config["block_out_channels"] = [8, 24]
    (bad / "config.json").write_text(json.dumps(config))
    # a denoiser whose outputs are NaN: its trajectories are non-finite from step 1 on
    nan = root / "nan-model"
    unet = _tiny_unet()
    with torch.no_grad():
        unet.conv_out.bias.fill_(float("nan"))
    unet.save_pretrained(nan)
    # a naive W8A8 checkpoint of the tiny model
    ckpt = root / "ckpt"
    assert cli.main(["quantize", "--model", str(folder), "--calib-n", "2", "--calib-steps", "2",
                     "--calib-every", "1", "--out", str(ckpt)]) == 0
    # pickles: a non-tensor object, and one that would run a command
    plain = root / "plain.pt"
    with open(plain, "wb") as f:
        pickle.dump({"weights": {1, 2, 3}, "when": __import__("datetime").date(2020, 1, 1)}, f)
    evil = root / "evil.pt"
    marker = root / "code-ran"
    torch.save({"x": _Touch(str(marker))}, evil)
    return {"root": root, "folder": folder, "mismatch": bad, "nan": nan, "ckpt": ckpt, "plain": plain,
            "evil": evil, "marker": marker}


def edited_checkpoint(world, tmp: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of the tiny checkpoint whose manifest went through ``edit``."""
    import shutil

    target = tmp / "inputs" / "edited"
    shutil.copytree(world["ckpt"], target)
    manifest = json.loads((target / "manifest.json").read_text())
    edit(manifest)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def first(mapping: dict) -> str:
    return next(iter(mapping))


def rename_key(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def assets_with(world, tmp: Path, relative: str, source: Path) -> Path:
    target = tmp / "assets" / relative
    target.parent.mkdir(parents=True)
    target.write_bytes(source.read_bytes())
    return tmp / "assets"


def train_out_with(world, tmp: Path, source: Path | None = None, obj=None) -> Path:
    out = tmp / "train"
    out.mkdir()
    if source is not None:
        (out / "checkpoint.pt").write_bytes(source.read_bytes())
    else:
        torch.save(obj, out / "checkpoint.pt")
    return out


def object_npz(tmp: Path) -> Path:
    path = tmp / "objects.npz"
    np.savez(path, images=np.array([{"a": 1}, None], dtype=object))
    return path


def a_file(tmp: Path) -> Path:
    path = tmp / "a-file"
    path.write_text("not a folder")
    return path


# ---------------------------------------------------------------------- the CLI table
@dataclass
class CliCase:
    id: str
    argv: Callable[[dict, Path], list[str]]
    expect: str
    before_work: bool = False


def _sample(world, tmp, *extra):
    return ["sample", "--model", str(world["folder"]), "--n", "2", "--steps", "2", "--no-progress",
            "--out", str(tmp / "s"), *extra]


def _edited(edit):
    return lambda w, t: _sample(w, t, "--quantized", str(edited_checkpoint(w, t, edit)))


def _quantize(world, tmp, *extra, out=None):
    return ["quantize", "--model", str(world["folder"]), "--calib-n", "2", "--calib-steps", "2",
            "--calib-every", "1", "--out", str(out or tmp / "q"), *extra]


def _set_layer_field(key, value):
    def edit(m):
        m["layers"][first(m["layers"])][key] = value
    return edit


def _set_tensor_entry(value):
    def edit(m):
        m["tensors"][first(m["tensors"])] = value
    return edit


def _set_quantizer_field(key, value):
    def edit(m):
        m["quantizers"][first(m["quantizers"])][key] = value
    return edit


CLI_CASES = [
    CliCase("folder-config-disagrees-with-weights",
            lambda w, t: ["sample", "--model", str(w["mismatch"]), "--n", "1", "--steps", "1", "--out", str(t / "s")],
            "size mismatch for down_blocks.1"),
    CliCase("manifest-plan-layer-the-model-lacks",
            _edited(lambda m: m["plan"]["layers"][0].update(name="no_such.layer")), "does not exist"),
    CliCase("manifest-layers-entry-the-model-lacks",
            _edited(lambda m: rename_key(m["layers"], first(m["layers"]), "no_such.layer")), "no_such.layer"),
    CliCase("manifest-quantizers-null", _edited(lambda m: m.update(quantizers=None)), "'quantizers' must be"),
    CliCase("manifest-layers-a-list", _edited(lambda m: m.update(layers=[])), "'layers' must be"),
    CliCase("manifest-layer-switch-a-string", _edited(_set_layer_field("use_act_quant", "yes")), "use_act_quant"),
    CliCase("manifest-lora-rank-negative", _edited(_set_layer_field("lora_rank", -2)), "lora_rank"),
    CliCase("manifest-tensor-shape-a-string", _edited(_set_tensor_entry({"shape": "abc", "dtype": "float32"})),
            "'tensors."),
    CliCase("manifest-model-tensors-a-string", _edited(lambda m: m["model"].update(tensors="many")),
            "'model.tensors'"),
    CliCase("manifest-timesteps-strings", _edited(lambda m: m["timestep_index"].update(timesteps="x")),
            "timestep_index.timesteps"),
    CliCase("manifest-quantizer-bits-99", _edited(_set_quantizer_field("bits", 99)), ".bits'"),
    CliCase("manifest-quantizer-grid-unknown", _edited(_set_quantizer_field("grid", "triangular")), ".grid'"),
    CliCase("manifest-plan-bits-a-word",
            _edited(lambda m: m["plan"]["layers"][0].update(weight_bits="four")), "weight_bits"),
    CliCase("manifest-config-bits-a-word", _edited(lambda m: m["config"].update(weight_bits="x")), "weight_bits"),
    CliCase("manifest-tensor-table-lists-a-missing-tensor",
            _edited(lambda m: m["tensors"].update({"model.extra.step": {"shape": [1], "dtype": "float32"}})),
            "model.extra.step"),
    CliCase("quantize-out-under-a-regular-file",
            lambda w, t: _quantize(w, t, out=a_file(t) / "sub"), "is a file", before_work=True),
    CliCase("quantize-out-on-a-pseudo-file-system",
            lambda w, t: _quantize(w, t, out=Path("/proc/diffquant-test/out")), "/proc/diffquant-test/out",
            before_work=True),
    CliCase("main-out-under-a-regular-file",
            lambda w, t: ["main", "--model", str(w["folder"]), "--no-fid", "--out", str(a_file(t) / "m")],
            "is a file", before_work=True),
    CliCase("bench-out-under-a-regular-file",
            lambda w, t: ["bench", "--model", str(w["folder"]), "--metrics", "--out", str(a_file(t) / "b")],
            "is a file", before_work=True),
    CliCase("sample-out-under-a-regular-file",
            lambda w, t: ["sample", "--model", str(w["folder"]), "--out", str(a_file(t) / "s")],
            "is a file", before_work=True),
    CliCase("evaluate-out-under-a-regular-file",
            lambda w, t: ["evaluate", "--samples", str(t / "none.npz"), "--out", str(a_file(t) / "e")],
            "is a file", before_work=True),
    CliCase("export-packed-under-a-regular-file",
            lambda w, t: ["export", "--model", str(w["folder"]), "--quantized", str(w["ckpt"]),
                          "--packed", str(a_file(t) / "p.safetensors")], "is a file", before_work=True),
    CliCase("mnist-resunet-weights-a-non-tensor-pickle",
            lambda w, t: ["sample", "--model", "mnist-resunet", "--out", str(t / "s"),
                          "--assets", str(assets_with(w, t, "models/mnist-resunet/ddpm_mnist.pth", w["plain"]))],
            "refused to load", before_work=True),
    CliCase("mnist-convunet-weights-a-code-running-pickle",
            lambda w, t: ["sample", "--model", "mnist-convunet", "--out", str(t / "s"),
                          "--assets", str(assets_with(w, t, "models/mnist-convunet/ddpm_mnist.pt", w["evil"]))],
            "refused to load", before_work=True),
    CliCase("train-resume-a-non-tensor-pickle",
            lambda w, t: ["train", "diffusion", "--resume", "--steps", "1", "--out", str(train_out_with(w, t, w["plain"]))],
            "refused to load"),
    CliCase("train-export-only-a-code-running-pickle",
            lambda w, t: ["train", "diffusion", "--export-only", "--out", str(train_out_with(w, t, w["evil"]))],
            "refused to load"),
    CliCase("train-export-only-a-tensor-dict-that-is-no-checkpoint",
            lambda w, t: ["train", "diffusion", "--export-only",
                          "--out", str(train_out_with(w, t, obj={"weights": torch.zeros(2)}))],
            "not a diffquant training checkpoint"),
    CliCase("evaluate-an-npz-of-object-arrays",
            lambda w, t: ["evaluate", "--samples", str(object_npz(t)), "--metrics", "mse", "--out", str(t / "e")],
            "object arrays are never unpickled"),
    CliCase("sample-guidance-nan", lambda w, t: _sample(w, t, "--guidance", "nan"), "finite number", before_work=True),
    CliCase("sample-eta-inf", lambda w, t: _sample(w, t, "--eta", "inf"), "finite number", before_work=True),
    CliCase("main-bits-W9A8",
            lambda w, t: ["main", "--model", str(w["folder"]), "--no-fid", "--bits", "W8A8", "W9A8",
                          "--out", str(t / "m")], "W9A8", before_work=True),
    CliCase("bench-settings-W9A8",
            lambda w, t: ["bench", "--model", str(w["folder"]), "--metrics", "--settings", "W9A8",
                          "--out", str(t / "b")], "W9A8", before_work=True),
    CliCase("bench-recipe-spec-bad-value",
            lambda w, t: ["bench", "--model", str(w["folder"]), "--metrics", "--recipes", "qdiffusion:iters_w=abc",
                          "--out", str(t / "b")], "iters_w must be an integer", before_work=True),
    CliCase("calibration-trajectories-non-finite",
            lambda w, t: ["quantize", "--model", str(w["nan"]), "--calib-n", "2", "--calib-steps", "3",
                          "--calib-every", "1", "--out", str(t / "q")], "non-finite"),
]


@pytest.fixture
def no_work(monkeypatch):
    """Capture and sampling raise if called: for the cases that must fail before any work."""
    import diffquant.calib.capture as capture
    import diffquant.diffusion.sampling as sampling

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the bad input was refused")

    monkeypatch.setattr(capture, "capture_trajectories", refuse)
    monkeypatch.setattr(sampling, "sample", refuse)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_clean_line(code: int, err: str, expect: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("diffquant")]
    assert len(lines) == 1, err
    assert expect in lines[0], lines[0]
    return lines[0]


def assert_nothing_half_written(tmp: Path) -> None:
    leftovers = [p for p in tmp.rglob("*") if (p.name.endswith((".tmp", ".new")) or p.name in
                 ("manifest.json", "quant_state.safetensors", "samples.npz", "results.json"))
                 and "inputs" not in p.relative_to(tmp).parts]
    assert not leftovers, leftovers


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_refuses_bad_input_in_one_line(case, world, tmp_path, capsys, request):
    argv = case.argv(world, tmp_path)
    if case.before_work:
        request.getfixturevalue("no_work")
    code, err = run_cli(argv, capsys)
    assert_one_clean_line(code, err, case.expect)
    assert_nothing_half_written(tmp_path)
    assert not world["marker"].exists(), "a pickle ran code while being loaded"


# ---------------------------------------------------------------------- recipe values
BAD_RECIPE_VALUES = [
    ("lr_w", "abc"), ("p_w", "abc"), ("p_w", ".nan"), ("split", "maybe"), ("calib_seed", "abc"),
    ("iters_w", "2.7"), ("iters_w", "true"), ("weight_recon", "3"), ("lr_w", "-1"), ("round_reg_weight", "-1"),
    ("iters_w", "abc"), ("lr_w", ".inf"), ("cali_n", "[1]"),
]


@pytest.mark.parametrize("key,value", BAD_RECIPE_VALUES, ids=[f"{k}={v}" for k, v in BAD_RECIPE_VALUES])
def test_recipe_values_are_type_and_range_checked_in_specs_and_files(key, value, tmp_path):
    from diffquant.pipeline import load_recipe_config, parse_recipe_spec

    with pytest.raises(ConfigError) as spec_error:
        parse_recipe_spec(f"qdiffusion:{key}={value}")
    yaml_file = tmp_path / "recipe.yaml"
    yaml_file.write_text(f"{key}: {value}\n")
    with pytest.raises(ConfigError) as file_error:
        load_recipe_config("qdiffusion", str(yaml_file))
    for exc in (spec_error, file_error):
        message = str(exc.value)
        assert message.startswith(key) and "\n" not in message


def test_every_recipe_config_checks_its_fields_from_python_too():
    import dataclasses

    from diffquant.methods import RECIPES

    for name, (config_cls, _) in RECIPES.items():
        for field in dataclasses.fields(config_cls):
            wrong = {"int": "abc", "float": "abc", "bool": 3, "str": 3}.get(str(field.type))
            if wrong is None:
                continue
            with pytest.raises(ConfigError) as exc:
                config_cls(**{field.name: wrong})
            assert str(exc.value).startswith(field.name), (name, field.name, str(exc.value))


def test_single_step_outside_the_calibration_schedule_fails_before_capture(world, tmp_path, capsys, no_work):
    cfg = tmp_path / "qd.yaml"
    cfg.write_text("calib_policy: single_t\nsingle_step: 99999\n")
    code, err = run_cli(_quantize(world, tmp_path, "--recipe", "qdiffusion", "--recipe-config", str(cfg)), capsys)
    assert_one_clean_line(code, err, "single_step")


def test_a_reused_work_dir_with_other_settings_fails_before_capture(world, tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "qd.yaml"
    cfg.write_text("iters_w: 2\niters_a: 2\nbatch_size: 2\ncali_st: 2\ncali_n: 2\nact_init_n: 2\n")
    argv = _quantize(world, tmp_path, "--recipe", "qdiffusion", "--recipe-config", str(cfg),
                     "--work-dir", str(tmp_path / "work"))
    assert run_cli(argv, capsys)[0] == 0
    import diffquant.calib.capture as capture

    monkeypatch.setattr(capture, "capture_trajectories", lambda *a, **k: pytest.fail("capture started"))
    code, err = run_cli(argv + ["--wbits", "4", "--out", str(tmp_path / "q4")], capsys)
    line = assert_one_clean_line(code, err, "other settings")
    assert "weight_bits" in line and "8" in line and "4" in line


# ---------------------------------------------------------------------- API cases
@pytest.fixture
def qmodel(world):
    from diffquant import load
    from diffquant.zoo.registry import load_model

    bundle = load_model(str(world["folder"]))
    return bundle, load(bundle.unet, world["ckpt"])


def test_non_finite_calibration_data_is_refused_naming_where(qmodel):
    from diffquant.calib.select import CalibrationSet

    xs = torch.randn(4, 1, 8, 8)
    xs[2, 0, 1, 1] = float("nan")
    xs[3, 0, 0, :3] = float("inf")
    with pytest.raises(DiffquantError) as exc:
        CalibrationSet(xs, torch.full((4,), 10), None, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]))
    message = str(exc.value)
    assert "4 non-finite values" in message and "2 of 4 inputs" in message and "entry 2 (step 1, sample 0)" in message


def test_a_checkpoint_with_non_finite_steps_is_neither_saved_nor_loaded(qmodel, world, tmp_path):
    from diffquant import load, save
    from diffquant.errors import CheckpointError

    bundle, q = qmodel
    broken = copy.deepcopy(q)
    name, quantizer = next(iter(broken.quantizers().items()))
    with torch.no_grad():
        quantizer.step.view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        save(broken, tmp_path / "nan")
    assert not (tmp_path / "nan" / "manifest.json").exists()
    # a state file edited to hold an Inf zero point
    import shutil

    shutil.copytree(world["ckpt"], tmp_path / "inf")
    tensors = load_file(tmp_path / "inf" / "quant_state.safetensors")
    key = next(k for k in tensors if k.endswith("zero_point"))
    tensors[key] = torch.full_like(tensors[key], float("inf"))
    save_file(tensors, str(tmp_path / "inf" / "quant_state.safetensors"))
    with pytest.raises(CheckpointError, match=f"{key}.*non-finite"):
        load(bundle.unet, tmp_path / "inf")


def test_a_state_file_resaved_in_float16_is_refused(qmodel, world, tmp_path):
    import shutil

    from diffquant import load
    from diffquant.errors import CheckpointError

    bundle, _ = qmodel
    shutil.copytree(world["ckpt"], tmp_path / "half")
    tensors = load_file(tmp_path / "half" / "quant_state.safetensors")
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(tmp_path / "half" / "quant_state.safetensors"))
    with pytest.raises(CheckpointError, match="float16.*manifest says float32"):
        load(bundle.unet, tmp_path / "half")


def test_a_nan_timestep_is_refused_by_nearest_lookup(make_unet, unet_inputs):
    from diffquant.config import QuantConfig
    from diffquant.methods.naive import run_naive
    from diffquant.model import quantize

    q = quantize(make_unet(), QuantConfig(timestep_lookup="nearest"), timesteps=[999, 500, 1])

    def loop(model):
        for t in (999, 500, 1):
            (x, ts), kw = unet_inputs(batch=2, t=t)
            model(x, ts, **kw)

    run_naive(q, loop)
    (x, _), kw = unet_inputs(batch=2)
    assert q(x, torch.tensor([700.0, 700.0]), **kw).sample.shape == x.shape  # nearest row: fine
    with pytest.raises(DiffquantError, match="non-finite timestep"):
        q(x, torch.tensor([float("nan")] * 2), **kw)


def test_sampling_api_refuses_non_finite_guidance(bundle):
    from diffquant.diffusion.sampling import sample

    with pytest.raises(ConfigError, match="guidance must be a finite number"):
        sample(bundle, 2, steps=2, guidance=float("nan"), progress=False)


def test_strict_json_everywhere(tmp_path):
    from diffquant.jsonio import write_json

    path = write_json(tmp_path / "r.json", {"fid": float("nan"), "big": float("inf"), "n": np.int64(3),
                                            "x": np.float32(0.5), "t": torch.tensor(2.0), "p": tmp_path})

    def refuse(constant):
        raise ValueError(f"non-JSON constant {constant}")

    data = json.loads(path.read_text(), parse_constant=refuse)
    assert data == {"fid": "nan", "big": "inf", "n": 3, "x": 0.5, "t": 2.0, "p": str(tmp_path)}
    assert not list(tmp_path.glob("*.tmp"))
