"""The ``diffquant`` command line.

Subcommands: ``main`` (the README's main job), ``quantize``, ``sample``, ``evaluate``, ``bench``, ``export``,
``train``, ``recipes``.
Bad input gives a one-line message and exit code 2 — never a traceback.
"""
from __future__ import annotations

import argparse
import sys

from .diffusion.sample_cli import class_list, finite_float
from .errors import DiffquantError
from .methods import RECIPES


def _bits(value: str) -> int:
    try:
        bits = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bit-width must be an integer, got {value!r}") from None
    if not (1 <= bits <= 8 or bits in (16, 32)):
        raise argparse.ArgumentTypeError(f"bit-width {bits} is not supported: use 1-8, or 16/32 for full precision")
    return bits


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def add_common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="named model (default = the bundled Fashion-MNIST UNet, mnist-resunet, mnist-convunet) "
                        "or a local diffusers UNet/pipeline folder")
    p.add_argument("--assets", default=None, help="assets directory (default: $DIFFQUANT_ASSETS or ../shared/assets)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")


def add_quantize_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model with a recipe and save the quantizer state",
                       description="Capture calibration data along full-precision trajectories, wrap the model, "
                                   "run a recipe and save quant_state.safetensors + manifest.json.")
    add_common_model_args(p)
    p.add_argument("--recipe", default="naive",
                   help="a preset (" + ", ".join(sorted(RECIPES)) + "[:option=value,...]) or a recipe file with "
                        "stages (FILE.yaml[:stage.option=value,...]); see `diffquant recipes`")
    p.add_argument("--recipe-config", default=None, help="YAML file with the recipe's options (e.g. configs/qdiffusion.yaml)")
    p.add_argument("--work-dir", default=None,
                   help="where reconstruction progress is kept; rerun the same command to resume (default OUT/work)")
    p.add_argument("--wbits", type=_bits, default=8, help="weight bits (1-8, 16/32 = full precision)")
    p.add_argument("--abits", type=_bits, default=8, help="activation bits (1-8, 16/32 = full precision)")
    p.add_argument("--config", default=None, help="YAML file with QuantConfig options (overrides --wbits/--abits)")
    p.add_argument("--split", action="store_true", help="split-shortcut quantization of concatenated inputs")
    p.add_argument("--calib-n", type=_positive, default=64, help="calibration trajectories")
    p.add_argument("--calib-steps", type=_positive, default=50, help="sampler steps of the calibration trajectories")
    p.add_argument("--calib-every", type=_positive, default=5, help="use every k-th step (uniform selection)")
    p.add_argument("--max-memory", type=float, default=None, metavar="MB",
                   help="in-memory budget of the reconstruction unit caches; beyond it they stream from disk "
                        "(default: the recipe's, at most a quarter of the machine's memory)")
    p.add_argument("--prompts", default=None,
                   help="text-to-image pipeline folders: calibration prompts, one per line (default: the shipped set)")
    p.add_argument("--classes", type=class_list, default=None,
                   help="class-conditional pipeline folders (DiT): calibration class labels, e.g. 1,2,3")
    p.add_argument("--guidance", type=finite_float, default=None,
                   help="guidance scale of the calibration runs (default: the model's / the pipeline's own)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(handler=_run_quantize)


def _run_quantize(args) -> int:
    from .pipeline import CalibConfig, quantize_model
    from .pipeline_folders import pipeline_folder_or_none

    folder = pipeline_folder_or_none(args.model)
    if folder is not None:
        return _quantize_pipeline_folder(args, folder)
    if args.prompts is not None or args.classes is not None:
        raise DiffquantError("--prompts / --classes apply to full diffusers pipeline folders (text encoder, "
                             "VAE or transformer); this model is sampled by diffquant's own sampler")

    result = quantize_model(
        model=args.model, recipe=args.recipe, wbits=args.wbits, abits=args.abits, config_path=args.config,
        split=args.split, calib=CalibConfig(n=args.calib_n, steps=args.calib_steps, every=args.calib_every,
                                            max_memory_mb=args.max_memory),
        out=args.out, assets=args.assets, device=args.device, recipe_config_path=args.recipe_config,
        work_dir=args.work_dir,
    )
    from .diffusion.distributed import dist_info

    if dist_info().is_main:
        print(result.summary)
        print(f"saved to {result.path}")
    return 0


def _quantize_pipeline_folder(args, folder) -> int:
    from .fsutil import check_writable_dir
    from .pipeline import build_quant_config, resolve_recipe
    from .pipeline_folders import quantize_pipeline_folder

    name, recipe_config = resolve_recipe(args.recipe, args.recipe_config)
    quant = build_quant_config(args.wbits, args.abits, args.config, args.split)
    check_writable_dir(args.out)
    qmodel, component, rows = quantize_pipeline_folder(
        folder, recipe=name, recipe_config=recipe_config, quant=quant, n=args.calib_n, steps=args.calib_steps,
        every=args.calib_every, prompts=args.prompts, classes=args.classes, guidance=args.guidance, out=args.out,
        device=args.device)
    print(qmodel.summary())
    print(f"calibrated pipe.{component} on {rows} recorded denoiser inputs; quantized pipeline saved to {args.out} "
          f"(sample it with: diffquant sample --model {args.out})")
    return 0


def add_main_parser(sub) -> None:
    p = sub.add_parser("main", help="the main job: quantize the default model at W8A8 and W4A8 and compare",
                       description="Quantizes a model at W8A8 and W4A8 with the best available recipe, samples from "
                                   "the same seeds as full precision, prints a table and writes an image grid.")
    add_common_model_args(p)
    p.add_argument("--n", type=_positive, default=100, help="samples per setting for the metrics")
    p.add_argument("--steps", type=_positive, default=50, help="DDIM steps")
    p.add_argument("--bits", nargs="+", default=["W8A8", "W4A8"], help="settings, e.g. W8A8 W4A8 W4A6")
    p.add_argument("--recipe", default="auto",
                   help="auto (the best recipe that fits the job's budget, beside the naive baseline) or a recipe spec")
    p.add_argument("--no-fid", action="store_true", help="skip FID (needs the Inception weights)")
    p.add_argument("--out", default="runs/main", help="output directory")
    p.add_argument("--calib-n", type=_positive, default=None,
                   help="calibration trajectories of the recipe (default: what it is sized for; pipeline folders: "
                        "calibration prompts/labels, 64)")
    p.add_argument("--calib-every", type=_positive, default=None,
                   help="calibrate on every k-th sampler step (default: what the recipe is sized for)")
    p.add_argument("--prompts", default=None,
                   help="text-to-image pipeline folders: prompts to sample, one per line (default: the shipped set)")
    p.add_argument("--classes", type=class_list, default=None,
                   help="class-conditional pipeline folders: class labels to sample, e.g. 1,207,360")
    p.add_argument("--reference", default=None,
                   help="pipeline folders: FID reference, a folder of images or a statistics file (.npz)")
    p.set_defaults(handler=_run_main)


def _run_main(args) -> int:
    from .pipeline import main_job
    from .pipeline_folders import main_pipeline_folder, pipeline_folder_or_none

    folder = pipeline_folder_or_none(args.model)
    if folder is not None:  # a full diffusers pipeline: sampled through diffusers
        main_pipeline_folder(folder, n=args.n, steps=args.steps, settings=args.bits,
                             recipe="naive" if args.recipe == "auto" else args.recipe,
                             fid=not args.no_fid, out=args.out, prompts=args.prompts, classes=args.classes,
                             reference=args.reference, calib_n=args.calib_n or 64, calib_every=args.calib_every or 5,
                             device=args.device)
        return 0
    if args.prompts is not None or args.classes is not None or args.reference is not None:
        raise DiffquantError("--prompts, --classes and --reference apply to full diffusers pipeline folders")
    main_job(model=args.model, n=args.n, steps=args.steps, settings=args.bits, recipe=args.recipe,
             fid=not args.no_fid, out=args.out, assets=args.assets, device=args.device, calib_n=args.calib_n,
             calib_every=args.calib_every)
    return 0


def _run_sample(args) -> int:
    from .diffusion.sample_cli import run_sample
    from .pipeline_folders import pipeline_folder_or_none, sample_pipeline_folder

    folder = pipeline_folder_or_none(args.quantized or args.model)
    if folder is not None:  # a full diffusers pipeline, quantized or float: run through diffusers
        if args.backend != "fake":
            raise DiffquantError("--backend int8 applies to diffquant's own sampler, not to pipeline folders")
        from .fsutil import check_writable_dir

        check_writable_dir(args.out)
        paths = sample_pipeline_folder(folder, n=args.n, steps=args.steps, guidance=args.guidance,
                                       prompts=args.prompts, classes=args.classes, seed=args.seed,
                                       batch_size=args.batch_size, out=args.out, device=args.device)
        print(f"wrote {args.n} samples to {paths['npz']}")
        return 0
    if args.prompts is not None:
        raise DiffquantError("--prompts applies to text-to-image pipeline folders")

    if args.compile and args.backend != "int8":
        raise DiffquantError("--compile applies to --backend int8")
    if args.quantized is None:
        if args.backend != "fake":
            raise DiffquantError("--backend int8 needs --quantized CHECKPOINT")
        return run_sample(args)

    def prepare(bundle):
        from .model import load

        qmodel = load(bundle.unet, args.quantized, device=args.device)
        if args.backend == "int8":
            from .export.int8_backend import compile_int8, to_int8

            qmodel = to_int8(qmodel)
            if args.compile:
                qmodel = compile_int8(qmodel)
        return bundle.with_unet(qmodel)

    return run_sample(args, prepare=prepare)


class OneLineParser(argparse.ArgumentParser):
    """An argument error is one line (``diffquant quantize: error: ...; see --help``), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="diffquant",
        description="Post-training quantization of diffusion models (Q-Diffusion, EDA-DM, DMQ, MPQ-DM).",
    )
    parser.add_argument("--version", action="version", version=f"diffquant {__import__('diffquant').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_main_parser(sub)
    add_quantize_parser(sub)
    from .bench import add_bench_parser
    from .diffusion.sample_cli import add_sample_parser
    from .eval.eval_cli import add_evaluate_parser
    from .zoo.train_cli import add_train_parser

    sample_parser = add_sample_parser(sub)
    sample_parser.add_argument("--quantized", default=None,
                               help="a quantized checkpoint directory (from `diffquant quantize`) to sample from")
    sample_parser.add_argument("--backend", default="fake", choices=["fake", "int8"],
                               help="fake = simulated quantization; int8 = integer CPU kernels where available")
    sample_parser.add_argument("--compile", action="store_true",
                               help="with --backend int8: torch.compile the int8 model (fuses the float work around "
                                    "the int8 kernels; compiling takes a minute or more)")
    sample_parser.set_defaults(handler=_run_sample)
    from .export.export_cli import add_export_parser

    add_export_parser(sub)
    add_evaluate_parser(sub)
    add_bench_parser(sub)
    add_train_parser(sub)
    from .recipes_cli import add_recipes_parser

    add_recipes_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except DiffquantError as exc:
        print(f"diffquant: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the user named could not be read or written (disk full, permissions, ...)
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"diffquant: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffquant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
