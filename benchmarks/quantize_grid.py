"""Run a grid of `zsq quantize` jobs (rows × bits × seeds) and summarise final accuracy as mean ± std.

Each job is the plain CLI command (printed, so every README number has its command); finished runs are read
back, killed ones are resumed with --resume. Rows are GENERATOR:METHOD[:extra flags], e.g.
    python benchmarks/quantize_grid.py --rows adadfq:adadfq gdfq:gdfq --bits 4 3 --seeds 0 1 2
    python benchmarks/quantize_grid.py --rows "gdfq:akt:--akt-base gdfq" --bits 3 --seeds 0
Prints a markdown table (with the Q model's gradient norm over the trained iterations, from metrics.jsonl, so
that losses can be compared for stability), then one JSON object as its last line.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
from pathlib import Path


def run_name(row: str, bits: int, seed: int) -> str:
    generator, method, *extra = row.split(":", 2)
    tag = "".join(c if c.isalnum() else "-" for c in " ".join(extra)).strip("-")
    return f"{generator}-{method}{'-' + tag if tag else ''}-w{bits}-s{seed}"


def command(row: str, bits: int, seed: int, out: Path, preset: str, teacher: str) -> list[str]:
    generator, method, *extra = row.split(":", 2)
    return ["zsq", "quantize", "--teacher", teacher, "--wbits", str(bits), "--abits", str(bits), "--generator",
            generator, "--method", method, *shlex.split(extra[0] if extra else ""), "--preset", preset, "--seed",
            str(seed), "--out", str(out)]


def run(cmd: list[str], out: Path, quiet: bool) -> dict:
    if not (out / "result.json").exists():
        resume = ["--resume"] if (out / "state.pt").exists() else []
        print("$", shlex.join(cmd + resume), flush=True)
        subprocess.run([sys.executable, "-m", "zsq", *cmd[1:], *resume, *(["--quiet"] if quiet else [])],
                       check=True)
    return json.loads((out / "result.json").read_text())


def grad_norms(out: Path) -> tuple[float, float]:
    """Median and maximum of the Q model's finite gradient norms over the run's trained iterations."""
    rows = (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip())
    norms = [r["grad_norm"] for r in rows if "grad_norm" in r and math.isfinite(r["grad_norm"])]
    return statistics.median(norms), max(norms)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="+", required=True, help="GENERATOR:METHOD[:extra flags]")
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 3])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--teacher", default="resnet20_fmnist")
    ap.add_argument("--runs", default="runs/grid", help="folder of the run directories")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    summary = []
    for bits in args.bits:
        for row in args.rows:
            results, norms = [], []
            for seed in args.seeds:
                out = Path(args.runs) / run_name(row, bits, seed)
                results.append(run(command(row, bits, seed, out, args.preset, args.teacher), out, args.quiet))
                norms.append(grad_norms(out))
            accs = [r["q_top1"] for r in results]
            summary.append({"bits": bits, "row": row, "seeds": args.seeds, "q_top1": accs,
                            "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                            "fp_top1": results[0]["fp_top1"], "wall_min": [round(r["wall_s"] / 60, 1) for r in results],
                            "grad_norm_median": statistics.mean(n[0] for n in norms),
                            "grad_norm_max": max(n[1] for n in norms),
                            "command": shlex.join(command(row, bits, 0, Path(args.runs) / run_name(row, bits, 0),
                                                          args.preset, args.teacher)).replace("--seed 0", "--seed S")})
    print("| bits | source:method | q_top1 mean ± std | per seed | FP − mean | grad norm median / max | loop wall (min) |")
    print("|---|---|---|---|---|---|---|")
    for s in summary:
        print(f"| W{s['bits']}A{s['bits']} | {s['row']} | {s['mean']:.2f} ± {s['std']:.2f} | "
              f"{' / '.join(f'{a:.2f}' for a in s['q_top1'])} | {s['fp_top1'] - s['mean']:.2f} | "
              f"{s['grad_norm_median']:.3g} / {s['grad_norm_max']:.3g} | "
              f"{' / '.join(str(w) for w in s['wall_min'])} |")
    print(json.dumps({"preset": args.preset, "teacher": args.teacher, "rows": summary}))


if __name__ == "__main__":
    main()
