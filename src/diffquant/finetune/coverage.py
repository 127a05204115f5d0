"""Layer coverage of EfficientDM / MPQ-DM (docs/methods.md §6.1, §1.10) as coverage rules.

The official code picks its 8-bit layers by hard-coded layer counts; here they are rules on the
roles the wrap plan finds from the traced forward (``@input`` = conv_in, ``@last`` = conv_out,
``@time_embedding``, ``@shortcut``, ``@downsample``; the papers' ``@conv_in``/``@conv_out`` are
accepted) or on name globs. The FP rules come first and the 8-bit rules after them, so a layer
matched by both is 8 bit (a later rule wins). 8-bit layers get W8A8 (static: no smoothing, OMQ or
LoRA); FP layers keep both sides in floating point (bits 32 in the plan, so a saved model reloads
the same). Every other layer is *mixed*: it stays at the model's bits and gets smoothing, OMQ and
LoRA.
"""
from __future__ import annotations

from ..config import LayerRule, check_role_patterns
from ..model.plan import layers_set_by_rules
from ..model.qmodel import QuantModel

DEFAULT_EIGHT_BIT = ["@conv_in", "@time_embedding", "@conv_out"]
DEFAULT_FP = ["@shortcut", "@downsample"]


def coverage_rules(eight_bit: list[str], fp: list[str]) -> list[LayerRule]:
    """The rule list of MPQ-DM's coverage: FP rules, then W8A8 rules (which win)."""
    check_role_patterns(eight_bit, "eight_bit_layers")
    check_role_patterns(fp, "fp_layers")
    return ([LayerRule(p, weight_bits=32, act_bits=32) for p in fp]
            + [LayerRule(p, weight_bits=8, act_bits=8) for p in eight_bit])


def coverage_of(qmodel: QuantModel) -> dict[str, list[str]]:
    """The wrapped model's layers by coverage (plan order): ``eight_bit`` and ``fp`` (set by a
    coverage rule of the wrap config), ``mixed`` (the rest: at the model's bits)."""
    ruled = layers_set_by_rules(qmodel.plan, qmodel.quant_config.rules)
    out: dict[str, list[str]] = {"eight_bit": [], "fp": [], "mixed": []}
    for lp in qmodel.plan.layers:
        if lp.name not in ruled:
            out["mixed"].append(lp.name)
        elif lp.weight_bits > 8 and lp.act_bits > 8:
            out["fp"].append(lp.name)
        else:
            out["eight_bit"].append(lp.name)
    return out


__all__ = ["DEFAULT_EIGHT_BIT", "DEFAULT_FP", "coverage_of", "coverage_rules"]
