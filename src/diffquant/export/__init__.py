"""Deployment: packed integer checkpoints, ONNX export, the int8 backend, folding τ."""
from .fold import fold_input_scales, folded_float_state
from .prepare import ExportPreparation, prepare_for_export

__all__ = ["ExportPreparation", "fold_input_scales", "folded_float_state", "prepare_for_export"]
