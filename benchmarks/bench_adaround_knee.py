"""AdaRound on one reconstruction unit: output error against iterations (the schedule's knee).

For each unit and iteration count, a fresh W4 (activations off) Q-Diffusion-wrapped copy of the
model reconstructs that one unit from float inputs, and three losses on the same calibration
samples are recorded: round-to-nearest (before), the soft rounding at the end of training, and
the hardened rounding that the quantized model keeps. Too few iterations leave h(V) between 0 and
1, so the soft solution is good but hardening it is worse than round-to-nearest; the knee is where
the hard loss drops below round-to-nearest. Writes ``benchmarks/results/adaround_knee.{json,md}``.

    python3 benchmarks/bench_adaround_knee.py --units conv_out decoders.2.1.res_block \\
        --iters 0 100 400 1000 2000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from diffquant import quantize
from diffquant.methods.qdiffusion import QDiffusionConfig
from diffquant.methods.stages import init_weight_quantizers
from diffquant.pipeline import CalibConfig, build_quant_config, calibration_batches
from diffquant.recon.cache import CalibrationCalls
from diffquant.recon.engine import EngineOptions, eval_indices, evaluate_unit, reconstruct_unit
from diffquant.recon.passes import AdaRoundPass
from diffquant.recon.state import quant_state
from diffquant.recon.units import make_units
from diffquant.zoo.registry import load_model


class SoftLossAdaRound(AdaRoundPass):
    """AdaRound from float inputs that also measures the soft-rounding loss before hardening."""

    inputs = "fp"

    def __init__(self, *args, eval_samples: int = 256, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_samples = eval_samples
        self.soft_loss: float | None = None
        self._cache = None

    def training_loss(self, unit, cache, index, device, count):
        self._cache = cache
        return super().training_loss(unit, cache, index, device, count)

    def finish(self, unit):
        if self._cache is not None:
            index = eval_indices(self._cache.n, self.eval_samples)
            self.soft_loss = evaluate_unit(unit, self._cache, self, index, "cpu")
        super().finish(unit)


def measure(bundle, calib_set, unit_name: str, iters: int, bits: int, seed: int) -> dict:
    config = QDiffusionConfig(seed=seed)
    quant = config.wrap_config(build_quant_config(bits, 32, None, split=True))
    args, kwargs = bundle.example_inputs(2)
    qmodel = quantize(bundle.unet, quant, (args, kwargs))
    init_weight_quantizers(qmodel)
    units = {u.name: u for u in make_units(qmodel, "block", "execution")}
    if unit_name not in units:
        sys.exit(f"error: no unit {unit_name!r}; units: {', '.join(units)}")
    data = CalibrationCalls(calib_set, bundle.predict_noise, "cpu")
    recon_pass = SoftLossAdaRound(iters=iters, batch_size=config.batch_size, lr=config.lr_w, p=config.p_w,
                                  reg_weight=config.round_reg_weight, beta_start=config.beta_start,
                                  beta_end=config.beta_end, warmup=config.warmup)
    t0 = time.perf_counter()
    with quant_state(qmodel, True, False):
        record = reconstruct_unit(qmodel, units[unit_name], data, recon_pass, fp_model=bundle.unet,
                                  options=EngineOptions(seed=seed, progress=False))
    return {"unit": unit_name, "iters": iters, "rtn_loss": record.initial_loss, "soft_loss": recon_pass.soft_loss,
            "hard_loss": record.final_loss, "hard_vs_rtn": record.final_loss / record.initial_loss,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mnist-resunet")
    parser.add_argument("--units", nargs="+", default=["conv_out"])
    parser.add_argument("--iters", nargs="+", type=int, default=[0, 100, 400, 1000, 2000])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--calib-n", type=int, default=64, help="calibration trajectories (20 steps × n samples)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    bundle = load_model(args.model)
    select = QDiffusionConfig(cali_n=args.calib_n).select_calibration
    calib_set = calibration_batches(bundle, CalibConfig(n=args.calib_n, steps=50, every=1), "cpu", select=select)
    rows = []
    for unit in args.units:
        for iters in args.iters:
            rows.append(measure(bundle, calib_set, unit, iters, args.bits, args.seed))
            r = rows[-1]
            print(f"{unit} {iters:>6} iters: RTN {r['rtn_loss']:.4g}  soft {r['soft_loss']}  hard {r['hard_loss']:.4g}"
                  f"  ({r['seconds']} s)", flush=True)
    command = "python3 " + " ".join(sys.argv)
    result = {"model": args.model, "bits": args.bits, "calib": {"trajectories": args.calib_n, "steps": 20},
              "loss": "Σ over channels of squared error, mean over the rest (Q-Diffusion's lp_loss, p = 2)",
              "rows": rows, "command": command}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adaround_knee.json").write_text(json.dumps(result, indent=1))
    lines = ["| unit | iterations | RTN loss | soft loss (end of training) | hard loss | hard / RTN | s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        soft = "-" if r["soft_loss"] is None else f"{r['soft_loss']:.4g}"
        lines.append(f"| {r['unit']} | {r['iters']} | {r['rtn_loss']:.4g} | {soft} | {r['hard_loss']:.4g} | "
                     f"{r['hard_vs_rtn']:.2f} | {r['seconds']} |")
    (args.out / "adaround_knee.md").write_text(
        f"# AdaRound knee on {args.model} (W{args.bits}, activations off, float inputs)\n\n"
        f"Q-Diffusion's AdaRound defaults (batch 32, lr 1e-3, λ = 0.01, β 20 → 2, warm-up 20 %) on one unit at a "
        f"time, calibration = 20 steps × {args.calib_n} trajectories; losses on the same 256 evaluation samples.\n\n"
        + "\n".join(lines) + f"\n\nCommand: `{command}`\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
