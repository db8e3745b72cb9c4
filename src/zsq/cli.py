"""The `zsq` command line. Parsing and printing only: every command calls the library.

A `UserError` (bad input the user can fix) prints one line and exits with code 2.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
from dataclasses import fields
from typing import Callable, Sequence

from . import __version__
from .bench import load_grid
from .bench.report import write_report
from .bench.runner import run_grid
from .data import list_datasets
from .errors import UserError
from .device import resolve_device
from .dist import session
from .evaluate import eval_set_for, run_eval
from .export import format_report
from .export.run import FORMATS, export_run
from .flags import (QUANTIZE_HELP, Parser, add_model_def, add_ptq, add_quantize, bits_type, int_list, positive_int,
                    ptq_config_from, quantize_config_from, run_config_of)
from .io import save_json
from .models import dataset_info, list_models, load_model, shipped_models
from .posttrain import ptq_run
from .presets import PRESETS, preset_values
from .quant import PLACEMENTS
from .synth import SOURCES
from .synth.pixels import BUILDERS, build_set
from .teacher import TeacherConfig, train_teacher
from .train import quantize_run
from .validate import Health, ProbeOptions, run_health


def _model_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. width_mult=0.5), got '{text}'")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value



def _cmd_teacher_train(args: argparse.Namespace) -> int:
    args.model_args = dict(args.model_args or [])
    names = {f.name for f in fields(TeacherConfig)}
    cfg = TeacherConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    metrics = train_teacher(cfg)
    print(f"saved {cfg.out}: top1 {metrics['top1']:.2f}  top5 {metrics['top5']:.2f}  "
          f"({metrics['wall_seconds'] / 60:.1f} min)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    result = run_eval(model=args.model, checkpoint=args.checkpoint, model_def=args.model_def, dataset=args.dataset,
                      data_dir=args.data_dir,
                      wbits=args.wbits, abits=args.abits, first_last=args.first_last, batch_size=args.batch_size,
                      limit=args.eval_limit, device=args.device, calib_batches=args.calib_batches, seed=args.seed,
                      placement=args.placement)
    q = result["quant"]
    label = "FP" if q is None else f"W{q['wbits']}A{q['abits']} fake-quant, {q['calibration']}"
    print(f"{result['model']} on {result['dataset']} ({result['n']} images, {label}): "
          f"top1 {result['top1']:.2f}  top5 {result['top5']:.2f}")
    if args.json:
        save_json(result, args.json)
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    cfg = quantize_config_from(args)
    result = quantize_run(cfg, resume=args.resume, quiet=args.quiet, restart=args.restart)
    s = result.summary
    if result.rank == 0:
        print(f"{cfg.run.out}: W{s['wbits']}A{s['abits']} source {s['source']}, loss {s['loss']} ({s['preset']}): "
              f"q_top1 {s['q_top1']:.2f} (FP {s['fp_top1']:.2f}) in {s['wall_s'] / 60:.1f} min")
        h = Health(**s["health"])
        print(("warning: " if h.flagged else "") + h.line(), file=sys.stderr if h.flagged else sys.stdout)
    return 0


def _cmd_ptq(args: argparse.Namespace) -> int:
    cfg = ptq_config_from(args)
    result = ptq_run(cfg, resume=args.resume, restart=args.restart, quiet=args.quiet)
    s = result.summary
    print(f"{cfg.out}: W{s['wbits']}A{s['abits']} ptq on {s['source']} ({s['preset']}): q_top1 {s['q_top1']:.2f} "
          f"(FP {s['fp_top1']:.2f}) in {s['wall_s'] / 60:.1f} min")
    h = Health(**s["health"])
    print(("warning: " if h.flagged else "") + h.line(), file=sys.stderr if h.flagged else sys.stdout)
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    h, where = run_health(args.run, args.teacher, args.checkpoint, args.qmodel, resolve_device(args.device),
                          ProbeOptions(args.probe_images, args.probe_iters), args.quiet, model_def=args.model_def)
    print(f"{args.run or where['qmodel']}: {h.line()}")
    if args.json:
        save_json({**where, **h.summary()}, args.json)
    return 1 if h.flagged else 0


def _add_health(sub) -> None:
    h = sub.add_parser("health", help="data-free health check of a quantized model against its teacher "
                                      "(exit 1 when flagged)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    h.add_argument("run", nargs="?", help="a finished run directory (its config.json names the teacher)")
    h.add_argument("--teacher", help="teacher (shipped name or checkpoint), instead of the run's")
    h.add_argument("--checkpoint", help="weights for an architecture given by --teacher")
    h.add_argument("--qmodel", help="a quantized model checkpoint (student.pt), instead of the run's")
    add_model_def(h, "of the teacher and the Q model (default: the one the run recorded)")
    h.add_argument("--probe-images", type=positive_int, default=ProbeOptions.probe_images)
    h.add_argument("--probe-iters", type=positive_int, default=ProbeOptions.probe_iters)
    h.add_argument("--device", default="auto")
    h.add_argument("--json", help="write the signals as JSON here")
    h.add_argument("--quiet", action="store_true", help="no progress bar while the probe set is built")
    h.set_defaults(func=_cmd_health)


SYNTH_FLAGS = {"images": "synth_images", "batch_size": "synth_batch", "iters": "synth_iters", "lr": "synth_lr",
               "patience": "synth_patience", "hard_weight": "hard_weight", "hard_gamma": "hard_gamma",
               "seed": "synth_seed", "latent_dim": "latent_dim", "latent_lr": "latent_lr",
               "generator_lr": "generator_lr", "generator_decay_every": "generator_decay_every", "swing": "swing"}


def _cmd_synth(args: argparse.Namespace) -> int:
    own = {f.name for f in fields(SOURCES.options_class(args.source))}
    for flag, name in SYNTH_FLAGS.items():
        if getattr(args, flag) is not None and name not in own:
            raise UserError(f"--{flag.replace('_', '-')} does not apply to --source {args.source}")
    teacher = load_model(args.teacher, checkpoint=args.checkpoint)
    recorded = dataset_info(teacher)
    info = (recorded if recorded is not None and args.dataset in (None, recorded.name)
            else eval_set_for(teacher, args.dataset, args.data_dir).info)
    options = {**preset_values(args.preset, args.source, "kd"),
               **{field: getattr(args, flag) for flag, field in SYNTH_FLAGS.items() if getattr(args, flag) is not None}}
    with session(resolve_device(args.device)) as (d, device):
        out = build_set(teacher, args.source, args.out, info.num_classes, (info.in_channels, info.image_size,
                        info.image_size), device, options, args.quiet, d)
    if d.main:
        print(f"{args.out}: {out['images']} {args.source} images, final synthesis loss {out['final_loss'][-1]:.4g}")
    return 0


def _add_synth(sub) -> None:
    s = sub.add_parser("synth", help="optimise an offline synthetic set (HAST, ZeroQ, Genie) for a teacher and save it",
                       description="Writes images, labels, the recipe and a hash of the teacher's weights; "
                                   "`zsq quantize --source hast --synth-data FILE` trains on it.")
    s.add_argument("--teacher", default="resnet20_fmnist", help="shipped teacher, architecture or checkpoint path")
    s.add_argument("--checkpoint", help="weights for an architecture name")
    s.add_argument("--source", default="hast", choices=sorted(BUILDERS))
    s.add_argument("--preset", default="quick", choices=list(PRESETS),
                   help="synthesis budget (paper: hast/zeroq 5,120 × 1,000, genie 1,024 × 4,000)")
    s.add_argument("--dataset", choices=list_datasets(), help="input geometry, when the checkpoint did not record it")
    s.add_argument("--data-dir")
    s.add_argument("--images", type=positive_int, help="number of images (default: preset)")
    s.add_argument("--batch-size", type=positive_int, help="images optimised together (default 256; genie 128)")
    s.add_argument("--iters", type=positive_int, help="Adam steps per batch (default: preset)")
    s.add_argument("--lr", type=float, help="hast/zeroq: Adam learning rate on the pixels (default 0.5)")
    s.add_argument("--patience", type=positive_int, help="plateau steps before the LR drops (default 50; genie 100)")
    s.add_argument("--hard-weight", type=float, help="hast/zeroq: β of the hardness-weighted CE (hast 10, zeroq 0)")
    s.add_argument("--hard-gamma", type=float, help="hast/zeroq: γ of the hardness weight (default 2)")
    s.add_argument("--latent-dim", type=positive_int, help="genie: size of each image's latent (default 256)")
    s.add_argument("--latent-lr", type=float, help="genie: Adam learning rate on the latents (default 0.1)")
    s.add_argument("--generator-lr", type=float, help="genie: Adam learning rate on the generator (default 0.01)")
    s.add_argument("--generator-decay-every", type=positive_int,
                   help="genie: steps between the generator LR's ×0.95 decays (default 100)")
    s.add_argument("--swing", type=int, help="genie: random shift before strided convs, pixels (default 1; 0: off)")
    s.add_argument("--seed", type=int)
    s.add_argument("--device", default="auto")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--out", required=True, help="file to write (.pt)")
    s.set_defaults(func=_cmd_synth)


def _cmd_export(args: argparse.Namespace) -> int:
    result = export_run(args.run, args.format, args.out, args.report, args.model_def)
    print(format_report(result))
    if args.format == "packed":
        print(f"{result['out']}: round trip max |Δlogit| {result['roundtrip_max_abs_logit_diff']:.2e} on 64 inputs")
    else:
        first = result["ort_first_differing_quantizer"]
        print(f"{result['out']}: onnxruntime vs PyTorch on 64 images: max |Δlogit| "
              f"{result['ort_max_abs_logit_diff_rel']:.2e} of the logit range, top-1 agreement "
              f"{100 * result['ort_top1_agreement']:.1f} %, activation codes differing: "
              f"{result['ort_codes_differing']} of {result['ort_codes']}"
              + (f" (from quantizer {first} on: float-order differences at rounding ties, then their spread)"
                 if first is not None else ""))
    return 0


def _add_export(sub) -> None:
    x = sub.add_parser("export", help="write a trained Q model as real low-bit integers, with a size report",
                       description="packed: every quantized weight as k-bit codes packed at k bits, with per-channel "
                                   "scales and zero points (zsq.export.load_packed rebuilds the model). onnx: a QDQ "
                                   "graph (integer weights, Q/DQ activation ranges, BN folded, input in [0, 1]), "
                                   "checked with onnxruntime; needs pip install 'zsq[export]'.")
    x.add_argument("run", help="a run directory of zsq quantize, or its student.pt")
    x.add_argument("--format", default="onnx", choices=list(FORMATS))
    x.add_argument("--out", required=True, help="file to write (e.g. model.zsq)")
    x.add_argument("--report", help="size report JSON (default: OUT.json)")
    add_model_def(x, "(default: the one the run recorded)")
    x.set_defaults(func=_cmd_export)


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis.plots import analyze  # matplotlib only for this command

    for path in analyze(args.runs, args.out, args.attention_runs):
        print(path)
    return 0


def _add_analyze(sub) -> None:
    a = sub.add_parser("analyze", help="PNG plots of finished runs: curves overlaid, attention maps, samples")
    a.add_argument("runs", nargs="+", help="run directories, or folders holding them")
    a.add_argument("--out", required=True, help="folder for the PNG files")
    a.add_argument("--attention-runs", type=int, default=4, help="runs to draw attention maps for (first N)")
    a.set_defaults(func=_cmd_analyze)


def _cmd_report(args: argparse.Namespace) -> int:
    if not args.runs and args.store is None:
        raise UserError("report: give run directories, --store FOLDER, or both")
    if args.out is None and args.readme is None:
        raise UserError("report: give --out FILE.md, --readme README.md, or both")
    out = write_report(args.runs, args.out, args.plots or [], args.store, args.readme)
    written = ", ".join(out[k] for k in ("markdown", "html", "readme") if k in out)
    print(f"{written}: {len(out['groups'])} configurations, {sum(len(g['runs']) for g in out['groups'])} runs"
          f"{'; ' + out['note'] if out['note'] else ''}")
    return 0


def _add_report(sub) -> None:
    r = sub.add_parser("report", help="one table of finished runs, seeds grouped as mean ± std (markdown and HTML)",
                       description="Published numbers (quoted) appear beside ours where dataset, model, bits, "
                                   "data source and loss match.")
    r.add_argument("runs", nargs="*", help="run directories, or folders holding them")
    r.add_argument("--store", help="a zsq bench output folder (its results.db)")
    r.add_argument("--out", help="markdown file; the HTML goes beside it")
    r.add_argument("--readme", help="also rewrite this file's '<!-- zsq report: STORE-NAME -->' section (the "
                                    "table) and/or '<!-- zsq headline: STORE-NAME -->' (a row per command, a "
                                    "column per bit width: a README's headline)")
    r.add_argument("--plots", nargs="*", help="PNG files to embed (e.g. from zsq analyze)")
    r.set_defaults(func=_cmd_report)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a zsq quantize flag without dashes), got '{text}'")
    return key.strip(), value


def _cmd_bench(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid, teacher=args.teacher, data_dir=args.data_dir, bits=args.bits, seeds=args.seeds,
                     overrides={k: {"true": True, "false": False}.get(v.lower(), v) for k, v in args.set or []},
                     only=args.only)
    s = run_grid(grid, args.out, run_config_of, args.runs, args.jobs, args.quiet, args.dry_run, args.collect)
    if args.dry_run:
        return 0
    print(f"{args.out}: {s.total} runs in {grid.name}: {len(s.finished_before)} finished before, {len(s.ran)} run "
          f"now, {len(s.failed)} failed{f', {len(s.not_run)} not run (--collect)' if args.collect else ''}")
    if s.failed:
        raise UserError(f"{len(s.failed)} run(s) failed; first: {s.failed[0]}")
    return 0


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="run a grid file (bits × data sources × losses × seeds) into a results store",
                       description="Each run is a `zsq quantize` process; finished runs are skipped and killed ones "
                                   "resumed, so the same command continues a grid. Results: OUT/results.db "
                                   "(read by zsq report --store OUT).")
    b.add_argument("grid", help="grid file (TOML), e.g. benchmarks/grids/fmnist-quick.toml")
    b.add_argument("--out", required=True, help="folder for results.db, logs/ and (default) runs/")
    b.add_argument("--runs", help="folder of the run directories (default OUT/runs)")
    b.add_argument("--jobs", type=positive_int, default=1, help="runs in parallel (processes; the cores are shared)")
    b.add_argument("--teacher", help="teacher for every run (a checkpoint path), instead of the grid's")
    b.add_argument("--data-dir", help="dataset folder for every run")
    b.add_argument("--bits", type=int_list, help="only these bits (W = A), e.g. 3,4")
    b.add_argument("--seeds", type=int_list, help="only these seeds, e.g. 0")
    b.add_argument("--only", metavar="GLOB", help="only the runs whose name matches, e.g. 'adadfq-gap-entropy-w4-*' "
                                                  "(names: SOURCE-LOSS[-OPTIONS]-wBITS-sSEED)")
    b.add_argument("--set", type=_key_value, action="append", metavar="KEY=VALUE",
                   help="a zsq quantize flag for every run, e.g. --set epochs=2 (repeatable)")
    b.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    b.add_argument("--collect", action="store_true",
                   help="store the runs already finished in the run folder, start none")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="zsq", description="Zero-shot quantization: a low-bit model from a trained FP model, no data.")
    p.add_argument("--version", action="version", version=f"zsq {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    teacher = sub.add_parser("teacher", help="train an FP teacher on real data")
    tsub = teacher.add_subparsers(dest="teacher_command", metavar="ACTION", parser_class=Parser)
    tsub.required = True
    t = tsub.add_parser("train", help="train a teacher and save it in zsq's checkpoint format",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--model", default="resnet20", choices=list_models(), help="architecture")
    t.add_argument("--model-arg", dest="model_args", type=_model_arg, action="append", metavar="KEY=VALUE",
                   help="an architecture keyword, repeatable (e.g. width_mult=0.5, stem_stride=1)")
    t.add_argument("--dataset", default="fashion-mnist", choices=list_datasets())
    t.add_argument("--data-dir", help="dataset folder (default: the Debian Fashion-MNIST files)")
    t.add_argument("--epochs", type=positive_int, default=20)
    t.add_argument("--batch-size", type=positive_int, default=128)
    t.add_argument("--lr", type=float, default=0.2, help="peak learning rate")
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--schedule", choices=["onecycle", "cosine"], default="onecycle")
    t.add_argument("--label-smoothing", type=float, default=0.1)
    t.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="autocast precision; auto: bf16 on a GPU with it or a CPU with AVX-512, else fp32")
    t.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-limit", type=positive_int, help="evaluate on the first N test images only")
    t.add_argument("--resume", action="store_true", help="continue from OUT.resume after a kill")
    t.add_argument("--out", required=True, help="checkpoint to write")
    t.set_defaults(func=_cmd_teacher_train)

    e = sub.add_parser("eval", help="top-1/top-5 of an FP or fake-quantized model on a real test set",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--model", required=True,
                   help=f"shipped teacher ({', '.join(shipped_models()) or 'none'}), architecture "
                        f"({', '.join(list_models())}) or checkpoint path")
    e.add_argument("--checkpoint", help="weights for an architecture given by --model")
    add_model_def(e, "(then --model is its weights file)")
    e.add_argument("--dataset", choices=list_datasets(),
                   help="default: the dataset recorded in the checkpoint, else fashion-mnist")
    e.add_argument("--data-dir", help="dataset folder")
    e.add_argument("--wbits", type=bits_type, default=32, help="weight bits (2..8; 32 = FP)")
    e.add_argument("--abits", type=bits_type, default=32, help="activation bits (2..8; 32 = FP)")
    e.add_argument("--first-last", choices=["same", "8bit"], default="same",
                   help="bits of the first and last layer: same as the rest (papers) or 8")
    e.add_argument("--calib-batches", type=positive_int, default=4, help="Gaussian-noise batches for activation ranges")
    e.add_argument("--placement", choices=list(PLACEMENTS), help=QUANTIZE_HELP["placement"])
    e.add_argument("--batch-size", type=positive_int, help="images per forward (default: 64 on a CPU, 500 on a GPU)")
    e.add_argument("--eval-limit", type=positive_int, help="evaluate on the first N test images only")
    e.add_argument("--device", default="auto")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", help="write the result as JSON here")
    e.set_defaults(func=_cmd_eval)
    add_quantize(sub).set_defaults(func=_cmd_quantize)
    add_ptq(sub).set_defaults(func=_cmd_ptq)
    _add_synth(sub)
    _add_export(sub)
    _add_report(sub)
    _add_bench(sub)
    _add_analyze(sub)
    _add_health(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except UserError as e:
        print(f"zsq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zsq: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout left (`zsq bench --dry-run | head`): not an error of ours
        sys.stdout = open(os.devnull, "w")
        return 0
