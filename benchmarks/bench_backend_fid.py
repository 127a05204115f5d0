"""Do the integer backends sample the same images as the fake-quant model? FID within noise.

For each bit setting, one naive-calibrated model is sampled from the same seeds (0 … N−1) as
- the PyTorch fake-quant model (the reference the recipes are measured with),
- the native PyTorch int8 backend (``diffquant sample --backend int8``: oneDNN int8 kernels),
- the onnxruntime ``integer`` export (ConvInteger / MatMulInteger),
- the onnxruntime ``fused`` export (8-bit conv outputs, QLinearConv; not exact: one more rounding
  per conv, ranges from 8 float trajectories as ``diffquant export --backend fused`` takes them),
and each image set is scored against the data set's test split (FID, sFID, precision, recall)
and compared pixel-wise with the fake-quant images (PSNR). The noise scale is the FID gap
between two independent full-precision sets (seeds 0 … N−1 and N … 2N−1): a backend "matches
within noise" when its FID differs from the fake-quant FID by less than that gap.

    python benchmarks/bench_backend_fid.py            # mnist-resunet, W8A8 and W4A8, N = 1000
    python benchmarks/bench_backend_fid.py --n 8 --ref-n 64 --out /tmp/b   # a quick smoke run
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mnist-resunet")
    p.add_argument("--bits", nargs="+", default=["W8A8", "W4A8"])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--ref-n", type=int, default=None)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def main(argv=None) -> int:
    from diffquant.diffusion.sampling import sample
    from diffquant.eval.fid import reference_stats
    from diffquant.eval.inception import InceptionFeatures
    from diffquant.eval.report import environment_record, evaluate_images
    from diffquant.export.int8_backend import to_int8
    from diffquant.export.export_cli import fused_calibration
    from diffquant.export.onnx_export import export_onnx
    from diffquant.export.onnx_runtime import OnnxDenoiser
    from diffquant.pipeline import CalibConfig, build_quant_config, default_guidance, parse_setting, quantize_bundle, reference_dataset
    from diffquant.zoo.registry import load_model

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = load_model(args.model)
    dataset = reference_dataset(bundle)
    guidance = default_guidance(bundle)
    extractor = InceptionFeatures()
    reference = reference_stats(dataset, "test", n=args.ref_n, extractor=extractor, spatial=True)
    kw = dict(steps=args.steps, guidance=guidance, batch_size=args.batch)
    metrics = ["fid", "sfid", "precision", "recall"]

    def score(images, labels, fp_images=None):
        extra = ["mse", "psnr"] if fp_images is not None else []
        return evaluate_images(images, labels, reference=reference, extractor=extractor, fp_images=fp_images,
                               metrics=metrics + extra)["metrics"]

    rows = []
    t0 = time.perf_counter()
    fp_a = sample(bundle, args.n, seed=0, **kw)
    rows.append({"model": "fp32", "backend": "pytorch", "seeds": f"0..{args.n - 1}", "sample_s": time.perf_counter() - t0,
                 **score(fp_a.images, fp_a.labels)})
    t0 = time.perf_counter()
    fp_b = sample(bundle, args.n, seed=0, start_index=args.n, **kw)
    rows.append({"model": "fp32", "backend": "pytorch", "seeds": f"{args.n}..{2 * args.n - 1}",
                 "sample_s": time.perf_counter() - t0, **score(fp_b.images, fp_b.labels)})
    noise = abs(rows[0]["fid"] - rows[1]["fid"])
    for tag in args.bits:
        wbits, abits = parse_setting(tag)
        res = quantize_bundle(bundle, "naive", build_quant_config(wbits, abits, None, split=False), CalibConfig(steps=args.steps))
        qmodel = res.qmodel.eval()
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = Path(tmp) / "denoiser.onnx"
            export_onnx(qmodel, bundle.example_inputs(2), onnx_path, mode="integer")
            fused_path = Path(tmp) / "fused.onnx"
            export_onnx(qmodel, bundle.example_inputs(2), fused_path, mode="fused",
                        calibration=fused_calibration(bundle, 8, 16))
            backends = {"fake-quant": qmodel, "int8 (oneDNN)": to_int8(qmodel),
                        "onnxruntime integer": OnnxDenoiser(onnx_path, threads=args.threads),
                        "onnxruntime fused": OnnxDenoiser(fused_path, threads=args.threads)}
            fake_images = None
            for name, denoiser in backends.items():
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = sample(bundle.with_unet(denoiser), args.n, seed=0, **kw)
                seconds = time.perf_counter() - t0
                if fake_images is None:
                    fake_images = out.images
                    row = score(out.images, out.labels)
                else:
                    row = score(out.images, out.labels, fp_images=fake_images)
                row = {"model": tag, "backend": name, "seeds": f"0..{args.n - 1}", "sample_s": seconds, **row}
                if name != "fake-quant":
                    fake_fid = next(r["fid"] for r in rows if r["model"] == tag and r["backend"] == "fake-quant")
                    row["fid_gap_vs_fake_quant"] = abs(row["fid"] - fake_fid)
                    row["within_noise"] = row["fid_gap_vs_fake_quant"] <= noise
                rows.append(row)
                print(row, flush=True)
    results = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "model": bundle.name, "n": args.n, "steps": args.steps, "guidance": guidance, "sampler": "ddim, eta 0",
        "reference": {"dataset": dataset, "split": "test", **reference.meta},
        "noise_fid_gap_fp_vs_fp": noise, "rows": rows, "environment": environment_record(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "backend_fid.json").write_text(json.dumps(results, indent=1, default=str))
    keys = ["model", "backend", "seeds", "fid", "sfid", "precision", "recall", "psnr", "fid_gap_vs_fake_quant",
            "within_noise", "sample_s"]

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    (out / "backend_fid.md").write_text(
        f"# Integer backends vs fake quantization: FID from the same seeds ({bundle.name})\n\n"
        f"N = {args.n}, DDIM {args.steps} steps, η = 0, guidance {guidance}; reference: {dataset} test "
        f"({reference.meta.get('n', 'all')} images). Naive calibration. PSNR is against the fake-quant images "
        f"from the same seeds. Noise scale: the FID gap between two independent fp32 sets = {noise:.3g}.\n\n"
        + "\n".join(lines) + f"\n\nCommand: `{results['command']}`\n"
    )
    print((out / "backend_fid.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
