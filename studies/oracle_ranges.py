"""Are the activation ranges still what limits a trained W3A3 model? The same `zsq quantize` run with the ranges of
an oracle that a zero-shot user never has: at the end of the warm-up every range is set on real training images
(EMA of each batch's 99.9th percentile, the best range without training in benchmarks/act_ranges.py), then
frozen, with the clipped STE of the quick preset. A seed that falls short of FP − 4 with these ranges is not held
back by its range setter.

The oracle is a range-setter plug-in registered here, outside the library (it needs data). Same seed, same
generator images as the `zsq quantize` run with the library's setters: only the ranges differ.
Usage: python studies/oracle_ranges.py [--loss kd+ce] [--bits 3] [--seeds 3 4] [--out runs/oracle-ranges]
Prints one JSON object as its last line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from act_ranges import real_inputs  # noqa: E402 - the real-image sampler of benchmarks/act_ranges.py

from zsq.quant import act_quantizers, calibrate
from zsq.quant.ranges import RANGE_SETTERS, RangeSetter
from zsq.train import quantize_run, resolve_config

PERCENTILE = 99.9


@RANGE_SETTERS.register("oracle-real")
class RealDataRange(RangeSetter):
    """The warm-up observes as usual (its images still train the generator); its ranges are then replaced."""

    def finish(self, qmodel: nn.Module) -> None:
        device = next(qmodel.parameters()).device
        real = [x.to(device) for x in real_inputs(8, 64)]  # act_ranges.py's oracle batches
        for q in act_quantizers(qmodel):
            q.percentile = PERCENTILE
        calibrate(qmodel, real)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--loss", default="kd+ce", help="transfer loss (akt: with the quick preset's akt options)")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--seeds", nargs="+", type=int, default=[3, 4])
    ap.add_argument("--out", default="runs/oracle-ranges")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    extra = {"akt_base": "kd+ce"} if args.loss == "akt" else {}
    runs = {}
    for seed in args.seeds:
        out = Path(args.out) / f"gdfq-{args.loss}-oracle-real-w{args.bits}-s{seed}"
        cfg = resolve_config("quick", "gdfq", args.loss, teacher="resnet20_fmnist", wbits=args.bits,
                             abits=args.bits, act_range="oracle-real", seed=seed, device=args.device, out=str(out),
                             **extra)
        if not (out / "result.json").exists():  # rerunning the command resumes or skips
            quantize_run(cfg, resume=(out / "state.pt").exists(), quiet=True)
        runs[seed] = q_top1 = json.loads((out / "result.json").read_text())["q_top1"]
        print(f"seed {seed}: q_top1 {q_top1:.2f}", flush=True)
    print(json.dumps({"benchmark": "oracle_ranges", "loss": args.loss, "bits": args.bits, "ste": cfg.quant.ste,
                      "percentile": PERCENTILE, "q_top1": runs}))


if __name__ == "__main__":
    main()
