"""``quantize(model, config)``: swap layers for quantized ones, nothing else in the model.

Wrapping is two steps: a traced float forward produces a :class:`WrapPlan` (execution order,
concatenation points, per-layer bits), then :func:`build` swaps modules according to the plan.
Loading a checkpoint runs only :func:`build`, with the plan from the manifest.
"""
from __future__ import annotations

import copy

from torch import nn

from ..config import QuantConfig
from ..errors import ConfigError
from ..nn.attention import QuantAttnProcessor
from ..nn.layers import QuantizerSpec, QuantLayer
from .plan import WrapPlan, make_plan
from .qmodel import QuantModel
from .trace import trace_in_eval


def _weight_spec(config: QuantConfig, bits: int) -> QuantizerSpec:
    return QuantizerSpec(
        bits=bits,
        grid=config.weight_grid,
        per_channel=config.weight_per_channel,
        init=config.weight_init,
        include_zero=config.weight_init != "lp_shrink",
    )


def _act_spec(config: QuantConfig, bits: int, num_steps: int, grid: str | None = None) -> QuantizerSpec:
    init = config.act_init
    return QuantizerSpec(
        bits=bits,
        grid=grid or config.act_grid,
        per_channel=False,
        init=init,
        num_steps=num_steps,
        include_zero=init != "lp_shrink",
    )


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def build(model: nn.Module, config: QuantConfig, plan: WrapPlan) -> QuantModel:
    """Swap the planned layers and attention processors in ``model`` (in place)."""
    float_keys = list(model.state_dict().keys())
    num_steps = len(plan.timesteps) if plan.timesteps else 1
    for lp in plan.layers:
        module = model.get_submodule(lp.name)
        if isinstance(module, QuantLayer):
            raise ConfigError(f"{lp.name} is already quantized; wrap a float model")
        layer = QuantLayer(
            module,
            _weight_spec(config, lp.weight_bits),
            _act_spec(config, lp.act_bits, num_steps),
            split=lp.split,
        )
        layer.use_act_quant = lp.quantize_input
        _set_submodule(model, lp.name, layer.to(module.weight.device))
    for name in plan.attention:
        attn = model.get_submodule(name)
        act_bits = config.act_bits if config.quantize_acts else 32
        softmax_bits = config.softmax_bits if act_bits <= 8 else 32
        processor = QuantAttnProcessor(
            _act_spec(config, act_bits, num_steps),
            _act_spec(config, softmax_bits, num_steps, grid="unsigned"),
            float_processor=attn.processor,
        )
        device = next(attn.parameters()).device
        attn.set_processor(processor.to(device))
    return QuantModel(model, config, plan, float_keys)


def quantize(
    model: nn.Module,
    config: QuantConfig | None = None,
    example_inputs: tuple | None = None,
    *,
    timesteps: list[int] | None = None,
    inplace: bool = False,
) -> QuantModel:
    """Wrap ``model`` for quantization.

    Args:
        model: any ``nn.Module`` denoiser (diffusers UNet/transformer, bundled or user model).
        config: bit-widths, grids, coverage and layer rules (defaults: W8A8).
        example_inputs: ``(args, kwargs)`` for one traced float forward; it finds execution
            order and concatenation points. Defaults to inputs built from a diffusers config.
        timesteps: the calibrated schedule when activations get one parameter set per step.
        inplace: modify ``model`` itself instead of a deep copy.
    """
    config = config or QuantConfig()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"quantize() needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, QuantModel) or any(isinstance(m, QuantLayer) for m in model.modules()):
        raise ConfigError("this model is already quantized; wrap a float model")
    if not inplace:
        model = copy.deepcopy(model)
    trace = trace_in_eval(model, example_inputs)
    plan = make_plan(model, config, trace, timesteps)
    if not plan.layers and not plan.attention:
        raise ConfigError("no layer matched the include/exclude filters: nothing to quantize")
    return build(model, config, plan)
