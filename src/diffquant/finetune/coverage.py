"""Layer coverage of EfficientDM / MPQ-DM (docs/methods.md §6.1, §1.10), selected by role.

Roles, computed from the wrap plan (layers in execution order) and the modules:

- ``conv_in``: the layer named ``conv_in``, else the first executed layer outside the time
  embedding;
- ``conv_out``: the last executed layer (plan role ``last``);
- ``time_embedding``: the plan role (the time-embedding MLP);
- ``shortcut``: residual 1×1 shortcut convs (names ending in ``conv_shortcut``,
  ``skip_connection``, ``nin_shortcut`` or ``residual_conv``);
- ``downsample``: convolutions with a stride > 1 (diffusers ``downsamplers``, CompVis ``op``,
  mnist ``downs``/``down*``).

The official code picks its 8-bit layers by hard-coded layer counts; here a selector list holds
``@role`` entries and/or name globs. Layers selected as 8-bit get W8A8 (static, no smoothing,
OMQ or LoRA); layers selected as FP keep both sides in floating point (bits 32 in the plan, so a
saved model reloads the same). 8 bit wins over FP when a layer is both.
"""
from __future__ import annotations

import fnmatch

from ..errors import ConfigError
from ..model.qmodel import QuantModel

ROLES = ("conv_in", "conv_out", "time_embedding", "shortcut", "downsample")
SHORTCUT_SUFFIXES = ("conv_shortcut", "skip_connection", "nin_shortcut", "residual_conv")
DEFAULT_EIGHT_BIT = ["@conv_in", "@time_embedding", "@conv_out"]
DEFAULT_FP = ["@shortcut", "@downsample"]


def layer_roles(qmodel: QuantModel) -> dict[str, set[str]]:
    """Role set of every planned layer."""
    plans = qmodel.plan.layers
    roles: dict[str, set[str]] = {lp.name: set() for lp in plans}
    if not plans:
        return roles
    names = [lp.name for lp in plans]
    conv_in = "conv_in" if "conv_in" in names else next(
        (lp.name for lp in plans if "time_embedding" not in lp.roles), names[0])
    conv_out = next((lp.name for lp in plans if "last" in lp.roles), names[-1])
    roles[conv_in].add("conv_in")
    roles[conv_out].add("conv_out")
    for lp in plans:
        if "time_embedding" in lp.roles:
            roles[lp.name].add("time_embedding")
        if lp.name.rsplit(".", 1)[-1] in SHORTCUT_SUFFIXES:
            roles[lp.name].add("shortcut")
        layer = qmodel.model.get_submodule(lp.name)
        stride = layer.op_args.get("stride", 1) if lp.kind in ("Conv1d", "Conv2d") else 1
        stride = stride if isinstance(stride, (tuple, list)) else (stride,)
        if any(s > 1 for s in stride) and lp.name not in (conv_in, conv_out):
            roles[lp.name].add("downsample")
    return roles


def select_layers(selectors: list[str], roles: dict[str, set[str]]) -> list[str]:
    """Layer names matching any ``@role`` or name glob in ``selectors`` (plan order)."""
    for s in selectors:
        if s.startswith("@") and s[1:] not in ROLES:
            raise ConfigError(f"unknown layer role {s!r}; roles: {', '.join('@' + r for r in ROLES)}")
    chosen = []
    for name, rs in roles.items():
        for s in selectors:
            if (s.startswith("@") and s[1:] in rs) or (not s.startswith("@") and fnmatch.fnmatchcase(name, s)):
                chosen.append(name)
                break
    return chosen


def _set_bits(qmodel: QuantModel, name: str, weight_bits: int, act_bits: int) -> None:
    lp = qmodel.plan.layer(name)
    layer = qmodel.model.get_submodule(name)
    lp.weight_bits, lp.act_bits = weight_bits, act_bits
    for q in layer.weight_quantizers:
        q.set_bits(weight_bits)
    for q in layer.act_quantizers:
        q.set_bits(act_bits)
    layer.clear_cache()


def apply_coverage(qmodel: QuantModel, eight_bit: list[str], fp: list[str]) -> dict[str, list[str]]:
    """Set the 8-bit and FP layers in place (plan and quantizers); returns the layer lists,
    including ``mixed``: the layers that stay at the model's bits (smoothing, OMQ, LoRA, TALSQ)."""
    roles = layer_roles(qmodel)
    eight = select_layers(list(eight_bit), roles)
    full = [n for n in select_layers(list(fp), roles) if n not in eight]
    for name in eight:
        lp = qmodel.plan.layer(name)
        w = lp.weight_bits if lp.weight_bits > 8 else 8
        a = lp.act_bits if lp.act_bits > 8 else 8
        _set_bits(qmodel, name, w, a)
    for name in full:
        _set_bits(qmodel, name, 32, 32)
    for name, rs in roles.items():  # shown by QuantModel.summary()
        lp = qmodel.plan.layer(name)
        lp.roles = list(dict.fromkeys(lp.roles + sorted(rs - {"time_embedding"})))
    mixed = [n for n in roles if n not in eight and n not in full]
    return {"eight_bit": eight, "fp": full, "mixed": mixed}


__all__ = ["DEFAULT_EIGHT_BIT", "DEFAULT_FP", "ROLES", "apply_coverage", "layer_roles", "select_layers"]
