"""The QAT recipe: one `TrainConfig` (data source, transfer loss, quantizer, range setter and their options,
optimisation, health checks, run folder), resolved from defaults → preset → what the user gave, with every option
that the run's choices leave without effect refused by name."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..distill import LOSSES, current_option
from ..errors import UserError, deprecated
from ..presets import PRESETS, preset_values
from ..quant import QuantConfig
from ..quant.ranges import RANGE_SETTERS, RangeSetter, create_range_setter
from ..synth import SOURCES
from ..validate import ProbeOptions

SELECT = ("final", "health")  # which Q model a run keeps (--select)


@dataclass
class RangeConfig:
    """How the activation ranges are set; the setter's own options are plug-in options (`TrainConfig.options`)."""

    act_range: str = "ema-minmax"  # activation range setter (zsq.quant.ranges)
    recalibrate_at: int = 0  # epoch at whose start the ranges are set again on the (trained) data source; 0 = off

    def __post_init__(self) -> None:
        RANGE_SETTERS.get(self.act_range)


@dataclass
class OptimConfig:
    """Optimisation and schedule: epochs of iterations, the Q model's SGD, the generator's Adam."""

    epochs: int = 6
    iters_per_epoch: int = 100
    warmup_epochs: int = 1
    batch_size: int = 64
    lr_q: float = 1e-3
    lr_g: float = 1e-3
    momentum: float = 0.9  # SGD Nesterov momentum of the Q model
    weight_decay: float = 1e-4  # on every Q-model parameter, as in the lineage
    milestones: list[int] = field(default_factory=list)  # epochs at which both learning rates are × lr_decay
    lr_decay: float = 0.1
    g_betas: tuple[float, float] = (0.5, 0.999)  # Adam betas of the generator
    promote: float = 0.0  # ε of HAST's FGSM difficulty promotion (0 = off): each batch also trains perturbed
    max_bad_steps: int = 20  # consecutive non-finite steps before the run stops

    def __post_init__(self) -> None:
        for name in ("epochs", "iters_per_epoch", "batch_size", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise UserError(f"warmup-epochs must be in [0, epochs), got {self.warmup_epochs} of {self.epochs}")
        if self.lr_q <= 0 or self.lr_g <= 0:
            raise UserError("learning rates must be > 0")
        if self.promote < 0:
            raise UserError(f"promote (FGSM ε) must be ≥ 0, got {self.promote}")
        self.milestones = sorted(int(m) for m in self.milestones)
        self.g_betas = tuple(self.g_betas)

    def lr_factor(self, epoch: int) -> float:
        return self.lr_decay ** sum(epoch >= m for m in self.milestones)


@dataclass
class ChecksConfig:
    """What the run measures as it goes (none of it changes the training): test evaluation, data-free health
    checks and the Q model kept by them, the loss curvature."""

    eval_every: int = 0  # epochs between test evaluations; 0 = only at the end
    eval_limit: int | None = None
    health_every: int = 0  # iterations between data-free health checks after warm-up (0 = only at the end)
    select: str = "final"  # the Q model kept: the final one, or the one with the best health score
    track_curvature: int = 0  # iterations between Hessian-trace estimates after warm-up (0 = off)
    curvature_samples: int = 16  # Hutchinson vectors per estimate

    def __post_init__(self) -> None:
        if self.track_curvature < 0 or self.curvature_samples < 1:
            raise UserError("track-curvature must be ≥ 0 and curvature-samples ≥ 1")
        if self.health_every < 0:
            raise UserError(f"health-every must be ≥ 0, got {self.health_every}")
        if self.select not in SELECT:
            raise UserError(f"unknown --select '{self.select}'; choose one of: {', '.join(SELECT)}")


@dataclass
class RunConfig:
    """Where and how the run executes: seed, machine, evaluation data, the run folder and its cadence."""

    seed: int = 0
    device: str = "auto"
    threads: int = 0  # CPU threads (torch.set_num_threads); 0 = the cores this process may use
    precision: str = "fp32"  # or bf16 autocast
    deterministic: bool = False
    dataset: str | None = None  # evaluation data; default: the teacher's recorded dataset
    data_dir: str | None = None
    ckpt_every: int = 100  # iterations between resume checkpoints
    log_every: int = 10  # iterations between metrics flushes (one device sync each)
    out: str = "runs/run"  # resolve_config names it after source, loss, bits, preset and seed

    def __post_init__(self) -> None:
        for name in ("ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        if self.threads < 0:
            raise UserError(f"threads must be ≥ 1 (or 0: the cores this process may use), got {self.threads}")


# Where a TrainConfig's concern differs from its dataclass's own default: the placement follows the teacher
# (None: zsq.quant.default_placement, resolved when the run starts and recorded in config.json).
CONCERN_DEFAULTS: dict[str, dict[str, Any]] = {"quant": {"placement": None}}


def _train_quant() -> QuantConfig:
    return QuantConfig(**CONCERN_DEFAULTS["quant"])


@dataclass
class TrainConfig:
    """The recipe, one dataclass per concern. config.json (and `resolve_config`'s keywords, the CLI's flags) is
    the flat union of their recorded fields, whose names are unique across concerns, so that every config.json
    zsq ever wrote reads the same way; `flat()` and `from_flat()` convert."""

    teacher: str = "resnet20_fmnist"  # shipped teacher, architecture (+ checkpoint) or checkpoint path
    checkpoint: str | None = None
    model_def: str | None = None  # FILE.py:FACTORY building a user's teacher module (--teacher: its weights)
    source: str = "gdfq"  # data source (zsq.synth)
    loss: str = "kd"  # transfer loss (zsq.distill)
    preset: str = "quick"
    ranges: RangeConfig = field(default_factory=RangeConfig)
    quant: QuantConfig = field(default_factory=_train_quant)
    optim: OptimConfig = field(default_factory=OptimConfig)
    probe: ProbeOptions = field(default_factory=ProbeOptions)  # the health check's probe set (zsq.validate)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # Plug-in options of the data source, the transfer loss and the range setter; the range setter's are all
    # recorded, at their defaults where none was given.
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        SOURCES.get(self.source)
        self.loss = LOSSES.canonical(self.loss)
        self.options = {k: current_option(k, v) for k, v in self.options.items()}
        unused = inapplicable({**self.flat(), **self.options})
        if unused:
            name, where = min(unused.items())
            raise UserError(f"--{name.replace('_', '-')} does not apply to this run: it applies to {where}")
        act_range, optim = self.ranges.act_range, self.optim
        self.options = with_range_defaults(act_range, self.options)
        if optim.warmup_epochs == 0 and RANGE_SETTERS.get(act_range).needs_images:
            raise UserError(f"--warmup-epochs 0 leaves no images to set activation ranges on: --act-range "
                            f"{act_range} needs them; bn-prior and learned set them from the teacher's "
                            f"BatchNorm statistics")
        self.range_setter()  # an unknown setter or a bad option fails here, before anything runs
        at = self.ranges.recalibrate_at
        if at and not optim.warmup_epochs < at < optim.epochs:
            raise UserError(f"recalibrate-at must be an epoch after the warm-up and before the end "
                            f"({optim.warmup_epochs + 1}..{optim.epochs - 1}), got {at}")

    def range_setter(self) -> RangeSetter:
        return create_range_setter(self.ranges.act_range, self.options)

    def __getattr__(self, name: str) -> Any:
        """A flat field read as before 0.2 composed the config (`cfg.batch_size`), for one release."""
        concern = CONCERN_OF.get(name)
        if concern is None:
            raise AttributeError(f"'TrainConfig' object has no attribute '{name}'")
        deprecated(f"TrainConfig.{name}", f"TrainConfig.{concern}.{name}")
        return getattr(getattr(self, concern), name)

    def flat(self) -> dict[str, Any]:
        """The recorded fields of every concern by name, beside the choices and the plug-in options."""
        out = {name: getattr(self, name) for name in TOP}
        for concern in CONCERNS:
            part = getattr(self, concern)
            out.update({f.name: getattr(part, f.name) for f in recorded_fields(type(part))})
        return {**out, "options": self.options}

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> TrainConfig:
        """A TrainConfig from flat field names (config.json's, resolve_config's); a name no concern has is an
        error (plug-in options go in `options`)."""
        values = dict(values)
        parts = {concern: cls_(**{**CONCERN_DEFAULTS.get(concern, {}),
                                  **{f.name: values.pop(f.name) for f in recorded_fields(cls_) if f.name in values}})
                 for concern, cls_ in CONCERN_TYPES.items()}
        unknown = set(values) - set(TOP) - {"options"}
        if unknown:
            raise TypeError(f"unknown TrainConfig fields: {sorted(unknown)}")
        return cls(**values, **parts)


def recorded_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a concern's dataclass that are flags and config.json keys (`metadata={"recorded": False}`
    marks one set only through the Python API, e.g. QuantConfig's per-layer bits)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("recorded", True)]


CONCERN_TYPES: dict[str, type] = {"ranges": RangeConfig, "quant": QuantConfig, "optim": OptimConfig,
                                  "probe": ProbeOptions, "checks": ChecksConfig, "run": RunConfig}
CONCERNS = tuple(CONCERN_TYPES)
CONCERN_OF = {f.name: concern for concern, cls in CONCERN_TYPES.items() for f in recorded_fields(cls)}
TOP = ("teacher", "checkpoint", "model_def", "source", "loss", "preset")


def flat_fields() -> list[dataclasses.Field]:
    """Every recorded field of TrainConfig, flat: the choices, then each concern's."""
    top = [f for f in dataclasses.fields(TrainConfig) if f.name in TOP]
    return top + [f for cls in CONCERN_TYPES.values() for f in recorded_fields(cls)]


FLAT_NAMES = frozenset(f.name for f in flat_fields())


def flat_defaults() -> dict[str, Any]:
    """Every flat field's default in a TrainConfig, in config.json's order (each concern built once)."""
    parts = {concern: cls(**CONCERN_DEFAULTS.get(concern, {})) for concern, cls in CONCERN_TYPES.items()}
    return {f.name: getattr(parts[CONCERN_OF[f.name]], f.name) if f.name in CONCERN_OF else f.default
            for f in flat_fields()}


def flat_default(name: str) -> Any:
    """A flat field's default in a TrainConfig (a concern's, e.g. the quantizer's placement None)."""
    if name in TOP:
        return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == name)
    concern = CONCERN_OF[name]
    return getattr(CONCERN_TYPES[concern](**CONCERN_DEFAULTS.get(concern, {})), name)


def resolve_config(preset: str = "quick", source: str = "gdfq", loss: str = "kd", **overrides: Any) -> TrainConfig:
    """TrainConfig defaults → preset for (source, loss) → overrides; None values are ignored. Keys that are
    not TrainConfig fields are plug-in options. An option that the run's choices leave without effect is refused
    when given (TrainConfig says so) and dropped when the preset set it: config.json records what applies."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    own = FLAT_NAMES | {"options"}
    given = {k: v for k, v in overrides.items() if v is not None}
    loss = LOSSES.canonical(loss)
    merged = {**preset_values(preset, source, loss), **given, "preset": preset, "source": source, "loss": loss}
    for name in set(inapplicable(merged)) - set(given):
        merged.pop(name, None)
    if merged.get("akt_reduction") == "sum" and "akt_lambda" in merged and "akt_lambda" not in given:
        raise UserError(f"--akt-reduction sum: the {preset} preset's --akt-lambda {merged['akt_lambda']:g} weighs "
                        f"batch-mean KLs; give --akt-lambda for batch sums (the same weight is "
                        f"{merged['akt_lambda']:g} / batch size), or omit both for the official weight")
    values = {k: v for k, v in merged.items() if k in own}
    values.setdefault("out", f"runs/{source}-{loss}-w{values.get('wbits', 4)}a{values.get('abits', 4)}"
                             f"-{preset}-s{values.get('seed', 0)}")
    options = {**values.pop("options", {}), **{k: v for k, v in merged.items() if k not in own}}
    return TrainConfig.from_flat({**values, "options": options})


def _option_names(registry: Any, name: str) -> set[str]:
    cls = registry.options_class(name)
    return {f.name for f in dataclasses.fields(cls)} if cls else set()


# The config fields that choose a plug-in, with the registry each is chosen from.
PLUGINS = {"source": SOURCES, "loss": LOSSES, "act_range": RANGE_SETTERS}


def plugin_fields(source: str, loss: str, act_range: str) -> set[str]:
    """The option names that the data source, the transfer loss and the range setter take."""
    return set().union(*(_option_names(PLUGINS[k], v) for k, v in
                         (("source", source), ("loss", loss), ("act_range", act_range))))


def inapplicable(values: dict[str, Any]) -> dict[str, str]:
    """The options in `values` (TrainConfig fields and plug-in options by name; None = not set) that the run's
    choices leave without effect, each with what it applies to: a plug-in option that neither the data source,
    the loss nor the range setter takes, or one their own switches turn off (`unused()` of the plug-in's options,
    e.g. --ce-weight under --akt-base kd)."""
    own = FLAT_NAMES | {"options"}
    plugin = {**{k: v for k, v in values.items() if k not in own and v is not None}, **(values.get("options") or {})}
    chosen = {k: values.get(k) or flat_default(k) for k in PLUGINS}
    out = {}
    for name in set(plugin) - plugin_fields(**chosen):
        takers = [f"--{key.replace('_', '-')} {' or '.join(names)}" for key, registry in PLUGINS.items()
                  if (names := [n for n in registry.names() if name in _option_names(registry, n)])]
        out[name] = " / ".join(takers) or "no data source, loss or range setter"
    for registry, name in ((PLUGINS[k], chosen[k]) for k in PLUGINS):
        cls = registry.options_class(name)
        if cls is not None and hasattr(cls, "unused"):
            opts = cls(**{k: v for k, v in plugin.items() if k in _option_names(registry, name)})
            out.update({k: where for k, where in opts.unused().items() if k in plugin})
    if values.get("warmup_epochs") == 0 and "warmup_batch" in plugin:  # no warm-up: no generator draws it
        out["warmup_batch"] = "--warmup-epochs ≥ 1"
    return out


def with_range_defaults(act_range: str, options: dict[str, Any]) -> dict[str, Any]:
    """`options` with every option of range setter `act_range` recorded, at its default where none was given."""
    cls = RANGE_SETTERS.options_class(act_range)
    return {**asdict(cls()), **options} if cls is not None else options


# Range-setter options that were TrainConfig fields (top level in config.json) before each setter registered its
# own options, as data sources and losses do.
FORMER_RANGE_FIELDS = ("act_percentile", "bn_k", "bn_propagate", "range_lr_scale")
FIRST_PROBE = {"probe_images": 512, "probe_iters": 200}  # the health probe before its size was an option
PTQ = "ptq"  # config.json's `method` of a `zsq ptq` run (zsq.posttrain), which has a source and no loss


def current_config(config: dict[str, Any]) -> dict[str, Any]:
    """A config.json as it is written now, so that an older run still compares, groups and resumes with new
    ones: `generator` and `method` (a QAT loss) are `source` and `loss`, a loss's or AKT base's former name is
    its name now; the health probe is the first one where none is recorded; range options move into `options`,
    those its setter does not take dropped (unset, or recorded by a zsq that did not refuse them yet)."""
    config = _current_names(config)
    if "probe_images" not in config:  # made before the probe was an option: checked on the first one
        config.update(FIRST_PROBE)
    if not any(k in config for k in FORMER_RANGE_FIELDS):
        return config
    takes = _option_names(RANGE_SETTERS, config.get("act_range") or RangeConfig.act_range)
    moved = {k: config[k] for k in FORMER_RANGE_FIELDS if config.get(k) is not None and k in takes}
    rest = {k: v for k, v in config.items() if k not in FORMER_RANGE_FIELDS}
    return {**rest, "options": {**moved, **config.get("options", {})}}


def _current_names(config: dict[str, Any]) -> dict[str, Any]:
    config = dict(config)
    if "generator" in config:
        config["source"] = config.pop("generator")
    if config.get("method", PTQ) != PTQ:
        config["loss"] = config.pop("method")
    if "loss" in config and config["loss"] in LOSSES:
        config["loss"] = LOSSES.canonical(config["loss"], quiet=True)
    if config.get("options"):
        config["options"] = {k: current_option(k, v, quiet=True) for k, v in config["options"].items()}
    return config


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as config.json holds it, flat (tuples become lists), so that configs compare by value."""
    return json.loads(json.dumps(cfg.flat()))
