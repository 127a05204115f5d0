"""Quantization-aware fine-tuning (EfficientDM / MPQ-DM, docs/methods.md §6): Stage-1 initialisation
with OMQ, QALoRA + TALSQ distillation along the float trajectory, and TRD."""
from .coverage import coverage_of, coverage_rules
from .qalora import FinetuneCheckpoint, FinetuneOptions, expand_act_tables, finetune
from .stage1 import Stage1Options, run_stage1
from .trd import TRDWindow, default_feature_module, trd_loss

__all__ = ["FinetuneCheckpoint", "FinetuneOptions", "Stage1Options", "TRDWindow", "coverage_of", "coverage_rules",
           "default_feature_module", "expand_act_tables", "finetune", "run_stage1", "trd_loss"]
