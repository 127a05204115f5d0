"""Class accuracy of generated images under a given classifier (conditional models, class fidelity)."""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffquant.errors import DiffquantError
from diffquant.eval.inception import as_image_batch


def to_classifier_input(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B,1,H,W] -> float [B,1,H,W] in [-1, 1] (the range the models are trained in)."""
    return images_uint8.float().div(127.5).sub(1.0)


def _eval_mode(module: torch.nn.Module) -> torch.nn.Module:
    try:
        return module.eval()
    except NotImplementedError:  # modules from torch.export are fixed graphs, already in eval mode
        return module


@torch.no_grad()
def predict_labels(images_uint8: Any, classifier: torch.nn.Module, *, batch_size: int = 256,
                   device: str | torch.device = "cpu", progress: bool = False) -> np.ndarray:
    """Arg-max class of each image, int64 [N]. Images must be single-channel."""
    images = as_image_batch(images_uint8)
    if images.shape[1] != 1:
        raise DiffquantError(f"the classifier takes grey images [N,1,H,W]; got {tuple(images.shape)}")
    classifier = _eval_mode(classifier.to(device))
    preds = []
    for start in tqdm(range(0, images.shape[0], batch_size), desc="classify", disable=not progress):
        x = to_classifier_input(images[start : start + batch_size]).to(device)
        logits = classifier(x)
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise DiffquantError(f"the classifier must return logits [B, classes]; got {tuple(logits.shape)}")
        preds.append(logits.argmax(dim=1).cpu())
    return torch.cat(preds).numpy().astype(np.int64)


def class_accuracy(images_uint8: Any, labels: Any, classifier: torch.nn.Module, *, batch_size: int = 256,
                   device: str | torch.device = "cpu", progress: bool = False) -> dict:
    """{"accuracy", "n", "per_class"}: how often the classifier recognises the class asked for."""
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    preds = predict_labels(images_uint8, classifier, batch_size=batch_size, device=device, progress=progress)
    if labels.shape != preds.shape:
        raise DiffquantError(f"{preds.size} images but {labels.size} labels")
    correct = preds == labels
    per_class = {int(c): float(correct[labels == c].mean()) for c in np.unique(labels)}
    return {"accuracy": float(correct.mean()), "n": int(labels.size), "per_class": per_class}


def load_classifier(path: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A classifier saved with ``torch.export.save`` (``.pt2``) or as TorchScript (``torch.jit.save``).

    Neither format unpickles arbitrary objects; plain state dicts need their model class instead.
    """
    try:
        if str(path).endswith(".pt2"):
            return torch.export.load(str(path)).module()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated in torch >= 2.10
            return torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError, OSError) as e:
        raise DiffquantError(f"cannot load classifier {path}: {str(e).splitlines()[0]}") from None
