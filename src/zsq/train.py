"""The zero-shot quantization loop: any data source × any transfer loss × a recipe.

Per iteration: the source draws a batch; the frozen teacher runs on it; an online source takes its generator
step; then (after warm-up) the Q model takes one step on the detached batch. During the warm-up epochs only the
generator trains and the Q model's activation ranges are calibrated on its images; then they are frozen. The Q
model's BatchNorms stay in eval mode (pretrained statistics) with trainable affine parameters.

A run directory holds config.json (resolved), metrics.jsonl, state.pt (resume), student.pt and result.json.

Under torchrun (zsq.dist) the Q model, and the generator where one trains, are wrapped in DistributedDataParallel:
each rank draws its own batch (seed + rank·stride), gradients are averaged, activation ranges are averaged when
they freeze, logged terms are averaged over ranks, and only the main rank writes files or prints.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .curvature import hessian_trace
from .device import autocast, deterministic, resolve_device
from .dist import RANK_SEED_STRIDE, SINGLE, Dist, session
from .distill import LOSSES, FeatureTap, TransferInputs, create_loss, fgsm_promote
from .errors import UserError
from .evaluate import evaluate, eval_set_for
from .io import save_json, save_torch
from .models import load_model, model_name, save_checkpoint
from .presets import PRESETS, preset_values
from .provenance import code_version
from .rundir import clear_run, open_run
from .quant import (
                    QuantConfig,
                    act_quantizers,
                    calibrate,
                    default_placement,
                    float_tensors,
                    observe_ranges,
                    quantize_model,
)
from .quant.ranges import RANGE_SETTERS, RangeOptions, RangeSetter, create_range_setter, readers, unread_options
from .synth import SOURCES, SourceContext, create_source
from .validate import Health, ProbeOptions, health, probe_set


CURVATURE_BATCHES = 2  # fixed batches each Hessian-trace estimate averages over
SAMPLES_SAVED = 32  # synthetic images kept in each run directory
SELECT = ("final", "health")  # which Q model a run keeps (--select)


@dataclass
class TrainConfig:
    teacher: str = "resnet20_fmnist"  # shipped teacher, architecture (+ checkpoint) or checkpoint path
    checkpoint: str | None = None
    generator: str = "gdfq"  # data source
    method: str = "kd"  # transfer loss
    preset: str = "quick"
    wbits: int = 4
    abits: int = 4
    first_last: str = "same"
    act_momentum: float = 0.9
    act_range: str = "ema-minmax"  # activation range setter (zsq.quant.ranges)
    # The setters' options (zsq.quant.ranges.RangeOptions): None where the chosen setter does not use one, its
    # default where it does and none was given.
    act_percentile: float | None = None  # the percentile setter's batch percentile
    bn_k: float | None = None  # the BN setters' standard deviations above the BN mean
    bn_propagate: str | None = None  # how the BN setters carry statistics across ReLUs and residual sums
    range_lr_scale: float | None = None  # the `learned` ranges' learning rate, × lr_q (same schedule)
    recalibrate_at: int = 0  # epoch at whose start the ranges are set again on the (trained) data source; 0 = off
    ste: str = "identity"
    model_def: str | None = None  # FILE.py:FACTORY building a user's teacher module (--teacher: its weights)
    placement: str | None = None  # activation quantizers (zsq.quant.placement); None: lineage for a registered
    # architecture, deployable for a user's module (resolved when the run starts, recorded in config.json)
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
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # CPU threads (torch.set_num_threads); 0 = the cores this process may use
    precision: str = "fp32"  # or bf16 autocast
    deterministic: bool = False
    dataset: str | None = None  # evaluation data; default: the teacher's recorded dataset
    data_dir: str | None = None
    eval_every: int = 0  # epochs between test evaluations; 0 = only at the end
    eval_limit: int | None = None
    ckpt_every: int = 100  # iterations between resume checkpoints
    log_every: int = 10  # iterations between metrics flushes (one device sync each)
    max_bad_steps: int = 20  # consecutive non-finite steps before the run stops
    promote: float = 0.0  # ε of HAST's FGSM difficulty promotion (0 = off): each batch also trains perturbed
    track_curvature: int = 0  # iterations between Hessian-trace estimates after warm-up (0 = off)
    curvature_samples: int = 16  # Hutchinson vectors per estimate
    health_every: int = 0  # iterations between data-free health checks after warm-up (0 = only at the end)
    select: str = "final"  # the Q model kept: the final one, or the one with the best health score
    probe_images: int = ProbeOptions.probe_images  # the health check's probe set (zsq.validate), made once
    probe_iters: int = ProbeOptions.probe_iters  # per teacher and cached
    out: str = "runs/run"  # resolve_config names it after generator, method, bits, preset and seed
    options: dict[str, Any] = field(default_factory=dict)  # plug-in options of the generator and the method

    def __post_init__(self) -> None:
        self.quant()  # validates the quantizer fields
        SOURCES.get(self.generator)
        LOSSES.get(self.method)
        RANGE_SETTERS.get(self.act_range)
        for name in ("epochs", "iters_per_epoch", "batch_size", "ckpt_every", "log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise UserError(f"warmup-epochs must be in [0, epochs), got {self.warmup_epochs} of {self.epochs}")
        if self.lr_q <= 0 or self.lr_g <= 0:
            raise UserError("learning rates must be > 0")
        if self.threads < 0:
            raise UserError(f"threads must be ≥ 1 (or 0: the cores this process may use), got {self.threads}")
        unused = inapplicable({**dataclasses.asdict(self), **self.options})
        if unused:
            name, where = min(unused.items())
            raise UserError(f"--{name.replace('_', '-')} does not apply to this run: it applies to {where}")
        for f in dataclasses.fields(RangeOptions):  # the setter's own options default to the setter's defaults
            if getattr(self, f.name) is None and f.name in RANGE_SETTERS.get(self.act_range).reads:
                setattr(self, f.name, f.default)
        if self.warmup_epochs == 0 and RANGE_SETTERS.get(self.act_range).needs_images:
            raise UserError(f"--warmup-epochs 0 leaves no images to set activation ranges on: --act-range "
                            f"{self.act_range} needs them; bn-prior and learned set them from the teacher's "
                            f"BatchNorm statistics")
        if self.promote < 0:
            raise UserError(f"promote (FGSM ε) must be ≥ 0, got {self.promote}")
        if self.track_curvature < 0 or self.curvature_samples < 1:
            raise UserError("track-curvature must be ≥ 0 and curvature-samples ≥ 1")
        if self.health_every < 0:
            raise UserError(f"health-every must be ≥ 0, got {self.health_every}")
        if self.select not in SELECT:
            raise UserError(f"unknown --select '{self.select}'; choose one of: {', '.join(SELECT)}")
        self.probe()  # validates the probe size
        self.milestones = sorted(int(m) for m in self.milestones)
        self.g_betas = tuple(self.g_betas)
        self.range_setter()  # an unknown setter or a bad option fails here, before anything runs
        if self.recalibrate_at and not self.warmup_epochs < self.recalibrate_at < self.epochs:
            raise UserError(f"recalibrate-at must be an epoch after the warm-up and before the end "
                            f"({self.warmup_epochs + 1}..{self.epochs - 1}), got {self.recalibrate_at}")

    def probe(self) -> ProbeOptions:
        return ProbeOptions(self.probe_images, self.probe_iters)

    def range_setter(self) -> RangeSetter:
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(RangeOptions)}
        return create_range_setter(self.act_range, RangeOptions(**{k: v for k, v in given.items() if v is not None}))

    def quant(self) -> QuantConfig:
        return QuantConfig(wbits=self.wbits, abits=self.abits, first_last=self.first_last,
                           act_momentum=self.act_momentum, ste=self.ste, placement=self.placement or "lineage")


def resolve_config(preset: str = "quick", generator: str = "gdfq", method: str = "kd", **overrides: Any) -> TrainConfig:
    """TrainConfig defaults → preset for (generator, method) → overrides; None values are ignored. Keys that are
    not TrainConfig fields are plug-in options. An option that the run's choices leave without effect is refused
    when given (TrainConfig says so) and dropped when the preset set it: config.json records what applies."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    own = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in overrides.items() if v is not None}
    merged = {**preset_values(preset, generator, method), **given, "preset": preset, "generator": generator,
              "method": method}
    for name in set(inapplicable(merged)) - set(given):
        merged.pop(name, None)
    if merged.get("akt_reduction") == "sum" and "akt_lambda" in merged and "akt_lambda" not in given:
        raise UserError(f"--akt-reduction sum: the {preset} preset's --akt-lambda {merged['akt_lambda']:g} weighs "
                        f"batch-mean KLs; give --akt-lambda for batch sums (the same weight is "
                        f"{merged['akt_lambda']:g} / batch size), or omit both for the official weight")
    values = {k: v for k, v in merged.items() if k in own}
    values.setdefault("out", f"runs/{generator}-{method}-w{values.get('wbits', 4)}a{values.get('abits', 4)}"
                             f"-{preset}-s{values.get('seed', 0)}")
    options = {**values.pop("options", {}), **{k: v for k, v in merged.items() if k not in own}}
    return TrainConfig(**values, options=options)


