"""Range searches per layer against the float forward of the same layer (issue 23, item 4).

For every Conv2d/Linear of a denoiser, the layer's input on one calibration batch (real x_t of
float trajectories at evenly spread steps) is captured once. On that tensor the script times, side
by side in one process:

- the float forward of the layer, and its forward + backward (the cost the searches are held to);
- the 8-bit per-tensor activation searches ``lp_shrink`` (Q-Diffusion's ``mse``) and
  ``edadm_grid`` (EDA-DM's 1-D / 2-D grid) of today's code and of a reference commit's code
  (``--before REF``, loaded from git), and the Lp error (p = 2.4, on all elements) of the range
  each one picks.

Writes ``OUT.json`` and ``OUT.md`` (per layer, plus the median / worst ratio to the forward).

    python3 benchmarks/bench_range_search.py --model default --before 1aeac11 \
        --out benchmarks/results/range_search
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from diffquant.quant import search as search_now  # noqa: E402
from diffquant.quant.affine import GridSpec  # noqa: E402
from report_io import write_report  # noqa: E402

P = 2.4


def load_search_at(ref: str):
    """The ``diffquant.quant.search`` module of commit ``ref`` (its relative imports resolved against today's package)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:src/diffquant/quant/search.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "search_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("diffquant.quant._search_before", path,
                                                  submodule_search_locations=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "diffquant.quant"
    spec.loader.exec_module(module)
    return module


def layer_inputs(bundle, batch: int, steps: int) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """The input of every Conv2d/Linear on one batch of real x_t (``batch`` samples over ``steps`` steps)."""
    from diffquant.calib.capture import capture_trajectories

    per_step = max(1, batch // steps)
    cache = capture_trajectories(bundle, per_step, steps=steps, guidance=bundle.default_guidance, progress=False)
    xs, ts = [], []
    for k in range(steps):
        xs.append(cache.xs(k))
        ts.append(torch.full((per_step,), int(cache.timesteps[k])))
    x, t = torch.cat(xs), torch.cat(ts)
    labels = None
    if bundle.is_conditional:
        labels = torch.arange(len(x)) % int(bundle.num_classes)
    seen: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    hooks = []
    for name, module in bundle.unet.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            def hook(mod, args, name=name):
                if name not in seen:
                    seen[name] = (mod, args[0].detach().clone())
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        bundle.predict_noise(bundle.unet, x, t, labels)
    for h in hooks:
        h.remove()
    return seen


def best_time(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def lp_error(module, x, lo, hi, spec, include_zero) -> float:
    rows = search_now.channel_rows(x, None)
    return float(search_now.lp_scores(rows, lo.reshape(1, 1), hi.reshape(1, 1), spec, p=P,
                                      include_zero=include_zero))


def measure(name, module, x, before, repeat) -> dict:
    spec = GridSpec(8, "asymmetric")
    with torch.no_grad():
        forward = best_time(lambda: module(x), repeat)
    xg = x.clone().requires_grad_(True)

    def fwd_bwd():
        module.zero_grad(set_to_none=True)
        module(xg).square().mean().backward()

    forward_backward = best_time(fwd_bwd, repeat)
    row = {"layer": name, "kind": type(module).__name__, "input_shape": list(x.shape), "elements": x.numel(),
           "side": search_now.data_side(x), "forward_s": forward, "forward_backward_s": forward_backward}
    for policy, include_zero in (("lp_shrink", False), ("edadm_grid", True)):
        for label, module_ in (("now", search_now), ("before", before)):
            if module_ is None:
                continue
            fn = getattr(module_, f"{policy}_range")
            seconds = best_time(lambda fn=fn: fn(x, spec, None), max(1, repeat // 2))
            lo, hi = fn(x, spec, None)
            row[f"{policy}_{label}_s"] = seconds
            row[f"{policy}_{label}_lp_error"] = lp_error(module, x, lo, hi, spec, include_zero)
        row[f"{policy}_now_vs_forward"] = row[f"{policy}_now_s"] / forward
        row[f"{policy}_now_vs_forward_backward"] = row[f"{policy}_now_s"] / forward_backward
        if before is not None:
            row[f"{policy}_before_vs_forward"] = row[f"{policy}_before_s"] / forward
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    has_before = "lp_shrink_before_s" in rows[0]
    lines = [f"# Range searches per layer vs the float forward ({meta['model']})", "",
             f"One calibration batch of {meta['batch']} real x_t over {meta['steps']} steps, 8-bit per-tensor "
             f"activation searches on each layer's input, {meta['threads']} threads, best of {meta['repeat']}; "
             f"load average {meta['load_before']} before, {meta['load_after']} after. Lp error: mean |x − Q(x)|^2.4 "
             f"on all elements of the range picked. `before`: commit {meta['before']}.", ""]
    head = "| layer | input | fwd ms | fwd+bwd ms | lp_shrink ×fwd | edadm_grid ×fwd |"
    sep = "|---|---|---|---|---|---|"
    if has_before:
        head += " lp_shrink ×fwd before | edadm_grid ×fwd before | Lp error now / before (lp_shrink, edadm) |"
        sep += "---|---|---|"
    lines += [head, sep]
    for r in rows:
        line = (f"| {r['layer']} | {'×'.join(map(str, r['input_shape']))} | {r['forward_s'] * 1e3:.2f} | "
                f"{r['forward_backward_s'] * 1e3:.2f} | {r['lp_shrink_now_vs_forward']:.2f} | "
                f"{r['edadm_grid_now_vs_forward']:.2f} |")
        if has_before:
            line += (f" {r['lp_shrink_before_vs_forward']:.1f} | {r['edadm_grid_before_vs_forward']:.1f} | "
                     f"{r['lp_shrink_now_lp_error'] / max(r['lp_shrink_before_lp_error'], 1e-30):.4f}, "
                     f"{r['edadm_grid_now_lp_error'] / max(r['edadm_grid_before_lp_error'], 1e-30):.4f} |")
        lines.append(line)
    lines.append("")
    for key in ("lp_shrink_now_vs_forward", "edadm_grid_now_vs_forward", "lp_shrink_now_vs_forward_backward",
                "edadm_grid_now_vs_forward_backward") + (
            ("lp_shrink_before_vs_forward", "edadm_grid_before_vs_forward") if has_before else ()):
        values = [r[key] for r in rows]
        lines.append(f"- `{key}`: median {statistics.median(values):.2f}, worst {max(values):.2f}")
    lines += ["", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-layers", type=int, default=None, help="only the first N layers (a quick look)")
    parser.add_argument("--before", default=None, help="git commit whose search module is timed beside today's")
    parser.add_argument("--out", required=True, help="output path without extension")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffquant.zoo.registry import load_model

    bundle = load_model(args.model)
    before = load_search_at(args.before) if args.before else None
    load_before = open("/proc/loadavg").read().split()[0]
    inputs = layer_inputs(bundle, args.batch, args.steps)
    rows = []
    for name, (module, x) in list(inputs.items())[:args.max_layers]:
        rows.append(measure(name, module, x, before, args.repeat))
        print(f"{name}: lp_shrink {rows[-1]['lp_shrink_now_vs_forward']:.2f}x, "
              f"edadm_grid {rows[-1]['edadm_grid_now_vs_forward']:.2f}x the forward", flush=True)
    meta = {"model": args.model, "batch": args.batch, "steps": args.steps, "repeat": args.repeat,
            "threads": args.threads, "before": args.before, "load_before": load_before,
            "load_after": open("/proc/loadavg").read().split()[0]}
    write_report(args.out, "bench_range_search.py", argv, meta, rows, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
