"""The QAT loop: `quantize_run` opens the run folder, builds the job and trains it epoch by epoch, with resume
checkpoints, the non-finite-step guard, range freezing and recalibration, periodic health checks and evaluations,
and a clean stop on SIGINT/SIGTERM; `quantize` is the Python entry point."""
from __future__ import annotations

import copy
import dataclasses
import signal
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..device import deterministic, resolve_device
from ..dist import session
from ..errors import UserError, deprecated
from ..evaluate import evaluate
from ..io import save_torch
from ..models import load_model
from ..provenance import RunClock
from ..quant import act_quantizers, default_placement
from ..synth import SourceContext
from ..validate import probe_set
from .config import TrainConfig, resolve_config
from .folder import (Metrics, Result, available_cores, finish, header, health_row, open_run_folder,
                     start_run_folder, warn_if_busy)
from .job import Job, build_job, check_health, curvature, freeze_ranges, nonfinite_state, recalibrate

BAD_STEP_HINT = {"generator": "lr_g", "Q model": "lr_q"}  # each guarded optimiser step, and the LR to lower


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


def quantize_run(cfg: TrainConfig, teacher: nn.Module | None = None, resume: bool = False,
                 quiet: bool = False, restart: bool = False) -> Result:
    """Run (or resume) one zero-shot quantization job and write its run directory. Under torchrun every rank calls
    this alike (see zsq.dist). A `teacher` module is copied: the user's module keeps its mode, gradients,
    device and hooks."""
    if cfg.run.deterministic:
        deterministic()
    if teacher is None and cfg.model_def:  # built now: its placement default depends on the module
        teacher = load_model(cfg.teacher, checkpoint=cfg.checkpoint, model_def=cfg.model_def)
    cfg = dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, threads=cfg.run.threads or available_cores()),
        quant=dataclasses.replace(cfg.quant, placement=cfg.quant.placement or default_placement(teacher)))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.run.threads)
    try:
        with session(resolve_device(cfg.run.device)) as (d, device):
            quiet = quiet or not d.main
            state = d.from_main(lambda: open_run_folder(cfg, resume, restart, d))
            job = build_job(cfg, copy.deepcopy(teacher) if teacher is not None else None, device, quiet, d)
            try:
                if d.main:
                    print(header(job), flush=True)
                    warn_if_busy(cfg.run.threads)
                info = job.test_set.info
                ctx = SourceContext(job.teacher, info.num_classes, info.in_channels, info.image_size, device, quiet,
                                    d)
                job.probe = probe_set(ctx, cfg.probe).to(device)
                if state is not None:
                    job.load_state_dict(state)
                    if not quiet:
                        print(f"resuming {job.out} at iteration {job.step}")
                else:
                    if d.main:
                        start_run_folder(cfg, job.out, d)
                    if cfg.optim.warmup_epochs == 0:
                        _set_ranges_without_images(job)
                _loop(job, quiet)
                return finish(job)
            finally:
                job.close()
    finally:
        torch.set_num_threads(threads_before)


def _set_ranges_without_images(job: Job) -> None:
    """--warmup-epochs 0: the range setter sets every activation range from the teacher alone (the BN prior), or
    the run is refused by name before it trains."""
    freeze_ranges(job)
    quants = act_quantizers(job.qmodel)
    unset = [q for q in quants if not q.calibrated]
    if unset:
        raise UserError(f"--warmup-epochs 0: --act-range {job.cfg.ranges.act_range} derives "
                        f"{len(quants) - len(unset)} of the {len(quants)} activation ranges of this model from its "
                        f"BatchNorm statistics; the others need warm-up images (--warmup-epochs ≥ 1)")


