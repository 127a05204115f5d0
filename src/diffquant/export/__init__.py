"""Deployment: packed integer checkpoints, ONNX export, the int8 backend, folding τ."""
from .fold import fold_input_scales, folded_float_state

__all__ = ["fold_input_scales", "folded_float_state"]
