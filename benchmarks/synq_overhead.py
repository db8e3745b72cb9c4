"""Cost of each SynQ part against the HAST iteration it builds on, through the loop's own `Job.iterate`.

All variants train on the same offline `hast` set (quick recipe; built once and cached) with the quick preset's
promotion pass; only the transfer loss differs: `synq` with no part is exactly the `hast` loss. Rounds alternate
between the variants so that drift in machine load hits all alike; the figure is the median over rounds.
Prints one JSON object as its last line. Usage: python benchmarks/synq_overhead.py [--batch-size 64]
"""
from __future__ import annotations

import argparse
import json

import torch

from loss_timing import add_arguments, time_variants

VARIANTS = {"hast": ("synq", {"synq_parts": "none"}), "lpf": ("synq", {"synq_parts": "lpf"}),
            "cam": ("synq", {"synq_parts": "cam"}), "selce": ("synq", {"synq_parts": "selce"}),
            "synq": ("synq", {}), "akt+synq": ("akt+synq", {})}


def main() -> None:
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    args = ap.parse_args()
    torch.manual_seed(0)
    ms = time_variants("hast", VARIANTS, args)
    for name in VARIANTS:
        print(f"{name:9s} {ms[name]:8.1f} ms/iter  ×{ms[name] / ms['hast']:.3f}")
    print(json.dumps({"batch_size": args.batch_size, "threads": torch.get_num_threads(),
                      "ms_per_iter": {k: round(v, 2) for k, v in ms.items()},
                      "ratio_to_hast": {k: round(v / ms["hast"], 3) for k, v in ms.items()}}))


if __name__ == "__main__":
    main()
