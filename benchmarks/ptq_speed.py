"""Post-training reconstruction speed: seconds per unit and images·iterations per second, against a teacher
forward+backward at the same batch measured in the same process.

Why: `zsq ptq`'s quick preset is sized by these numbers (units × steps × seconds per step); a unit's step runs only
that unit, so its cost is a fraction of a whole-network step. Each unit's time includes its input caches (the FP
and quantized prefixes over all images) and its activation steps' range search.
Usage: python benchmarks/ptq_speed.py [--teacher resnet20_fmnist] [--iters 50] [--images 256] [--bits 4]
Prints one JSON object as its last line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import zsq
from zsq.quant import QuantConfig
from zsq.recon import ReconConfig, reconstruct


def teacher_step_seconds(teacher: torch.nn.Module, x: torch.Tensor, steps: int) -> float:
    """A forward+backward of the whole teacher on batch x (gradients for the weights), per step."""
    model = teacher.train()
    for p in model.parameters():
        p.requires_grad_(True)
    y = torch.randint(0, 10, (len(x),))
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        model.zero_grad(set_to_none=True)
        loss.backward()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--teacher", default="resnet20_fmnist")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--bits", type=int, default=4)
    a = p.parse_args()
    teacher = zsq.load_model(a.teacher)
    info = teacher.zsq_dataset
    images = torch.randn(a.images, info.in_channels, info.image_size, info.image_size,
                         generator=torch.Generator().manual_seed(0))
    cfg = ReconConfig(iters=a.iters)
    baseline = teacher_step_seconds(teacher, images[: cfg.batch_size], 10)
    marks, units = [time.perf_counter()], []

    def timed(k: int, record: dict, state: dict) -> None:
        marks.append(time.perf_counter())
        units.append({"unit": record["name"], "seconds": marks[-1] - marks[-2]})

    reconstruct(teacher, images, QuantConfig(a.bits, a.bits, weight_range="fixed", first_last="8bit"), cfg,
                on_unit=timed)
    for u in units:
        u["images_iters_per_s"] = cfg.batch_size * a.iters / u["seconds"]
        u["step_vs_teacher_step"] = u["seconds"] / a.iters / baseline
    total = sum(u["seconds"] for u in units)
    for u in units:
        print(f"{u['unit']:12s} {u['seconds']:6.2f} s  {u['images_iters_per_s']:8.0f} img·it/s  "
              f"step = {u['step_vs_teacher_step']:.2f} × teacher step")
    print(json.dumps({"benchmark": "ptq_speed", "teacher": a.teacher, "threads": torch.get_num_threads(),
                      "bits": a.bits, "iters_per_unit": a.iters, "images": a.images, "batch": cfg.batch_size,
                      "teacher_step_s": baseline, "total_s": total,
                      "total_vs_teacher_steps": total / baseline, "units": units}))


if __name__ == "__main__":
    main()
