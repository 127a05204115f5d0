"""Real low-bit deployment: checkpoint sizes and CPU speed of integer backends.

Models: the bundled default model (``src/diffquant/zoo/assets/fmnist-unet/``; mnist-resunet until
it exists, else a small config-built stand-in) and a config-built diffusers UNet2DModel of about
31 M parameters at 32×32 (DDPM-CIFAR-like, attention at 16×16).

Sizes: safetensors files of the float model in fp32 and fp16, and packed integer checkpoints
(:mod:`diffquant.export.pack`, unquantized tensors in fp32) at W8, W4, W3, W2, plus a mixed
per-channel 2/3/4-bit checkpoint made with :class:`~diffquant.quant.variants.MixedBitQuantizer`
(the quantizer of MPQ-DM's OMQ): in each layer the 10 % of output channels with the highest weight
kurtosis at 4 bits, the 10 % lowest at 2, the rest at 3 (average exactly 3 bits). Goal: W4 ≥ 7× smaller than fp32.

Speed (``--threads`` CPU threads, batch ``--batch``): per denoiser call (median of ``--reps``
after a warm-up) and per full ``--steps``-step DDIM sample of the whole batch, for
PyTorch fp32, PyTorch fake-quant, the PyTorch int8 backend (eager, and behind ``torch.compile``
with weight freezing: :func:`diffquant.export.int8_backend.compile_int8`; its one-off compile time
is reported, not counted in the call time), onnxruntime fp32 and onnxruntime int8
(``integer`` graphs: ConvInteger/MatMulInteger; ``qdq`` graphs; ``fused`` graphs, whose conv
outputs are requantized to 8 bits on the anchors' calibration inputs so that onnxruntime runs
QLinearConv — not exact, so their departure from fake quantization is reported) at each ``--bits`` setting. Quantized models come
from the naive recipe calibrated on Gaussian-noise inputs at a few timesteps (timings and sizes do
not depend on calibration quality). Each backend's denoiser output is compared with the
fake-quant model's (relative RMS) as a sanity check, and with the float model's.

Anchors (W8A8, the option a user picks first), measured in the same run on the same model and
calibration inputs: onnxruntime's own ``quantize_static`` (QDQ, per-channel int8 weights, uint8
activations, MinMax calibration, then onnxruntime's fusions) and PyTorch's PT2E static int8
(``X86InductorQuantizer`` + ``torch.compile`` with freezing, from torchao — ``pip install torchao``;
the row is skipped without it). The CPU's ISA flags (VNNI/AMX) and whether oneDNN's int8 products
saturate (:func:`diffquant.export.int8_backend.int8_products_saturate`) are recorded.

    python benchmarks/bench_deploy.py                      # writes benchmarks/results/deploy.{json,md}
    python benchmarks/bench_deploy.py --tiny --out /tmp/d  # seconds: checks that everything runs
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SIZE_BITS = (8, 4, 3, 2)
TARGET_W4_RATIO = 7.0


def cpu_isa() -> dict:
    """The CPU's int8-relevant ISA flags, PyTorch's dispatch level and the oneDNN saturation probe."""
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    from diffquant.export.int8_backend import int8_kernels_available, int8_products_saturate

    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")
    return {"flags": [f for f in wanted if f in flags], "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
            "int8_products_saturate": int8_products_saturate() if int8_kernels_available() else None}


# ------------------------------------------------------------------------------------- models
def unet_30m():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 192, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=64, norm_num_groups=32,
    )


def tiny_stand_in(size: int = 16):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=size, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=8,
    )


def _bundle_of(name: str, unet, shape):
    from diffquant.bundle import CALL_DIFFUSERS, DiffusionBundle, linear_ddpm_config

    return DiffusionBundle(name=name, unet=unet.eval(), scheduler_config=linear_ddpm_config(), sample_shape=shape,
                           call_convention=CALL_DIFFUSERS, source="config-built")


def load_bundles(names: list[str], tiny: bool):
    from diffquant.errors import DiffquantError
    from diffquant.zoo.registry import load_model

    torch.manual_seed(0)
    out = []
    for name in names:
        if name == "unet30m":
            unet, shape = (tiny_stand_in(16), (1, 16, 16)) if tiny else (unet_30m(), (3, 32, 32))
            out.append(_bundle_of("unet30m" + (" (tiny stand-in)" if tiny else ""), unet, shape))
            continue
        bundle = None
        for candidate in ([] if tiny else [name, "mnist-resunet"]):
            try:
                bundle = load_model(candidate)
                break
            except DiffquantError:
                continue
        if bundle is None:
            bundle = _bundle_of(f"{name} (config-built stand-in)", tiny_stand_in(16), (1, 16, 16))
        out.append(bundle)
    return out


def calibrated(bundle, wbits: int, abits: int, batch: int):
    from diffquant.config import QuantConfig
    from diffquant.methods.naive import run_naive
    from diffquant.model import quantize

    example = bundle.example_inputs(2)
    qmodel = quantize(bundle.unet, QuantConfig(weight_bits=wbits, act_bits=abits, split=True), example_inputs=example)
    gen = torch.Generator().manual_seed(1)

    @torch.no_grad()
    def loop(model):
        for t in (900, 500, 100, 10):
            x = torch.randn(min(batch, 8), *bundle.sample_shape, generator=gen)
            bundle.predict_noise(model, x, torch.full((x.shape[0],), t))

    return run_naive(qmodel, loop)


# ------------------------------------------------------------------------------------- sizes
def file_mib(path: Path) -> float:
    return path.stat().st_size / 2**20


def mixed_bit_file(qmodel, path: Path) -> Path:
    """Turn a W3 model's weight quantizers into MixedBitQuantizers (see module docstring) and pack it."""
    from diffquant.export.pack import save_packed
    from diffquant.quant.variants import MixedBitQuantizer, replace_module

    for name, layer in qmodel.layers().items():
        if not layer.use_weight_quant:
            continue
        for i, (w, q) in enumerate(zip(layer.weight_parts(), layer.weight_quantizers)):
            if not q.active or q.channel_axis is None:
                continue
            rows = w.detach().movedim(q.channel_axis, 0).reshape(q.channels, -1).double()
            centred = rows - rows.mean(dim=1, keepdim=True)
            kurtosis = centred.pow(4).mean(dim=1) / rows.var(dim=1).pow(2).clamp_min(1e-30)
            order = torch.argsort(kurtosis, descending=True)
            k = q.channels // 10
            bits = torch.full((q.channels,), 3)
            bits[order[:k]] = 4
            if k:
                bits[order[q.channels - k:]] = 2
            mixed = MixedBitQuantizer.from_quantizer(q)
            mixed.set_channel_bits(bits)
            mixed.init_from(w.detach())
            replace_module(qmodel.model, f"{name}.weight_quantizers.{i}", mixed)
        layer.clear_cache()
    return save_packed(qmodel, path)


