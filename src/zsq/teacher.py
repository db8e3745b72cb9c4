"""Train an FP teacher on real data (`zsq teacher train`): the one place zsq sees labelled data for training.

Recipe: SGD with Nesterov momentum, one-cycle (or cosine) learning rate, label smoothing, random crop + flip;
channels-last, and bf16 autocast where the hardware has it (`--precision auto`): 2.0× the fp32 throughput on a
2-core AVX-512 CPU (benchmarks/teacher_step.py), but 5× slower than fp32 on an AVX2-only one, which gets fp32.
The run checkpoints every epoch next to its output and resumes after a kill.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import augment, batches, load_dataset, normalize
from .device import autocast, resolve_device, resolve_precision
from .errors import UserError
from .evaluate import evaluate
from .io import save_torch
from .models import create_model, read_checkpoint, save_checkpoint
from .provenance import hardware


@dataclass
class TeacherConfig:
    model: str = "resnet20"
    model_args: dict = field(default_factory=dict)  # the architecture's own keywords, e.g. width_mult
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    out: str = "teacher.pt"
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.2  # peak learning rate of the one-cycle schedule, for batch 128
    momentum: float = 0.9
    weight_decay: float = 5e-4  # not applied to BN parameters and biases
    schedule: str = "onecycle"  # "onecycle" (25 % warm-up, cosine down) or "cosine"
    label_smoothing: float = 0.1
    precision: str = "auto"  # bf16 where the hardware computes it natively, else fp32 (zsq.device)
    device: str = "auto"
    seed: int = 0
    eval_limit: int | None = None  # evaluate on the first N test images only (smoke tests)
    resume: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError("epochs and batch size must be ≥ 1")
        if self.lr <= 0:
            raise UserError(f"learning rate must be > 0, got {self.lr}")
        if self.schedule not in ("onecycle", "cosine"):
            raise UserError(f"schedule must be onecycle or cosine, got '{self.schedule}'")


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(cfg: TeacherConfig, step: int, total: int) -> float:
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
    warm = max(1, int(0.25 * total))
    if step < warm:
        return cfg.lr * (0.04 + 0.96 * step / warm)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))


def train_teacher(cfg: TeacherConfig) -> dict:
    device = resolve_device(cfg.device)
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))  # recorded as resolved
    train_set = load_dataset(cfg.dataset, "train", cfg.data_dir)
    test_set = load_dataset(cfg.dataset, "test", cfg.data_dir)
    info = train_set.info
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, **{"num_classes": info.num_classes, "in_channels": info.in_channels,
                                        **cfg.model_args})
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(_param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    steps_per_epoch = -(-len(train_set) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    out = Path(cfg.out)
    state_path = out.with_name(out.name + ".resume")
    start_epoch, history = 0, []
    if cfg.resume and state_path.exists():
        state = read_checkpoint(state_path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"], state["history"]
        print(f"resuming from {state_path} after epoch {start_epoch}")
    t0 = time.time() - sum(h["seconds"] for h in history)
    for epoch in range(start_epoch, cfg.epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # the epoch's order, identical on resume
        model.train()
        t_epoch = time.time()
        loss_sum = torch.zeros((), device=device)
        bar = tqdm(batches(train_set, cfg.batch_size, shuffle=True, generator=gen), total=steps_per_epoch,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for i, (x, y) in enumerate(bar):
            step = epoch * steps_per_epoch + i
            for g in opt.param_groups:
                g["lr"] = _lr_at(cfg, step, total)
            x = normalize(augment(x.to(device), gen), info).contiguous(memory_format=torch.channels_last)
            y = y.to(device)
            with autocast(device, cfg.precision):
                loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            if i % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        if not torch.isfinite(loss_sum):
            raise UserError(f"training loss became NaN/Inf in epoch {epoch + 1}: lower --lr (now {cfg.lr})")
        acc = evaluate(model, test_set, device=device, limit=cfg.eval_limit)
        history.append({"epoch": epoch + 1, "loss": loss_sum.item() / steps_per_epoch, "top1": acc["top1"],
                        "seconds": time.time() - t_epoch})
        print(f"epoch {epoch + 1}/{cfg.epochs}  loss {history[-1]['loss']:.4f}  test top1 {acc['top1']:.2f}  "
              f"({history[-1]['seconds']:.0f}s)", flush=True)
        save_torch({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                    "history": history}, state_path)
    final = evaluate(model, test_set, device=device, limit=cfg.eval_limit)
    wall = time.time() - t0
    metrics = {**final, "wall_seconds": wall, "history": history, "config": asdict(cfg),
               "torch": str(torch.__version__), "device": device, "hardware": hardware(device)}
    save_checkpoint(model.cpu().to(memory_format=torch.contiguous_format), out, info, metrics)
    state_path.unlink(missing_ok=True)
    return metrics
