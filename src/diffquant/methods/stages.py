"""Calibration stages shared by recipes (a recipe is a composition of these)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..model.qmodel import QuantModel
from ..jsonio import write_json

#: runs calibration data through a model: ``forward_loop(model)``
ForwardLoop = Callable[[nn.Module], None]


@torch.no_grad()
def init_weight_quantizers(qmodel: QuantModel) -> None:
    """Initialise every weight quantizer from its own weight (part), under its init policy."""
    for layer in qmodel.layers().values():
        for w, q in zip(layer.weight_parts(), layer.weight_quantizers):
            if not q.is_float:
                q.init_from(w.detach())
        layer.clear_cache()


@torch.no_grad()
def observe_activations(qmodel: QuantModel, forward_loop: ForwardLoop, *, weights: bool = True) -> None:
    """Run calibration data with every activation quantizer in ``observe`` mode.

    Ranges accumulate over all batches under each quantizer's init policy (``minmax``: the
    global min/max over all batches and timesteps); weights are quantized meanwhile unless
    ``weights=False``.
    """
    qmodel.eval()
    qmodel.set_quant_state(weights=weights, acts=True)
    for q in qmodel.quantizers("act").values():
        q.reset()
    qmodel.set_act_mode("observe")
    try:
        forward_loop(qmodel)
    finally:
        qmodel.set_act_mode("quantize")
    missing = [n for n, q in qmodel.quantizers("act").items() if q.active and not bool(q.initialized.all())]
    if missing:
        # a quantizer the calibration data never reached (e.g. an unused layer): keep it FP
        for name in missing:
            qmodel.quantizers("act")[name].enabled = False


def finish_recipe(qmodel: QuantModel, name: str, config, quant, records: list, work_dir=None) -> QuantModel:
    """Common end of a reconstruction recipe: final switches, provenance, per-unit records."""
    qmodel.set_quant_state(weights=quant.quantize_weights, acts=quant.quantize_acts)
    qmodel.recipe = name
    qmodel.recipe_config = config
    qmodel.recon_records = [r.to_dict() for r in records]
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(work_dir) / "records.json", qmodel.recon_records, indent=1)
    qmodel.eval()
    return qmodel


def recipe_fingerprint(qmodel, config, calib_set=None, **extra) -> str:
    """What a resumable run's saved progress must match: recipe, its config, the wrap plan, the
    quantization config and a digest of the calibration data (plus ``extra`` settings)."""
    from ..recon.progress import fingerprint_of

    data = None
    if calib_set is not None:
        data = {
            "n": len(calib_set),
            "xs": float(calib_set.xs.double().sum()),
            "xs_abs": float(calib_set.xs.double().abs().sum()),
            "ts": calib_set.ts.tolist(),
            "labels": None if calib_set.labels is None else (
                calib_set.labels.fingerprint() if hasattr(calib_set.labels, "fingerprint") else calib_set.labels.tolist()),
        }
    return fingerprint_of({"recipe": config.recipe_name, "config": config, "plan": qmodel.plan.to_dict(),
                           "quant": qmodel.quant_config, "data": data, **extra})
