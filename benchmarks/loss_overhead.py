"""Cost of a transfer loss's iteration against the iteration it builds on, through the loop's own `Job.iterate`.

Two families, each on one teacher, data source and batch, where only the transfer loss differs:
- `akt`: AKT (RFD on the stage maps, or on every residual unit's) against plain KD, on a GDFQ generator; AKT adds
  forward hooks, two attention reductions per map and their KLs. Target: akt ≤ 1.15 × kd.
- `synq`: each SynQ part (low-pass filter, Grad-CAM alignment, selective CE), all three, and `akt+synq`, against
  the HAST loss they build on (`synq` with no part), on the offline `hast` set with the quick preset's promotion.
Rounds alternate between the variants so that drift in machine load hits all alike; each figure is the median
over rounds, in ms per trained iteration. Prints one JSON object as its last line.
Usage: python benchmarks/loss_overhead.py [--family akt|synq] [--rounds 5] [--iters 4] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from zsq.train import build_job, resolve_config

# family: (data source, baseline variant, {variant: (loss, options)})
FAMILIES = {
    "akt": ("gdfq", "kd", {"kd": ("kd", {}), "akt_stages": ("akt", {"akt_layers": "stages"}),
                           "akt_units": ("akt", {"akt_layers": "units"})}),
    "synq": ("hast", "hast", {"hast": ("synq", {"synq_parts": "none"}), "lpf": ("synq", {"synq_parts": "lpf"}),
                              "cam": ("synq", {"synq_parts": "cam"}), "selce": ("synq", {"synq_parts": "selce"}),
                              "synq": ("synq", {}), "akt+synq": ("akt+synq", {})}),
}


def trained_job(source: str, loss: str, options: dict, args: argparse.Namespace):
    """A job past its warm-up: ranges calibrated on a few generator batches, ready for Q steps."""
    cfg = resolve_config("quick", source, loss, teacher=args.teacher, wbits=4, abits=4, batch_size=args.batch_size,
                         device="cpu", out="unused", **options)
    job = build_job(cfg)
    job.start_epoch(0)
    for _ in range(3):
        job.iterate(True)
    job.start_epoch(cfg.optim.warmup_epochs)
    return job


def round_ms(job, iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        job.iterate(False)
    return (time.perf_counter() - t0) / iters * 1e3


def time_variants(source: str, variants: dict[str, tuple[str, dict]], args: argparse.Namespace) -> dict[str, float]:
    """{variant: median ms per trained iteration}."""
    jobs = {name: trained_job(source, loss, opts, args) for name, (loss, opts) in variants.items()}
    for job in jobs.values():
        round_ms(job, 1)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(args.rounds):
        for name, job in jobs.items():
            times[name].append(round_ms(job, args.iters))
    for job in jobs.values():
        job.close()
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=[*FAMILIES, "all"], default="all")
    ap.add_argument("--teacher", default="resnet20_fmnist")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    out = {"benchmark": "loss_overhead", "batch_size": args.batch_size, "threads": torch.get_num_threads()}
    for family in FAMILIES if args.family == "all" else [args.family]:
        torch.manual_seed(0)
        source, base, variants = FAMILIES[family]
        ms = time_variants(source, variants, args)
        for name in variants:
            print(f"{family}: {name:11s} {ms[name]:8.1f} ms/iter  ×{ms[name] / ms[base]:.3f} {base}")
        out[family] = {"source": source, "baseline": base, "ms_per_iter": {k: round(v, 2) for k, v in ms.items()},
                       "ratio": {k: round(v / ms[base], 3) for k, v in ms.items()}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
