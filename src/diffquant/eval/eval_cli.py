"""``diffquant evaluate``: metrics of a samples.npz against cached reference statistics.

samples.npz holds ``images`` (uint8, grey or RGB, any size: [N,H,W], [N,1|3,H,W] or [N,H,W,1|3]),
optionally ``labels`` (int [N]). ``--reference`` is a data set name, a folder of images or a
statistics file (see :mod:`diffquant.eval.reference`). The sampler settings (the protocol, stored verbatim in the results) come
from a ``protocol`` JSON string in the npz, else from ``samples.json`` written beside it by
``diffquant sample``.
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
    p.add_argument("--samples", required=True, help="samples.npz (key 'images', optional 'labels', 'protocol')")
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
    p.add_argument("--out", required=True, help="output directory for results.json and results.md")
    p.add_argument("--fid-weights", default=None, help="path to default_1.pt (FID Inception TorchScript)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--fd-method", choices=("sqrtm", "eigh"), default="sqrtm",
                   help="matrix square root for the Fréchet distance (eigh: same value, faster)")
    p.add_argument("--no-cache", action="store_true", help="recompute reference statistics")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run_evaluate)
    return p


def load_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(uint8 images [N,1,28,28], labels or None, protocol dict) from a samples.npz, checked."""
    path = Path(path)
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
    settings_file = path.with_suffix(".json")
    if protocol_text is None and settings_file.is_file():
        protocol_text = settings_file.read_text()
    try:
        protocol = json.loads(protocol_text) if protocol_text is not None else {}
    except json.JSONDecodeError as e:
        raise DiffquantError(f"{path}: the sampler protocol is not valid JSON ({e})") from None
    if images.dtype != np.uint8:
        raise DiffquantError(f"{path}: images must be uint8 in [0, 255]; got {images.dtype}")
    original_shape = tuple(int(d) for d in images.shape)
    if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    elif images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] < 2 or min(images.shape[2:]) < 2:
        raise DiffquantError(
            f"{path}: images must be [N,H,W], [N,1|3,H,W] or [N,H,W,1|3] with N >= 2; got {original_shape}"
        )
    if labels is not None and not np.issubdtype(labels.dtype, np.integer):
        raise DiffquantError(f"{path}: labels must be integers, got {labels.dtype}")
    if labels is not None and labels.shape != (images.shape[0],):
        raise DiffquantError(f"{path}: labels shape {labels.shape} does not match {images.shape[0]} images")
    return np.ascontiguousarray(images), labels, protocol


def run_evaluate(args: argparse.Namespace) -> int:
    from diffquant.eval.classify import load_classifier
    from diffquant.eval.inception import InceptionFeatures
    from diffquant.eval.reference import resolve_reference
    from diffquant.eval.report import evaluate_images, metrics_table, write_results

    check_writable_dir(args.out)
    images, labels, protocol = load_samples(args.samples)
    fp_images = load_samples(args.fp_samples)[0] if args.fp_samples else None
    if fp_images is not None and fp_images.shape != images.shape:
        raise DiffquantError(f"--fp-samples holds images of shape {tuple(fp_images.shape)}, the samples "
                             f"{tuple(images.shape)}: fidelity needs the same images from the same noise")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    classifier = load_classifier(args.classifier, args.device) if args.classifier else None
    inception_needed = metrics is None or bool({"fid", "sfid", "precision", "recall"} & set(metrics))
    extractor = reference = None
    if inception_needed:
        extractor = InceptionFeatures(args.fid_weights, device=args.device)
        reference = resolve_reference(
            args.reference, split=args.ref_split, n=args.ref_n, extractor=extractor, data_dir=args.data_dir,
            subset_seed=args.ref_seed, spatial=metrics is None or "sfid" in metrics,
            batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
            cache=not args.no_cache,
        )
        if args.save_reference_stats:
            reference.save(args.save_reference_stats)
            print(f"reference statistics saved to {args.save_reference_stats}.json / .safetensors")
    results = evaluate_images(
        images, labels, reference=reference, extractor=extractor, classifier=classifier, fp_images=fp_images,
        metrics=metrics, device=args.device, batch_size=args.batch_size, protocol=protocol,
        fd_method=args.fd_method, progress=not args.no_progress,
    )
    results["inputs"] = {"samples": str(args.samples), "fp_samples": args.fp_samples, "classifier": args.classifier}
    json_path, md_path = write_results(results, args.out)
    print(metrics_table(results))
    print(f"wrote {json_path} and {md_path}")
    return 0
