"""The quantized model: the user's model with layers swapped, plus the quantization plan.

``QuantModel`` is called exactly like the wrapped model and passes the wrapped model's attributes
(``config``, ``dtype``, ``device``, ...) through, so it drops into a diffusers pipeline; its own
quantization settings are ``quant_config``. It is a diffusers ``ModelMixin``, so a pipeline takes it
as a component everywhere a model goes: ``Pipeline.from_pretrained(path, unet=qmodel)`` accepts it,
``pipe.save_pretrained`` saves it through :meth:`QuantModel.save_pretrained` (recorded in
``model_index.json`` as ``["diffquant", "QuantModel"]``) and ``Pipeline.from_pretrained`` of that
folder loads it back through :meth:`QuantModel.from_pretrained`, bit-identical. Before each call the wrapped model's forward pre-hook
looks up the timestep argument in the calibrated schedule (per-timestep tables, docs/methods.md §1.7),
so every quantizer with a table reads the row of *this* timestep — no call counter — whether
the call comes through ``QuantModel`` or straight to ``qmodel.denoiser`` from a pipeline.
"""
from __future__ import annotations

import warnings
from typing import Iterator

import torch
from diffusers import ModelMixin
from torch import Tensor, nn

from ..config import QuantConfig
from ..nn.attention import QuantAttnProcessor
from ..nn.layers import QuantLayer
from ..quant.quantizer import UniformQuantizer
from ..quant.timestep import TimestepIndex, install_timestep_hook, remove_timestep_hooks
from .plan import UnitPlan, WrapPlan


