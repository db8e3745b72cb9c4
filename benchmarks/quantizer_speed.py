"""The weight fake quantizer's cost per training step: forward + backward over every conv and linear weight of a
ResNet-50 (25.5 M weights), per-channel min/max ranges, 4 bits, with each straight-through estimator.

The baseline, timed in the same process on the same weights, is torch's fused `fake_quantize_per_channel_affine`
(forward + backward), whose codes zsq's quantizer matches bit for bit (tests/test_quant.py); it cannot replace it:
it refuses a zero point outside the code range (a channel whose weights are all positive) and its clipped gradient
is decided in code space. Prints one JSON object as its last line.
Usage: python benchmarks/quantizer_speed.py [--threads 1] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from zsq.models import create_model
from zsq.quant import fake_quantize, per_channel_range, quant_params

BITS = 4


def _seconds(fn, weights: list[torch.Tensor], repeats: int) -> float:
    """Median wall time of one forward + backward over all weights."""
    times = []
    for _ in range(repeats + 1):  # the first pass warms the allocator
        for w in weights:
            w.grad = None
        t0 = time.perf_counter()
        outs = [fn(w) for w in weights]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[repeats // 2]


def _torch_fused(w: torch.Tensor) -> torch.Tensor:
    lo, hi = per_channel_range(w)
    scale, zero = quant_params(lo.clamp(max=0), hi.clamp(min=0), BITS)  # torch needs Z inside the code range
    return torch.fake_quantize_per_channel_affine(w, scale.flatten(), zero.flatten().int(), 0, 0, 2**BITS - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model("resnet50", num_classes=1000)
    weights = [p for n, p in model.named_parameters() if p.ndim == 4 or n == "fc.weight"]
    base = _seconds(_torch_fused, weights, args.repeats)
    out = {"model": "resnet50", "weights_M": round(sum(w.numel() for w in weights) / 1e6, 2), "bits": BITS,
           "threads": args.threads, "torch_fused_s": round(base, 4)}
    for ste in ("identity", "clipped"):
        s = _seconds(lambda w: fake_quantize(w, *per_channel_range(w), BITS, ste), weights, args.repeats)
        out[f"{ste}_s"], out[f"{ste}_vs_torch_fused"] = round(s, 4), round(s / base, 2)
        print(f"{ste:8s} {s:.3f} s per forward + backward, {s / base:.2f}× torch's fused kernel ({base:.3f} s)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
