"""``diffquant export``: a quantized checkpoint → packed integer file and/or ONNX graph.

    diffquant export --model mnist-resunet --quantized runs/w4a8 --packed w4a8.safetensors
    diffquant export --model mnist-resunet --quantized runs/w4a8 --onnx w4a8.onnx --backend integer

``--quantized`` is a directory written by ``diffquant quantize`` or a packed file written by
``--packed``; ``--backend`` picks the ONNX node layout (``qdq``: QuantizeLinear/DequantizeLinear
pairs, portable; ``integer``: ConvInteger/MatMulInteger, integer kernels in onnxruntime).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from .onnx_modules import MODES
from .pack import FLOAT_DTYPES


def add_export_parser(sub) -> argparse.ArgumentParser:
    """Register ``export`` on an argparse subparsers object; the handler is ``args.handler``."""
    p = sub.add_parser("export", help="export a quantized model: packed integer checkpoint and/or ONNX",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default",
                   help="the float model the checkpoint belongs to (named model or diffusers folder)")
    p.add_argument("--assets", default=None, help="assets directory (default: $DIFFQUANT_ASSETS or ../shared/assets)")
    p.add_argument("--quantized", required=True,
                   help="quantized checkpoint directory (diffquant quantize --out) or packed .safetensors file")
    p.add_argument("--packed", default=None, help="write a packed integer checkpoint (one .safetensors file)")
    p.add_argument("--float-dtype", default="float32", choices=list(FLOAT_DTYPES),
                   help="dtype of the unquantized tensors in the packed file")
    p.add_argument("--onnx", default=None, help="write the quantized denoiser as ONNX (OUT.onnx)")
    p.add_argument("--backend", "--onnx-mode", dest="backend", default="qdq", choices=list(MODES),
                   help="ONNX node layout: qdq (portable Q/DQ pairs, exact), integer (ConvInteger/MatMulInteger, "
                        "exact) or fused (qdq with 8-bit conv outputs: onnxruntime QLinearConv, faster, not exact)")
    p.add_argument("--calib-samples", type=int, default=8,
                   help="fused: float trajectories (10 DDIM steps) whose inputs set the conv output ranges")
    p.add_argument("--float-onnx", default=None, help="also write the float denoiser as ONNX, for comparison")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 13)")
    p.add_argument("--batch", type=int, default=2, help="batch size of the example inputs used for tracing")
    p.set_defaults(handler=run_export)
    return p


def _load_quantized(unet, path: Path):
    from ..model import load
    from .pack import load_packed

    if path.is_file():
        return load_packed(unet, path)
    return load(unet, path)


def fused_calibration(bundle, samples: int, batch: int, steps: int = 10) -> list:
    """Denoiser inputs along ``samples`` float DDIM trajectories, every step, in batches: where the
    ``fused`` export takes its conv output ranges (the trajectory cache is reused when present)."""
    from ..calib.capture import capture_trajectories
    from ..calib.select import all_steps

    calib = all_steps(capture_trajectories(bundle, samples, steps=steps, progress=False))
    size = max(batch, 8)
    return [bundle.call_inputs(*calib[start:start + size]) for start in range(0, len(calib), size)]


def run_export(args: argparse.Namespace) -> int:
    """Handler of ``diffquant export``."""
    if not (args.packed or args.onnx or args.float_onnx):
        raise ConfigError("nothing to export: give --packed OUT, --onnx OUT.onnx and/or --float-onnx OUT.onnx")
    if args.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {args.batch}")
    if args.calib_samples < 1:
        raise ConfigError(f"--calib-samples must be >= 1, got {args.calib_samples}")
    from ..fsutil import check_writable_dir
    from ..zoo.registry import load_model

    for option, target in (("--packed", args.packed), ("--onnx", args.onnx), ("--float-onnx", args.float_onnx)):
        if target:
            check_writable_dir(Path(target).parent, f"{option} folder")
    bundle = load_model(args.model, assets=args.assets, device="cpu")
    qmodel = _load_quantized(bundle.unet, Path(args.quantized))
    example = bundle.example_inputs(args.batch)
    if args.packed:
        from .pack import read_packed, save_packed

        path = save_packed(qmodel, args.packed, float_dtype=args.float_dtype)
        sizes = read_packed(path).nbytes()
        print(f"packed checkpoint: {path} ({path.stat().st_size / 1024:.1f} KiB; "
              f"weight streams {sizes['weight_streams'] / 1024:.1f} KiB)")
    if args.onnx:
        from .onnx_export import export_onnx

        calibration = fused_calibration(bundle, args.calib_samples, args.batch) if args.backend == "fused" else None
        result = export_onnx(qmodel, example, args.onnx, opset=args.opset, mode=args.backend, calibration=calibration)
        for p in result.paths:
            print(f"onnx ({args.backend}): {p} ({p.stat().st_size / 1024:.1f} KiB)")
        for j, r in enumerate(result.requantized):
            print(f"  graph {j}: {r['layers']} conv outputs requantized to 8 bits; output changed by relative RMS "
                  f"{r['rel_rms_change']:.2e} on the calibration inputs")
        if len(result.paths) > 1:
            print(f"{len(result.paths)} graphs, one per timestep group; index: {result.sidecar}")
        for name, why in result.not_integer.items():
            print(f"  not on an integer operator: {name} ({why})")
    if args.float_onnx:
        from .onnx_export import export_float_onnx

        path = export_float_onnx(qmodel, example, args.float_onnx, opset=args.opset)
        print(f"onnx (float): {path} ({path.stat().st_size / 1024:.1f} KiB)")
    return 0