def measure_sizes(bundle, workdir: Path, batch: int) -> dict:
    from safetensors.torch import save_file

    from diffquant.export.pack import read_packed, save_packed

    state = {k: v.detach().contiguous() for k, v in bundle.unet.state_dict().items()}
    fp32 = workdir / "fp32.safetensors"
    fp16 = workdir / "fp16.safetensors"
    save_file(state, str(fp32))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(fp16))
    rows = {"fp32": {"MiB": file_mib(fp32)}, "fp16": {"MiB": file_mib(fp16)}}
    w3 = None
    for bits in SIZE_BITS:
        qmodel = calibrated(bundle, bits, 8, batch)
        path = save_packed(qmodel, workdir / f"w{bits}.safetensors")
        parts = read_packed(path).nbytes()
        rows[f"W{bits}"] = {"MiB": file_mib(path), "weight_streams_MiB": parts["weight_streams"] / 2**20}
        if bits == 3:
            w3 = qmodel
    path = mixed_bit_file(w3, workdir / "mixed.safetensors")
    rows["mixed 2/3/4"] = {"MiB": file_mib(path), "weight_streams_MiB": read_packed(path).nbytes()["weight_streams"] / 2**20}
    for row in rows.values():
        row["x smaller than fp32"] = rows["fp32"]["MiB"] / row["MiB"]
    return rows


# ------------------------------------------------------------------------------------- speed
def _median_seconds(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt())