def _option_names(registry: Any, name: str) -> set[str]:
    cls = registry.options_class(name)
    return {f.name for f in dataclasses.fields(cls)} if cls else set()


def plugin_fields(generator: str, method: str) -> set[str]:
    """The option names that the data source `generator` and the transfer loss `method` take."""
    return _option_names(SOURCES, generator) | _option_names(LOSSES, method)


def inapplicable(values: dict[str, Any]) -> dict[str, str]:
    """The options in `values` (TrainConfig fields and plug-in options by name; None = not set) that the run's
    choices leave without effect, each with what it applies to: a range option the setter does not read, a plug-in
    option that neither the data source nor the loss takes, or one their own switches turn off (`unused()` of
    the plug-in's options, e.g. --ce-weight under --akt-base kd)."""
    own = {f.name for f in dataclasses.fields(TrainConfig)}
    act_range = values.get("act_range") or TrainConfig.act_range
    out = {name: "--act-range " + " or ".join(readers(name)) for name in unread_options(act_range)
           if values.get(name) is not None}
    plugin = {**{k: v for k, v in values.items() if k not in own and v is not None}, **(values.get("options") or {})}
    generator, method = values.get("generator") or TrainConfig.generator, values.get("method") or TrainConfig.method
    for name in set(plugin) - plugin_fields(generator, method):
        takers = [f"--{flag} {' or '.join(names)}" for flag, registry in (("generator", SOURCES), ("method", LOSSES))
                  if (names := [n for n in registry.names() if name in _option_names(registry, n)])]
        out[name] = " / ".join(takers) or "no data source or method"
    for registry, name in ((SOURCES, generator), (LOSSES, method)):
        cls = registry.options_class(name)
        if cls is not None and hasattr(cls, "unused"):
            opts = cls(**{k: v for k, v in plugin.items() if k in _option_names(registry, name)})
            out.update({k: where for k, where in opts.unused().items() if k in plugin})
    if values.get("warmup_epochs") == 0 and "warmup_batch" in plugin:  # no warm-up: no generator draws it
        out["warmup_batch"] = "--warmup-epochs ≥ 1"
    return out


