"""``diffquant evaluate``: metrics of a samples.npz against cached reference statistics.

samples.npz holds ``images`` (uint8, grey or RGB, any size: [N,H,W], [N,1|3,H,W] or [N,H,W,1|3]),
optionally ``labels`` (int [N]). ``--reference`` is a data set name, a folder of images (any size,
grey or RGB) or a statistics file saved by ``--save-reference-stats STEM`` (see
:mod:`diffquant.eval.reference`); ``--save-reference-stats`` without ``--samples`` only computes
and saves them, so a reference is processed once. The sampler settings (the protocol, stored
verbatim in the results) come from a ``protocol`` JSON string in the npz, else from
``samples.json`` written beside it by ``diffquant sample``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from diffquant.errors import DiffquantError
from diffquant.fsutil import check_writable_dir

IMAGE_KEYS = ("images", "samples", "arr_0")


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``evaluate`` on an argparse subparsers object; the handler is ``args.handler``."""
    p = subparsers.add_parser("evaluate", help="FID, sFID, precision/recall, accuracy, fidelity of samples",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", default=None,
                   help="samples.npz (key 'images', optional 'labels', 'protocol'); required unless only "
                        "--save-reference-stats is wanted")
    p.add_argument("--reference", default="fashion-mnist",
                   help="fashion-mnist | mnist | a folder of images (any size, grey or RGB) | a statistics file "
                        "STEM.json written by --save-reference-stats")
    p.add_argument("--save-reference-stats", default=None, metavar="STEM",
                   help="also write the reference statistics to STEM.safetensors + STEM.json (reuse with "
                        "--reference STEM.json)")
    p.add_argument("--ref-split", default="test", choices=("train", "test"), help="split of the real data set")
    p.add_argument("--ref-n", type=int, default=None, help="number of real images (default: the whole split)")
    p.add_argument("--ref-seed", type=int, default=None,
                   help="draw the real images at random with this seed (default: the first ref-n)")
    p.add_argument("--data-dir", default=None, help="directory with the IDX files of the reference set")
    p.add_argument("--metrics", default=None,
                   help="comma-separated subset of fid,sfid,precision,recall,accuracy,mse,psnr "
                        "(default: all that the inputs allow)")
    p.add_argument("--classifier", default=None, help="TorchScript classifier for class accuracy")
    p.add_argument("--fp-samples", default=None, help="full-precision samples.npz from the same noise (mse, psnr)")
    p.add_argument("--out", default=None, help="output directory for results.json and results.md (with --samples)")
    p.add_argument("--fid-weights", default=None, help="path to default_1.pt (FID Inception TorchScript)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--fd-method", choices=("sqrtm", "eigh"), default="sqrtm",
                   help="matrix square root for the Fréchet distance (eigh: same value, faster)")
    p.add_argument("--no-cache", action="store_true", help="recompute reference statistics")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run_evaluate)
    return p


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """(images, labels or None, protocol JSON text or None) as stored in a samples.npz."""
    if not path.is_file():
        raise DiffquantError(f"samples file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DiffquantError(f"cannot read {path} as .npz: {e}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise DiffquantError(f"{path} is a single .npy array, not an .npz archive with an 'images' array")
    with data:
        key = next((k for k in IMAGE_KEYS if k in data.files), None)
        if key is None:
            raise DiffquantError(f"{path} has no image array; expected one of {list(IMAGE_KEYS)}, found {data.files}")
        try:  # object arrays would need unpickling: refused by allow_pickle=False
            images = data[key]
            labels = data["labels"] if "labels" in data.files else None
            protocol_text = str(data["protocol"]) if "protocol" in data.files else None
        except (ValueError, OSError, EOFError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DiffquantError(f"{path}: cannot read its arrays ({first}); object arrays are never unpickled") from None
    return images, labels, protocol_text


def _read_protocol(path: Path, protocol_text: str | None) -> dict:
    """The sampler protocol: the npz's own, else ``samples.json`` beside it, else {}."""
    settings_file = path.with_suffix(".json")
    if protocol_text is None and settings_file.is_file():
        protocol_text = settings_file.read_text()
    try:
        return json.loads(protocol_text) if protocol_text is not None else {}
    except json.JSONDecodeError as e:
        raise DiffquantError(f"{path}: the sampler protocol is not valid JSON ({e})") from None


def images_nchw(images: np.ndarray, source: str) -> np.ndarray:
    """uint8 [N,H,W], [N,1|3,H,W] or [N,H,W,1|3] (N >= 2, H, W >= 2, any size) -> contiguous [N,C,H,W].

    Grey stays one channel: the Inception extractor repeats it to RGB after resizing to 299.
    """
    if images.dtype != np.uint8:
        raise DiffquantError(f"{source}: images must be uint8 in [0, 255]; got {images.dtype}")
    original_shape = tuple(int(d) for d in images.shape)
    if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    elif images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] < 2 or min(images.shape[2:]) < 2:
        raise DiffquantError(f"{source}: images must be [N,H,W], [N,1|3,H,W] or [N,H,W,1|3] with N >= 2 "
                             f"and H, W >= 2; got {original_shape}")
    return np.ascontiguousarray(images)


def load_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(uint8 images [N,C,H,W] with C 1 or 3 and any H, W, labels or None, protocol dict) from a samples.npz."""
    path = Path(path)
    images, labels, protocol_text = _read_npz(path)
    protocol = _read_protocol(path, protocol_text)
    images = images_nchw(images, str(path))
    if labels is not None and not np.issubdtype(labels.dtype, np.integer):
        raise DiffquantError(f"{path}: labels must be integers, got {labels.dtype}")
    if labels is not None and labels.shape != (images.shape[0],):
        raise DiffquantError(f"{path}: labels shape {labels.shape} does not match {images.shape[0]} images")
    return images, labels, protocol


def check_fidelity_pair(images: np.ndarray, fp_images: np.ndarray) -> None:
    """MSE/PSNR compare image by image: both sets need the same count, channels and size."""
    if fp_images.shape != images.shape:
        raise DiffquantError(f"--fp-samples holds images of shape {tuple(fp_images.shape)} [N,C,H,W], the samples "
                             f"{tuple(images.shape)}: fidelity needs the same images (count, channels, size) "
                             "from the same noise")


def stats_stem(path: str) -> Path:
    """``STEM`` of a statistics file given as STEM, STEM.json or STEM.safetensors."""
    p = Path(path).expanduser()
    return p.with_suffix("") if p.suffix in (".json", ".safetensors") else p


def _spatial_wanted(metrics: list[str] | None, saving: bool, extractor, reference: str) -> bool:
    """Spatial (sFID) statistics: when sfid is scored, and in statistics computed here to be saved."""
    from diffquant.eval.reference import DATASETS, stats_file_stem

    if metrics is None or "sfid" in metrics:
        return True
    computed_here = reference in DATASETS or stats_file_stem(Path(reference).expanduser()) is None
    return saving and computed_here and getattr(extractor, "spatial_available", True)


def run_evaluate(args: argparse.Namespace) -> int:
    """Score ``--samples`` (or, with only --save-reference-stats, just save the reference statistics)."""
    from diffquant.eval.classify import load_classifier
    from diffquant.eval.inception import InceptionFeatures
    from diffquant.eval.reference import resolve_reference
    from diffquant.eval.report import evaluate_images, metrics_table, write_results

    if args.samples is None and not args.save_reference_stats:
        raise DiffquantError("evaluate needs --samples (or --save-reference-stats STEM to only save the "
                             "reference statistics)")
    if args.samples is not None and args.out is None:
        raise DiffquantError("evaluate needs --out DIR for results.json and results.md")
    if args.out is not None:
        check_writable_dir(args.out)
    save_stem = stats_stem(args.save_reference_stats) if args.save_reference_stats else None
    if save_stem is not None:
        check_writable_dir(save_stem.parent, "--save-reference-stats")
    images = labels = fp_images = None
    protocol: dict = {}
    if args.samples is not None:
        images, labels, protocol = load_samples(args.samples)
        fp_images = load_samples(args.fp_samples)[0] if args.fp_samples else None
        if fp_images is not None:
            check_fidelity_pair(images, fp_images)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    classifier = load_classifier(args.classifier, args.device) if args.classifier else None
    inception_needed = (metrics is None or bool({"fid", "sfid", "precision", "recall"} & set(metrics))
                        or bool(args.save_reference_stats))
    extractor = reference = None
    if inception_needed:
        extractor = InceptionFeatures(args.fid_weights, device=args.device)
        spatial = _spatial_wanted(metrics, save_stem is not None, extractor, args.reference)
        reference = resolve_reference(
            args.reference, split=args.ref_split, n=args.ref_n, extractor=extractor, data_dir=args.data_dir,
            subset_seed=args.ref_seed, spatial=spatial,
            batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
            cache=not args.no_cache,
        )
        if save_stem is not None:
            reference.save(save_stem)
            print(f"reference statistics saved to {save_stem}.json and {save_stem}.safetensors")
    if images is None:
        return 0
    results = evaluate_images(
        images, labels, reference=reference, extractor=extractor, classifier=classifier, fp_images=fp_images,
        metrics=metrics, device=args.device, batch_size=args.batch_size, protocol=protocol,
        fd_method=args.fd_method, progress=not args.no_progress,
    )
    results["inputs"] = {"samples": str(args.samples), "fp_samples": args.fp_samples, "classifier": args.classifier,
                         "reference": args.reference}
    json_path, md_path = write_results(results, args.out)
    print(metrics_table(results))
    print(f"wrote {json_path} and {md_path}")
    return 0
