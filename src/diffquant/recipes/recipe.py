"""A recipe: an ordered list of registered stages plus the engine settings they share.

``Recipe.from_dict`` / ``load_recipe`` read the YAML form (``name``, ``description``, ``engine``,
``stages: [{stage_name: {option: value}}, ...]``); ``check`` refuses incompatible orders in one
line naming the conflict; ``run_recipe`` runs the stages on a wrapped model: every stage's
``prepare`` (structure), then one checkpoint restore, then every stage's ``run`` in order, a
stage without passes being skipped when a later stage's work is already in the checkpoint.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..diffusion import distributed
from ..config import QuantConfig, from_dict, to_dict
from ..errors import ConfigError
from .registry import STAGES
from .stage import FAMILIES, EngineSettings, Stage, StageContext

#: what each fact means, for one-line refusals
FACTS = {
    "calibration_set": "the calibration set selected",
    "input_scales": "per-channel input scales τ set",
    "weights_init": "the weight quantizers initialised",
    "weights_rounded": "the weight rounding learned",
    "bit_allocation": "the bits allocated per channel group",
    "acts_init": "the activation ranges initialised",
    "act_tables": "per-timestep activation tables built",
    "acts_learned": "the activation step sizes learned",
    "pts": "power-of-two channel factors voted",
    "finetuned": "the model fine-tuned",
}
#: facts at most one stage of a recipe may provide
EXCLUSIVE = frozenset({"calibration_set", "input_scales", "weights_init", "weights_rounded", "bit_allocation", "act_tables",
                       "acts_learned", "pts", "finetuned"})
PRESETS_DIR = Path(__file__).parent / "presets"


@dataclass
class Recipe:
    """An ordered list of stages (see :mod:`diffquant.recipes.stage`)."""

    name: str
    stages: list[Stage]
    engine: EngineSettings = field(default_factory=EngineSettings)
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("a recipe needs a name")
        self.check()

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "engine": to_dict(self.engine),
                "stages": [s.to_dict() for s in self.stages]}

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping with name and stages, got {type(data).__name__}")
        unknown = sorted(set(data) - {"name", "description", "engine", "stages"})
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; valid: name, description, engine, stages")
        entries = data.get("stages")
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"{source}: 'stages' must be a non-empty list of {{stage: options}} entries")
        stages = []
        for i, entry in enumerate(entries):
            if isinstance(entry, str):
                entry = {entry: {}}
            if not isinstance(entry, dict) or len(entry) != 1:
                raise ConfigError(f"{source}: stage entry {i + 1} must be one 'stage_name: {{options}}' mapping, "
                                  f"got {entry!r}")
            (stage_name, options), = entry.items()
            stage_cls = STAGES.get(str(stage_name))
            try:
                stages.append(stage_cls(options or {}))
            except ConfigError as exc:
                raise ConfigError(f"{source}: stage {stage_name}: {exc}") from None
        engine = from_dict(EngineSettings, data.get("engine") or {})
        return cls(str(data.get("name") or Path(source).stem), stages, engine, str(data.get("description") or ""))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    def replace_options(self, overrides: dict[str, Any]) -> "Recipe":
        """A copy with ``{"stage.option": value}`` overrides (``option`` alone when exactly one stage has it)."""
        data = self.to_dict()
        for key, value in overrides.items():
            stage_name, dot, option = key.rpartition(".")
            targets = [d for d in data["stages"] if (not dot and option in next(iter(d.values())))
                       or (dot and stage_name in d)]
            if dot and not targets:
                raise ConfigError(f"recipe {self.name} has no stage {stage_name!r}")
            if not dot and option in data["engine"]:
                data["engine"][option] = value
                continue
            if len(targets) != 1:
                where = "no stage" if not targets else f"{len(targets)} stages"
                raise ConfigError(f"recipe {self.name}: {where} of it has option {option!r}; write stage.{option}")
            options = next(iter(targets[0].values()))
            if option not in options:
                raise ConfigError(f"recipe {self.name}: stage {stage_name} has no option {option!r}")
            options[option] = value
        return Recipe.from_dict(data, self.name)

    # ---------------------------------------------------------------- checks
    def check(self) -> None:
        """Refuse an incompatible order in one line naming the conflict."""
        provided: dict[str, str] = {}
        passes: dict[str, str] = {}
        for i, stage in enumerate(self.stages):
            if stage.family == "selection" and i != 0:
                raise ConfigError(f"recipe {self.name}: selection stage {stage.name} must come first")
            provides, requires, before = stage.facts()
            for fact in sorted(requires - set(provided)):
                makers = [n for n in STAGES if fact in STAGES.get(n)().facts()[0]]
                raise ConfigError(f"recipe {self.name}: stage {stage.name} needs {FACTS.get(fact, fact)} first "
                                  f"(put one of {', '.join(makers) or '-'} before it)")
            for fact in sorted(before & set(provided)):
                raise ConfigError(f"recipe {self.name}: stage {stage.name} must run before {provided[fact]} "
                                  f"({FACTS.get(fact, fact)} already)")
            for fact in sorted(provides & EXCLUSIVE & set(provided)):
                raise ConfigError(f"recipe {self.name}: stages {provided[fact]} and {stage.name} both have "
                                  f"{FACTS.get(fact, fact)}; keep one")
            for p in stage.declared_passes():
                if p in passes:
                    raise ConfigError(f"recipe {self.name}: stages {passes[p]} and {stage.name} both run pass {p!r}")
                passes[p] = stage.name
            for fact in provides:
                provided.setdefault(fact, stage.name)

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    # ---------------------------------------------------------------- before wrapping / capture
    def wrap_config(self, quant: QuantConfig) -> QuantConfig:
        """``quant`` with every stage's wrapping knobs (a new object); two stages asking for
        different values of one knob are refused."""
        merged: dict[str, Any] = {}
        owner: dict[str, str] = {}
        rules = list(quant.rules)
        for stage in self.stages:
            for key, value in stage.wrap_overrides(quant).items():
                if key == "rules":
                    rules += [r for r in value if r not in rules]
                    continue
                if key in merged and merged[key] != value:
                    raise ConfigError(f"recipe {self.name}: stages {owner[key]} and {stage.name} ask for "
                                      f"{key}={merged[key]!r} and {value!r}")
                merged[key], owner[key] = value, stage.name
        quant = dataclasses.replace(quant, **merged, rules=rules)
        quant.__post_init__()
        return quant

    def check_calibration(self, steps: int) -> None:
        for stage in self.stages:
            stage.check_calibration(steps)

    def capture_options(self, unet, example_inputs) -> dict:
        options: dict = {}
        for stage in self.stages:
            options.update(stage.capture_options(unet, example_inputs))
        return options

    def select(self, cache):
        """The calibration set of the selection stage, or None (the caller's default)."""
        stage = next((s for s in self.stages if s.family == "selection"), None)
        return None if stage is None else stage.select(cache)

    @property
    def has_selection(self) -> bool:
        return any(s.family == "selection" for s in self.stages)


def load_recipe(source: str | Path) -> Recipe:
    """A recipe from a YAML file, or a preset by name (:func:`preset_names`)."""
    path = Path(source)
    if not path.suffix and (PRESETS_DIR / f"{source}.yaml").is_file():
        path = PRESETS_DIR / f"{source}.yaml"
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {source} (presets: {', '.join(preset_names())})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return Recipe.from_dict(data, str(path))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


#: engine knobs that decide only where unit caches are stored and how often progress is written
#: (left out of resume fingerprints: a run may resume with other values)
STORAGE_KNOBS = ("cache_storage", "cache_memory_mb", "cache_propagation", "checkpoint_every_s")


def fingerprint(qmodel, recipe: Recipe, calib_set=None, **extra) -> str:
    """What a resumable run's saved progress must match: the recipe, the wrap plan, the
    quantization config and a digest of the calibration data (plus ``extra``)."""
    from ..recon.progress import fingerprint_of

    data = None
    if calib_set is not None:
        labels = calib_set.labels
        data = {
            "n": len(calib_set),
            "xs": float(calib_set.xs.double().sum()),
            "xs_abs": float(calib_set.xs.double().abs().sum()),
            "ts": calib_set.ts.tolist(),
            "labels": None if labels is None else (
                labels.fingerprint() if hasattr(labels, "fingerprint") else labels.tolist()),
        }
    recipe_dict = recipe.to_dict()
    # where caches live changes no number: a run may resume with another memory budget or storage
    recipe_dict["engine"] = {k: v for k, v in recipe_dict["engine"].items() if k not in STORAGE_KNOBS}
    return fingerprint_of({"recipe": recipe_dict, "plan": qmodel.plan.to_dict(),
                           "quant": qmodel.quant_config, "data": data, **extra})


def _warn_if_wrapped_otherwise(qmodel, recipe: Recipe) -> None:
    expected = recipe.wrap_config(dataclasses.replace(qmodel.quant_config))
    differ = [f.name for f in dataclasses.fields(QuantConfig)
              if getattr(expected, f.name) != getattr(qmodel.quant_config, f.name)]
    if differ:
        warnings.warn(f"the model was wrapped with other {', '.join(differ)} than recipe {recipe.name} asks for; "
                      "wrap it with recipe.wrap_config(quant_config) to get them", stacklevel=3)


def run_recipe(qmodel, recipe: Recipe, ctx: StageContext | None = None, *, recipe_config: Any = None):
    """Run ``recipe`` on the wrapped model ``qmodel`` in place and return it.

    ``ctx`` carries the calibration set, denoiser call, float model, work dir, device and the
    progress switch (default: nothing, i.e. data-free stages only). ``recipe_config`` is what is
    recorded as the model's recipe configuration (default: the recipe's own dict).
    """
    from ..jsonio import write_json
    from ..recon.cache import CalibrationCalls
    from ..recon.progress import ReconProgress

    ctx = ctx or StageContext()
    ctx.engine = recipe.engine
    _warn_if_wrapped_otherwise(qmodel, recipe)
    for p in qmodel.parameters():  # only what a stage trains gets gradients
        p.requires_grad_(False)
    active = [s for s in recipe.stages if s.family != "selection" and s.active(qmodel)]
    if ctx.calib_set is None:
        for stage in active:
            if stage.needs_calib_set(qmodel):
                raise ConfigError(f"stage {stage.name} of recipe {recipe.name} needs the calibration set itself: "
                                  "pass calib_set=")
    else:
        ctx.data = CalibrationCalls(ctx.calib_set, ctx.call, ctx.device)
    for stage in active:
        stage.prepare(qmodel, ctx)
    ctx.fingerprint = fingerprint(qmodel, recipe, ctx.calib_set)
    passes = [p for s in active for p in s.passes(qmodel)]
    if ctx.work_dir is not None and ctx.calib_set is not None and passes:
        ctx.checkpoints = ReconProgress(ctx.work_dir, passes, ctx.fingerprint,
                                        min_interval_s=recipe.engine.checkpoint_every_s)
        ctx.checkpoints.restore(qmodel)
    for i, stage in enumerate(active):
        if not stage.passes(qmodel) and any(later.resumed(qmodel, ctx) for later in active[i + 1:]):
            continue  # its result is in the restored checkpoint
        stage.run(qmodel, ctx)

    quant = qmodel.quant_config
    for p in qmodel.parameters():
        p.requires_grad_(False)
    qmodel.set_quant_state(weights=quant.quantize_weights, acts=quant.quantize_acts)
    qmodel.recipe = recipe.name
    qmodel.recipe_config = recipe.to_dict() if recipe_config is None else recipe_config
    qmodel.recon_records = [r.to_dict() for r in ctx.records]
    if ctx.work_dir is not None and passes and distributed.dist_info().is_main:
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        write_json(ctx.work_dir / "records.json", qmodel.recon_records, indent=1)
    for stage in active:
        stage.finish(qmodel, ctx)
    qmodel.eval()
    return qmodel


__all__ = ["EXCLUSIVE", "FACTS", "FAMILIES", "PRESETS_DIR", "Recipe", "fingerprint", "load_recipe",
           "preset_names", "run_recipe"]
