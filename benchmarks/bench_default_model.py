"""Quality of the bundled default model (float): class accuracy and FID of guided samples.

Protocol (issue: bundled default model): DDIM 50 steps, η = 0, classes i % 10 for sample i,
seeds 0..N-1 (per-sample generators), FID against the 10 000 Fashion-MNIST test images with the
TF-2015 Inception, class accuracy by the shipped classifier.

    python benchmarks/bench_default_model.py --n 1000 --guidance 2 3 --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from diffquant.bench import rows_markdown
from diffquant.diffusion.sampling import sample
from diffquant.eval.fid import reference_stats
from diffquant.eval.inception import InceptionFeatures
from diffquant.eval.report import environment_record, evaluate_images
from diffquant.pipeline import bundled_classifier
from diffquant.zoo.registry import load_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--ref-n", type=int, default=None, help="reference images (default: all 10 000)")
    p.add_argument("--guidance", type=float, nargs="+", default=[2.0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--no-fid", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    bundle = load_model(args.model)
    classifier = bundled_classifier(bundle)
    extractor = reference = None
    if not args.no_fid:
        extractor = InceptionFeatures()
        reference = reference_stats("fashion-mnist", "test", n=args.ref_n, extractor=extractor, spatial=True)
    rows = []
    for g in args.guidance:
        t0 = time.perf_counter()
        res = sample(bundle, args.n, seed=0, scheduler="ddim", steps=args.steps, eta=0.0, guidance=g, batch_size=100)
        seconds = time.perf_counter() - t0
        metrics = ["accuracy"] + ([] if args.no_fid else ["fid", "sfid", "precision", "recall"])
        ev = evaluate_images(res.images, res.labels, reference=reference, extractor=extractor, classifier=classifier,
                             metrics=metrics, fd_method="sqrtm")
        rows.append({"guidance": g, **ev["metrics"], "sample_s": round(seconds, 1)})
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(sys.argv)
    record = {"model": bundle.name, "source": bundle.source,
              "protocol": {"n": args.n, "scheduler": "ddim", "steps": args.steps, "eta": 0.0,
                           "classes": "i % 10", "seeds": f"0..{args.n - 1}",
                           "reference": None if reference is None else {"dataset": "fashion-mnist", "split": "test",
                                                                        **reference.meta}},
              "rows": rows, "environment": environment_record(), "command": command}
    (out / "default_model.json").write_text(json.dumps(record, indent=1, default=str))
    (out / "default_model.md").write_text(
        f"# Bundled default model ({bundle.name}), float\n\nN = {args.n}, DDIM {args.steps} steps, η = 0, "
        f"classes i % 10, FID vs Fashion-MNIST test ({'all 10000' if args.ref_n is None else args.ref_n} images)\n\n"
        f"{rows_markdown(rows)}\n\nCommand: `{command}`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