def measure_speed(bundle, settings: list[tuple[int, int]], args, workdir: Path) -> list[dict]:
    from diffquant.diffusion.sampling import sample
    from diffquant.export.int8_backend import compile_int8, int8_kernels_available, to_int8
    from diffquant.export.onnx_export import export_float_onnx, export_onnx
    from diffquant.export.onnx_runtime import OnnxDenoiser

    (x, t), kwargs = bundle.example_inputs(args.batch)
    example = bundle.example_inputs(2)
    backends: list[tuple[str, torch.nn.Module, str | None]] = [("pytorch fp32", bundle.unet, None)]
    path = export_float_onnx(bundle.unet, example, workdir / "fp32.onnx")
    backends.append(("onnxruntime fp32", OnnxDenoiser(path, threads=args.threads), None))
    for wbits, abits in settings:
        tag = f"W{wbits}A{abits}"
        qmodel = calibrated(bundle, wbits, abits, args.batch)
        backends.append((f"pytorch fake-quant {tag}", qmodel, tag))
        backends.append((f"pytorch fake-quant float64 {tag} (float-rounding floor)", _Float64(qmodel), tag))
        if int8_kernels_available():
            int8 = to_int8(qmodel)
            backends.append((f"pytorch int8 {tag}", int8, tag))
            if args.compile and (args.compile_models is None or bundle.name in args.compile_models):
                backends.append((f"pytorch int8 + torch.compile {tag}", compile_int8(int8), tag))
        for mode in args.onnx_modes:
            calibration = None
            if mode == "fused":  # the same inputs quantize_static and PT2E calibrate on
                calibration = [((cx, ct), bundle.example_inputs(cx.shape[0])[1])
                               for cx, ct in _calibration_inputs(bundle, args.batch)]
            result = export_onnx(qmodel, example, workdir / f"{tag}_{mode}.onnx", mode=mode, calibration=calibration)
            backends.append((f"onnxruntime {mode} {tag}", OnnxDenoiser(result.paths[0], threads=args.threads), tag))

    if (8, 8) in settings:
        backends += anchor_backends(bundle, args, workdir, path, batch_shape=x.shape)

    rows, reference, float_out = [], {}, None
    for name, model, tag in backends:
        row = {"backend": name, "setting": tag or "fp32"}
        start = time.perf_counter()
        with torch.no_grad():
            out = bundle.predict_noise(model, x, t, kwargs.get("class_labels"))
        if "torch.compile" in name and hasattr(model, "compiled_ok"):
            row["compile_s"] = time.perf_counter() - start  # the first call compiles
            row["compiled"] = bool(model.compiled_ok)
        if name == f"pytorch fake-quant {tag}":
            reference[tag] = out
        if name == "pytorch fp32":
            float_out = out
        elif float_out is not None:
            row["rel_rms_vs_float"] = _rel_rms(out, float_out)
        with torch.no_grad():
            row["call_s"] = _median_seconds(lambda: bundle.predict_noise(model, x, t, kwargs.get("class_labels")), args.reps)
        if tag is not None and tag in reference and not name.startswith("anchor"):
            row["rel_rms_vs_fake_quant"] = _rel_rms(out, reference[tag])
        if not args.no_sample:
            start = time.perf_counter()
            sample(bundle.with_unet(model), args.batch, steps=args.steps, batch_size=args.batch, progress=False)
            row["sample_s"] = time.perf_counter() - start
        rows.append(row)
        print(f"  {bundle.name:28s} {name:32s} call {row['call_s'] * 1e3:8.1f} ms"
              + (f"  sample {row['sample_s']:7.1f} s" if "sample_s" in row else ""), flush=True)
    return rows


def _calibration_inputs(bundle, batch: int) -> list:
    gen = torch.Generator().manual_seed(1)
    out = []
    for t in (900, 500, 100, 10):
        x = torch.randn(min(batch, 8), *bundle.sample_shape, generator=gen)
        out.append((x, torch.full((x.shape[0],), t)))
    return out


class _PredictNoise(torch.nn.Module):
    """(x, t) -> the bundle's noise prediction, with t as float (PT2E observers cannot take int64)."""

    def __init__(self, bundle, model):
        super().__init__()
        self.bundle, self.model = bundle, model

    def forward(self, x, t):
        return self.bundle.predict_noise(self.model, x, t)


class _Float64(torch.nn.Module):
    """The fake-quant model in float64: the same quantized network with other float rounding."""

    def __init__(self, qmodel):
        super().__init__()
        import copy

        self.model = copy.deepcopy(qmodel).double()

    def forward(self, x, t, *args, **kwargs):
        out = self.model(x.double(), t, *args, **kwargs)
        return (out if isinstance(out, torch.Tensor) else out[0]).float()


