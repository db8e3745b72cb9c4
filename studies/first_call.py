"""Does a process's first parallel `torch.tanh` agree with its later calls, with and without the priming that
`--deterministic` does (`zsq.device.deterministic`)?

Each trial is a fresh Python process (the effect exists once per process): it computes tanh of the same 8,192
floats twice and reports whether the first result differs from the second, and by how much on which elements.
Found on torch 2.13.0 (CPU, 2 threads, beside two training runs) with the generator's own tanh input, before this
script existed: the first call differed in 2 of 100 unprimed processes (up to 8e-6, exactly the second thread's
half), in 0 of 100 with OMP_NUM_THREADS=1, and in 0 of 199 primed ones. Run it to check another torch build.
Usage: python studies/first_call.py [--trials 100] [--threads 2]
Prints one JSON object as its last line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

TRIAL = """
import sys, torch
from zsq.device import deterministic
if sys.argv[1] == "primed":
    deterministic()
x = torch.linspace(-3, 3, 8192).view(8, 1, 32, 32)
a, b = torch.tanh(x), torch.tanh(x)
bad = (a != b).flatten().nonzero().flatten()
print(len(bad), int(bad.min()) if len(bad) else -1, float((a - b).abs().max()))
"""


def trial(mode: str, threads: int) -> tuple[int, int, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", TRIAL, mode], capture_output=True, text=True, env=env, check=True)
    n, first, gap = out.stdout.split()
    return int(n), int(first), float(gap)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    figures: dict[str, dict[str, float]] = {}
    for mode in ("plain", "primed"):
        results = [trial(mode, args.threads) for _ in range(args.trials)]
        odd = [r for r in results if r[0]]
        figures[mode] = {"processes": args.trials, "first_call_differs": len(odd),
                         "max_abs_gap": max((r[2] for r in odd), default=0.0),
                         "first_bad_element": min((r[1] for r in odd), default=-1)}
        print(f"{mode:7s} first call differs in {len(odd)} of {args.trials} processes", flush=True)
    print(json.dumps({"benchmark": "first_call", "threads": args.threads, **figures}))


if __name__ == "__main__":
    main()
