"""Does the data-free health score predict real accuracy? Recomputes `zsq health` for every finished run under the
given folders (or reads the score each run of a results store recorded at its end, on the probe given here) and
sets it against the run's real test accuracy.

    python benchmarks/health_study.py --runs /tmp/grid --runs /tmp/hgrid --out results/health/study.json
    python benchmarks/health_study.py --store results/fmnist-ptq --out results/health/study-ptq.json

Reports the Spearman rank correlation of the score (and of each signal) with test top-1, over all runs, within
each bit width and within each teacher; the runs more than 10 points below FP that were not flagged and those within 3 points that were;
and, for runs made with `--select health --eval-every 1`, the final Q model vs the health-selected one vs the
best test accuracy over the same checkpoints (an oracle: it looks at the test set). For each teacher, two
references it provides without data, on the same probe: its own W8A8 fake-quant copy (ranges set on the probe) and
the uniform prediction (KL(teacher ‖ uniform)), and the flags the threshold gives on the score taken relative to
each, beside the raw score's. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import math

import numpy as np
import torch

from zsq.analysis import spearman
from zsq.bench.report import read_store
from zsq.io import save_bytes, save_json
from zsq.models import dataset_info, load_model
from zsq.quant import calibrate, quantize_model
from zsq.synth import SourceContext
from zsq.validate import THRESHOLD, ProbeOptions, health, probe_set, run_health


def selection(run: Path, result: dict) -> dict | None:
    """Final vs health-selected vs best-on-test accuracy, from a run made with --select health --eval-every 1."""
    if result.get("select") != "health":
        return None
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    checked = {r["iter"] for r in rows if "health" in r}
    tested = {r["iter"]: r["eval_q_top1"] for r in rows if "eval_q_top1" in r and r["iter"] in checked}
    final = result.get("final_q_top1", result["q_top1"])
    return {"final": final, "health": result["q_top1"], "oracle": max([final, *tested.values()]),
            "selected_iter": result["selected_iter"], "checkpoints": len(checked) + 1}


def study(folders: list[Path], opts: ProbeOptions) -> list[dict]:
    rows = []
    for run in sorted(p for folder in folders for p in folder.iterdir() if (p / "result.json").is_file()):
        result = json.loads((run / "result.json").read_text())
        h, _ = run_health(run, device="cpu", opts=opts, quiet=True)
        teacher = json.loads((run / "config.json").read_text())["teacher"]
        rows.append({"run": run.name, "teacher": teacher, "q_top1": result["q_top1"], "fp_top1": result["fp_top1"],
                     "wbits": result["wbits"], **h.summary(), "selection": selection(run, result)})
        print(f"{result['q_top1']:6.2f}  score {h.score:5.1f}{' FLAGGED' if h.flagged else '        '}  {run.name}",
              flush=True)
    return rows


def stored(folder: Path, opts: ProbeOptions) -> list[dict]:
    """The health each run of a results store recorded at its end, where it was checked on the probe `opts`."""
    runs, _ = read_store(folder)
    return [{"run": r["name"], "teacher": r["config"]["teacher"], "q_top1": r["result"]["q_top1"],
             "fp_top1": r["result"]["fp_top1"],
             "wbits": r["config"]["wbits"], **r["result"]["health"], "selection": None} for r in runs
            if r["result"].get("health") and (r["config"].get("probe_images"), r["config"].get("probe_iters"))
            == (opts.probe_images, opts.probe_iters)]


@torch.no_grad()
def references(teacher_name: str, opts: ProbeOptions) -> dict:
    """What the teacher itself says about its probe: the KL of its own W8A8 copy (activation ranges set on the
    probe: the floor a near-lossless Q model reaches) and of the uniform prediction (where a collapsed one goes)."""
    t = load_model(teacher_name).eval()
    info = dataset_info(t)
    probe = probe_set(SourceContext(t, info.num_classes, info.in_channels, info.image_size, "cpu", True), opts)
    q8 = calibrate(quantize_model(t, 8, 8), probe.split(64))
    logp = torch.cat([torch.log_softmax(t(x), 1) for x in probe.split(256)])
    uniform = (logp.exp() * (logp + math.log(logp.shape[1]))).sum(1).mean().item()
    return {"kl_w8a8": health(t, q8, probe).kl, "kl_uniform": uniform}


def summarise(rows: list[dict]) -> dict:
    acc = [r["q_top1"] for r in rows]
    gap = [r["q_top1"] - r["fp_top1"] for r in rows]  # comparable across teachers
    out: dict = {"runs": len(rows), "spearman_score": spearman([r["score"] for r in rows], acc),
                 "spearman_score_fp_gap": spearman([r["score"] for r in rows], gap),
                 "spearman_agreement": spearman([r["agreement"] for r in rows], acc),
                 "spearman_neg_bn_drift": spearman([-r["bn_drift"] for r in rows], acc)}
    for bits in sorted({r["wbits"] for r in rows}):
        sub = [r for r in rows if r["wbits"] == bits]
        out[f"spearman_score_w{bits}"] = spearman([r["score"] for r in sub], [r["q_top1"] for r in sub])
        out[f"runs_w{bits}"] = len(sub)
    low = [r for r in rows if r["q_top1"] < r["fp_top1"] - 10]
    near = [r for r in rows if r["q_top1"] >= r["fp_top1"] - 3]
    middle = [r for r in rows if r not in low and r not in near]
    out.update(below_fp_10=len(low), below_fp_10_unflagged=[r["run"] for r in low if not r["flagged"]],
               within_fp_3=len(near), within_fp_3_flagged=[r["run"] for r in near if r["flagged"]],
               between_flagged=f"{sum(r['flagged'] for r in middle)}/{len(middle)}")
    if all("kl_over_uniform" in r for r in rows):
        out.update(spearman_neg_kl_over_uniform_fp_gap=spearman([-r["kl_over_uniform"] for r in rows], gap),
                   flagged=[r["run"] for r in rows if r["flagged"]],
                   flagged_over_w8a8=[r["run"] for r in rows if r["score_over_w8a8"] < THRESHOLD])
    chosen = [r["selection"] for r in rows if r["selection"]]
    if chosen:
        out["selection_runs"] = len(chosen)
        for key in ("final", "health", "oracle"):
            out[f"selection_mean_{key}"] = float(np.mean([c[key] for c in chosen]))
    return out


BANDS = ["collapsed (< 20 %)", "more than 10 below FP", "3–10 below FP", "within 3 of FP"]


def band(r: dict) -> str:
    gap = r["fp_top1"] - r["q_top1"]
    return BANDS[0] if r["q_top1"] < 20 else BANDS[1] if gap > 10 else BANDS[2] if gap > 3 else BANDS[3]


def markdown(rows: list[dict]) -> str:
    """The bands table (flagged runs and score range per accuracy band), then every run, lowest accuracy first."""
    lines = ["| real top-1 band | runs | flagged | health score min–max | probe KL min–max |", "|---|---|---|---|---|"]
    for label in BANDS:
        inside = [r for r in rows if band(r) == label]
        if inside:
            lines.append(f"| {label} | {len(inside)} | {sum(r['flagged'] for r in inside)} | "
                         f"{min(r['score'] for r in inside):.1f}–{max(r['score'] for r in inside):.1f} | "
                         f"{min(r['kl'] for r in inside):.3f}–{max(r['kl'] for r in inside):.3f} |")
    lines += ["", "| run | bits | real top-1 | health score | flagged | probe KL | agreement % | BN drift |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["q_top1"]):
        lines.append(f"| {r['run']} | W{r['wbits']} | {r['q_top1']:.2f} | {r['score']:.1f} | "
                     f"{'yes' if r['flagged'] else ''} | {r['kl']:.3f} | {r['agreement']:.1f} | {r['bn_drift']:.3g} |")
    chosen = [r for r in rows if r["selection"]]
    if chosen:
        lines += ["", "| run | final Q model | `--select health` (iteration) | best on test (oracle) |", "|---|---|---|---|"]
        for r in chosen:
            c = r["selection"]
            lines.append(f"| {r['run']} | {c['final']:.2f} | {c['health']:.2f} ({c['selected_iter']}) | "
                         f"{c['oracle']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", action="append", default=[], type=Path, help="a folder of run directories")
    p.add_argument("--store", action="append", default=[], type=Path,
                   help="a zsq bench output folder: its runs' recorded health (those checked on the probe given)")
    p.add_argument("--out", type=Path, help="write every run's signals and the summary here (JSON)")
    p.add_argument("--table", type=Path, help="write the bands and the per-run table here (markdown)")
    p.add_argument("--references", action="store_true",
                   help="also each teacher's own references (its W8A8 copy, the uniform prediction) on the probe")
    p.add_argument("--probe-images", type=int, default=ProbeOptions.probe_images)
    p.add_argument("--probe-iters", type=int, default=ProbeOptions.probe_iters)
    args = p.parse_args()
    opts = ProbeOptions(args.probe_images, args.probe_iters)
    if not args.runs and not args.store:
        p.error("give --runs or --store")
    rows = study(args.runs, opts) + [r for folder in args.store for r in stored(folder, opts)]
    teachers = sorted({r["teacher"] for r in rows})
    refs = {name: references(name, opts) for name in teachers} if args.references else {}
    for r in rows:
        if refs:  # the score over the W8A8 copy's KL, and the KL as a fraction of the uniform prediction's
            ref = refs[r["teacher"]]
            r.update(score_over_w8a8=100 * math.exp(-(r["kl"] - ref["kl_w8a8"])),
                     kl_over_uniform=r["kl"] / ref["kl_uniform"])
    summary = summarise(rows)
    if len(teachers) > 1:
        summary["by_teacher"] = {name: {**summarise([r for r in rows if r["teacher"] == name]),
                                        **({"reference": refs[name]} if refs else {})} for name in teachers}
    elif refs:
        summary["reference"] = refs[teachers[0]]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_json({"summary": summary, "runs": rows}, args.out)
    if args.table:
        save_bytes(markdown(rows).encode(), args.table)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