def anchor_backends(bundle, args, workdir: Path, fp32_onnx: Path, batch_shape) -> list:
    """W8A8 int8 models made by other toolkits' own static quantization, same calibration inputs."""
    out = []
    calib = _calibration_inputs(bundle, args.batch)
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from diffquant.export.onnx_runtime import OnnxDenoiser

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.items = iter(calib)
                import onnx

                self.names = [i.name for i in onnx.load(str(fp32_onnx)).graph.input]

            def get_next(self):
                item = next(self.items, None)
                if item is None:
                    return None
                x, t = item
                feeds = dict(zip(self.names, (x.numpy(), t.numpy())))
                extra = bundle.example_inputs(x.shape[0])[1]  # e.g. class_labels of a conditional model
                for name in self.names[2:]:
                    feeds[name] = extra[name].numpy()
                return feeds

        target = workdir / "ort_quantize_static.onnx"
        quantize_static(str(fp32_onnx), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        out.append(("anchor: onnxruntime quantize_static W8A8", OnnxDenoiser(target, threads=args.threads), "W8A8"))
    except Exception as exc:  # the anchor is optional; say why it is missing
        print(f"  onnxruntime quantize_static skipped: {exc}", flush=True)
    try:
        import torch._inductor.config as inductor_config
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

        wrapped = _PredictNoise(bundle, bundle.unet).eval()
        x0 = torch.randn(*batch_shape)
        t0 = torch.full((batch_shape[0],), 500.0)
        exported = torch.export.export(wrapped, (x0, t0)).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for x, t in calib:
                prepared(torch.cat([x, x])[: batch_shape[0]], torch.cat([t, t])[: batch_shape[0]].float())
        converted = convert_pt2e(prepared)
        with inductor_config.patch(freezing=True):
            compiled = torch.compile(converted)
            start = time.perf_counter()
            with torch.no_grad():
                compiled(x0, t0)
        print(f"  PT2E compiled in {time.perf_counter() - start:.0f} s", flush=True)

        class Frozen(torch.nn.Module):
            """Called by the bundle like its denoiser; the compiled graph already predicts the noise."""

            def forward(self, x, t, *args, **kwargs):
                with inductor_config.patch(freezing=True):
                    return compiled(x, torch.as_tensor(t).float().reshape(-1).expand(x.shape[0]))

        out.append(("anchor: pytorch PT2E X86InductorQuantizer W8A8 + torch.compile", Frozen(), "W8A8"))
    except Exception as exc:
        print(f"  PT2E skipped: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", flush=True)
    return out


# ------------------------------------------------------------------------------------- report
TARGET_SPEEDUP = 1.5


def _ratio_lines(best: dict, best_fp: dict, rows: list[dict], setting: str, key: str, what: str) -> list[str]:
    ratio = best_fp[key] / best[key]
    lines = [f"- {setting}, per {what}: {best['backend']} is {ratio:.2f}× faster than {best_fp['backend']} "
             f"(goal ≥ {TARGET_SPEEDUP}×: {'met' if ratio >= TARGET_SPEEDUP else 'NOT met'})."]
    for anchor in (r for r in rows if r["setting"] == setting and r["backend"].startswith("anchor") and key in r):
        lines.append(f"- {setting}, per {what}: {best['backend']} takes {best[key] / anchor[key]:.2f}× the time "
                     f"of {anchor['backend'][8:]} (goal ≤ 1.0×: {'met' if best[key] <= anchor[key] else 'NOT met'}).")
    return lines


def speedup_lines(rows: list[dict]) -> list[str]:
    """Best exact integer path (PyTorch int8 or onnxruntime integer) and the fused onnxruntime graph
    vs the best fp32 path and the anchors, per setting."""
    fp = [r for r in rows if r["setting"] == "fp32"]
    lines = []
    for key, what in (("call_s", "denoiser call"), ("sample_s", "full sample")):
        if not all(key in r for r in rows):
            continue
        best_fp = min(fp, key=lambda r: r[key])
        for setting in sorted({r["setting"] for r in rows} - {"fp32"}):
            ints = [r for r in rows if r["setting"] == setting and not r["backend"].startswith("anchor")
                    and ("int8" in r["backend"] or "integer" in r["backend"])]
            if not ints:
                continue
            lines += _ratio_lines(min(ints, key=lambda r: r[key]), best_fp, rows, setting, key, what)
            for fused in (r for r in rows if r["setting"] == setting and r["backend"].startswith("onnxruntime fused")):
                lines += _ratio_lines(fused, best_fp, rows, setting, key, what)
    return lines
def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "deploy.json").write_text(json.dumps(results, indent=1))
    lines = ["# Real low-bit deployment: size and CPU speed", "", f"Command: `{results['command']}`", "",
             f"Machine: {results['machine']}; torch {results['torch']}, onnxruntime {results['onnxruntime']}; "
             f"{results['threads']} threads, batch {results['batch']}, {results['steps']}-step DDIM samples; "
             f"load average at start {results['loadavg']}.", "",
             f"CPU ISA: {', '.join(results['isa']['flags']) or 'none of avx2/avx512/vnni/amx'}; PyTorch dispatch "
             f"{results['isa']['torch_cpu_capability']}; ONEDNN_MAX_CPU_ISA={results['isa']['onednn_max_cpu_isa']}; "
             f"oneDNN int8 products saturate: {results['isa']['int8_products_saturate']}.", "",
             "The fake-quant model disagrees with itself at this level too: rounding boundaries make single codes "
             "flip under any change of float order, and flips multiply downstream (see docs/deploy.md).", ""]
    for model in results["models"]:
        lines += [f"## {model['name']} ({model['params_M']:.1f} M parameters)", "", "| checkpoint | MiB | × smaller than fp32 |",
                  "|---|---:|---:|"]
        for key, row in model["sizes"].items():
            lines.append(f"| {key} | {row['MiB']:.3f} | {row['x smaller than fp32']:.2f} |")
        w4 = model["sizes"]["W4"]["x smaller than fp32"]
        lines += ["", f"W4 is {w4:.2f}× smaller than fp32 (goal ≥ {TARGET_W4_RATIO}×: {'met' if w4 >= TARGET_W4_RATIO else 'NOT met'}).", ""]
        if model.get("speed"):
            lines += ["| backend | ms / denoiser call | s / full sample | rel. RMS vs fake-quant | rel. RMS vs float |",
                      "|---|---:|---:|---:|---:|"]
            for row in model["speed"]:
                sample_s = f"{row['sample_s']:.1f}" if "sample_s" in row else "-"
                rel = f"{row['rel_rms_vs_fake_quant']:.2e}" if "rel_rms_vs_fake_quant" in row else "-"
                rel_fp = f"{row['rel_rms_vs_float']:.2e}" if "rel_rms_vs_float" in row else "-"
                note = f" (compiled in {row['compile_s']:.0f} s)" if row.get("compiled") else (
                    " (compile failed: eager)" if "compiled" in row else "")
                lines.append(f"| {row['backend']}{note} | {row['call_s'] * 1e3:.1f} | {sample_s} | {rel} | {rel_fp} |")
            lines += [""] + speedup_lines(model["speed"]) + [""]
    (out / "deploy.md").write_text("\n".join(lines) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["default", "unet30m"], help="default and/or unet30m")
    p.add_argument("--bits", nargs="+", default=["W8A8", "W4A8"], help="quantized settings to time")
    p.add_argument("--onnx-modes", nargs="+", default=["integer", "qdq", "fused"], choices=["integer", "qdq", "fused"])
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile'd int8 rows (compiling takes a minute or more per model)")
    p.add_argument("--compile-models", nargs="+", default=None,
                   help="models that get the torch.compile'd int8 rows (default: all)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes-only", action="store_true")
    p.add_argument("--no-sample", action="store_true", help="skip the full-sample timings")
    p.add_argument("--tiny", action="store_true", help="tiny stand-in models, batch 2, 2 steps, 1 rep (a smoke test)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.steps, args.reps = 2, 2, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = []
    for tag in args.bits:
        w, a = tag.upper().lstrip("W").split("A")
        settings.append((int(w), int(a)))
    import onnxruntime

    results = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "threads": args.threads, "batch": args.batch, "steps": args.steps, "reps": args.reps,
        "loadavg": [round(v, 2) for v in os.getloadavg()], "isa": cpu_isa(), "models": [],
    }
    for bundle in load_bundles(args.models, args.tiny):
        print(f"{bundle.name}: sizes", flush=True)
        entry = {"name": bundle.name, "source": bundle.source,
                 "params_M": sum(p.numel() for p in bundle.unet.parameters()) / 1e6}
        with tempfile.TemporaryDirectory() as tmp:
            entry["sizes"] = measure_sizes(bundle, Path(tmp), args.batch)
            if not args.sizes_only:
                print(f"{bundle.name}: speed", flush=True)
                entry["speed"] = measure_speed(bundle, settings, args, Path(tmp))
        results["models"].append(entry)
    write_report(results, Path(args.out))
    print(f"wrote {Path(args.out) / 'deploy.json'} and deploy.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
