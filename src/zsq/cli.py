"""The `zsq` command line. Parsing and printing only: every command calls the library.

A `UserError` (bad input the user can fix) prints one line and exits with code 2.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import os
import sys
from dataclasses import fields
from typing import Any, Callable, Sequence

from . import __version__
from .analysis import write_report
from .bench import load_grid
from .bench.runner import run_grid
from .data import list_datasets
from .distill import LOSSES, list_methods
from .errors import UserError
from .device import resolve_device
from .dist import session
from .evaluate import eval_set_for, run_eval
from .export import format_report
from .export.run import FORMATS, export_run
from .io import save_json
from .models import dataset_info, list_models, load_model, shipped_models
from .posttrain import PTQ_SOURCES, PtqConfig, ptq_run, resolve_ptq_config
from .posttrain import config_dict as ptq_config_dict
from .presets import PRESETS, preset_values
from .quant import PLACEMENTS, check_bits
from .quant.ranges import BN_PROPAGATE, RANGE_SETTERS
from .synth import SOURCES, list_sources
from .synth.pixels import BUILDERS, build_set
from .teacher import TeacherConfig, train_teacher
from .train import SELECT, TrainConfig, config_dict, quantize_run, resolve_config
from .validate import Health, ProbeOptions, run_health


def _bits(text: str) -> int:
    try:
        k = int(text)
        check_bits(k, "bits")
    except (ValueError, UserError):
        raise argparse.ArgumentTypeError(f"bits must be in 2..8 (or 32 for full precision), got '{text}'") from None
    return k


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


class _Parser(argparse.ArgumentParser):
    """One line per error, naming the command (argparse's own prints usage and exits 2); no abbreviated flags, so
    that a flag added later cannot change what an old command line means (`--wbit` is not `--wbits`)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix("zsq").strip()
        raise UserError(f"{command}: {message}" if command else message)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:  # argparse reports them at the top level; say which command they were given to
            command = " ".join(filter(None, (getattr(parsed, "command", None),
                                             getattr(parsed, "teacher_command", None))))
            raise UserError(f"{command + ': ' if command else ''}unrecognized arguments: {' '.join(extra)}")
        return parsed


def _add_model_def(parser: argparse.ArgumentParser, default: str = "") -> None:
    parser.add_argument("--model-def", metavar="FILE.py:FACTORY",
                        help=f"a user's own architecture: FACTORY in FILE.py builds the module with no arguments "
                             f"(imported only when named) {default}".strip())


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


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _float_pair(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got '{text}'") from None
    return a, b


QUANTIZE_HELP = {
    "promote": "ε of HAST's FGSM difficulty promotion, with any method (0 = off; the hast presets: 0.01)",
    "track_curvature": "every N trained iterations, log Hutchinson's Hessian trace of the transfer loss on fixed "
                       "synthetic batches (hessian_trace, hessian_trace_se in metrics.jsonl; 0 = off)",
    "curvature_samples": "Rademacher vectors per Hessian-trace estimate (default 16)",
    "act_range": "how activation ranges are set: ema-minmax (lineage; the paper preset's), percentile, bn-prior "
                 "(data-free, from the teacher's BatchNorm statistics), bn-clamp (EMA clamped to the BN bound), "
                 "learned (hi trained by its LSQ gradient from the BN prior)",
    "act_percentile": "batch percentile of --act-range percentile (default 99.9; the quick preset's for --method "
                      "gdfq, whose ranges it sets: 99.7)",
    "recalibrate_at": "at the start of this epoch, set the activation ranges again on the trained data source's "
                      "images (0 = never)",
    "bn_k": "BN standard deviations above the BN mean for --act-range bn-prior/bn-clamp/learned (default 3; "
            "the quick preset's: 2.5)",
    "bn_propagate": "how the BN setters carry channel statistics across ReLUs and residual sums: bounds (add the "
                    "inputs' bounds; default) or moments (rectified-Gaussian mean and std, variances add; the quick "
                    "preset's for --method akt)",
    "health_every": "every N trained iterations, check the Q model's data-free health (zsq health) and log it "
                    "(0: only at the end)",
    "select": "the Q model kept: final, or the one with the best health score over the checks (a data-free "
              "alternative to picking the best test accuracy)",
    "probe_images": "images of the health check's probe set (built once per teacher, cached)",
    "probe_iters": "BN-statistics steps per probe batch",
    "teacher": "shipped teacher, architecture (with --checkpoint) or checkpoint path",
    "generator": "data source", "method": "transfer loss", "preset": "recipe: paper budget or quick CPU budget",
    "wbits": "weight bits (2..8; 32 = FP)", "abits": "activation bits (2..8; 32 = FP)",
    "epochs": "epochs (default: preset)", "iters_per_epoch": "iterations per epoch (default: preset)",
    "warmup_epochs": "generator-only epochs that calibrate activation ranges (default: preset)",
    "batch_size": "synthetic batch size (default: preset)", "lr_q": "Q-model SGD learning rate (default: preset)",
    "lr_g": "generator Adam learning rate (default: preset)",
    "range_lr_scale": "learning rate of --act-range learned's ranges, × lr-q (default 1)",
    "milestones": "epochs where both LRs decay, e.g. 100,200",
    "dataset": "evaluation dataset (default: the teacher's)", "data_dir": "dataset folder",
    "eval_every": "evaluate on the test set every N epochs (0: only at the end)",
    "eval_limit": "evaluate on the first N test images only", "ckpt_every": "iterations between resume checkpoints",
    "deterministic": "deterministic algorithms (a resumed run then ends identical to an uninterrupted one)",
    "precision": "fp32 or bf16 autocast", "device": "auto, cpu or cuda[:N]", "out": "run directory",
    "model_def": "a user's own architecture: FACTORY in FILE.py builds the module with no arguments (imported only "
                 "when named); --teacher is then its weights file",
    "placement": "where activations are quantized: lineage (after each ReLU/ReLU6, the papers) or deployable "
                 "(also every tensor entering a conv, linear or add: an integer graph); default: lineage for a "
                 "registered architecture, deployable for a --model-def module",
    "threads": "CPU threads of the run (default: the cores it may use: OMP_NUM_THREADS, else its CPU affinity; "
               "recorded in config.json)",
}
QUANTIZE_TYPES: dict[str, Callable] = {"wbits": _bits, "abits": _bits, "milestones": _int_list, "g_betas": _float_pair,
                                       "epochs": _positive, "iters_per_epoch": _positive, "batch_size": _positive}


def _field_type(f: dataclasses.Field) -> Callable:
    t = str(f.type)
    return QUANTIZE_TYPES.get(f.name) or (int if t.startswith("int") else float if t.startswith("float") else str)


def _add_quantize(sub) -> None:
    q = sub.add_parser("quantize", help="train a low-bit model from a teacher, with no real data",
                       description="Every recipe field defaults to the preset; plug-in options apply to the chosen "
                                   "generator or method.")
    choices = {"generator": list_sources(), "method": list_methods(), "preset": list(PRESETS),
               "first_last": ["same", "8bit"], "act_range": RANGE_SETTERS.names(), "ste": ["identity", "clipped"],
               "bn_propagate": list(BN_PROPAGATE),
               "precision": ["fp32", "bf16"], "select": list(SELECT), "placement": list(PLACEMENTS)}
    for f in fields(TrainConfig):
        if f.name == "options":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.name in ("teacher", "generator", "method", "preset", "wbits", "abits") else None
        if str(f.type) == "bool":
            q.add_argument(flag, action="store_true", default=None, help=QUANTIZE_HELP.get(f.name))
        else:
            q.add_argument(flag, type=_field_type(f), default=default, choices=choices.get(f.name),
                           help=QUANTIZE_HELP.get(f.name, f"(default: preset or {f.default!r})"))
    plugin = q.add_argument_group("plug-in options")
    options = {**SOURCES.all_options(), **LOSSES.all_options()}
    for name, f in sorted(options.items()):
        plugin.add_argument("--" + name.replace("_", "-"), type=_field_type(f), default=None,
                            help=f.metadata.get("help", ""))
    q.add_argument("--resume", action="store_true", help="continue the run in --out after a kill")
    q.add_argument("--restart", action="store_true",
                   help="start over in --out, discarding the unfinished run there (never a finished one)")
    q.add_argument("--quiet", action="store_true", help="no progress bar (for logs)")
    q.set_defaults(func=_cmd_quantize, plugin_options=sorted(options))


def _quantize_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config values of a parsed `zsq quantize` (None = not given)."""
    return {k: v for k, v in vars(args).items()
            if k not in ("func", "command", "plugin_options", "resume", "restart", "quiet")}


def _quantize_config(args: argparse.Namespace) -> TrainConfig:
    values = _quantize_values(args)
    return resolve_config(values.pop("preset"), values.pop("generator"), values.pop("method"), **values)


def quantize_values(argv: list[str]) -> dict[str, Any]:
    """The typed values that `zsq quantize ARGV` gives, before any preset (a bad flag or value raises UserError)."""
    return {k: v for k, v in _quantize_values(_parser().parse_args(["quantize", *argv])).items() if v is not None}


@functools.lru_cache(maxsize=1)
def _parser() -> argparse.ArgumentParser:
    return build_parser()


def quantize_config(argv: list[str]) -> TrainConfig:
    """The TrainConfig that `zsq quantize ARGV` would run (a bad flag or value raises UserError)."""
    return _quantize_config(_parser().parse_args(["quantize", *argv]))


def run_config_of(command: str, argv: list[str]) -> dict[str, Any]:
    """The config.json that `zsq COMMAND ARGV` (quantize or ptq) would write, before the run resolves its
    machine (a bad flag or value raises UserError)."""
    args = _parser().parse_args([command, *argv])
    if command == "ptq":
        return ptq_config_dict(_ptq_config(args))
    return config_dict(_quantize_config(args))


def _cmd_quantize(args: argparse.Namespace) -> int:
    cfg = _quantize_config(args)
    result = quantize_run(cfg, resume=args.resume, quiet=args.quiet, restart=args.restart)
    s = result.summary
    if result.rank == 0:
        print(f"{cfg.out}: W{s['wbits']}A{s['abits']} {s['generator']}+{s['method']} ({s['preset']}): "
              f"q_top1 {s['q_top1']:.2f} (FP {s['fp_top1']:.2f}) in {s['wall_s'] / 60:.1f} min")
        h = Health(**s["health"])
        print(("warning: " if h.flagged else "") + h.line(), file=sys.stderr if h.flagged else sys.stdout)
    return 0


PTQ_FLAGS = ("teacher", "checkpoint", "model_def", "wbits", "abits", "first_last", "placement", "images",
             "iters_per_unit", "lam", "qdrop", "weight_step", "recon_loss", "units", "seed", "device", "threads", "deterministic",
             "dataset",
             "data_dir", "eval_limit", "probe_images", "probe_iters", "out", "synth_iters", "synth_batch",
             "synth_patience", "synth_data", "synth_lr", "hard_weight", "hard_gamma", "latent_lr", "generator_lr",
             "latent_dim", "generator_decay_every", "swing")


def _ptq_config(args: argparse.Namespace) -> PtqConfig:
    return resolve_ptq_config(args.preset, args.source, **{k: getattr(args, k) for k in PTQ_FLAGS})


def _cmd_ptq(args: argparse.Namespace) -> int:
    cfg = _ptq_config(args)
    result = ptq_run(cfg, resume=args.resume, restart=args.restart, quiet=args.quiet)
    s = result.summary
    print(f"{cfg.out}: W{s['wbits']}A{s['abits']} ptq on {s['generator']} ({s['preset']}): q_top1 {s['q_top1']:.2f} "
          f"(FP {s['fp_top1']:.2f}) in {s['wall_s'] / 60:.1f} min")
    h = Health(**s["health"])
    print(("warning: " if h.flagged else "") + h.line(), file=sys.stderr if h.flagged else sys.stdout)
    return 0


def _add_ptq(sub) -> None:
    p = sub.add_parser("ptq", help="post-training quantization: reconstruct a low-bit model block by block on a "
                                   "small synthetic set (Genie), no real data",
                       description="Distils a small image set from the teacher (--source genie, hast, zeroq; or "
                                   "real training images, an upper bound that uses data), then fits each block's "
                                   "rounding and steps to the teacher's outputs (AdaRound, Genie-M, LSQ, QDrop). "
                                   "Flags left out come from the preset.")
    p.add_argument("--teacher", default="resnet20_fmnist", help="shipped teacher, architecture or checkpoint path")
    p.add_argument("--checkpoint", help="weights for an architecture given by --teacher")
    _add_model_def(p, "(then --teacher is its weights file)")
    p.add_argument("--source", default="genie", choices=list(PTQ_SOURCES), help="where the images come from")
    p.add_argument("--preset", default="quick", choices=list(PRESETS),
                   help="quick: 256 images, 300 steps per unit; paper: 1,024 images, 20,000 steps (Genie)")
    p.add_argument("--wbits", type=_bits, default=4)
    p.add_argument("--abits", type=_bits, default=4)
    p.add_argument("--first-last", choices=["8bit", "same"], default=None,
                   help="first and last layer's weights at 8 bits (Genie/BRECQ tables; default) or as the rest")
    p.add_argument("--placement", choices=list(PLACEMENTS), help=QUANTIZE_HELP["placement"])
    p.add_argument("--images", type=_positive, help="images the units are fitted on (default: preset)")
    p.add_argument("--iters-per-unit", type=int,
                   help="optimisation steps per unit (default: preset; 0: none, round-to-nearest at the L2.4 steps)")
    p.add_argument("--lam", type=float, help="weight of the rounding penalty (Genie 1.0; BRECQ/QDrop 0.01)")
    p.add_argument("--qdrop", type=float, help="probability an element stays full precision while fitting (0.5)")
    p.add_argument("--weight-step", choices=["learned", "fixed"],
                   help="per-channel weight steps learned with the rounding (Genie-M; default) or fixed (AdaRound)")
    p.add_argument("--recon-loss", choices=["mse", "fisher"],
                   help="each unit's loss: output MSE (the official codes; default) or BRECQ's Fisher-weighted MSE")
    p.add_argument("--units", type=lambda t: [u for u in t.split(",") if u],
                   help="comma-separated module names of the blocks (default: read from the graph)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.add_argument("--threads", type=int)
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="deterministic algorithms (a resumed run then ends identical to an uninterrupted one)")
    p.add_argument("--dataset", choices=list_datasets(), help="evaluation data (default: the teacher's recorded)")
    p.add_argument("--data-dir")
    p.add_argument("--eval-limit", type=_positive)
    p.add_argument("--probe-images", type=_positive)
    p.add_argument("--probe-iters", type=_positive)
    options = {**SOURCES.all_options()}
    for name in ("synth_iters", "synth_batch", "synth_patience", "synth_data", "synth_lr", "hard_weight",
                 "hard_gamma", "latent_lr", "generator_lr", "latent_dim", "generator_decay_every", "swing"):
        p.add_argument("--" + name.replace("_", "-"), type=_field_type(options[name]), default=None,
                       help=options[name].metadata.get("help", ""))
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after a kill")
    p.add_argument("--restart", action="store_true", help="start over in --out, discarding the unfinished run there")
    p.add_argument("--quiet", action="store_true", help="no progress bar (for logs)")
    p.set_defaults(func=_cmd_ptq)


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
    _add_model_def(h, "of the teacher and the Q model (default: the one the run recorded)")
    h.add_argument("--probe-images", type=_positive, default=ProbeOptions.probe_images)
    h.add_argument("--probe-iters", type=_positive, default=ProbeOptions.probe_iters)
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
                                   "`zsq quantize --generator hast --synth-data FILE` trains on it.")
    s.add_argument("--teacher", default="resnet20_fmnist", help="shipped teacher, architecture or checkpoint path")
    s.add_argument("--checkpoint", help="weights for an architecture name")
    s.add_argument("--source", default="hast", choices=sorted(BUILDERS))
    s.add_argument("--preset", default="quick", choices=list(PRESETS),
                   help="synthesis budget (paper: hast/zeroq 5,120 × 1,000, genie 1,024 × 4,000)")
    s.add_argument("--dataset", choices=list_datasets(), help="input geometry, when the checkpoint did not record it")
    s.add_argument("--data-dir")
    s.add_argument("--images", type=_positive, help="number of images (default: preset)")
    s.add_argument("--batch-size", type=_positive, help="images optimised together (default 256; genie 128)")
    s.add_argument("--iters", type=_positive, help="Adam steps per batch (default: preset)")
    s.add_argument("--lr", type=float, help="hast/zeroq: Adam learning rate on the pixels (default 0.5)")
    s.add_argument("--patience", type=_positive, help="plateau steps before the LR drops (default 50; genie 100)")
    s.add_argument("--hard-weight", type=float, help="hast/zeroq: β of the hardness-weighted CE (hast 10, zeroq 0)")
    s.add_argument("--hard-gamma", type=float, help="hast/zeroq: γ of the hardness weight (default 2)")
    s.add_argument("--latent-dim", type=_positive, help="genie: size of each image's latent (default 256)")
    s.add_argument("--latent-lr", type=float, help="genie: Adam learning rate on the latents (default 0.1)")
    s.add_argument("--generator-lr", type=float, help="genie: Adam learning rate on the generator (default 0.01)")
    s.add_argument("--generator-decay-every", type=_positive,
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
    _add_model_def(x, "(default: the one the run recorded)")
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
                                   "data source and method match.")
    r.add_argument("runs", nargs="*", help="run directories, or folders holding them")
    r.add_argument("--store", help="a zsq bench output folder (its results.db)")
    r.add_argument("--out", help="markdown file; the HTML goes beside it")
    r.add_argument("--readme", help="also rewrite this file's '<!-- zsq report: STORE-NAME -->' section")
    r.add_argument("--plots", nargs="*", help="PNG files to embed (e.g. from zsq analyze)")
    r.set_defaults(func=_cmd_report)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a zsq quantize flag without dashes), got '{text}'")
    return key.strip(), value


def _cmd_bench(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid, teacher=args.teacher, data_dir=args.data_dir, bits=args.bits, seeds=args.seeds,
                     overrides={k: {"true": True, "false": False}.get(v.lower(), v) for k, v in args.set or []})
    s = run_grid(grid, args.out, args.runs, args.jobs, args.quiet, args.dry_run, args.collect)
    if args.dry_run:
        return 0
    print(f"{args.out}: {s.total} runs in {grid.name}: {len(s.finished_before)} finished before, {len(s.ran)} run "
          f"now, {len(s.failed)} failed{f', {len(s.not_run)} not run (--collect)' if args.collect else ''}")
    if s.failed:
        raise UserError(f"{len(s.failed)} run(s) failed; first: {s.failed[0]}")
    return 0


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="run a grid file (bits × data sources × methods × seeds) into a results store",
                       description="Each run is a `zsq quantize` process; finished runs are skipped and killed ones "
                                   "resumed, so the same command continues a grid. Results: OUT/results.db "
                                   "(read by zsq report --store OUT).")
    b.add_argument("grid", help="grid file (TOML), e.g. benchmarks/grids/fmnist-quick.toml")
    b.add_argument("--out", required=True, help="folder for results.db, logs/ and (default) runs/")
    b.add_argument("--runs", help="folder of the run directories (default OUT/runs)")
    b.add_argument("--jobs", type=_positive, default=1, help="runs in parallel (processes; the cores are shared)")
    b.add_argument("--teacher", help="teacher for every run (a checkpoint path), instead of the grid's")
    b.add_argument("--data-dir", help="dataset folder for every run")
    b.add_argument("--bits", type=_int_list, help="only these bits (W = A), e.g. 3,4")
    b.add_argument("--seeds", type=_int_list, help="only these seeds, e.g. 0")
    b.add_argument("--set", type=_key_value, action="append", metavar="KEY=VALUE",
                   help="a zsq quantize flag for every run, e.g. --set epochs=2 (repeatable)")
    b.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    b.add_argument("--collect", action="store_true",
                   help="store the runs already finished in the run folder, start none")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="zsq", description="Zero-shot quantization: a low-bit model from a trained FP model, no data.")
    p.add_argument("--version", action="version", version=f"zsq {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    teacher = sub.add_parser("teacher", help="train an FP teacher on real data")
    tsub = teacher.add_subparsers(dest="teacher_command", metavar="ACTION", parser_class=_Parser)
    tsub.required = True
    t = tsub.add_parser("train", help="train a teacher and save it in zsq's checkpoint format",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--model", default="resnet20", choices=list_models(), help="architecture")
    t.add_argument("--model-arg", dest="model_args", type=_model_arg, action="append", metavar="KEY=VALUE",
                   help="an architecture keyword, repeatable (e.g. width_mult=0.5, stem_stride=1)")
    t.add_argument("--dataset", default="fashion-mnist", choices=list_datasets())
    t.add_argument("--data-dir", help="dataset folder (default: the Debian Fashion-MNIST files)")
    t.add_argument("--epochs", type=_positive, default=20)
    t.add_argument("--batch-size", type=_positive, default=128)
    t.add_argument("--lr", type=float, default=0.2, help="peak learning rate")
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--schedule", choices=["onecycle", "cosine"], default="onecycle")
    t.add_argument("--label-smoothing", type=float, default=0.1)
    t.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast precision")
    t.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-limit", type=_positive, help="evaluate on the first N test images only")
    t.add_argument("--resume", action="store_true", help="continue from OUT.resume after a kill")
    t.add_argument("--out", required=True, help="checkpoint to write")
    t.set_defaults(func=_cmd_teacher_train)

    e = sub.add_parser("eval", help="top-1/top-5 of an FP or fake-quantized model on a real test set",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--model", required=True,
                   help=f"shipped teacher ({', '.join(shipped_models()) or 'none'}), architecture "
                        f"({', '.join(list_models())}) or checkpoint path")
    e.add_argument("--checkpoint", help="weights for an architecture given by --model")
    _add_model_def(e, "(then --model is its weights file)")
    e.add_argument("--dataset", choices=list_datasets(),
                   help="default: the dataset recorded in the checkpoint, else fashion-mnist")
    e.add_argument("--data-dir", help="dataset folder")
    e.add_argument("--wbits", type=_bits, default=32, help="weight bits (2..8; 32 = FP)")
    e.add_argument("--abits", type=_bits, default=32, help="activation bits (2..8; 32 = FP)")
    e.add_argument("--first-last", choices=["same", "8bit"], default="same",
                   help="bits of the first and last layer: same as the rest (papers) or 8")
    e.add_argument("--calib-batches", type=_positive, default=4, help="Gaussian-noise batches for activation ranges")
    e.add_argument("--placement", choices=list(PLACEMENTS), help=QUANTIZE_HELP["placement"])
    e.add_argument("--batch-size", type=_positive, default=500)
    e.add_argument("--eval-limit", type=_positive, help="evaluate on the first N test images only")
    e.add_argument("--device", default="auto")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", help="write the result as JSON here")
    e.set_defaults(func=_cmd_eval)
    _add_quantize(sub)
    _add_ptq(sub)
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
