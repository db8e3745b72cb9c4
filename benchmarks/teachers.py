"""The shipped teachers on the real Fashion-MNIST test set: FP, and W8A8 / W4A4 fake-quant with Gaussian-noise
ranges and no training (`zsq eval`), on all 10,000 images and on the first SUBSET of them, bound to each weight
file by its SHA-256.

README's teacher tables quote the full-set numbers. tests/test_shipped_teacher.py checks that the recorded numbers
belong to the shipped files and meet the teachers' acceptance (FP ≥ 93 %, W8A8 within 0.5 of FP), and that today's
code reproduces the subset numbers: a tenth of the evaluation, so the suite need not spend two minutes on it.
Usage: python benchmarks/teachers.py [--out results/teachers.json]   (about 5 min on 1 thread of a 2-core EPYC)
Prints one JSON object as its last line.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from pathlib import Path

import torch

import zsq
from zsq.evaluate import run_eval
from zsq.io import save_json
from zsq.models import shipped_models
from zsq.models.checkpoint import WEIGHTS_DIR

SUBSET = 2000  # the first images of the test set that the suite re-evaluates
BITS = (32, 8, 4)


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or platform.machine())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def measure(name: str) -> dict:
    row: dict = {"sha256": sha256(WEIGHTS_DIR / f"{name}.pt")}
    for bits in BITS:
        key = "fp" if bits == 32 else f"w{bits}a{bits}"
        full = run_eval(name, wbits=bits, abits=bits)
        part = run_eval(name, wbits=bits, abits=bits, limit=SUBSET)
        row[key] = {"top1": full["top1"], "top5": full["top5"], "n": full["n"], f"top1_first_{SUBSET}": part["top1"]}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/teachers.json")
    args = parser.parse_args()
    t0 = time.time()
    result = {"what": "shipped teachers on the Fashion-MNIST test set: FP and fake-quant with Gaussian-noise ranges",
              "subset": SUBSET, "torch": torch.__version__, "zsq": zsq.__version__, "threads": torch.get_num_threads(),
              "cpu": cpu_name(),
              "teachers": {name: measure(name) for name in shipped_models()}}
    result["wall_s"] = round(time.time() - t0, 1)
    save_json(result, Path(args.out))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
