"""Run a grid of `zsq quantize` jobs (rows × bits × seeds) and summarise final accuracy as mean ± std.

Each job is the plain CLI command (printed, so every README number has its command); finished runs are read
back, killed ones are resumed with --resume. Rows are GENERATOR:METHOD[:extra flags], e.g.
    python benchmarks/quantize_grid.py --rows adadfq:adadfq gdfq:gdfq --bits 4 3 --seeds 0 1 2
    python benchmarks/quantize_grid.py --rows "gdfq:akt:--akt-base gdfq" --bits 3 --seeds 0
Prints a markdown table, then one JSON object as its last line.
"""
from __future__ import annotations

import argparse
import json
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
            results = []
            for seed in args.seeds:
                out = Path(args.runs) / run_name(row, bits, seed)
                results.append(run(command(row, bits, seed, out, args.preset, args.teacher), out, args.quiet))
            accs = [r["q_top1"] for r in results]
            summary.append({"bits": bits, "row": row, "seeds": args.seeds, "q_top1": accs,
                            "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                            "fp_top1": results[0]["fp_top1"], "wall_min": [round(r["wall_s"] / 60, 1) for r in results],
                            "command": shlex.join(command(row, bits, 0, Path(args.runs) / run_name(row, bits, 0),
                                                          args.preset, args.teacher)).replace("--seed 0", "--seed S")})
    print("| bits | source:method | q_top1 mean ± std | per seed | FP − mean | loop wall (min) |")
    print("|---|---|---|---|---|---|")
    for s in summary:
        print(f"| W{s['bits']}A{s['bits']} | {s['row']} | {s['mean']:.2f} ± {s['std']:.2f} | "
              f"{' / '.join(f'{a:.2f}' for a in s['q_top1'])} | {s['fp_top1'] - s['mean']:.2f} | "
              f"{' / '.join(str(w) for w in s['wall_min'])} |")
    print(json.dumps({"preset": args.preset, "teacher": args.teacher, "rows": summary}))


if __name__ == "__main__":
    main()
