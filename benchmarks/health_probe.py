"""The health check's probe per teacher: what building it costs against a quick run, and how well each probe
recipe's score ranks Q models by their real accuracy, absolute and relative to the teacher's own 8-bit copy.

For each teacher and each probe recipe IMAGES:ITERS (pixel steps per half), the probe is built in a fresh cache and
timed; the quick preset's run time is measured in the same process on a real `zsq.quantize` job cut to a tenth (1
warm-up + 6 trained epochs of 10 iterations: the quick preset's shape at its batch, models and losses), times ten
(its evaluations on 500 test images, so the real run's 10,000-image evaluation is left out: the probe's share is
overstated, never understated). The population of Q models spans healthy to collapsed without training: every layer
at W8…W2 (WkAk), and W8 weights with Ak activations, ranges from Gaussian noise (as `zsq eval --wbits`) or from the
teacher's BN statistics (the quick preset's bn-prior, k 2.5); plus the finished runs under --runs whose teacher it
is. Each model gets its real test top-1 and its health on every probe; the reference is the teacher's own W8A8 copy
with ranges from the probe itself (`kl_ref`: what 8-bit rounding alone costs on that probe).
Usage: python benchmarks/health_probe.py --teacher resnet20_fmnist --probe 512:200 --probe 256:100 [--runs DIR]
       [--placement deployable]
Prints one JSON object as its last line (every model's signals: any score variant can be recomputed from it).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import zsq
from zsq.analysis import spearman
from zsq.quant import PLACEMENTS, calibrate, create_range_setter, gaussian_inputs, quantize_model
from zsq.synth import SourceContext, pixels
from zsq.validate import ProbeOptions, health, probe_set


def population(teacher: torch.nn.Module, shape: tuple[int, int, int], bits: list[int], placement: str):
    """(name, Q model) pairs, no training: uniform WkAk and W8Ak, Gaussian-noise or BN-prior ranges."""
    for k in bits:
        for w, a in ((k, k), (8, k)) if k != 8 else ((8, 8),):
            for ranges in ("gaussian", "bn-prior"):
                q = quantize_model(teacher, wbits=w, abits=a, placement=placement)
                calibrate(q, gaussian_inputs(4, 256, shape))
                if ranges == "bn-prior":
                    create_range_setter("bn-prior", {"bn_k": 2.5}).finish(q)
                yield f"W{w}A{a}-{ranges}", q


def trained(folder: str | Path | None, teacher: str):
    """The students of the finished runs of `teacher` under `folder`, with their run names."""
    for run in sorted(Path(folder).iterdir()) if folder else []:
        if (run / "result.json").is_file() and json.loads((run / "config.json").read_text())["teacher"] == teacher:
            yield run.name, zsq.load_model(str(run / "student.pt"))


def quick_seconds(teacher: str, probe: ProbeOptions, out: Path) -> float:
    """Wall time of the quick preset's run, from one a tenth as long (its probe is cached by then)."""
    t0 = time.perf_counter()
    zsq.quantize(teacher, 4, 4, iters_per_epoch=10, eval_limit=500, out=str(out), quiet=True,
                 probe_images=probe.probe_images, probe_iters=probe.probe_iters)
    return 10 * (time.perf_counter() - t0)


def study(teacher_name: str, recipes: list[ProbeOptions], bits: list[int], placement: str, given: str | None,
          limit: int | None, work: Path) -> dict:
    teacher = zsq.load_model(teacher_name)
    info = teacher.zsq_dataset
    shape = (info.in_channels, info.image_size, info.image_size)
    test = zsq.load_dataset(info.name, "test")
    ctx = SourceContext(teacher, info.num_classes, info.in_channels, info.image_size, "cpu", True)
    probes, cost = {}, {}
    for r in recipes:
        key = f"{r.probe_images}:{r.probe_iters}"
        t0 = time.perf_counter()
        probes[key] = probe_set(ctx, r)
        cost[key] = time.perf_counter() - t0
        print(f"{teacher_name}: probe {key} built in {cost[key]:.0f} s", flush=True)
    runs = work / Path(teacher_name).stem  # a name or a checkpoint's path
    quick = quick_seconds(teacher_name, recipes[0], runs / "quick-tenth-w4a4")
    refs = {}
    for key, probe in probes.items():
        ref = calibrate(quantize_model(teacher, wbits=8, abits=8, placement=placement), probe.split(256))
        refs[key] = health(teacher, ref, probe).kl
    fp = zsq.evaluate(teacher, test, limit=limit)["top1"]
    models = []
    students = [*trained(given, teacher_name), *trained(runs, teacher_name)]
    for name, q in [*population(teacher, shape, bits, placement), *students]:
        row = {"model": name, "top1": zsq.evaluate(q, test, limit=limit)["top1"]}
        for key, probe in probes.items():
            h = health(teacher, q, probe)
            row[key] = {"kl": h.kl, "agreement": h.agreement, "bn_drift": h.bn_drift}
        models.append(row)
        print(f"{name:28s} top1 {row['top1']:6.2f}  " + "  ".join(f"{k} KL {row[k]['kl']:.3f}" for k in probes),
              flush=True)
    tops = [m["top1"] for m in models]
    return {"teacher": teacher_name, "placement": placement, "fp_top1": fp, "quick_run_s": quick,
            "probes": {k: {"build_s": cost[k], "share_of_quick": cost[k] / quick, "kl_ref": refs[k],
                           "spearman_kl": spearman([-m[k]["kl"] for m in models], tops),
                           "spearman_agreement": spearman([m[k]["agreement"] for m in models], tops),
                           "spearman_bn_drift": spearman([-m[k]["bn_drift"] for m in models], tops)}
                       for k in probes},
            "models": models}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--teacher", action="append", required=True)
    p.add_argument("--probe", action="append", required=True, help="IMAGES:ITERS; the first also times the quick run")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 6, 5, 4, 3, 2])
    p.add_argument("--placement", default="lineage", choices=PLACEMENTS, help="of the population's Q models")
    p.add_argument("--runs", help="finished runs to add (those of each teacher are picked by their config.json)")
    p.add_argument("--limit", type=int, help="evaluate the population on the first N test images")
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args()
    recipes = [ProbeOptions(*map(int, r.split(":"))) for r in a.probe]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ZSQ_CACHE"] = tmp  # every probe is built here and timed, never read from a cache
        pixels.SHIPPED_CACHE = Path(tmp) / "shipped"  # nor from the probes shipped with the teachers
        out = {"benchmark": "health_probe", "threads": torch.get_num_threads(),
               "teachers": [study(t, recipes, a.bits, a.placement, a.runs, a.limit, Path(tmp)) for t in a.teacher]}
    text = json.dumps(out)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
