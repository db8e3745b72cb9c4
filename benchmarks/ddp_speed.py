"""Step time of one process against two torchrun processes (DDP, gloo) on the same global batch, on the CPU.

Both runs get the same cores: one process with --threads threads and batch G, or two processes with
--threads / 2 threads each and batch G / 2 (per rank). Each is a real `zsq quantize` job cut to 1 warm-up + 1
trained epoch of --iters iterations; the speed is the trained iterations per second read from metrics.jsonl
(first logging interval excluded), as in preset_speed.py. speedup = two processes over one.
Usage: python benchmarks/ddp_speed.py [--batch 64] [--iters 40] [--threads 2] [--loss kd+ce]
Prints one JSON object as its last line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from preset_speed import iterations_per_second


def run(procs: int, batch: int, threads: int, args: argparse.Namespace, out: Path) -> float:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
                if procs > 1 else [sys.executable])
    cmd = [*launcher, "-m", "zsq", "quantize", "--teacher", args.teacher, "--source", args.source,
           "--loss", args.loss, "--batch-size", str(batch), "--epochs", "2", "--warmup-epochs", "1",
           "--iters-per-epoch", str(args.iters), "--log-every", "10", "--eval-limit", "200", "--quiet",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return iterations_per_second(out / "metrics.jsonl", args.iters)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64, help="global batch")
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2, help="cores given to each configuration")
    ap.add_argument("--source", default="gdfq")
    ap.add_argument("--loss", default="kd+ce")
    ap.add_argument("--teacher", default="resnet20_fmnist")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, args.batch, args.threads, args, Path(tmp) / "one")
        two = run(2, args.batch // 2, max(1, args.threads // 2), args, Path(tmp) / "two")
    figures = {"global_batch": args.batch, "threads": args.threads, "source": args.source, "loss": args.loss,
               "one_process_it_per_s": round(one, 3), "two_processes_it_per_s": round(two, 3),
               "speedup": round(two / one, 3)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