def _loop(job: Job, quiet: bool) -> None:
    cfg, state_path = job.cfg, job.out / "state.pt"
    total = cfg.optim.epochs * cfg.optim.iters_per_epoch
    clock, first = RunClock(job.wall_s, job.cpu_s), job.step
    bad_run = {name: 0 for name in BAD_STEP_HINT}
    metrics = Metrics(job.out / "metrics.jsonl", keep_below=job.step, clock=clock.wall, d=job.dist)

    def checkpoint() -> None:
        metrics.flush()
        bad = nonfinite_state(job)
        if bad:
            raise UserError(f"{bad} holds NaN/Inf at iteration {job.step}: not checkpointed (the last good checkpoint "
                            f"is {state_path})")
        job.wall_s, job.cpu_s = clock.wall(), clock.cpu()
        rngs = job.dist.gather(job.rng.get_state())
        if job.dist.main:
            save_torch(job.state_dict(rngs), state_path)

    bar = tqdm(range(job.step, total), total=total, initial=job.step, disable=quiet, desc="quantize",
               dynamic_ncols=True)
    with _Stop() as stop:
        for step in bar:
            epoch, it = divmod(step, cfg.optim.iters_per_epoch)
            warm = epoch < cfg.optim.warmup_epochs
            if it == 0 or step == first:
                job.start_epoch(epoch)
            if cfg.ranges.recalibrate_at and it == 0 and epoch == cfg.ranges.recalibrate_at:
                recalibrate(job)
                metrics.event({"iter": step, "epoch": epoch, "recalibrated": True})
            terms, skipped = job.iterate(warm)
            trained = step - cfg.optim.warmup_epochs * cfg.optim.iters_per_epoch
            if cfg.checks.track_curvature and not warm and trained % cfg.checks.track_curvature == 0:
                terms.update(curvature(job))
            for name, was_skipped in skipped.items():
                bad_run[name] = bad_run[name] + 1 if was_skipped else 0
                job.skipped[name] = job.skipped.get(name, 0) + int(was_skipped)
                if bad_run[name] >= cfg.optim.max_bad_steps:
                    metrics.flush()
                    flag = BAD_STEP_HINT[name]
                    raise UserError(f"the {name} loss or gradient was NaN/Inf for {bad_run[name]} iterations in a "
                                    f"row (iteration {step}): lower --{flag.replace('_', '-')} (now "
                                    f"{getattr(cfg.optim, flag)}); the last good checkpoint is {state_path}")
            metrics.add({"iter": step, "epoch": epoch, "lr_q": job.q_opt.param_groups[0]["lr"], "warmup": warm},
                        terms)
            job.step = step + 1
            if job.step % cfg.run.log_every == 0:
                bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.flush().items() if k in ("loss_q", "loss_g")})
            end_of_epoch = job.step % cfg.optim.iters_per_epoch == 0
            if end_of_epoch and epoch + 1 == cfg.optim.warmup_epochs:
                job.set_ranges()
            every = cfg.checks.health_every
            if every and not warm and (trained + 1) % every == 0 and job.step < total:
                h = check_health(job)
                metrics.event({"iter": step, "epoch": epoch, **health_row(h)})
                if h.flagged and not quiet:
                    tqdm.write(f"warning: iteration {job.step}: {h.line()}")
            every = cfg.checks.eval_every
            if every and end_of_epoch and (epoch + 1) % every == 0 and job.step < total:
                row: dict[str, Any] = {"iter": step, "epoch": epoch}
                if job.dist.main:
                    row["eval_q_top1"] = evaluate(job.qmodel, job.test_set, device=job.device,
                                                  limit=cfg.checks.eval_limit)["top1"]
                metrics.event(row)
            stopping = job.dist.any(stop.signum is not None)  # a signal reaches the ranks at different steps
            if job.step % cfg.run.ckpt_every == 0 or end_of_epoch or stopping:
                checkpoint()
            if stopping:
                bar.close()
                raise UserError(f"stopped by signal {stop.signum or 'on another rank'} at iteration {job.step}; "
                                f"continue with --resume")
    bar.close()
    metrics.flush()
    job.wall_s, job.cpu_s = clock.wall(), clock.cpu()


def quantize(teacher: str | nn.Module = "resnet20_fmnist", wbits: int = 4, abits: int = 4, source: str = "gdfq",
             loss: str = "kd", preset: str = "quick", resume: bool = False, quiet: bool = False,
             restart: bool = False, **overrides: Any) -> Result:
    """Python entry point: `zsq.quantize(teacher, wbits=4, abits=4, source="adadfq", loss="kd")`.

    `teacher` is a name/path (as for `zsq.load_model`) or any `nn.Module` classifier (then pass `dataset=`).
    The former keywords `generator=` and `method=` still work for one release.
    """
    if "generator" in overrides:
        deprecated("zsq.quantize(generator=...)", "source=...")
        source = overrides.pop("generator")
    if "method" in overrides:
        deprecated("zsq.quantize(method=...)", "loss=...")
        loss = overrides.pop("method")
    module = teacher if isinstance(teacher, nn.Module) else None
    name = "module" if module is not None else str(teacher)
    if module is not None and getattr(module, "zsq_model_def", None):
        overrides.setdefault("model_def", module.zsq_model_def)  # later commands rebuild it from the same code
    cfg = resolve_config(preset, source, loss, teacher=name, wbits=wbits, abits=abits, **overrides)
    return quantize_run(cfg, teacher=module, resume=resume, quiet=quiet, restart=restart)
