"""Model level: wrapping, execution-order units, save/load."""
from .checkpoint import load, read_manifest, restore_into, save
from .plan import LayerPlan, UnitPlan, WrapPlan
from .qmodel import QuantModel
from .trace import trace_model
from .wrap import build, quantize

__all__ = ["LayerPlan", "QuantModel", "UnitPlan", "WrapPlan", "build", "load", "quantize", "read_manifest", "restore_into", "save", "trace_model"]
