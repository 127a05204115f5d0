"""Run an exported denoiser in onnxruntime behind the PyTorch call convention.

:class:`OnnxDenoiser` is an ``nn.Module`` called like the original denoiser, ``(x, t, **kwargs)``,
returning the noise prediction as a tensor, so ``DiffusionBundle.with_unet(OnnxDenoiser(path))``
samples with onnxruntime. With per-timestep graphs (see :mod:`.onnx_export`) each call runs the
graph of its timestep.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError, DiffquantError
from ..quant.timestep import TimestepIndex
from .onnx_export import POSITIONAL_NAMES, SIDECAR_FORMAT, sidecar_path


def session_options(threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return options


def optimized_op_types(path: str | Path, threads: int | None = 1) -> dict[str, int]:
    """Operator counts of the graph onnxruntime actually runs (after its fusions), e.g. to check
    which layers landed on integer kernels (ConvInteger, MatMulIntegerToFloat, ...)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads)
        # the extended level keeps the graph portable enough to serialize; layout-specific
        # rewrites of ORT_ENABLE_ALL do not change which kernels are integer
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


class OnnxDenoiser(nn.Module):
    """An exported denoiser (one graph, or one per timestep group) run by onnxruntime on CPU."""

    def __init__(self, path: str | Path, *, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise DiffquantError(f"no ONNX model at {path}")
        sidecar = sidecar_path(path)
        graphs = [{"file": path.name, "timesteps": None}]
        lookup = "exact"
        if sidecar.is_file():
            try:
                info = json.loads(sidecar.read_text())
            except json.JSONDecodeError as exc:
                raise DiffquantError(f"{sidecar} is corrupt ({exc.msg})") from None
            if info.get("format") == SIDECAR_FORMAT:
                graphs, lookup = info["graphs"], info.get("timestep_lookup", "exact")
        options = session_options(threads)
        self.sessions = []
        for g in graphs:
            file = path.parent / g["file"]
            if not file.is_file():
                raise DiffquantError(f"{file} (listed in {sidecar.name}) is missing")
            try:
                self.sessions.append(ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"]))
            except Exception as exc:  # onnxruntime raises its own exception types
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise DiffquantError(f"onnxruntime cannot load {file}: {first}") from None
        self.index = None
        self.group_of_row: list[int] = []
        if len(graphs) > 1:
            schedule = sorted({t for g in graphs for t in g["timesteps"]}, reverse=True)
            self.index = TimestepIndex(schedule, lookup)
            where = {t: j for j, g in enumerate(graphs) for t in g["timesteps"]}
            self.group_of_row = [where[t] for t in schedule]
        self.input_names = [i.name for i in self.sessions[0].get_inputs()]

    def session_for(self, t) -> int:
        """Index of the graph serving timestep ``t``."""
        if self.index is None:
            return 0
        return self.group_of_row[self.index.index_of(t)]

    def forward(self, *args, **kwargs) -> Tensor:
        named = dict(zip(POSITIONAL_NAMES, args))
        if len(args) > len(POSITIONAL_NAMES):
            named.update({f"input{i}": a for i, a in enumerate(args) if i >= len(POSITIONAL_NAMES)})
        named.update(kwargs)
        if "timestep" not in named and "t" in named:
            named["timestep"] = named.pop("t")
        feeds = {}
        for name in self.input_names:
            if name not in named or named[name] is None:
                raise ConfigError(f"the ONNX denoiser needs the input {name!r}")
            value = named[name]
            batch = args[0].shape[0] if args else None
            if name == "timestep":
                value = torch.as_tensor(value).reshape(-1)
                if value.numel() == 1 and batch is not None:
                    value = value.expand(batch)
                feeds[name] = value.detach().cpu().to(torch.int64).numpy()
            elif isinstance(value, Tensor):
                array = value.detach().cpu()
                feeds[name] = (array.float() if array.is_floating_point() else array.to(torch.int64)).numpy()
            else:
                feeds[name] = np.asarray(value)
        session = self.sessions[self.session_for(named.get("timestep"))]
        out = session.run(None, feeds)[0]
        device = args[0].device if args and isinstance(args[0], Tensor) else "cpu"
        return torch.from_numpy(out).to(device)
