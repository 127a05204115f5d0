"""Calibration data captured from the user's own diffusers pipeline.

:func:`capture_pipeline` runs the pipeline as the user would (its scheduler, guidance, prompts or
class labels, image size) with a forward pre-hook on its denoiser (``pipe.unet`` or
``pipe.transformer``) that records every call: x_t, the timestep and every other argument — text
embeddings, ``added_cond_kwargs``, ``timestep_cond``, class labels — with both halves of a
classifier-free-guidance batch as separate rows. The result is a :class:`PipelineCalibration`:
a :class:`~diffquant.calib.select.CalibrationSet` whose ``labels`` slot holds the recorded
:class:`~diffquant.calib.conditioning.Conditioning`, saved to disk (safetensors + JSON) so one
capture serves many recipes. Nothing is downloaded; the pipeline must already be loaded.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import DiffquantError
from ..jsonio import write_json
from .calls import CalibrationCalls
from .conditioning import Conditioning, conditioned_call
from .select import CalibrationSet, check_finite_inputs

DENOISER_NAMES = ("unet", "transformer", "prior", "decoder")
FORMAT = "diffquant-pipeline-calibration"
TENSORS_FILE = "calibration.safetensors"
INDEX_FILE = "calibration.json"
#: a few dozen everyday prompts for text-to-image calibration (written for diffquant)
DEFAULT_PROMPTS_FILE = Path(__file__).with_name("default_prompts.txt")


def denoiser_of(pipe, name: str | None = None) -> tuple[str, nn.Module]:
    """The pipeline's denoiser attribute name and module (``unet``, ``transformer``, ...)."""
    names = [name] if name else [n for n in DENOISER_NAMES if isinstance(getattr(pipe, n, None), nn.Module)]
    if not names or not isinstance(getattr(pipe, names[0], None), nn.Module):
        raise DiffquantError(f"{type(pipe).__name__} has no denoiser module "
                             f"{name or ' / '.join(DENOISER_NAMES)}; pass denoiser='<attribute name>'")
    return names[0], getattr(pipe, names[0])


def read_prompts(prompts: str | os.PathLike | Sequence[str] | None) -> list[str]:
    """Prompts from a list, or from a text file with one prompt per line (blank lines and ``#``
    comments skipped); ``None`` gives the shipped default set."""
    if prompts is None:
        prompts = DEFAULT_PROMPTS_FILE
    if isinstance(prompts, os.PathLike) or (isinstance(prompts, str) and prompts.endswith(".txt")):
        path = Path(prompts)
        if not path.is_file():
            raise DiffquantError(f"prompt file not found: {path}")
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    elif isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise DiffquantError("prompts must be a non-empty list of non-empty strings")
    return prompts


