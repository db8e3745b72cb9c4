"""One QAT job: everything a run trains (teacher, Q model, data source, transfer loss, feature taps,
optimisers) and what one iteration does with it. `build_job(cfg)` makes it; the loop (`zsq.train.loop`) and the
benchmarks drive it by `start_epoch` and `iterate`.

Per iteration: the source draws a batch; the frozen teacher runs on it; an online source takes its generator
step; then (after warm-up) the Q model takes one step on the detached batch. During the warm-up epochs only the
generator trains and the Q model's activation ranges are calibrated on its images; then they are frozen. The Q
model's BatchNorms stay in eval mode (pretrained statistics) with trainable affine parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..curvature import hessian_trace
from ..device import autocast
from ..dist import RANK_SEED_STRIDE, SINGLE, Dist
from ..distill import FeatureTap, TransferInputs, create_loss, fgsm_promote
from ..errors import UserError
from ..evaluate import eval_set_for
from ..models import load_model
from ..quant import act_quantizers, calibrate, observe_ranges, output_module, quantize_model
from ..synth import SourceContext, create_source
from ..validate import Health, health
from .config import TrainConfig

CURVATURE_BATCHES = 2  # fixed batches each Hessian-trace estimate averages over


def _teacher_and_data(cfg: TrainConfig, teacher: nn.Module | None, device: str):
    """The frozen teacher, the evaluation set and the input geometry the generator must produce."""
    if teacher is None:
        teacher = load_model(cfg.teacher, checkpoint=cfg.checkpoint, model_def=cfg.model_def)
    test_set = eval_set_for(teacher, cfg.run.dataset, cfg.run.data_dir)
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
    cpu_s: float | None = 0.0  # None: resumed from a checkpoint written before zsq counted CPU time
    skipped: dict[str, int] = field(default_factory=dict)  # steps skipped (NaN/Inf) per optimiser, over the run

    def state_dict(self, rngs: list[torch.Tensor] | None = None) -> dict[str, Any]:
        """`rngs`: every rank's sampling state (the models and optimisers are the same on all ranks); by default
        this rank's alone."""
        rngs = rngs or [self.rng.get_state()]
        return {"step": self.step, "qmodel": self.qmodel.state_dict(), "source": self.source.state_dict(),
                "warm_source": self.warm_source.state_dict() if self.warm_source is not None else None,
                "q_opt": self.q_opt.state_dict(), "g_opt": self.g_opt.state_dict() if self.g_opt else None,
                "rng": rngs[0], "rng_ranks": rngs[1:], "wall_s": self.wall_s, "cpu_s": self.cpu_s,
                "skipped": self.skipped, "curv_batches": self.curv_batches, "best": self.best}

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
        self.cpu_s = state.get("cpu_s")
        self.curv_batches = state.get("curv_batches")
        self.best = state.get("best")

    def start_epoch(self, epoch: int) -> None:
        """Enter `epoch`: its learning rates; activation ranges observing during the warm-up epochs, then trained
        or fixed as the range setter says; an offline source's warm-up generator dropped once warm-up ends."""
        cfg = self.cfg
        factor = cfg.optim.lr_factor(epoch)
        _set_lr(self.q_opt, cfg.optim.lr_q * factor)
        if self.g_opt is not None:
            _set_lr(self.g_opt, cfg.optim.lr_g * factor)
        observe_ranges(self.qmodel, epoch < cfg.optim.warmup_epochs)
        cfg.range_setter().training(self.qmodel, epoch >= cfg.optim.warmup_epochs)
        if epoch >= cfg.optim.warmup_epochs:
            self.end_warmup()

    def iterate(self, warm: bool) -> tuple[dict[str, Any], dict[str, bool]]:
        """One iteration (see `_iteration`): the loss terms, and per optimiser whether its step was skipped."""
        return _iteration(self, warm)

    def set_ranges(self) -> None:
        """The warm-up is over: stop observing, and let the range setter set the activation ranges from what was
        observed (averaged over the ranks)."""
        observe_ranges(self.qmodel, False)
        freeze_ranges(self)

    def transfer_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The clean transfer loss of the Q model on a batch, as a Q step sees it (prepared by the loss, e.g.
        SynQ's low-pass filter; no promotion, no step): on a fixed batch, whether training lowers it."""
        return _clean_loss(self, (self.loss_fn.prepare(x), y))

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
        size = self.cfg.optim.batch_size
        if source is self.warm_source:
            size = self.source.warmup_batch or size
        trained = self.g_train.module if isinstance(self.g_train, DistributedDataParallel) else self.g_train
        return (self.g_train if source is trained else source)(size, self.rng)


def build_job(cfg: TrainConfig, teacher: nn.Module | None = None, device: str = "cpu", quiet: bool = True,
              d: Dist = SINGLE) -> Job:
    """The job of `cfg` on `device`, ready to train: `job.start_epoch(e)` at each epoch's start, `job.iterate(warm)`
    per iteration, `job.close()` at the end. `quantize_run` drives it so, with the run folder, resume, health
    checks and evaluation around it; benchmarks and tests drive it directly. `teacher` (a module) is used as is."""
    torch.manual_seed(cfg.run.seed)  # the same on every rank: the models start equal (DDP also broadcasts them)
    teacher, test_set = _teacher_and_data(cfg, teacher, device)
    info = test_set.info
    qmodel = quantize_model(teacher, cfg=cfg.quant).to(device)
    cfg.range_setter().prepare(qmodel)
    if device.startswith("cuda"):  # NHWC feeds the tensor cores; the CPU path keeps the default layout
        teacher.to(memory_format=torch.channels_last)
        qmodel.to(memory_format=torch.channels_last)
    for p in qmodel.parameters():
        p.requires_grad_(True)
    qmodel.eval()  # BN uses the teacher's running statistics throughout; its affine parameters still train
    loss_fn = create_loss(cfg.loss, cfg.options).to(device)
    layers = loss_fn.feature_layers(teacher, torch.zeros(2, info.in_channels, info.image_size, info.image_size,
                                                         device=device))
    _check_taps(qmodel, layers, cfg.loss)  # before an offline set is built
    ctx = SourceContext(teacher, info.num_classes, info.in_channels, info.image_size, device, quiet, d)
    source = create_source(cfg.source, ctx, cfg.options)
    # hast.md §1b: an offline set is not what the ranges should see first; a GDFQ generator, trained during the
    # warm-up epochs and then discarded, provides the calibration images.
    warm_source = create_source("gdfq", ctx) if not source.online and cfg.optim.warmup_epochs > 0 else None
    if device.startswith("cuda"):
        source.to(memory_format=torch.channels_last)
        if warm_source is not None:
            warm_source.to(memory_format=torch.channels_last)
    q_params = [p for p in qmodel.parameters() if p.requires_grad]
    q_opt = torch.optim.SGD(_q_groups(qmodel, q_params, cfg.range_setter().lr_scale), lr=cfg.optim.lr_q,
                            momentum=cfg.optim.momentum, nesterov=True, weight_decay=cfg.optim.weight_decay)
    _set_lr(q_opt, cfg.optim.lr_q)
    trained_source = source if source.online else warm_source
    g_params = list(trained_source.parameters()) if trained_source is not None else []
    g_opt = torch.optim.Adam(g_params, lr=cfg.optim.lr_g, betas=cfg.optim.g_betas) if g_params else None
    q_train, g_train = qmodel, trained_source if g_params else None
    if d.on:  # ranges stay per rank while they observe (no buffer sync per forward) and are averaged when they freeze
        ids = [torch.device(device).index] if device.startswith("cuda") else None
        q_train = DistributedDataParallel(qmodel, device_ids=ids, forward_sync_buffers=False)
        if g_train is not None:
            g_train = DistributedDataParallel(g_train, device_ids=ids)
    rng = torch.Generator().manual_seed(cfg.run.seed + RANK_SEED_STRIDE * d.rank)
    return Job(cfg, device, Path(cfg.run.out), teacher, qmodel, test_set, source, loss_fn,
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


RECALIBRATION_BATCHES = 20  # the EMA (momentum 0.9) forgets its start within about this many batches


def nonfinite_state(job: Job) -> str | None:
    """What of the run's state holds a NaN/Inf (the Q model, the data source, the warm-up generator), if any:
    such a state is never checkpointed."""
    for name, part in (("the Q model", job.qmodel), ("the data source", job.source),
                       ("the warm-up generator", job.warm_source)):
        floats = [t for t in part.state_dict().values() if t.is_floating_point()] if part is not None else []
        if floats and not bool(torch.stack([t.isfinite().all() for t in floats]).all()):
            return name
    return None


def freeze_ranges(job: Job) -> None:
    """The observed ranges, averaged over the ranks (each saw its own batches), handed to the range setter."""
    job.dist.mean_([t for q in act_quantizers(job.qmodel) for t in (q.ema_min, q.ema_max, q.lo, q.hi)])
    job.cfg.range_setter().finish(job.qmodel)


def recalibrate(job: Job) -> None:
    """Set the activation ranges again, now on the images of the data source it trains with (for a generator:
    as trained so far, not as it was during the warm-up), through the same range setter."""
    cfg, setter = job.cfg, job.cfg.range_setter()
    with torch.no_grad(), autocast(job.device, cfg.run.precision):
        batches = [job.batch_source(False).sample(cfg.optim.batch_size, job.rng)[0]
                   for _ in range(RECALIBRATION_BATCHES)]
    setter.training(job.qmodel, False)
    calibrate(job.qmodel, batches)
    freeze_ranges(job)
    setter.training(job.qmodel, True)


def check_health(job: Job) -> Health:
    """The health of the Q model now; with --select health, keeps a copy of the best one so far (the later one
    on a tie: it has trained longer). Every rank computes it (same models, same probe), so all keep the same
    model without a collective."""
    h = health(job.teacher, job.qmodel, job.probe, job.device)
    job.t_tap.take()  # the probe forwards filled the feature taps; the next step must not see them
    job.q_tap.take()
    if job.cfg.checks.select == "health" and (job.best is None or h.score >= job.best["score"]):
        job.best = {"score": h.score, "iter": job.step - 1,  # numbered as in metrics.jsonl
                    "qmodel": {k: v.detach().clone() for k, v in job.qmodel.state_dict().items()}}
    return h


def _iteration(job: Job, warm: bool) -> tuple[dict[str, Any], dict[str, bool]]:
    """One generator step (online sources) and, after warm-up, one Q-model step. Returns the loss terms and, for
    each optimiser that was due to step, whether its step was skipped because its loss or gradient was NaN/Inf
    (a skipped step leaves the parameters and the optimiser state as they were)."""
    cfg, source, qmodel, loss_fn = job.cfg, job.batch_source(warm), job.qmodel, job.loss_fn
    terms: dict[str, Any] = {}
    skipped: dict[str, bool] = {}
    with autocast(job.device, cfg.run.precision):
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
        x = seen.requires_grad_(True) if cfg.optim.promote > 0 else seen
        inp = _transfer_inputs(job, x, y, generator_pass, synced=True)
        loss, q_terms = loss_fn(inp)
        if cfg.optim.promote > 0:
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
    with autocast(job.device, job.cfg.run.precision):
        inp = _transfer_inputs(job, *batch)
        loss, _ = job.loss_fn(inp)
        extra = job.loss_fn.clean_only(inp)
    return loss if extra is None else loss + extra[0]


def curvature(job: Job) -> dict[str, torch.Tensor]:
    """Hutchinson's trace of the Hessian of the clean transfer loss on the run's fixed batches, drawn once from
    the data source at the first estimate (and kept in resume checkpoints)."""
    cfg = job.cfg
    if job.curv_batches is None:
        gen = torch.Generator().manual_seed(cfg.run.seed + 1)
        with torch.no_grad(), autocast(job.device, cfg.run.precision):
            job.curv_batches = [tuple(t.detach() for t in job.source.sample(cfg.optim.batch_size, gen))
                                for _ in range(CURVATURE_BATCHES)]
    batches = [(job.loss_fn.prepare(x.float()), y) for x, y in job.curv_batches]
    mean, se = hessian_trace(job.qmodel, lambda model, b: _clean_loss(job, b), batches, cfg.checks.curvature_samples,
                             seed=cfg.run.seed)
    return {"hessian_trace": torch.tensor(mean, device=job.device),  # beside the loss terms, on their device
            "hessian_trace_se": torch.tensor(se, device=job.device)}


def _check_taps(qmodel: nn.Module, layers: list[str], loss: str) -> None:
    """The Q model must call, as modules, the layers whose outputs the loss reads, or mark their outputs: under the
    deployable placement its forward is a graph of leaf modules, and a block whose output could not be marked is
    refused by name here, not at the first trained step."""
    lost = [name for name in layers if output_module(qmodel, name) is None]
    if lost:
        raise UserError(f"--loss {loss} reads the outputs of {', '.join(lost)}, which --placement deployable "
                        f"dissolves into its integer graph (they are no longer called as modules, and what they "
                        f"return is not their last operation): use --placement lineage, or layers that are single "
                        f"modules")


def _promoted_loss(job: Job, clean: TransferInputs, clean_loss: torch.Tensor) -> torch.Tensor:
    """HAST's sample-difficulty promotion: the batch moved by ε·sign(∇ₓ loss), i.e. made harder for the Q model,
    and the transfer loss on it. `clean_loss` is the loss without its clean-only terms (SynQ's CAM), whose
    gradient is the direction. The direction follows the Q path only; the HAST code also let it flow through
    the teacher, whose outputs it never detached (hast.md §5.4), a side effect rather than the method."""
    x_adv = fgsm_promote(clean.x, clean_loss, job.cfg.optim.promote)
    with torch.no_grad():
        t_logits = job.teacher(x_adv)
    t_feats = job.t_tap.take(detach=True)
    loss, _ = job.loss_fn(TransferInputs(t_logits, job.qmodel(x_adv), clean.labels, x_adv, t_feats,
                                         job.q_tap.take(), clean=clean))
    return loss
