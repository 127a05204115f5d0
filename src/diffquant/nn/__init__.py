"""Module level: quantized layers and attention matmul quantizers."""
from .attention import QuantAttnProcessor
from .layers import SUPPORTED, QuantizerSpec, QuantLayer, layer_kind

__all__ = ["QuantAttnProcessor", "QuantLayer", "QuantizerSpec", "SUPPORTED", "layer_kind"]
