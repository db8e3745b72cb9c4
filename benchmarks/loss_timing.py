"""Shared by the loss-overhead benchmarks: time `zsq quantize` iterations of several transfer losses through the
loop's own `Job.iterate`, on the same teacher and data source. Rounds alternate between the variants so that drift
in machine load hits all of them alike; each figure is the median over rounds, in ms per iteration."""
from __future__ import annotations

import argparse
import statistics
import time

from zsq.train import build_job, resolve_config


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--teacher", default="resnet20_fmnist")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)


def build(generator: str, method: str, options: dict, args: argparse.Namespace):
    cfg = resolve_config("quick", generator, method, teacher=args.teacher, wbits=4, abits=4,
                         batch_size=args.batch_size, device="cpu", out="unused", **options)
    job = build_job(cfg)
    job.start_epoch(0)  # warm-up epoch: calibrate the activation ranges on a few generator batches
    for _ in range(3):
        job.iterate(True)
    job.start_epoch(cfg.warmup_epochs)
    return job


def round_ms(job, iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        job.iterate(False)
    return (time.perf_counter() - t0) / iters * 1e3


def time_variants(generator: str, variants: dict[str, tuple[str, dict]], args: argparse.Namespace) -> dict[str, float]:
    """{variant: median ms per trained iteration}; `variants` maps a name to (method, options)."""
    jobs = {name: build(generator, method, opts, args) for name, (method, opts) in variants.items()}
    for job in jobs.values():
        round_ms(job, 1)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(args.rounds):
        for name, job in jobs.items():
            times[name].append(round_ms(job, args.iters))
    for job in jobs.values():
        job.close()
    return {name: statistics.median(t) for name, t in times.items()}
