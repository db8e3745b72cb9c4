"""Throughput of offline pixel synthesis (`zsq synth`, HAST/ZeroQ) in images·iterations per second.

One synthesis step is a teacher forward with BN-statistics hooks, the hardness-weighted CE, a backward to the
pixels and an Adam step; the baseline is the teacher's forward + backward to its input alone, on the same batch,
measured in the same run. Prints one JSON object as its last line.
Usage: python benchmarks/synth_speed.py [--batch-size 256] [--iters 10]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from zsq.models import load_model
from zsq.synth.pixels import PixelOptions, synthesize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="resnet20_fmnist")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    teacher = load_model(args.teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    shape = (teacher.conv1.in_channels, 32, 32)
    b, n = args.batch_size, args.iters
    opts = PixelOptions(synth_images=b, synth_batch=b, synth_iters=n)
    synthesize(teacher, PixelOptions(synth_images=b, synth_batch=b, synth_iters=2), 10, shape, "cpu", True)  # warm
    t0 = time.perf_counter()
    synthesize(teacher, opts, 10, shape, "cpu", True)
    synth_s = (time.perf_counter() - t0) / n
    x0 = torch.randn(b, *shape)
    t0 = time.perf_counter()
    for _ in range(n):
        x = x0.clone().requires_grad_(True)
        teacher(x).sum().backward()
    base_s = (time.perf_counter() - t0) / n
    print(f"synthesis step {synth_s * 1e3:.0f} ms = {b / synth_s:.0f} images·iterations/s; teacher fwd+bwd alone "
          f"{base_s * 1e3:.0f} ms; ratio {synth_s / base_s:.2f}")
    print(json.dumps({"batch_size": b, "threads": torch.get_num_threads(), "ms_per_step": round(synth_s * 1e3, 1),
                      "images_iters_per_s": round(b / synth_s, 1), "teacher_fwd_bwd_ms": round(base_s * 1e3, 1),
                      "ratio_to_teacher_pass": round(synth_s / base_s, 3)}))


if __name__ == "__main__":
    main()
