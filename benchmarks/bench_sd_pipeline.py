"""Drop-in quantization of a Stable-Diffusion-topology text-to-image pipeline (issue #18 benchmark).

Model: a config-built ``StableDiffusionPipeline`` whose UNet has SD-1.5's topology (3 cross-attention
down/up levels + a plain one, 2 ResNets per level, 77-token 768-d text embeddings) at reduced width
(``--channels``, default 96/192/384/384: about 81 M parameters) on 32×32 latents, a random CLIP text
encoder and tokenizer built in the script, and a tiny VAE. Random weights: this measures the path and
its cost (does calibration from prompts work end to end inside diffusers, how long, how much
memory), not image quality.

Per row (recipe × setting): calibration from ``--prompts`` prompts (the shipped default set) through
:func:`diffquant.capture_pipeline` (DDIM ``--steps``, guidance 7.5, both CFG halves recorded), the
recipe via :func:`diffquant.apply_recipe`, then ``pipe.unet = qmodel`` and sampling of
``--eval-prompts`` held-out prompts from the same noise as float. Reported: ε-MSE relative to the
float prediction's mean square along the float trajectory (teacher-forced, every step), final-latent
relative MSE vs float, calibration time, peak RSS of the process so far, and the load average.

    python benchmarks/bench_sd_pipeline.py                   # writes benchmarks/results/sd_pipeline.{json,md}
    python benchmarks/bench_sd_pipeline.py --tiny --out /tmp/s   # seconds: checks that everything runs
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import string
import sys
import tempfile
import time
from pathlib import Path

import torch

import diffquant as dq


def build_pipeline(channels, context_dim: int, tmp: Path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokens = ["<|startoftext|>", "<|endoftext|>"]
    for c in string.ascii_lowercase + string.digits + ",.!?'-":
        tokens += [c, c + "</w>"]
    (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokens), hidden_size=context_dim, intermediate_size=2 * context_dim,
                                        num_hidden_layers=2, num_attention_heads=8, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=tuple(channels), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * (len(channels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(channels) - 1),
        cross_attention_dim=context_dim, attention_head_dim=8, norm_num_groups=32).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=64).eval()
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def final_latents(pipe, prompts, steps, seed=123):
    return pipe(prompts, num_inference_steps=steps, height=64, width=64, guidance_scale=7.5, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).images


def relative_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean() / (b ** 2).mean())


def teacher_forced_eps(qmodel, reference: dq.PipelineCalibration, fp_model, device="cpu") -> float:
    """Mean over steps of ‖ε_q − ε_fp‖² / ‖ε_fp‖² on the float trajectory's recorded inputs."""
    cs = reference.calib_set
    errors = []
    with torch.no_grad():
        for k in sorted(set(cs.steps.tolist())):
            index = (cs.steps == k).nonzero().flatten()
            x, t, cond = cs[index]
            x, t = x.to(device), t.to(device)
            fp = dq.conditioned_call(fp_model, x, t, cond)
            q = dq.conditioned_call(qmodel, x, t, cond)
            errors.append(relative_mse(q, fp))
    return sum(errors) / len(errors)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", type=lambda s: [int(c) for c in s.split(",")], default=[96, 192, 384, 384])
    p.add_argument("--context-dim", type=int, default=768)
    p.add_argument("--prompts", type=int, default=64, help="calibration prompts (from the shipped set, cycled)")
    p.add_argument("--eval-prompts", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rows", nargs="+", default=["naive:W8A8", "naive:W4A8"],
                   help="RECIPE:SETTING; reconstruction recipes (qdiffusion, dmq) also run, but they re-propagate "
                        "the calibration set per unit: hours at this size on 2 cores until issue #23")
    p.add_argument("--spec", default=None,
                   help="one row from a recipe spec (preset[:key=value,...], as diffquant bench) at --setting, "
                        "instead of --rows (benchmarks/bench_sd_scaling.py runs one per process)")
    p.add_argument("--setting", default="W4A8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu | cuda (benchmarks/gpu_check.sh)")
    p.add_argument("--name", default=None, help="results file stem (default: sd_pipeline[_tiny])")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.tiny:
        args.channels, args.context_dim, args.prompts, args.eval_prompts, args.steps = [32, 32], 64, 2, 1, 2
    recipe_options = {
        "naive": None,
        # CPU schedules: a few iterations per unit (this measures the path and its cost)
        "qdiffusion": dq.QDiffusionConfig(iters_w=20 if not args.tiny else 2, iters_a=10 if not args.tiny else 2,
                                          batch_size=8, act_init_n=16),
        "dmq": dq.DMQConfig(les_iters=10 if not args.tiny else 2, iters_w=0, batch_size=8),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(args.channels, args.context_dim, Path(tmp))
    pipe = pipe.to(args.device)
    fp_unet = pipe.unet
    params = sum(p.numel() for p in fp_unet.parameters())
    texts = dq.read_prompts(None)
    calib_prompts = [texts[i % len(texts)] for i in range(args.prompts)]
    eval_prompts = ["a watercolor of a fox in the snow", "a city street at dawn", "a bowl of soup",
                    "a sailing boat at sea"][: args.eval_prompts]
    t0 = time.perf_counter()
    calib = dq.capture_pipeline(pipe, prompts=calib_prompts, prompts_per_call=8, num_inference_steps=args.steps,
                                height=64, width=64, guidance_scale=7.5, output_type="latent", progress=False)
    capture_s = time.perf_counter() - t0
    reference = dq.capture_pipeline(pipe, prompts=eval_prompts, prompts_per_call=len(eval_prompts),
                                    num_inference_steps=args.steps, height=64, width=64, guidance_scale=7.5,
                                    output_type="latent", progress=False, seed=123)
    fp_latents = final_latents(pipe, eval_prompts, args.steps)
    rows = [{"recipe": "fp32", "setting": "W32A32", "eps_rel_mse": 0.0, "latent_rel_mse": 0.0,
             "calib_s": 0.0, "peak_rss_mb": round(peak_rss_mb()), "load_avg": os.getloadavg()[0]}]
    specs = [(args.spec, args.setting)] if args.spec else [tuple(row.split(":")) for row in args.rows]
    for spec, setting in specs:
        if args.spec:
            recipe, config = dq.pipeline.parse_recipe_spec(spec)
        else:
            recipe, config = spec, recipe_options[spec]
        wbits, abits = dq.pipeline.parse_setting(setting)
        t0, cpu0 = time.perf_counter(), time.process_time()
        qmodel = dq.apply_recipe(fp_unet, calib, recipe, dq.QuantConfig(weight_bits=wbits, act_bits=abits),
                                 recipe_config=config, batch_size=16, device=args.device)
        calib_s, calib_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
        pipe.unet = qmodel
        q_latents = final_latents(pipe, eval_prompts, args.steps)
        pipe.unet = fp_unet
        rows.append({"recipe": spec, "setting": setting, "units": len(qmodel.plan.units),
                     "calib_cpu_s": round(calib_cpu_s, 1), "eps_rel_mse": teacher_forced_eps(qmodel, reference, fp_unet, args.device),
                     "latent_rel_mse": relative_mse(q_latents, fp_latents), "calib_s": round(calib_s, 1),
                     "peak_rss_mb": round(peak_rss_mb()), "load_avg": os.getloadavg()[0],
                     "peak_device_mb": round(torch.cuda.max_memory_allocated() / 2**20)
                     if str(args.device).startswith("cuda") else None})
        print(rows[-1], flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    results = {"model": {"unet_parameters": params, "channels": args.channels, "latent": [4, 32, 32],
                         "context": [77, args.context_dim]},
               "calibration": {"prompts": args.prompts, "steps": args.steps, "guidance": 7.5, "rows": len(calib),
                               "capture_s": round(capture_s, 1)},
               "eval_prompts": eval_prompts, "threads": args.threads, "device": args.device,
               "device_name": torch.cuda.get_device_name(0) if str(args.device).startswith("cuda") else None,
               "rows": rows, "command": command}
    name = args.name or ("sd_pipeline_tiny" if args.tiny else "sd_pipeline")
    dq.jsonio.write_json(out / f"{name}.json", results)
    lines = [f"# Drop-in quantization of an SD-topology pipeline ({params / 1e6:.1f} M-parameter UNet, random weights)",
             "", f"Calibration: {args.prompts} prompts × {args.steps} DDIM steps × 2 CFG halves = {len(calib)} recorded "
             f"UNet inputs, captured in {capture_s:.0f} s; {args.threads} threads. ε: teacher-forced on the float "
             f"trajectories of {len(eval_prompts)} held-out prompts, relative to the float prediction.", "",
             "| recipe | setting | ε rel. MSE | final latent rel. MSE | calibration s | peak RSS MB | load avg |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['setting']} | {r['eps_rel_mse']:.3g} | {r['latent_rel_mse']:.3g} | "
                     f"{r['calib_s']} | {r['peak_rss_mb']} | {r['load_avg']:.2f} |")
    lines += ["", f"Command: `{command}`", ""]
    (out / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
