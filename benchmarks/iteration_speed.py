"""Cost of one zero-shot quantization iteration against the passes it cannot avoid, measured alone.

The loop's iteration (generator step + Q-model step) is timed through `Job.iterate`; the baseline is
the sum of the unavoidable passes, each timed separately on the same batch: the generator forward+backward,
the teacher forward with the backward to its input (the generator's gradient must cross the teacher), and the
Q model's forward+backward. A ratio near 1 means the loop adds little of its own. AdaDFQ's generator loss also
needs a Q forward+backward to the input, which the baseline adds for that source.
Prints one JSON object as its last line. Usage: python benchmarks/iteration_speed.py [--batch-size 64]
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch
import torch.nn.functional as F

from zsq.models import create_model
from zsq.train import build_job, resolve_config


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


def measure(source: str, loss: str, batch_size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    teacher = create_model("resnet20", in_channels=1).eval()  # random weights: the cost does not depend on them
    cfg = resolve_config("quick", source, loss, batch_size=batch_size, wbits=4, abits=4, out="unused")
    job = build_job(cfg, teacher)
    job.start_epoch(0)
    for _ in range(2):  # calibrate the activation ranges on generator batches, as the warm-up does
        job.iterate(True)
    job.start_epoch(cfg.optim.warmup_epochs)
    source, qmodel, rng = job.source, job.qmodel, job.rng
    full = timed(lambda: job.iterate(False), repeats)

    def gen_pass():
        x, _ = source.sample(batch_size, rng)
        x.sum().backward()

    x0 = torch.randn(batch_size, 1, 32, 32)

    def teacher_pass():
        x = x0.clone().requires_grad_(True)
        teacher(x).sum().backward()

    def q_pass():
        F.cross_entropy(qmodel(x0), torch.zeros(batch_size, dtype=torch.long)).backward()

    def q_input_pass():
        x = x0.clone().requires_grad_(True)
        qmodel(x).sum().backward(inputs=[x])

    parts = {"generator_fwd_bwd": timed(gen_pass, repeats), "teacher_fwd_bwd_to_input": timed(teacher_pass, repeats),
             "q_fwd_bwd": timed(q_pass, repeats)}
    if source == "adadfq":
        parts["q_fwd_bwd_to_input"] = timed(q_input_pass, repeats)
    base = sum(parts.values())
    return {"iteration_ms": round(full, 2), "passes_ms": {k: round(v, 2) for k, v in parts.items()},
            "sum_of_passes_ms": round(base, 2), "ratio": round(full / base, 3)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    results = {}
    for source, loss in (("gdfq", "kd"), ("gdfq", "kd+ce"), ("adadfq", "gap-entropy")):
        r = measure(source, loss, a.batch_size, a.repeats)
        results[f"{source}/{loss}"] = r
        print(f"{source}/{loss}: {r['iteration_ms']:.1f} ms/iteration, passes alone {r['sum_of_passes_ms']:.1f} ms,"
              f" ratio {r['ratio']:.2f}")
    print(json.dumps({"benchmark": "iteration_speed", "batch_size": a.batch_size, "threads": torch.get_num_threads(),
                      "device": "cpu", "results": results}))


if __name__ == "__main__":
    main()
