"""A QAT run's folder: config.json (resolved), metrics.jsonl, state.pt (resume), student.pt, samples.pt and
result.json; and the run's result. Every file is written whole (temp file, then rename), by the main rank."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..device import autocast
from ..dist import SINGLE, Dist
from ..evaluate import evaluate
from ..io import save_json, save_torch
from ..models import model_name, save_checkpoint
from ..provenance import code_version, hardware
from ..quant import act_quantizers, float_tensors, observe_ranges
from ..rundir import clear_run, open_run
from ..validate import Health, health
from .config import TrainConfig, config_dict, current_config
from .job import Job, check_health

SAMPLES_SAVED = 32  # synthetic images kept in each run directory


@dataclass
class Result:
    fp_top1: float
    q_top1: float
    run_dir: Path
    qmodel: nn.Module
    summary: dict[str, Any]
    rank: int = 0  # under torchrun every rank returns the same result; rank 0 is the one that wrote it


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


def run_config(cfg: TrainConfig, d: Dist = SINGLE) -> dict[str, Any]:
    """config.json: the resolved config, and under torchrun the process count with the per-rank (batch_size)
    and the global batch."""
    out = config_dict(cfg)
    if d.on:
        out["distributed"] = {"world_size": d.world, "backend": d.backend, "batch_per_rank": cfg.optim.batch_size,
                              "global_batch": cfg.optim.batch_size * d.world}
    return out


def start_run_folder(cfg: TrainConfig, out: Path, d: Dist = SINGLE) -> None:
    """A fresh run folder holding config.json: the resolved config, under torchrun with the world's batches."""
    clear_run(out)
    save_json(run_config(cfg, d), out / "config.json")


def open_run_folder(cfg: TrainConfig, resume: bool, restart: bool, d: Dist = SINGLE) -> dict[str, Any] | None:
    return open_run(Path(cfg.run.out), run_config(cfg, d), resume, restart, d.world,
                    say=print if d.main else (lambda *a: None), as_now=current_config)


def available_cores() -> int:
    """The cores this process may use: OMP_NUM_THREADS when set, else its CPU affinity mask."""
    try:
        omp = int(os.environ.get("OMP_NUM_THREADS", "0"))
    except ValueError:
        omp = 0
    return omp if omp > 0 else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def warn_if_busy(cores: int) -> None:
    """Other work on the cores makes every thread of this run wait (three jobs on two cores ran 10-40× slower)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    machine = os.cpu_count() or 1
    if load > machine:
        print(f"warning: this machine's load ({load:.1f}) already exceeds its {machine} cores: the run's {cores} "
              f"thread(s) will wait for them (run fewer jobs at once, or lower --threads)", file=sys.stderr)


def header(job: Job) -> str:
    cfg, q, optim = job.cfg, job.cfg.quant, job.cfg.optim
    return (f"zsq quantize: {model_name(job.teacher)} W{q.wbits}A{q.abits} ({q.placement}), source {cfg.source}, "
            f"loss {cfg.loss}, preset {cfg.preset}: {optim.epochs * optim.iters_per_epoch} iterations "
            f"({optim.warmup_epochs * optim.iters_per_epoch} warm-up) on {job.device}, {cfg.run.threads} thread(s) "
            f"→ {job.out}")


def health_row(h: Health) -> dict[str, Any]:
    return {"health": h.score, **{f"health_{k}": getattr(h, k) for k in ("kl", "agreement", "bn_drift")}}


def finish(job: Job) -> Result:
    """The final health check; with --select health the best-scoring Q model (a periodic check's or the final
    one) is the one kept, evaluated and saved."""
    observe_ranges(job.qmodel, False)
    h = check_health(job)
    selected, final_top1 = job.step - 1, None
    if job.best is not None and job.best["iter"] != selected:
        final_top1 = job.dist.from_main(lambda: evaluate(job.qmodel, job.test_set, device=job.device,
                                                         limit=job.cfg.checks.eval_limit)["top1"])
        job.qmodel.load_state_dict(job.best["qmodel"])
        h, selected = health(job.teacher, job.qmodel, job.probe, job.device), job.best["iter"]
    summary = job.dist.from_main(lambda: _write_results(job, h, selected, final_top1))
    return Result(summary["fp_top1"], summary["q_top1"], job.out, job.qmodel, summary, job.dist.rank)


def _write_results(job: Job, h: Health, selected: int, final_top1: float | None) -> dict[str, Any]:
    """Evaluate the teacher and the Q model, write student.pt, samples.pt and result.json; the summary.
    `final_top1`: the last iteration's accuracy, when --select kept another Q model (for comparison only)."""
    cfg, out = job.cfg, job.out
    fp = evaluate(job.teacher, job.test_set, device=job.device, limit=cfg.checks.eval_limit)
    q = evaluate(job.qmodel, job.test_set, device=job.device, limit=cfg.checks.eval_limit)
    save_checkpoint(job.qmodel.cpu(), out / "student.pt", job.test_set.info, {"top1": q["top1"], "top5": q["top5"]},
                    quant=asdict(cfg.quant))
    job.qmodel.to(job.device)
    job.qmodel.zsq_dataset = job.test_set.info  # zsq.export(result.qmodel, ...) needs no dataset= then
    if cfg.teacher == "module":  # a module passed to zsq.quantize: `zsq health RUN` finds its weights here
        save_checkpoint(job.teacher.cpu(), out / "teacher.pt", job.test_set.info, {"top1": fp["top1"]})
        job.teacher.to(job.device)
    summary = {"fp_top1": fp["top1"], "q_top1": q["top1"], "q_top5": q["top5"], "eval_images": q["n"],
               "wbits": cfg.quant.wbits, "abits": cfg.quant.abits, "source": cfg.source, "loss": cfg.loss,
               "preset": cfg.preset, "iterations": job.step, "wall_s": job.wall_s, "cpu_s": job.cpu_s,
               "seed": cfg.run.seed,
               "device": job.device, "hardware": hardware(job.device), "torch": str(torch.__version__), "skipped_steps": job.skipped.get("Q model", 0),
               "skipped_generator_steps": job.skipped.get("generator", 0),
               "dataset": job.test_set.info.name, "model": model_name(job.teacher), "code": code_version(),
               **job.source.describe(), **({"world_size": job.dist.world} if job.dist.on else {}),
               "act_ranges": [[a.lo.item(), a.hi.item()] for a in act_quantizers(job.qmodel)],
               "placement": cfg.quant.placement, "float_tensors": float_tensors(job.qmodel),
               "select": cfg.checks.select, "selected_iter": selected, "health": h.summary(),
               **({"final_q_top1": final_top1} if final_top1 is not None else {})}
    with torch.no_grad(), autocast(job.device, cfg.run.precision):  # what the data source made, for zsq analyze
        x, y = job.source.sample(SAMPLES_SAVED, torch.Generator().manual_seed(cfg.run.seed))
    save_torch({"images": x.float().cpu(), "labels": y.cpu(), "source": cfg.source}, out / "samples.pt")
    save_json(summary, out / "result.json")
    (out / "state.pt").unlink(missing_ok=True)
    return summary
