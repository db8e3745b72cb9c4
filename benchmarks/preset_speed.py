"""Trained iterations per second of `zsq quantize` for each preset and method, on the device given.

Each (preset, data source, loss) runs a real job cut to 1 warm-up + 1 trained epoch of --iters iterations (the
preset's batch size, models and losses unchanged; an offline set is built small, its size does not change the
step); the speed is read from the wall time metrics.jsonl records after each logging sync, over the trained
epoch only, first logging interval excluded (start-up, cuDNN autotuning). The ratio column is against gdfq+gdfq
of the same preset, measured in the same run.
Usage: python benchmarks/preset_speed.py [--device cuda] [--iters 60] [--presets quick paper]
Prints one JSON object as its last line.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from zsq.train import quantize_run, resolve_config

PAIRS = (("gdfq", "kd+ce", {}), ("adadfq", "gap-entropy", {}), ("hast", "hast", {}),
         ("adadfq", "akt", {"akt_base": "gap-entropy"}), ("hast", "synq", {}))


def iterations_per_second(metrics: Path, warmup_iters: int) -> float:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    timed = [(r["iter"], r["wall_s"]) for r in rows if "wall_s" in r and r["iter"] >= warmup_iters]
    if len(timed) < 2:
        raise SystemExit("--iters must be at least 20 (two logging intervals of 10 in the trained epoch)")
    (i0, t0), (i1, t1) = timed[0], timed[-1]  # from the end of the first trained logging interval
    return (i1 - i0) / (t1 - t0)


def measure(preset: str, source: str, loss: str, options: dict, iters: int, device: str, teacher: str,
            folder: Path) -> dict:
    cfg = resolve_config(preset, source, loss, teacher=teacher, epochs=2, warmup_epochs=1, milestones=[],
                         iters_per_epoch=iters, log_every=10, eval_limit=500, device=device, seed=0,
                         out=str(folder / f"{preset}-{source}-{loss}"),
                         **options, **({"synth_images": 256, "synth_iters": 20} if source == "hast" else {}))
    result = quantize_run(cfg, quiet=True)
    return {"batch_size": cfg.optim.batch_size, "it_per_s": round(iterations_per_second(result.run_dir / "metrics.jsonl",
                                                                                  iters), 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--presets", nargs="+", default=["quick", "paper"])
    ap.add_argument("--teacher", default="resnet20_fmnist")
    args = ap.parse_args()
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            figures[preset] = {}
            for source, loss, options in PAIRS:
                r = measure(preset, source, loss, options, args.iters, args.device, args.teacher, Path(tmp))
                figures[preset][f"{source}/{loss}"] = r
            base = figures[preset]["gdfq+gdfq"]["it_per_s"]
            for name, r in figures[preset].items():
                r["ratio_to_gdfq"] = round(r["it_per_s"] / base, 3)
                print(f"{preset:6s} {name:16s} batch {r['batch_size']:4d}: {r['it_per_s']:8.2f} it/s "
                      f"({r['ratio_to_gdfq']:.2f}× gdfq+gdfq)", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    print(json.dumps({"benchmark": "preset_speed", "device": device, "threads": torch.get_num_threads(),
                      "iters": args.iters, "figures": figures}))


if __name__ == "__main__":
    main()