@dataclass
class Result:
    fp_top1: float
    q_top1: float
    run_dir: Path
    qmodel: nn.Module
    summary: dict[str, Any]
    rank: int = 0  # under torchrun every rank returns the same result; rank 0 is the one that wrote it


def _lr_factor(cfg: TrainConfig, epoch: int) -> float:
    return cfg.lr_decay ** sum(epoch >= m for m in cfg.milestones)


class _Stop:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the iteration and exits."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "_Stop":
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


class Metrics:
    """Per-iteration rows kept as device tensors and written to metrics.jsonl every `log_every` iterations, so
    logging costs one sync per flush rather than one per scalar. The last row of each flush gets the run's wall
    time (`wall_s`, taken after that sync), from which iterations per second follow."""

    def __init__(self, path: Path, keep_below: int, clock: Callable[[], float], d: Dist = SINGLE) -> None:
        self.path, self.clock, self.dist = path, clock, d
        if d.main:
            rows = []
            if path.exists():  # on resume, drop rows from iterations that the checkpoint does not contain
                rows = [r for r in (json.loads(l) for l in path.read_text().splitlines() if l.strip())
                        if r.get("iter", -1) < keep_below]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.pending: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = []

    def add(self, static: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.pending.append((static, {k: v.detach() for k, v in tensors.items()}))

    def flush(self) -> dict[str, float]:
        """Write the pending rows; under torchrun each term is its mean over the ranks (the global batch's value
        for a batch-mean loss), so every rank must flush at the same iterations."""
        if not self.pending:
            return {}
        flat = [v.float().reshape(()) for _, t in self.pending for v in t.values()]
        stacked = torch.stack(flat) if flat else torch.zeros(0)
        self.dist.mean_([stacked])
        values = iter(stacked.tolist())
        rows = [{**static, **{k: next(values) for k in t}} for static, t in self.pending]
        rows[-1]["wall_s"] = round(self.clock(), 3)
        if self.dist.main:
            with open(self.path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        self.pending = []
        return rows[-1]

    def event(self, row: dict[str, Any]) -> None:
        self.flush()
        if self.dist.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def _teacher_and_data(cfg: TrainConfig, teacher: nn.Module | None, device: str):
    """The frozen teacher, the evaluation set and the input geometry the generator must produce."""
    if teacher is None:
        teacher = load_model(cfg.teacher, checkpoint=cfg.checkpoint, model_def=cfg.model_def)
    test_set = eval_set_for(teacher, cfg.dataset, cfg.data_dir)
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, test_set


@dataclass
class Job:
    """Everything one run trains or reads; `state_dict` is what a resume checkpoint holds."""

    cfg: TrainConfig
    device: str
    out: Path
    teacher: nn.Module
    qmodel: nn.Module
    test_set: Any
    source: Any
    loss_fn: Any
    t_tap: FeatureTap
    q_tap: FeatureTap
    q_params: list[torch.Tensor]
    q_opt: torch.optim.Optimizer
    g_opt: torch.optim.Optimizer | None  # of the online source, or of the warm-up generator
    rng: torch.Generator
    warm_source: Any = None  # offline sources: the GDFQ generator whose images calibrate ranges during warm-up
    curv_batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # fixed batches of --track-curvature
    probe: torch.Tensor | None = None  # the health check's probe images (zsq.validate), on the device
    best: dict[str, Any] | None = None  # --select health: score, iteration and Q-model state of the best check
    dist: Dist = field(default_factory=Dist)
    q_train: nn.Module | None = None  # the Q model as the training step calls it (DDP-wrapped under torchrun)
    g_train: nn.Module | None = None  # the source whose generator trains, as the step calls it (likewise)
    step: int = 0
    wall_s: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)  # steps skipped (NaN/Inf) per optimiser, over the run

    def state_dict(self, rngs: list[torch.Tensor] | None = None) -> dict[str, Any]:
        """`rngs`: every rank's sampling state (the models and optimisers are the same on all ranks); by default
        this rank's alone."""
        rngs = rngs or [self.rng.get_state()]
        return {"step": self.step, "qmodel": self.qmodel.state_dict(), "source": self.source.state_dict(),
                "warm_source": self.warm_source.state_dict() if self.warm_source is not None else None,
                "q_opt": self.q_opt.state_dict(), "g_opt": self.g_opt.state_dict() if self.g_opt else None,
                "rng": rngs[0], "rng_ranks": rngs[1:], "wall_s": self.wall_s, "skipped": self.skipped,
                "curv_batches": self.curv_batches, "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.qmodel.load_state_dict(state["qmodel"])
        self.source.load_state_dict(state["source"])
        if self.warm_source is not None:
            self.warm_source.load_state_dict(state["warm_source"])
        self.q_opt.load_state_dict(state["q_opt"])
        if self.g_opt is not None:
            self.g_opt.load_state_dict(state["g_opt"])
        self.rng.set_state([state["rng"], *state.get("rng_ranks", [])][self.dist.rank])
        self.step, self.wall_s, self.skipped = state["step"], state["wall_s"], state["skipped"]
        self.curv_batches = state.get("curv_batches")
        self.best = state.get("best")

    def start_epoch(self, epoch: int) -> None:
        """Enter `epoch`: its learning rates; activation ranges observing during the warm-up epochs, then trained
        or fixed as the range setter says; an offline source's warm-up generator dropped once warm-up ends."""
        cfg = self.cfg
        factor = _lr_factor(cfg, epoch)
        _set_lr(self.q_opt, cfg.lr_q * factor)
        if self.g_opt is not None:
            _set_lr(self.g_opt, cfg.lr_g * factor)
        observe_ranges(self.qmodel, epoch < cfg.warmup_epochs)
        cfg.range_setter().training(self.qmodel, epoch >= cfg.warmup_epochs)
        if epoch >= cfg.warmup_epochs:
            self.end_warmup()

    def iterate(self, warm: bool) -> tuple[dict[str, Any], dict[str, bool]]:
        """One iteration (see `_iteration`): the loss terms, and per optimiser whether its step was skipped."""
        return _iteration(self, warm)

    def close(self) -> None:
        """Remove every hook this run put on the teacher and the Q model (the teacher may be the user's)."""
        self.t_tap.remove()
        self.q_tap.remove()
        self.source.close()
        self.end_warmup()

    def end_warmup(self) -> None:
        """Offline sources discard the warm-up generator: its BN hooks would slow every later teacher forward."""
        if self.warm_source is not None:
            self.warm_source.close()

    def batch_source(self, warm: bool) -> Any:
        return self.warm_source if warm and self.warm_source is not None else self.source

    def draw(self, warm: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch from this rank's stream, through DDP when this source's generator trains."""
        source = self.batch_source(warm)
        size = (self.source.warmup_batch or self.cfg.batch_size) if source is self.warm_source else self.cfg.batch_size
        trained = self.g_train.module if isinstance(self.g_train, DistributedDataParallel) else self.g_train
        return (self.g_train if source is trained else source)(size, self.rng)


def build_job(cfg: TrainConfig, teacher: nn.Module | None = None, device: str = "cpu", quiet: bool = True,
              d: Dist = SINGLE) -> Job:
    """The job of `cfg` on `device`, ready to train: `job.start_epoch(e)` at each epoch's start, `job.iterate(warm)`
    per iteration, `job.close()` at the end. `quantize_run` drives it so, with the run folder, resume, health
    checks and evaluation around it; benchmarks and tests drive it directly. `teacher` (a module) is used as is."""
    torch.manual_seed(cfg.seed)  # the same on every rank: the models start equal (DDP also broadcasts them)
    teacher, test_set = _teacher_and_data(cfg, teacher, device)
    info = test_set.info
    qmodel = quantize_model(teacher, cfg=cfg.quant()).to(device)
    cfg.range_setter().prepare(qmodel)
    if device.startswith("cuda"):  # NHWC feeds the tensor cores; the CPU path keeps the default layout
        teacher.to(memory_format=torch.channels_last)
        qmodel.to(memory_format=torch.channels_last)
    for p in qmodel.parameters():
        p.requires_grad_(True)
    qmodel.eval()  # BN uses the teacher's running statistics throughout; its affine parameters still train
    ctx = SourceContext(teacher, info.num_classes, info.in_channels, info.image_size, device, quiet, d)
    source = create_source(cfg.generator, ctx, cfg.options)
    # hast.md §1b: an offline set is not what the ranges should see first; a GDFQ generator, trained during the
    # warm-up epochs and then discarded, provides the calibration images.
    warm_source = create_source("gdfq", ctx) if not source.online and cfg.warmup_epochs > 0 else None
    if device.startswith("cuda"):
        source.to(memory_format=torch.channels_last)
        if warm_source is not None:
            warm_source.to(memory_format=torch.channels_last)
    loss_fn = create_loss(cfg.method, cfg.options).to(device)
    layers = loss_fn.feature_layers(teacher, torch.zeros(2, info.in_channels, info.image_size, info.image_size,
                                                         device=device))
    q_params = [p for p in qmodel.parameters() if p.requires_grad]
    q_opt = torch.optim.SGD(_q_groups(qmodel, q_params, cfg.range_lr_scale or 1.0), lr=cfg.lr_q, momentum=cfg.momentum,
                            nesterov=True, weight_decay=cfg.weight_decay)
    _set_lr(q_opt, cfg.lr_q)
    trained_source = source if source.online else warm_source
    g_params = list(trained_source.parameters()) if trained_source is not None else []
    g_opt = torch.optim.Adam(g_params, lr=cfg.lr_g, betas=cfg.g_betas) if g_params else None
    q_train, g_train = qmodel, trained_source if g_params else None
    if d.on:  # ranges stay per rank while they observe (no buffer sync per forward) and are averaged when they freeze
        ids = [torch.device(device).index] if device.startswith("cuda") else None
        q_train = DistributedDataParallel(qmodel, device_ids=ids, forward_sync_buffers=False)
        if g_train is not None:
            g_train = DistributedDataParallel(g_train, device_ids=ids)
    rng = torch.Generator().manual_seed(cfg.seed + RANK_SEED_STRIDE * d.rank)
    return Job(cfg, device, Path(cfg.out), teacher, qmodel, test_set, source, loss_fn,
               FeatureTap(teacher, layers, loss_fn.teacher_grad_layers), FeatureTap(qmodel, layers), q_params, q_opt,
               g_opt, rng, warm_source, dist=d, q_train=q_train, g_train=g_train)


def _q_groups(qmodel: nn.Module, q_params: list[nn.Parameter], range_scale: float) -> list[dict[str, Any]]:
    """The Q optimizer's parameter groups: the learned ranges (if any) apart, at their own `lr_scale`."""
    ranges = {id(q.hi_param) for q in act_quantizers(qmodel) if q.hi_param is not None}
    groups = [{"params": [p for p in q_params if id(p) not in ranges], "lr_scale": 1.0}]
    if ranges:
        groups.append({"params": [p for p in q_params if id(p) in ranges], "lr_scale": range_scale})
    return groups


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def run_config(cfg: TrainConfig, d: Dist = SINGLE) -> dict[str, Any]:
    """config.json: the resolved config, and under torchrun the process count with the per-rank (batch_size)
    and the global batch."""
    out = config_dict(cfg)
    if d.on:
        out["distributed"] = {"world_size": d.world, "backend": d.backend, "batch_per_rank": cfg.batch_size,
                              "global_batch": cfg.batch_size * d.world}
    return out


def _open_run(cfg: TrainConfig, resume: bool, restart: bool, d: Dist = SINGLE) -> dict[str, Any] | None:
    return open_run(Path(cfg.out), run_config(cfg, d), resume, restart, d.world,
                    say=print if d.main else (lambda *a: None))


def available_cores() -> int:
    """The cores this process may use: OMP_NUM_THREADS when set, else its CPU affinity mask."""
    try:
        omp = int(os.environ.get("OMP_NUM_THREADS", "0"))
    except ValueError:
        omp = 0
    return omp if omp > 0 else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _warn_if_busy(cores: int) -> None:
    """Other work on the cores makes every thread of this run wait (three jobs on two cores ran 10-40× slower)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    machine = os.cpu_count() or 1
    if load > machine:
        print(f"warning: this machine's load ({load:.1f}) already exceeds its {machine} cores: the run's {cores} "
              f"thread(s) will wait for them (run fewer jobs at once, or lower --threads)", file=sys.stderr)


def _header(job: Job) -> str:
    cfg = job.cfg
    return (f"zsq quantize: {model_name(job.teacher)} W{cfg.wbits}A{cfg.abits} ({cfg.placement}), source "
            f"{cfg.generator}, loss "
            f"{cfg.method}, preset {cfg.preset}: {cfg.epochs * cfg.iters_per_epoch} iterations "
            f"({cfg.warmup_epochs * cfg.iters_per_epoch} warm-up) on {job.device}, {cfg.threads} thread(s) "
            f"→ {job.out}")


def quantize_run(cfg: TrainConfig, teacher: nn.Module | None = None, resume: bool = False,
                 quiet: bool = False, restart: bool = False) -> Result:
    """Run (or resume) one zero-shot quantization job and write its run directory. Under torchrun every rank calls
    this alike (see zsq.dist). A `teacher` module is copied: the user's module keeps its mode, gradients,
    device and hooks."""
    if cfg.deterministic:
        deterministic()
    if teacher is None and cfg.model_def:  # built now: its placement default depends on the module
        teacher = load_model(cfg.teacher, checkpoint=cfg.checkpoint, model_def=cfg.model_def)
    cfg = dataclasses.replace(cfg, threads=cfg.threads or available_cores(),
                              placement=cfg.placement or default_placement(teacher))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with session(resolve_device(cfg.device)) as (d, device):
            quiet = quiet or not d.main
            state = d.from_main(lambda: _open_run(cfg, resume, restart, d))
            job = build_job(cfg, copy.deepcopy(teacher) if teacher is not None else None, device, quiet, d)
            try:
                if d.main:
                    print(_header(job), flush=True)
                    _warn_if_busy(cfg.threads)
                info = job.test_set.info
                ctx = SourceContext(job.teacher, info.num_classes, info.in_channels, info.image_size, device, quiet,
                                    d)
                job.probe = probe_set(ctx, cfg.probe()).to(device)
                if state is not None:
                    job.load_state_dict(state)
                    if not quiet:
                        print(f"resuming {job.out} at iteration {job.step}")
                else:
                    if d.main:
                        clear_run(job.out)
                        save_json(run_config(cfg, d), job.out / "config.json")
                    if cfg.warmup_epochs == 0:
                        _set_ranges_without_images(job)
                _loop(job, quiet)
                return _finish(job)
            finally:
                job.close()
    finally:
        torch.set_num_threads(threads_before)


def _set_ranges_without_images(job: Job) -> None:
    """--warmup-epochs 0: the range setter sets every activation range from the teacher alone (the BN prior), or
    the run is refused by name before it trains."""
    _freeze_ranges(job)
    quants = act_quantizers(job.qmodel)
    unset = [q for q in quants if not q.calibrated]
    if unset:
        raise UserError(f"--warmup-epochs 0: --act-range {job.cfg.act_range} derives {len(quants) - len(unset)} of "
                        f"the {len(quants)} activation ranges of this model from its BatchNorm statistics; the "
                        f"others need warm-up images (--warmup-epochs ≥ 1)")


def _loop(job: Job, quiet: bool) -> None:
    cfg, state_path = job.cfg, job.out / "state.pt"
    total = cfg.epochs * cfg.iters_per_epoch
    t0, wall_before, first = time.time(), job.wall_s, job.step
    bad_run = {name: 0 for name in BAD_STEP_HINT}
    metrics = Metrics(job.out / "metrics.jsonl", keep_below=job.step, clock=lambda: wall_before + time.time() - t0,
                      d=job.dist)

    def checkpoint() -> None:
        metrics.flush()
        bad = _nonfinite_state(job)
        if bad:
            raise UserError(f"{bad} holds NaN/Inf at iteration {job.step}: not checkpointed (the last good checkpoint "
                            f"is {state_path})")
        job.wall_s = wall_before + time.time() - t0
        rngs = job.dist.gather(job.rng.get_state())
        if job.dist.main:
            save_torch(job.state_dict(rngs), state_path)

    bar = tqdm(range(job.step, total), total=total, initial=job.step, disable=quiet, desc="quantize",
               dynamic_ncols=True)
    with _Stop() as stop:
        for step in bar:
            epoch, it = divmod(step, cfg.iters_per_epoch)
            warm = epoch < cfg.warmup_epochs
            if it == 0 or step == first:
                job.start_epoch(epoch)
            if cfg.recalibrate_at and it == 0 and epoch == cfg.recalibrate_at:
                _recalibrate(job)
                metrics.event({"iter": step, "epoch": epoch, "recalibrated": True})
            terms, skipped = job.iterate(warm)
            trained = step - cfg.warmup_epochs * cfg.iters_per_epoch
            if cfg.track_curvature and not warm and trained % cfg.track_curvature == 0:
                terms.update(_curvature(job))
            for name, was_skipped in skipped.items():
                bad_run[name] = bad_run[name] + 1 if was_skipped else 0
                job.skipped[name] = job.skipped.get(name, 0) + int(was_skipped)
                if bad_run[name] >= cfg.max_bad_steps:
                    metrics.flush()
                    flag = BAD_STEP_HINT[name]
                    raise UserError(f"the {name} loss or gradient was NaN/Inf for {bad_run[name]} iterations in a "
                                    f"row (iteration {step}): lower --{flag.replace('_', '-')} (now "
                                    f"{getattr(cfg, flag)}); the last good checkpoint is {state_path}")
            metrics.add({"iter": step, "epoch": epoch, "lr_q": job.q_opt.param_groups[0]["lr"], "warmup": warm},
                        terms)
            job.step = step + 1
            if job.step % cfg.log_every == 0:
                bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.flush().items() if k in ("loss_q", "loss_g")})
            end_of_epoch = job.step % cfg.iters_per_epoch == 0
            if end_of_epoch and epoch + 1 == cfg.warmup_epochs:
                observe_ranges(job.qmodel, False)
                _freeze_ranges(job)
            if cfg.health_every and not warm and (trained + 1) % cfg.health_every == 0 and job.step < total:
                h = _check_health(job)
                metrics.event({"iter": step, "epoch": epoch, **_health_row(h)})
                if h.flagged and not quiet:
                    tqdm.write(f"warning: iteration {job.step}: {h.line()}")
            if cfg.eval_every and end_of_epoch and (epoch + 1) % cfg.eval_every == 0 and job.step < total:
                row: dict[str, Any] = {"iter": step, "epoch": epoch}
                if job.dist.main:
                    row["eval_q_top1"] = evaluate(job.qmodel, job.test_set, device=job.device,
                                                  limit=cfg.eval_limit)["top1"]
                metrics.event(row)
            stopping = job.dist.any(stop.signum is not None)  # a signal reaches the ranks at different steps
            if job.step % cfg.ckpt_every == 0 or end_of_epoch or stopping:
                checkpoint()
            if stopping:
                bar.close()
                raise UserError(f"stopped by signal {stop.signum or 'on another rank'} at iteration {job.step}; "
                                f"continue with --resume")
    bar.close()
    metrics.flush()
    job.wall_s = wall_before + time.time() - t0


RECALIBRATION_BATCHES = 20  # the EMA (momentum 0.9) forgets its start within about this many batches
BAD_STEP_HINT = {"generator": "lr_g", "Q model": "lr_q"}  # each guarded optimiser step, and the LR to lower


def _nonfinite_state(job: Job) -> str | None:
    """What of the run's state holds a NaN/Inf (the Q model, the data source, the warm-up generator), if any:
    such a state is never checkpointed."""
    for name, part in (("the Q model", job.qmodel), ("the data source", job.source),
                       ("the warm-up generator", job.warm_source)):
        floats = [t for t in part.state_dict().values() if t.is_floating_point()] if part is not None else []
        if floats and not bool(torch.stack([t.isfinite().all() for t in floats]).all()):
            return name
    return None


def _freeze_ranges(job: Job) -> None:
    """The observed ranges, averaged over the ranks (each saw its own batches), handed to the range setter."""
    job.dist.mean_([t for q in act_quantizers(job.qmodel) for t in (q.ema_min, q.ema_max, q.lo, q.hi)])
    job.cfg.range_setter().finish(job.qmodel)


def _recalibrate(job: Job) -> None:
    """Set the activation ranges again, now on the images of the data source it trains with (for a generator:
    as trained so far, not as it was during the warm-up), through the same range setter."""
    cfg, setter = job.cfg, job.cfg.range_setter()
    with torch.no_grad(), autocast(job.device, cfg.precision):
        batches = [job.batch_source(False).sample(cfg.batch_size, job.rng)[0] for _ in range(RECALIBRATION_BATCHES)]
    setter.training(job.qmodel, False)
    calibrate(job.qmodel, batches)
    _freeze_ranges(job)
    setter.training(job.qmodel, True)


def _check_health(job: Job) -> Health:
    """The health of the Q model now; with --select health, keeps a copy of the best one so far (the later one
    on a tie: it has trained longer). Every rank computes it (same models, same probe), so all keep the same
    model without a collective."""
    h = health(job.teacher, job.qmodel, job.probe, job.device)
    job.t_tap.take()  # the probe forwards filled the feature taps; the next step must not see them
    job.q_tap.take()
    if job.cfg.select == "health" and (job.best is None or h.score >= job.best["score"]):
        job.best = {"score": h.score, "iter": job.step - 1,  # numbered as in metrics.jsonl
                    "qmodel": {k: v.detach().clone() for k, v in job.qmodel.state_dict().items()}}
    return h


def _health_row(h: Health) -> dict[str, Any]:
    return {"health": h.score, **{f"health_{k}": getattr(h, k) for k in ("kl", "agreement", "bn_drift")}}


def _finish(job: Job) -> Result:
    """The final health check; with --select health the best-scoring Q model (a periodic check's or the final
    one) is the one kept, evaluated and saved."""
    observe_ranges(job.qmodel, False)
    h = _check_health(job)
    selected, final_top1 = job.step - 1, None
    if job.best is not None and job.best["iter"] != selected:
        final_top1 = job.dist.from_main(lambda: evaluate(job.qmodel, job.test_set, device=job.device,
                                                         limit=job.cfg.eval_limit)["top1"])
        job.qmodel.load_state_dict(job.best["qmodel"])
        h, selected = health(job.teacher, job.qmodel, job.probe, job.device), job.best["iter"]
    summary = job.dist.from_main(lambda: _write_results(job, h, selected, final_top1))
    return Result(summary["fp_top1"], summary["q_top1"], job.out, job.qmodel, summary, job.dist.rank)


def _write_results(job: Job, h: Health, selected: int, final_top1: float | None) -> dict[str, Any]:
    """Evaluate the teacher and the Q model, write student.pt, samples.pt and result.json; the summary.
    `final_top1`: the last iteration's accuracy, when --select kept another Q model (for comparison only)."""
    cfg, out = job.cfg, job.out
    fp = evaluate(job.teacher, job.test_set, device=job.device, limit=cfg.eval_limit)
    q = evaluate(job.qmodel, job.test_set, device=job.device, limit=cfg.eval_limit)
    save_checkpoint(job.qmodel.cpu(), out / "student.pt", job.test_set.info, {"top1": q["top1"], "top5": q["top5"]},
                    quant=asdict(cfg.quant()))
    job.qmodel.to(job.device)
    job.qmodel.zsq_dataset = job.test_set.info  # zsq.export(result.qmodel, ...) needs no dataset= then
    if cfg.teacher == "module":  # a module passed to zsq.quantize: `zsq health RUN` finds its weights here
        save_checkpoint(job.teacher.cpu(), out / "teacher.pt", job.test_set.info, {"top1": fp["top1"]})
        job.teacher.to(job.device)
    summary = {"fp_top1": fp["top1"], "q_top1": q["top1"], "q_top5": q["top5"], "eval_images": q["n"],
               "wbits": cfg.wbits, "abits": cfg.abits, "generator": cfg.generator, "method": cfg.method,
               "preset": cfg.preset, "iterations": job.step, "wall_s": job.wall_s, "seed": cfg.seed,
               "device": job.device, "torch": str(torch.__version__), "skipped_steps": job.skipped.get("Q model", 0),
               "skipped_generator_steps": job.skipped.get("generator", 0),
               "dataset": job.test_set.info.name, "model": model_name(job.teacher), "code": code_version(),
               **job.source.describe(), **({"world_size": job.dist.world} if job.dist.on else {}),
               "act_ranges": [[a.lo.item(), a.hi.item()] for a in act_quantizers(job.qmodel)],
               "placement": cfg.placement, "float_tensors": float_tensors(job.qmodel),
               "select": cfg.select, "selected_iter": selected, "health": h.summary(),
               **({"final_q_top1": final_top1} if final_top1 is not None else {})}
    with torch.no_grad(), autocast(job.device, cfg.precision):  # what the data source made, for zsq analyze
        x, y = job.source.sample(SAMPLES_SAVED, torch.Generator().manual_seed(cfg.seed))
    save_torch({"images": x.float().cpu(), "labels": y.cpu(), "source": cfg.generator}, out / "samples.pt")
    save_json(summary, out / "result.json")
    (out / "state.pt").unlink(missing_ok=True)
    return summary


def _iteration(job: Job, warm: bool) -> tuple[dict[str, Any], dict[str, bool]]:
    """One generator step (online sources) and, after warm-up, one Q-model step. Returns the loss terms and, for
    each optimiser that was due to step, whether its step was skipped because its loss or gradient was NaN/Inf
    (a skipped step leaves the parameters and the optimiser state as they were)."""
    cfg, source, qmodel, loss_fn = job.cfg, job.batch_source(warm), job.qmodel, job.loss_fn
    terms: dict[str, Any] = {}
    skipped: dict[str, bool] = {}
    with autocast(job.device, cfg.precision):
        x, y = job.draw(warm)
        t_logits = None
        if source.online and job.g_opt is not None:
            t_logits = job.teacher(x)
            g_loss, g_terms = source.generator_loss(x, y, t_logits, qmodel)
            skipped["generator"], _ = _step(job, job.g_opt, g_loss, list(source.parameters()))
            terms.update(g_terms, loss_g=g_loss)
        x = x.detach()
        if warm:  # the Q model only calibrates its activation ranges
            with torch.no_grad():
                qmodel(x)
            job.t_tap.take()
            job.q_tap.take()
            return terms, skipped
        seen = loss_fn.prepare(x)
        generator_pass = t_logits if seen is x else None  # the teacher already saw this very batch
        x = seen.requires_grad_(True) if cfg.promote > 0 else seen
        inp = _transfer_inputs(job, x, y, generator_pass, synced=True)
        loss, q_terms = loss_fn(inp)
        if cfg.promote > 0:
            adv = _promoted_loss(job, inp, loss)
            q_terms = {**q_terms, "loss_clean": loss, "loss_promoted": adv}
            loss = loss + adv
        extra = loss_fn.clean_only(inp)
        if extra is not None:
            loss, q_terms = loss + extra[0], {**q_terms, **extra[1]}
    skipped["Q model"], grad_norm = _step(job, job.q_opt, loss, job.q_params)
    terms.update(q_terms, loss_q=loss.detach(), grad_norm=grad_norm)
    return terms, skipped


def _step(job: Job, opt: torch.optim.Optimizer, loss: torch.Tensor,
          params: list[torch.Tensor]) -> tuple[bool, torch.Tensor]:
    """Backward into `params` alone (not into the batch, which requires grad under --promote), then the
    optimiser's step unless the loss or the gradient is NaN/Inf on any rank (one sync: the guard must know now).
    Returns whether the step was skipped, and the gradient norm."""
    opt.zero_grad(set_to_none=True)
    loss.backward(inputs=params)
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    skipped = job.dist.any(not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)))
    if not skipped:
        opt.step()
    return skipped, grad_norm


def _transfer_inputs(job: Job, x: torch.Tensor, y: torch.Tensor, t_logits: torch.Tensor | None = None,
                     synced: bool = False) -> TransferInputs:
    """Both models on a prepared Q-step batch. `t_logits`: the generator step's teacher pass on the same batch
    (its maps wait in t_tap), reused unless the loss differentiates the teacher. A new teacher pass runs without
    grad, or, for Grad-CAM, with the maps in `teacher_grad_layers` made leaves; never back into x. `synced`: the
    Q model runs through DDP, whose backward averages the gradients (the training step's one forward; any other
    pass, e.g. FGSM promotion, uses the plain module: its gradient joins the same backward, which DDP then
    averages once)."""
    grad_layers = job.loss_fn.teacher_grad_layers
    if t_logits is None or grad_layers:
        job.t_tap.take()
        with torch.set_grad_enabled(bool(grad_layers)), job.t_tap.cutting():
            t_logits = job.teacher(x.detach())
    t_logits = t_logits if grad_layers else t_logits.detach()
    t_feats = job.t_tap.take(detach=True)
    qmodel = job.q_train if synced else job.qmodel
    return TransferInputs(t_logits, qmodel(x), y, x, t_feats, job.q_tap.take())


def _clean_loss(job: Job, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The transfer loss of the Q model on a prepared batch, without promotion: what the curvature is taken of."""
    with autocast(job.device, job.cfg.precision):
        inp = _transfer_inputs(job, *batch)
        loss, _ = job.loss_fn(inp)
        extra = job.loss_fn.clean_only(inp)
    return loss if extra is None else loss + extra[0]


def _curvature(job: Job) -> dict[str, torch.Tensor]:
    """Hutchinson's trace of the Hessian of the clean transfer loss on the run's fixed batches, drawn once from
    the data source at the first estimate (and kept in resume checkpoints)."""
    cfg = job.cfg
    if job.curv_batches is None:
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        with torch.no_grad(), autocast(job.device, cfg.precision):
            job.curv_batches = [tuple(t.detach() for t in job.source.sample(cfg.batch_size, gen))
                                for _ in range(CURVATURE_BATCHES)]
    batches = [(job.loss_fn.prepare(x.float()), y) for x, y in job.curv_batches]
    mean, se = hessian_trace(job.qmodel, lambda model, b: _clean_loss(job, b), batches, cfg.curvature_samples,
                             seed=cfg.seed)
    return {"hessian_trace": torch.tensor(mean, device=job.device),  # beside the loss terms, on their device
            "hessian_trace_se": torch.tensor(se, device=job.device)}


def _promoted_loss(job: Job, clean: TransferInputs, clean_loss: torch.Tensor) -> torch.Tensor:
    """HAST's sample-difficulty promotion: the batch moved by ε·sign(∇ₓ loss), i.e. made harder for the Q model,
    and the transfer loss on it. `clean_loss` is the loss without its clean-only terms (SynQ's CAM), whose
    gradient is the direction. The direction follows the Q path only; the HAST code also let it flow through
    the teacher, whose outputs it never detached (hast.md §5.4), a side effect rather than the method."""
    x_adv = fgsm_promote(clean.x, clean_loss, job.cfg.promote)
    with torch.no_grad():
        t_logits = job.teacher(x_adv)
    t_feats = job.t_tap.take(detach=True)
    loss, _ = job.loss_fn(TransferInputs(t_logits, job.qmodel(x_adv), clean.labels, x_adv, t_feats,
                                         job.q_tap.take(), clean=clean))
    return loss


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as config.json holds it (tuples become lists), so that configs compare by value."""
    return json.loads(json.dumps(asdict(cfg)))


def quantize(teacher: str | nn.Module = "resnet20_fmnist", wbits: int = 4, abits: int = 4, generator: str = "gdfq",
             method: str = "kd", preset: str = "quick", resume: bool = False, quiet: bool = False,
             restart: bool = False, **overrides: Any) -> Result:
    """Python entry point: `zsq.quantize(teacher, wbits=4, abits=4, generator="adadfq", method="kd")`.

    `teacher` is a name/path (as for `zsq.load_model`) or any `nn.Module` classifier (then pass `dataset=`).
    """
    module = teacher if isinstance(teacher, nn.Module) else None
    name = "module" if module is not None else str(teacher)
    if module is not None and getattr(module, "zsq_model_def", None):
        overrides.setdefault("model_def", module.zsq_model_def)  # later commands rebuild it from the same code
    cfg = resolve_config(preset, generator, method, teacher=name, wbits=wbits, abits=abits, **overrides)
    return quantize_run(cfg, teacher=module, resume=resume, quiet=quiet, restart=restart)
