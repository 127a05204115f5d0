"""``diffquant train diffusion|classifier``: train the bundled default models.

Hook into the main CLI with :func:`add_train_parser`; also runnable directly as
``python -m diffquant.zoo.train_cli diffusion --out DIR ...``.
"""
from __future__ import annotations

import argparse
import sys

from diffquant.errors import DiffquantError


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip() != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (checkpoint, exported model)")
    p.add_argument("--data-dir", default=None, help="folder with the IDX .gz files")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def _fill_subparsers(sub) -> None:
    d = sub.add_parser("diffusion", help="class-conditional DDPM UNet (Fashion-MNIST)")
    _add_common(d)
    d.add_argument("--steps", type=int, default=10_000, help="total optimizer steps")
    d.add_argument("--max-minutes", type=float, default=None,
                   help="stop cleanly (checkpoint + export) after this many minutes")
    d.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    d.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant")
    d.add_argument("--warmup-steps", type=int, default=200)
    d.add_argument("--ema-decay", type=float, default=0.999)
    d.add_argument("--channels", type=_ints, default=(32, 64, 64), help="e.g. 32,64,64")
    d.add_argument("--layers-per-block", type=int, default=1)
    d.add_argument("--attn-levels", type=_ints, default=(2,),
                   help="resolution levels with self-attention (0 = 28x28)")
    d.add_argument("--no-hflip", action="store_true")
    d.add_argument("--checkpoint-minutes", type=float, default=5.0)
    d.add_argument("--export-only", action="store_true",
                   help="only export OUT/checkpoint.pt's EMA weights to OUT/model")
    d.set_defaults(train_func=_run_diffusion)

    c = sub.add_parser("classifier", help="Fashion-MNIST CNN classifier")
    _add_common(c)
    c.add_argument("--epochs", type=int, default=3)
    c.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    c.add_argument("--channels", type=_ints, default=(32, 64, 128))
    c.set_defaults(train_func=_run_classifier)


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train`` (with ``diffusion`` / ``classifier``) on an argparse subparsers object.

    The handler is stored as ``args.handler``; call ``args.handler(args)`` (returns an exit code).
    """
    p = subparsers.add_parser("train", help="train the bundled default diffusion model / classifier")
    sub = p.add_subparsers(dest="train_what", required=True, metavar="{diffusion,classifier}")
    _fill_subparsers(sub)
    p.set_defaults(handler=run_train)
    return p


def run_train(args: argparse.Namespace) -> int:
    """Handler of ``diffquant train``."""
    return args.train_func(args)


def _run_diffusion(args: argparse.Namespace) -> int:
    from diffquant.zoo.train import (
        TrainConfig, UNetConfig, build_unet, count_parameters, export_diffusion, train_diffusion,
    )

    if args.export_only:
        path = export_diffusion(args.out, f"{args.out}/model")
        print(f"exported to {path}")
        return 0
    model = UNetConfig(block_out_channels=args.channels, layers_per_block=args.layers_per_block,
                       attn_levels=args.attn_levels)
    extra = {k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr)) if v is not None}
    cfg = TrainConfig(
        out_dir=args.out, model=model, dataset=args.dataset, data_dir=args.data_dir,
        steps=args.steps, max_minutes=args.max_minutes, seed=args.seed, resume=args.resume,
        lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps, ema_decay=args.ema_decay,
        hflip=not args.no_hflip, checkpoint_minutes=args.checkpoint_minutes, device=args.device,
        num_threads=args.threads, progress=not args.no_progress, **extra,
    )
    print(f"UNet {count_parameters(build_unet(model)):,} parameters; config {model}", flush=True)
    out = train_diffusion(cfg)
    print(f"done: {out}")
    return 0


def _run_classifier(args: argparse.Namespace) -> int:
    from diffquant.zoo.train import ClassifierTrainConfig, train_classifier

    extra = {k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr)) if v is not None}
    cfg = ClassifierTrainConfig(
        out_dir=args.out, channels=args.channels, dataset=args.dataset, data_dir=args.data_dir,
        epochs=args.epochs, max_steps=args.steps, seed=args.seed, device=args.device,
        num_threads=args.threads, progress=not args.no_progress, **extra,
    )
    out, acc = train_classifier(cfg)
    print(f"classifier saved to {out}; test accuracy {acc:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffquant.zoo.train_cli", description=__doc__)
    sub = parser.add_subparsers(dest="train_what", required=True)
    _fill_subparsers(sub)
    args = parser.parse_args(argv)
    try:
        return args.train_func(args)
    except DiffquantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
