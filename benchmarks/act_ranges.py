"""Activation ranges without training: how each range setter's frozen ranges compare with the ranges real data
gives, and what top-1 the fake-quantized teacher keeps with them (weights quantized, no training at all).

The oracle rows calibrate on real training images (never available to a zero-shot user); `noise` is the
Gaussian-noise calibration `zsq eval` uses; the BN rows need no input at all (`bn-clamp` clamps the noise ranges;
`moments`: `--bn-propagate moments`, the residual sums' ranges from propagated means and variances).
`--runs DIR ...` also compares the ranges that trained runs ended with (`act_ranges` in each run's result.json,
at that run's activation bits) with the real-data ones, and gives the top-1 of the untrained teacher with those
ranges at the run's bits (for a setter that freezes its ranges: what they were worth before any weight trained).
Usage: python benchmarks/act_ranges.py [--bits 2 3 4] [--k 2 3 4 5] [--eval-images 2000] [--runs DIR ...]
Prints one JSON object as its last line.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from zsq import evaluate, load_dataset, load_model
from zsq.data import batches, normalize
from zsq.quant import act_quantizers, calibrate, gaussian_inputs, quantize_model
from zsq.quant.ranges import create_range_setter


def real_inputs(n_batches: int, batch_size: int) -> list[torch.Tensor]:
    train = load_dataset("fashion-mnist", "train")
    it = batches(train, batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    return [normalize(next(it)[0], train.info) for _ in range(n_batches)]


def calibrated(teacher, bits: int, inputs: list[torch.Tensor], setter: str, **opts) -> torch.nn.Module:
    q = quantize_model(teacher, bits, bits)
    rs = create_range_setter(setter, opts)
    rs.prepare(q)
    calibrate(q, inputs)
    rs.finish(q)
    return q


def ratio_summary(his: list[float], ref: list[float]) -> dict[str, float]:
    ratio = [h / r for h, r in zip(his, ref, strict=True)]
    return {"hi_over_real_median": round(statistics.median(ratio), 3), "hi_over_real_min": round(min(ratio), 3),
            "hi_over_real_max": round(max(ratio), 3)}


def real_his(teacher, bits: int, real: list[torch.Tensor], cache: dict[int, list[float]]) -> list[float]:
    """The oracle's ranges (min/max of real training images) at `bits`, calibrated once per bit width."""
    if bits not in cache:
        cache[bits] = [q.hi.item() for q in act_quantizers(calibrated(teacher, bits, real, "ema-minmax"))]
    return cache[bits]


def with_ranges(teacher, wbits: int, abits: int, ranges: list[list[float]]) -> torch.nn.Module:
    """The teacher fake-quantized, its activation ranges set to `ranges` ([lo, hi] per quantizer, in order)."""
    q = quantize_model(teacher, wbits, abits)
    quantizers = act_quantizers(q)
    if len(quantizers) != len(ranges):
        raise SystemExit(f"the run has {len(ranges)} activation ranges, the teacher {len(quantizers)} quantizers")
    for a, (lo, hi) in zip(quantizers, ranges, strict=True):
        a.lo.fill_(lo)
        a.hi.fill_(hi)
        a.calibrated = True
    return q


def run_ranges(teacher, test, real: list[torch.Tensor], run_dirs: list[str], cache: dict[int, list[float]],
               eval_images: int) -> dict[str, dict[str, float]]:
    """Trained runs' final ranges against real-data min/max at each run's activation bits, and the untrained
    teacher's top-1 with them."""
    out = {}
    for d in run_dirs:
        result = json.loads((Path(d) / "result.json").read_text())
        ref = real_his(teacher, result["abits"], real, cache)
        q = with_ranges(teacher, result["wbits"], result["abits"], result["act_ranges"])
        row = out[Path(d).name] = {"untrained_top1": evaluate(q, test, limit=eval_images)["top1"],
                                   **ratio_summary([hi for _, hi in result["act_ranges"]], ref)}
        print(f"{Path(d).name}: untrained top1 {row['untrained_top1']:.2f}, hi / real hi median "
              f"{row['hi_over_real_median']:.2f} ({row['hi_over_real_min']:.2f}-{row['hi_over_real_max']:.2f})",
              flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", nargs="*", type=int, default=[2, 3, 4], help="none: only --runs")
    ap.add_argument("--k", nargs="+", type=float, default=[2, 3, 4, 5])
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--teacher", default="resnet20_fmnist")
    ap.add_argument("--runs", nargs="*", default=[], help="run folders whose final ranges to compare")
    args = ap.parse_args()
    teacher = load_model(args.teacher)
    test = load_dataset("fashion-mnist", "test")
    real, noise = real_inputs(8, 64), list(gaussian_inputs(8, 64, (1, 32, 32)))
    rows, refs = {}, {}
    for bits in args.bits:
        ref = real_his(teacher, bits, real, refs)
        cases = {"real ema-minmax (oracle)": (real, "ema-minmax", {}),
                 "real percentile 99.9 (oracle)": (real, "percentile", {}),
                 "noise ema-minmax": (noise, "ema-minmax", {}), "noise percentile 99.9": (noise, "percentile", {}),
                 **{f"bn-prior k={k:g}": (noise, "bn-prior", {"bn_k": k}) for k in args.k},
                 **{f"bn-prior moments k={k:g}": (noise, "bn-prior", {"bn_k": k, "bn_propagate": "moments"})
                    for k in args.k},
                 **{f"noise bn-clamp k={k:g}": (noise, "bn-clamp", {"bn_k": k}) for k in args.k}}
        for name, (inputs, setter, opts) in cases.items():
            q = calibrated(teacher, bits, inputs, setter, **opts)
            row = rows[f"W{bits}A{bits} {name}"] = {"top1": evaluate(q, test, limit=args.eval_images)["top1"],
                                                    **ratio_summary([q_.hi.item() for q_ in act_quantizers(q)], ref)}
            print(f"W{bits}A{bits} {name:32s} top1 {row['top1']:6.2f}  hi / real hi: median "
                  f"{row['hi_over_real_median']:.2f}, max {row['hi_over_real_max']:.2f}", flush=True)
    print(json.dumps({"benchmark": "act_ranges", "teacher": args.teacher, "eval_images": args.eval_images,
                      "rows": rows, "runs": run_ranges(teacher, test, real, args.runs, refs, args.eval_images)}))


if __name__ == "__main__":
    main()
