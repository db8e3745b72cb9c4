"""Teacher-training step throughput: fp32 vs channels-last vs bf16 autocast, ResNet-20 on 1×32×32 inputs.

Why: `zsq teacher train` defaults to bf16 autocast + channels-last because this measures it faster on CPUs
with AVX-512 BF16. Prints one JSON object as its last line; speed-ups are ratios against fp32 in the same run.
Usage: python benchmarks/teacher_step.py [--batch-size 128] [--steps 6]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from zsq.models import create_model


def images_per_second(batch_size: int, steps: int, channels_last: bool, bf16: bool) -> float:
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x = torch.randn(batch_size, 1, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch_size,))
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch_size * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    a = p.parse_args()
    variants = {"fp32": (False, False), "fp32_channels_last": (True, False), "bf16": (False, True),
                "bf16_channels_last": (True, True)}
    ips = {name: images_per_second(a.batch_size, a.steps, *v) for name, v in variants.items()}
    for name, v in ips.items():
        print(f"{name:20s} {v:8.0f} img/s  ×{v / ips['fp32']:.2f}")
    print(json.dumps({"benchmark": "teacher_step", "batch_size": a.batch_size, "threads": torch.get_num_threads(),
                      "images_per_second": {k: round(v, 1) for k, v in ips.items()},
                      "speedup_vs_fp32": {k: round(v / ips["fp32"], 3) for k, v in ips.items()}}))


if __name__ == "__main__":
    main()
