"""Model level: wrapping, execution-order units, save/load."""
from .checkpoint import load, read_manifest, restore_into, save
from .pipeline_io import load_pipeline, save_pipeline
from .plan import LayerPlan, UnitPlan, WrapPlan
from .qmodel import QuantModel
from .trace import trace_model
from .wrap import build, quantize

__all__ = ["LayerPlan", "QuantModel", "UnitPlan", "WrapPlan", "build", "load", "load_pipeline", "quantize", "read_manifest", "restore_into", "save", "save_pipeline", "trace_model"]