class QuantModel(ModelMixin):
    # diffusers records a pipeline component as (module, class name) in model_index.json and imports
    # it from there when the pipeline is loaded: the public name keeps saved pipelines loadable
    # whatever the package layout becomes
    __module__ = "diffquant"

    def __init__(self, model: nn.Module, config: QuantConfig, plan: WrapPlan, float_keys: list[str]):
        super().__init__()
        self.model = model
        self.quant_config = config
        self.plan = plan
        self.timestep_index = TimestepIndex(plan.timesteps, config.timestep_lookup)
        #: state-dict keys of the float model (saved separately from the quantizer state)
        self.float_keys = list(float_keys)
        self.recipe = "none"
        self.recipe_config: dict = {}
        for q in self.quantizers().values():
            q.timestep_index = self.timestep_index
        install_timestep_hook(model, self.timestep_index)
        install_bare_save_warning(model)

    # ------------------------------------------------------------------ calling
    def forward(self, *args, **kwargs):
        # the wrapped model's own pre-hook selects the per-timestep row (see install_timestep_hook)
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # drop-in: pipelines read the denoiser's own ``config``, ``dtype``, ``device``, ...
            return getattr(self._modules["model"], name)

    # the denoiser's diffusers config *is* this model's config (ConfigMixin.config reads
    # ``_internal_dict``; a pipeline that rewrites it rewrites the denoiser's)
    @property
    def _internal_dict(self):
        return self._modules["model"]._internal_dict

    @_internal_dict.setter
    def _internal_dict(self, value) -> None:
        self._modules["model"]._internal_dict = value

    @property
    def dtype(self) -> torch.dtype:
        inner = self._modules["model"]
        return inner.dtype if isinstance(inner, ModelMixin) else ModelMixin.dtype.fget(self)

    @property
    def device(self) -> torch.device:
        inner = self._modules["model"]
        return inner.device if isinstance(inner, ModelMixin) else ModelMixin.device.fget(self)

    # gradient checkpointing is a property of the denoiser's class, not of the wrapper
    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self._modules["model"], "is_gradient_checkpointing", False))

    def enable_gradient_checkpointing(self, *args, **kwargs) -> None:
        self._modules["model"].enable_gradient_checkpointing(*args, **kwargs)

    def disable_gradient_checkpointing(self) -> None:
        self._modules["model"].disable_gradient_checkpointing()

    def save_pretrained(self, directory, **save_kwargs):
        """Like the denoiser's ``save_pretrained`` (float weights in diffusers' layout) plus the
        quantizer state in ``<directory>/diffquant/`` — never the quantizer tensors mixed into the
        float weights file. Load with :meth:`from_pretrained`."""
        from .pipeline_io import save_pretrained

        return save_pretrained(self, directory, **save_kwargs)

    @classmethod
    def from_pretrained(cls, directory, model_cls=None, **load_kwargs) -> "QuantModel":
        """A quantized model saved by :meth:`save_pretrained` (bit-identical)."""
        from .pipeline_io import from_pretrained

        return from_pretrained(directory, model_cls, **load_kwargs)

    @property
    def denoiser(self) -> nn.Module:
        """The user's own model object with the quantized layers swapped in: an instance of its
        original class (``UNet2DConditionModel``, ...), so ``Pipeline.from_pretrained(path,
        unet=qmodel.denoiser)`` accepts it; it selects per-timestep rows itself."""
        return self.model

    # ------------------------------------------------------------------ access
    def layers(self) -> dict[str, QuantLayer]:
        return {lp.name: self.model.get_submodule(lp.name) for lp in self.plan.layers}

    def attention_processors(self) -> dict[str, QuantAttnProcessor]:
        return {name: self.model.get_submodule(name).processor for name in self.plan.attention}

    def quantizers(self, which: str = "all") -> dict[str, UniformQuantizer]:
        """Quantizers by qualified name; ``which`` = all | weight | act."""
        out = {}
        for name, m in self.model.named_modules():
            if isinstance(m, UniformQuantizer):
                is_weight = ".weight_quantizers." in f".{name}"
                if which == "all" or (which == "weight") == is_weight:
                    out[name] = m
        return out

    def unit_modules(self) -> Iterator[tuple[UnitPlan, nn.Module]]:
        for unit in self.plan.units:
            yield unit, self.model.get_submodule(unit.name)

    def set_quant_state(self, weights: bool | None = None, acts: bool | None = None) -> None:
        """Switch weight and/or activation quantization on or off for the whole model.

        Layers planned with ``quantize_input=False`` keep their input in floating point.
        """
        for lp in self.plan.layers:
            layer = self.model.get_submodule(lp.name)
            if weights is not None:
                layer.use_weight_quant = weights
            if acts is not None:
                layer.use_act_quant = acts and lp.quantize_input
        if acts is not None:
            for proc in self.attention_processors().values():
                proc.use_act_quant = acts

    def set_act_mode(self, mode: str) -> None:
        for q in self.quantizers("act").values():
            q.mode = mode

    def set_timesteps(self, timesteps: list[int]) -> None:
        """Set the calibrated schedule (tables must already have one row per step)."""
        self.timestep_index.set_timesteps(timesteps)
        self.plan.timesteps = list(self.timestep_index.timesteps)

    # ------------------------------------------------------------------ reporting
    def denoiser_state_dict(self) -> dict[str, Tensor]:
        """The denoiser's state dict under its own key names (float weights and quantizer state),
        read through the wrapper — reading ``qmodel.denoiser.state_dict()`` directly warns."""
        return {k[len("model."):]: v for k, v in self.state_dict().items() if k.startswith("model.")}

    def quant_state_dict(self) -> dict[str, Tensor]:
        """Everything the quantization added (quantizer state, rounding, ...), not float weights."""
        floats = {f"model.{k}" for k in self.float_keys}
        return {k: v for k, v in self.state_dict().items() if k not in floats}

    def summary(self) -> str:
        rows = [("layer", "kind", "W bits", "A bits", "granularity", "split", "roles")]
        for lp in self.plan.layers:
            layer = self.model.get_submodule(lp.name)
            wq = layer.weight_quantizers[0]
            gran = "channel" if wq.channel_axis is not None else "tensor"
            a_bits = str(lp.act_bits) if lp.quantize_input else f"{lp.act_bits} (input FP)"
            w_bits = str(lp.weight_bits)
            channel_bits = getattr(wq, "channel_bits", None)
            if channel_bits is not None and wq.active:  # mixed precision per channel (MPQ-DM's OMQ)
                values, counts = torch.unique(channel_bits.long(), return_counts=True)
                w_bits += " (" + "/".join(f"{int(b)}:{int(c)}" for b, c in zip(values, counts)) + ")"
            rows.append((lp.name, lp.kind, w_bits, a_bits, gran, str(lp.split or "-"), ",".join(lp.roles) or "-"))
        for name in self.plan.attention:
            proc = self.model.get_submodule(name).processor
            rows.append((name, "attn matmuls", "-", f"{proc.q_quantizer.bits} (P: {proc.probs_quantizer.bits})", "tensor", "-", "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        n_units = len(self.plan.units)
        n_blocks = sum(u.kind == "block" for u in self.plan.units)
        found = self.plan.found or {}
        how = {"names": "by name", "structure": "from the traced graph", "none": "none found"}
        detail = "; ".join(f"{role.replace('_', ' ')} {how.get(v, v)}" for role, v in found.items())
        points = {"middle": "TDAC feature", "last_block": "TRD feature"}
        features = ", ".join(f"{points[k]} {v}" for k, v in (self.plan.features or {}).items() if k in points)
        if features:
            detail += ("; " if detail else "") + f"{features} from the traced graph"
        lines.append(f"{len(self.plan.layers)} quantized layers, {len(self.plan.attention)} attention modules, "
                     f"{n_units} reconstruction units ({n_blocks} blocks)" + (f"; {detail}" if detail else ""))
        return "\n".join(lines)

    def clear_weight_cache(self) -> None:
        for layer in self.layers().values():
            layer.clear_cache()


BARE_SAVE_WARNING = ("diffquant: the state dict of a quantized denoiser was read on its own (e.g. pipe.unet = "
                     "qmodel.denoiser; pipe.save_pretrained): a plain load of it gets the float weights only; "
                     "put the QuantModel itself in the pipeline (pipe.unet = qmodel) or use diffquant.save")


def _warn_bare_state_dict(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    # through the wrapper the prefix is "model."; an empty prefix means someone saves the bare denoiser
    if not prefix:
        warnings.warn(BARE_SAVE_WARNING, UserWarning, stacklevel=3)


def install_bare_save_warning(model: nn.Module) -> None:
    """Warn in one line when ``model`` (a wrapped denoiser) is serialised without its wrapper."""
    remove_bare_save_warning(model)
    model.register_state_dict_pre_hook(_warn_bare_state_dict)


def remove_bare_save_warning(model: nn.Module) -> None:
    for key, hook in list(model._state_dict_pre_hooks.items()):
        if hook is _warn_bare_state_dict:
            del model._state_dict_pre_hooks[key]


def remove_wrapper_hooks(model: nn.Module) -> None:
    """Strip what wrapping installed on a denoiser (timestep row selection, the bare-save warning):
    for a copy that is used on its own, e.g. an export copy with its rows fixed."""
    remove_timestep_hooks(model)
    remove_bare_save_warning(model)
