"""How far trained ranges moved: each run's final activation ranges (`act_ranges` in result.json) against a
reference, quantizer by quantizer, as hi / hi_ref − 1. Made for the `learned` setter: its reference is the
`bn-prior` run with the same prior (same bn-k and bn-propagate), whose ranges are that prior, frozen. A reference
`bn-prior:K:PROPAGATE` is the BN prior itself, computed from the run's teacher at its activation bits (e.g. how far
an oracle's ranges lie from it).
Usage: python studies/range_shift.py RUN:REFERENCE [RUN:REFERENCE ...]   (run folders, seed by seed)
Prints one JSON object as its last line.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from zsq.models import load_model
from zsq.quant import act_quantizers, bn_bounds, quantize_model


def his(run: str) -> list[float]:
    return [hi for _, hi in json.loads((Path(run) / "result.json").read_text())["act_ranges"]]


def prior_his(run: str, k: float, propagate: str) -> list[float]:
    """The BN prior's hi for each quantizer of the run's Q model (0 where it derives no bound)."""
    config = json.loads((Path(run) / "config.json").read_text())
    q = quantize_model(load_model(config["teacher"], checkpoint=config.get("checkpoint")), config["wbits"],
                       config["abits"])
    bounds = bn_bounds(q, k, propagate)
    return [max(bounds.get(a, 0.0), 0.0) for a in act_quantizers(q)]


def shift(run: str, reference: str) -> list[float]:
    if reference.startswith("bn-prior:"):
        _, k, propagate = reference.split(":")
        pairs = [(x, y) for x, y in zip(his(run), prior_his(run, float(k), propagate), strict=True) if y > 0]
        return [x / y - 1 for x, y in pairs]
    a, b = his(run), his(reference)
    if len(a) != len(b):
        raise SystemExit(f"{run} and {reference} have different quantizers ({len(a)} against {len(b)})")
    return [x / y - 1 for x, y in zip(a, b, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("pairs", nargs="+", help="RUN:REFERENCE, two run folders")
    args = ap.parse_args()
    every = []
    for pair in args.pairs:
        run, _, reference = pair.partition(":")  # run folders hold no colon
        s = shift(run, reference)
        every += s
        print(f"{Path(run).name}: {100 * min(s):+.2f} % .. {100 * max(s):+.2f} % (median "
              f"{100 * statistics.median(s):+.2f} %)", flush=True)
    print(json.dumps({"benchmark": "range_shift", "runs": len(args.pairs), "quantizers": len(every),
                      "min_pct": round(100 * min(every), 3), "median_pct": round(100 * statistics.median(every), 3),
                      "max_pct": round(100 * max(every), 3)}))


if __name__ == "__main__":
    main()