class _CallRecorder:
    """Forward pre-hook recording each denoiser call as (x, t[B], conditioning) on the CPU."""

    def __init__(self, module: nn.Module):
        self.signature = inspect.signature(module.forward)
        self.var_keyword = next((p.name for p in self.signature.parameters.values()
                                 if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        self.records: list[tuple[Tensor, Tensor, Conditioning, int]] = []
        self.step = 0

    def __call__(self, module, args: tuple, kwargs: dict) -> None:
        try:
            bound = self.signature.bind_partial(*args, **kwargs).arguments
        except TypeError as exc:
            raise DiffquantError(f"cannot read the denoiser call's arguments ({exc})") from None
        names = list(bound)
        if len(names) < 2:
            raise DiffquantError("the denoiser was called without a sample and a timestep argument")
        x, t = bound.pop(names[0]), bound.pop(names[1])
        if self.var_keyword is not None:
            bound.update(bound.pop(self.var_keyword, {}))
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise DiffquantError(f"the denoiser's first argument is not a batched tensor ({type(x).__name__})")
        batch = x.shape[0]
        t = torch.as_tensor(t).detach().reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise DiffquantError(f"the denoiser got {t.numel()} timesteps for a batch of {batch}")
        bound.pop("return_dict", None)
        cond = Conditioning.from_call(bound, batch).to("cpu")
        where = f"denoiser call {len(self.records)} (step {self.step}, t={t[0].item():g})"
        check_finite_inputs(x.detach().cpu(), f"{where}: the sample", lambda i: f"row {i}")
        bad = cond.non_finite()
        if bad is not None:
            raise DiffquantError(f"{where}: argument {bad[0]!r} holds {bad[1]} non-finite values (NaN/Inf); "
                                 "calibration data must be finite")
        self.records.append((x.detach().cpu(), t.cpu().clone(), cond, self.step))
        self.step += 1
        return None


@dataclass
class PipelineCalibration:
    """Recorded denoiser inputs of a pipeline: what every recipe calibrates on."""

    calib_set: CalibrationSet
    denoiser: str
    #: pipeline class and the call settings, for the record
    source: dict

    call = staticmethod(conditioned_call)

    def __len__(self) -> int:
        return len(self.calib_set)

    def example_inputs(self, batch: int = 2) -> tuple[tuple, dict[str, Any]]:
        """``(args, kwargs)`` of one denoiser call on the first ``batch`` rows (for tracing)."""
        x, t, cond = self.calib_set[slice(0, batch)]
        return (x, t), cond.kwargs()

    def forward_loop(self, batch_size: int = 32, device: str | torch.device = "cpu"):
        """``loop(model)`` running every recorded input through ``model``, one timestep per batch
        (per-timestep quantizer tables need that)."""
        calls = CalibrationCalls(self.calib_set, conditioned_call, device)

        @torch.no_grad()
        def loop(model: nn.Module) -> None:
            for index in calls.slices(batch_size, one_timestep=True):
                calls.run(model, index)

        return loop

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``calibration.safetensors`` + ``calibration.json`` into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        cond: Conditioning = self.calib_set.labels
        tensors = {"x": self.calib_set.xs, "t": self.calib_set.ts, "steps": self.calib_set.steps,
                   "sample_ids": self.calib_set.sample_ids}
        tensors.update({f"cond/{k}": v for k, v in cond.tensors.items()})
        constants, tensor_constants = {}, {}
        for key, value in cond.constants.items():
            if isinstance(value, Tensor):
                tensor_constants[key] = value
            else:
                constants[key] = value
        tensors.update({f"const/{k}": v for k, v in tensor_constants.items()})
        try:
            json.dumps(constants)
        except TypeError:
            raise DiffquantError(f"cannot save the recorded non-batched arguments {sorted(constants)}: "
                                 "they are not JSON values") from None
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / TENSORS_FILE))
        write_json(out / INDEX_FILE, {"format": FORMAT, "denoiser": self.denoiser, "source": self.source,
                                      "rows": len(self), "constants": constants})
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "PipelineCalibration":
        """Read a calibration written by :meth:`save` (safetensors: nothing is unpickled)."""
        root = Path(directory)
        index_file, tensors_file = root / INDEX_FILE, root / TENSORS_FILE
        if not index_file.is_file() or not tensors_file.is_file():
            raise DiffquantError(f"{root} is not a pipeline calibration (expected {INDEX_FILE} and {TENSORS_FILE})")
        try:
            index = json.loads(index_file.read_text())
            tensors = load_file(str(tensors_file))
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise DiffquantError(f"{root}: the calibration files are damaged ({str(exc).splitlines()[0]})") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise DiffquantError(f"{index_file} is not a diffquant pipeline calibration index")
        missing = [k for k in ("x", "t", "steps", "sample_ids") if k not in tensors]
        if missing:
            raise DiffquantError(f"{tensors_file} lacks {missing[0]}")
        cond_tensors = {k[len("cond/"):]: v for k, v in tensors.items() if k.startswith("cond/")}
        constants = dict(index.get("constants") or {})
        constants.update({k[len("const/"):]: v for k, v in tensors.items() if k.startswith("const/")})
        cond = Conditioning(cond_tensors, constants, int(tensors["x"].shape[0]))
        calib_set = CalibrationSet(tensors["x"], tensors["t"], cond, tensors["steps"], tensors["sample_ids"])
        return cls(calib_set, str(index.get("denoiser", "unet")), dict(index.get("source") or {}))


