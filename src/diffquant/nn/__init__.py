"""Module level: quantized layers and attention matmul quantizers."""
from .attention import QuantAttnProcessor
from .layers import LAYER_KINDS, SUPPORTED, LayerKind, QuantizerSpec, QuantLayer, layer_kind

__all__ = ["LAYER_KINDS", "LayerKind", "QuantAttnProcessor", "QuantLayer", "QuantizerSpec", "SUPPORTED", "layer_kind"]
