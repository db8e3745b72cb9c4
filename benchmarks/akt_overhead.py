"""Cost of an AKT iteration against a plain KD iteration, both through the loop's own `Job.iterate`.

The same teacher, generator and batch; only the transfer loss differs (AKT adds forward hooks, two attention
reductions per map and their KLs). Rounds alternate between the methods so that drift in machine load hits all
of them alike; the figure is the median over rounds. Target: akt ≤ 1.15 × kd.
Prints one JSON object as its last line. Usage: python benchmarks/akt_overhead.py [--batch-size 64]
"""
from __future__ import annotations

import argparse
import json

import torch

from loss_timing import add_arguments, time_variants

VARIANTS = {"kd": ("kd", {}), "akt_stages": ("akt", {"akt_layers": "stages"}),
            "akt_units": ("akt", {"akt_layers": "units"})}


def main() -> None:
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    args = ap.parse_args()
    torch.manual_seed(0)
    ms = time_variants("gdfq", VARIANTS, args)
    for name in VARIANTS:
        print(f"{name:11s} {ms[name]:8.1f} ms/iter  ×{ms[name] / ms['kd']:.3f}")
    print(json.dumps({"batch_size": args.batch_size, "threads": torch.get_num_threads(),
                      "ms_per_iter": {k: round(v, 2) for k, v in ms.items()},
                      "ratio_to_kd": {k: round(v / ms["kd"], 3) for k, v in ms.items()}, "target": 1.15}))


if __name__ == "__main__":
    main()
