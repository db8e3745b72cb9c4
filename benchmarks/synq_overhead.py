"""Cost of each SynQ part against the HAST iteration it builds on, through the loop's own `_iteration`.

All variants train on the same offline `hast` set (quick recipe; built once and cached) with the quick preset's
promotion pass; only the transfer loss differs: `synq` with no part is exactly the `hast` loss. Rounds alternate
between the variants so that drift in machine load hits all alike; the figure is the median over rounds.
Prints one JSON object as its last line. Usage: python benchmarks/synq_overhead.py [--batch-size 64]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from zsq.train import _build, _iteration, _set_epoch, resolve_config

VARIANTS = {"hast": ("synq", {"synq_parts": "none"}), "lpf": ("synq", {"synq_parts": "lpf"}),
            "cam": ("synq", {"synq_parts": "cam"}), "selce": ("synq", {"synq_parts": "selce"}),
            "synq": ("synq", {}), "akt+synq": ("akt+synq", {})}


def build(method: str, options: dict, args: argparse.Namespace):
    cfg = resolve_config("quick", "hast", method, teacher=args.teacher, wbits=4, abits=4, batch_size=args.batch_size,
                         device="cpu", out="unused", **options)
    job = _build(cfg, None, "cpu", quiet=True)
    _set_epoch(job, 0)  # warm-up epoch: calibrate the activation ranges on a few generator batches
    for _ in range(3):
        _iteration(job, True)
    _set_epoch(job, cfg.warmup_epochs)
    return job


def round_ms(job, iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        _iteration(job, False)
    return (time.perf_counter() - t0) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="resnet20_fmnist")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    jobs = {name: build(method, opts, args) for name, (method, opts) in VARIANTS.items()}
    for job in jobs.values():
        round_ms(job, 1)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(args.rounds):
        for name, job in jobs.items():
            times[name].append(round_ms(job, args.iters))
    ms = {name: statistics.median(t) for name, t in times.items()}
    for name in jobs:
        print(f"{name:9s} {ms[name]:8.1f} ms/iter  ×{ms[name] / ms['hast']:.3f}")
    for job in jobs.values():
        job.close()
    print(json.dumps({"batch_size": args.batch_size, "threads": torch.get_num_threads(),
                      "ms_per_iter": {k: round(v, 2) for k, v in ms.items()},
                      "ratio_to_hast": {k: round(v / ms["hast"], 3) for k, v in ms.items()}}))


if __name__ == "__main__":
    main()