def capture_pipeline(pipe, calls: Iterable[Mapping[str, Any]] | None = None, *,
                     prompts: str | os.PathLike | Sequence[str] | None = None, prompts_per_call: int = 1,
                     denoiser: str | None = None, seed: int = 0, every: int = 1,
                     out: str | os.PathLike | None = None, progress: bool = True,
                     **pipe_kwargs) -> PipelineCalibration:
    """Run ``pipe`` and record every input its denoiser receives.

    ``calls``: keyword arguments of each pipeline call (e.g. ``[{"class_labels": [1, 2]}]`` for
    DiT, ``[{"batch_size": 4}]`` for DDIM); or ``prompts`` (a list or a ``.txt`` file, ``None`` =
    the shipped default set when ``calls`` is also None and the pipeline takes a ``prompt``),
    ``prompts_per_call`` at a time. ``pipe_kwargs`` go to every call (``num_inference_steps``,
    ``guidance_scale``, ``height``, ...). Call ``i`` gets ``generator=torch.Generator().manual_seed(seed
    + i)`` unless it brings its own. ``every`` keeps every k-th denoising step. With ``out`` the
    calibration is also saved there. Returns the :class:`PipelineCalibration`.
    """
    if every < 1:
        raise DiffquantError(f"every must be >= 1, got {every}")
    name, module = denoiser_of(pipe, denoiser)
    takes_prompt = "prompt" in inspect.signature(pipe.__call__).parameters
    if calls is None:
        if not takes_prompt:
            raise DiffquantError(f"{type(pipe).__name__} takes no prompt: pass calls=[{{...}}] with its arguments")
        texts = read_prompts(prompts)
        calls = [{"prompt": texts[i:i + prompts_per_call]} for i in range(0, len(texts), prompts_per_call)]
    elif prompts is not None:
        raise DiffquantError("pass either calls or prompts, not both")
    calls = [dict(c) for c in calls]
    if not calls:
        raise DiffquantError("no pipeline calls to capture")
    recorder = _CallRecorder(module)
    handle = module.register_forward_pre_hook(recorder, with_kwargs=True)
    try:
        with torch.no_grad():
            for i, call in enumerate(tqdm(calls, desc=f"capturing {type(pipe).__name__}", disable=not progress)):
                recorder.step = 0
                kwargs = {**pipe_kwargs, **call}
                kwargs.setdefault("generator", torch.Generator().manual_seed(seed + i))
                try:
                    pipe(**kwargs)
                except TypeError as exc:
                    raise DiffquantError(f"{type(pipe).__name__} refused the call arguments "
                                         f"{sorted(kwargs)}: {exc}") from None
    finally:
        handle.remove()
    if not recorder.records:
        raise DiffquantError(f"{type(pipe).__name__} never called its {name}")
    source = {"pipeline": type(pipe).__name__, "denoiser": name, "calls": len(calls), "every": every,
              "seed": seed, "settings": {k: v for k, v in pipe_kwargs.items() if isinstance(v, (int, float, str, bool))}}
    result = _assemble(recorder.records, every, name, source)
    if out is not None:
        result.save(out)
    return result


def _trajectory_ids(records) -> list[Tensor]:
    """Per record, the id of each row's trajectory: a run starts at step 0 and row i of every later
    call of that run continues trajectory ``start + i`` (CFG halves are trajectories of their own)."""
    ids, start, width = [], 0, 0
    for x, _, _, step in records:
        if step == 0 or not ids:
            start += width
            width = x.shape[0]
        ids.append(torch.arange(start, start + x.shape[0]))
    return ids


def _assemble(records, every: int, denoiser: str, source: dict) -> PipelineCalibration:
    trajectory = _trajectory_ids(records)
    kept = [i for i, r in enumerate(records) if r[3] % every == 0]
    xs = torch.cat([records[i][0] for i in kept])
    ts = torch.cat([records[i][1] for i in kept])
    steps = torch.cat([torch.full((records[i][0].shape[0],), records[i][3], dtype=torch.long) for i in kept])
    cond = Conditioning.cat([records[i][2] for i in kept])
    calib_set = CalibrationSet(xs, ts, cond, steps, torch.cat([trajectory[i] for i in kept]))
    return PipelineCalibration(calib_set, denoiser, source)


class RecordedCalls:
    """What :func:`record_calls` saw; :meth:`calibration` turns it into a calibration."""

    def __init__(self, recorder: _CallRecorder, name: str):
        self._recorder = recorder
        self._name = name

    def __len__(self) -> int:
        return len(self._recorder.records)

    def calibration(self, every: int = 1) -> PipelineCalibration:
        """The recorded calls as a calibration; step k of a call is the rank of its timestep in
        the recorded schedule (largest t first), so any sampler numbers its steps the same way."""
        if every < 1:
            raise DiffquantError(f"every must be >= 1, got {every}")
        records = self._recorder.records
        if not records:
            raise DiffquantError(f"{self._name} was not called inside the record_calls() block")
        schedule = sorted({float(r[1][0]) for r in records}, reverse=True)
        ranked = [(x, t, c, schedule.index(float(t[0]))) for x, t, c, _ in records]
        return _assemble(ranked, every, self._name, {"recorded": self._name, "calls": len(records), "every": every})


@contextlib.contextmanager
def record_calls(denoiser: nn.Module) -> Iterator[RecordedCalls]:
    """Record every call of ``denoiser`` made inside the block — by your own sampler, a pipeline
    or any other caller — with all its arguments::

        with torch.no_grad(), diffquant.record_calls(model) as calls:
            my_sampler(model)
        qmodel = diffquant.apply_recipe(model, calls.calibration(), "qdiffusion")
    """
    if not isinstance(denoiser, nn.Module):
        raise DiffquantError(f"record_calls() needs a torch.nn.Module, got {type(denoiser).__name__}")
    recorder = _CallRecorder(denoiser)
    handle = denoiser.register_forward_pre_hook(recorder, with_kwargs=True)
    try:
        yield RecordedCalls(recorder, type(denoiser).__name__)
    finally:
        handle.remove()
