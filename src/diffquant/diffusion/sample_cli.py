"""``diffquant sample``: draw samples from a model and write samples.npz + grid.png."""
from __future__ import annotations

import argparse
import math

import torch

from diffquant.diffusion import distributed
from diffquant.diffusion.sampling import SCHEDULERS, sample, save_samples
from diffquant.errors import ConfigError
from diffquant.fsutil import check_writable_dir


def class_list(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def finite_float(text: str) -> float:
    """An argparse type: a finite number (``nan``/``inf`` are refused with a one-line message)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="registered model name (mnist-resunet, mnist-convunet, fmnist-unet, default) "
                             "or a local diffusers folder")
    # --num-samples: under torchrun, argparse rejects "--n" as an ambiguous torchrun option
    parser.add_argument("--n", "--num-samples", dest="n", type=int, default=64, help="number of samples")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps")
    parser.add_argument("--scheduler", default="ddim", choices=list(SCHEDULERS))
    parser.add_argument("--eta", type=finite_float, default=0.0, help="DDIM η (0 = deterministic)")
    parser.add_argument("--guidance", type=finite_float, default=None,
                        help="classifier-free guidance scale (default 1 = none; full pipelines: their own default)")
    parser.add_argument("--prompts", default=None,
                        help="text-to-image pipeline folders: a .txt file with one prompt per line (default: the "
                             "shipped prompt set)")
    parser.add_argument("--classes", type=class_list, default=None,
                        help="comma-separated class labels, cycled over the samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-index", type=int, default=0, help="global index of the first sample")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--assets", default=None, help="assets folder (default: $DIFFQUANT_ASSETS)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_sample(args: argparse.Namespace, prepare=None) -> int:
    """Handler of ``diffquant sample``; under torchrun every rank samples and rank 0 writes.

    ``prepare(bundle) -> bundle`` may swap the denoiser (the CLI uses it for quantized models;
    the sampler itself knows nothing about quantization)."""
    from diffquant.zoo.registry import load_model

    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    if distributed.dist_info().is_main:
        check_writable_dir(args.out)
    owns_group = not distributed.dist_info().is_distributed
    info = distributed.init_from_env(args.device)
    try:
        device = distributed.device_for_rank(args.device, info)
        bundle = load_model(args.model, assets=args.assets, device=device)
        if prepare is not None:
            bundle = prepare(bundle)
        result = sample(bundle, args.n, seed=args.seed, start_index=args.start_index,
                        scheduler=args.scheduler, steps=args.steps, eta=args.eta,
                        guidance=1.0 if args.guidance is None else args.guidance,
                        classes=args.classes, batch_size=args.batch_size, device=device,
                        progress=not args.no_progress)
        if info.is_main:
            paths = save_samples(result, args.out)
            print(f"wrote {len(result.images)} samples to {paths['npz']}")
    finally:
        if owns_group and info.is_distributed:
            torch.distributed.destroy_process_group()
    return 0


def add_sample_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``sample`` on an ``argparse`` subparsers object; the handler is ``args.handler``."""
    parser = subparsers.add_parser("sample", help="draw samples from a diffusion model",
                                   description=__doc__)
    add_sample_arguments(parser)
    parser.set_defaults(handler=run_sample)
    return parser
