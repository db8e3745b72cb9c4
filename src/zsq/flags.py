"""The run commands' flags (`zsq quantize`, `zsq ptq`), generated from their configs, and a command line → the
config it runs. Below `bench` (a grid's rows are these command lines, checked before any starts) and `cli` (which
adds the other commands and runs them).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Any, Callable

from .data import list_datasets
from .distill import LOSSES
from .errors import UserError, deprecated
from .posttrain import PTQ_SOURCES, PtqConfig, resolve_ptq_config
from .posttrain import config_dict as ptq_config_dict
from .presets import PRESETS
from .quant import PLACEMENTS, check_bits
from .quant.ranges import RANGE_SETTERS
from .synth import SOURCES
from .train import SELECT, TrainConfig, config_dict, flat_fields, resolve_config


def bits_type(text: str) -> int:
    try:
        k = int(text)
        check_bits(k, "bits")
    except (ValueError, UserError):
        raise argparse.ArgumentTypeError(f"bits must be in 2..8 (or 32 for full precision), got '{text}'") from None
    return k


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


class Parser(argparse.ArgumentParser):
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


class Renamed(argparse.Action):
    """A flag's former name, kept for one release: sets the new flag's value, with a deprecation line."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[override]
        deprecated(option_string or self.new, self.new)
        setattr(namespace, self.dest, values)


def add_model_def(parser: argparse.ArgumentParser, default: str = "") -> None:
    parser.add_argument("--model-def", metavar="FILE.py:FACTORY",
                        help=f"a user's own architecture: FACTORY in FILE.py builds the module with no arguments "
                             f"(imported only when named) {default}".strip())


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def float_pair(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got '{text}'") from None
    return a, b


QUANTIZE_HELP = {
    "promote": "ε of HAST's FGSM difficulty promotion, with any loss (0 = off; the hast presets: 0.01)",
    "track_curvature": "every N trained iterations, log Hutchinson's Hessian trace of the transfer loss on fixed "
                       "synthetic batches (hessian_trace, hessian_trace_se in metrics.jsonl; 0 = off)",
    "curvature_samples": "Rademacher vectors per Hessian-trace estimate (default 16)",
    "act_range": "how activation ranges are set: ema-minmax (lineage; the paper preset's), percentile, bn-prior "
                 "(data-free, from the teacher's BatchNorm statistics), bn-clamp (EMA clamped to the BN bound), "
                 "learned (hi trained by its LSQ gradient from the BN prior)",
    "recalibrate_at": "at the start of this epoch, set the activation ranges again on the trained data source's "
                      "images (0 = never)",
    "health_every": "every N trained iterations, check the Q model's data-free health (zsq health) and log it "
                    "(0: only at the end)",
    "select": "the Q model kept: final, or the one with the best health score over the checks (a data-free "
              "alternative to picking the best test accuracy)",
    "probe_images": "images of the health check's probe set (built once per teacher, cached)",
    "probe_iters": "BN-statistics steps per probe batch",
    "teacher": "shipped teacher, architecture (with --checkpoint) or checkpoint path",
    "source": "data source: online generators gdfq, adadfq; offline sets hast, zeroq, genie (formerly --generator)",
    "loss": "transfer loss: kd, kd+ce (GDFQ's), gap-entropy (AdaDFQ's), hast, akt…, synq (formerly --method)",
    "preset": "recipe: paper budget or quick CPU budget",
    "wbits": "weight bits (2..8; 32 = FP)", "abits": "activation bits (2..8; 32 = FP)",
    "epochs": "epochs (default: preset)", "iters_per_epoch": "iterations per epoch (default: preset)",
    "warmup_epochs": "generator-only epochs that calibrate activation ranges (default: preset)",
    "batch_size": "synthetic batch size (default: preset)", "lr_q": "Q-model SGD learning rate (default: preset)",
    "lr_g": "generator Adam learning rate (default: preset)",
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
QUANTIZE_TYPES: dict[str, Callable] = {"wbits": bits_type, "abits": bits_type, "milestones": int_list,
                                       "g_betas": float_pair, "epochs": positive_int, "iters_per_epoch": positive_int,
                                       "batch_size": positive_int}


def _field_type(f: dataclasses.Field) -> Callable:
    """The flag's type from the field's annotation: a string in modules with postponed annotations, else the
    class itself (`float`, whose str() is "<class 'float'>") or a union (`int | None`)."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return QUANTIZE_TYPES.get(f.name) or (int if t.startswith("int") else float if t.startswith("float") else str)


def add_quantize(sub) -> argparse.ArgumentParser:
    q = sub.add_parser("quantize", help="train a low-bit model from a teacher, with no real data",
                       description="Every recipe field defaults to the preset; plug-in options apply to the chosen "
                                   "source, loss or act-range.")
    choices = {"source": SOURCES.names(), "preset": list(PRESETS),
               "first_last": ["same", "8bit"], "act_range": RANGE_SETTERS.names(), "ste": ["identity", "clipped"],
               "precision": ["fp32", "bf16"], "select": list(SELECT), "placement": list(PLACEMENTS)}
    for f in flat_fields():
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.name in ("teacher", "source", "loss", "preset", "wbits", "abits") else None
        if str(f.type) == "bool":
            q.add_argument(flag, action="store_true", default=None, help=QUANTIZE_HELP.get(f.name))
        elif f.name == "loss":  # a former name is translated, with a deprecation line
            q.add_argument(flag, type=LOSSES.canonical, default=default, metavar="{" + ",".join(LOSSES.names()) + "}",
                           help=QUANTIZE_HELP[f.name])
        else:
            q.add_argument(flag, type=_field_type(f), default=default, choices=choices.get(f.name),
                           help=QUANTIZE_HELP.get(f.name, f"(default: preset or {f.default!r})"))
    for old, new in (("--generator", "--source"), ("--method", "--loss")):
        q.add_argument(old, dest=new[2:], action=Renamed, new=new, help=argparse.SUPPRESS)
    plugin = q.add_argument_group("plug-in options")
    options = {**SOURCES.all_options(), **LOSSES.all_options(), **RANGE_SETTERS.all_options()}
    for name, f in sorted(options.items()):
        plugin.add_argument("--" + name.replace("_", "-"), type=_field_type(f), default=None,
                            help=f.metadata.get("help", ""))
    q.add_argument("--resume", action="store_true", help="continue the run in --out after a kill")
    q.add_argument("--restart", action="store_true",
                   help="start over in --out, discarding the unfinished run there (never a finished one)")
    q.add_argument("--quiet", action="store_true", help="no progress bar (for logs)")
    q.set_defaults(plugin_options=sorted(options))
    return q


def _quantize_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config values of a parsed `zsq quantize` (None = not given)."""
    return {k: v for k, v in vars(args).items()
            if k not in ("func", "command", "plugin_options", "resume", "restart", "quiet")}


def quantize_config_from(args: argparse.Namespace) -> TrainConfig:
    values = _quantize_values(args)
    return resolve_config(values.pop("preset"), values.pop("source"), values.pop("loss"), **values)


def quantize_values(argv: list[str]) -> dict[str, Any]:
    """The typed values that `zsq quantize ARGV` gives, before any preset (a bad flag or value raises UserError)."""
    return {k: v for k, v in _quantize_values(_run_parser().parse_args(["quantize", *argv])).items() if v is not None}


@functools.lru_cache(maxsize=1)
def _run_parser() -> argparse.ArgumentParser:
    """The run commands alone, parsed as `zsq` parses them."""
    p = Parser(prog="zsq")
    sub = p.add_subparsers(dest="command", parser_class=Parser)
    add_quantize(sub)
    add_ptq(sub)
    return p


def quantize_config(argv: list[str]) -> TrainConfig:
    """The TrainConfig that `zsq quantize ARGV` would run (a bad flag or value raises UserError)."""
    return quantize_config_from(_run_parser().parse_args(["quantize", *argv]))


def run_config_of(command: str, argv: list[str]) -> dict[str, Any]:
    """The config.json that `zsq COMMAND ARGV` (quantize or ptq) would write, before the run resolves its
    machine (a bad flag or value raises UserError)."""
    args = _run_parser().parse_args([command, *argv])
    if command == "ptq":
        return ptq_config_dict(ptq_config_from(args))
    return config_dict(quantize_config_from(args))



PTQ_FLAGS = ("teacher", "checkpoint", "model_def", "wbits", "abits", "first_last", "placement", "images",
             "iters_per_unit", "lam", "qdrop", "weight_step", "recon_loss", "units", "seed", "device", "threads", "deterministic",
             "dataset",
             "data_dir", "eval_limit", "probe_images", "probe_iters", "out", "synth_iters", "synth_batch",
             "synth_patience", "synth_data", "synth_lr", "hard_weight", "hard_gamma", "latent_lr", "generator_lr",
             "latent_dim", "generator_decay_every", "swing")


def ptq_config_from(args: argparse.Namespace) -> PtqConfig:
    return resolve_ptq_config(args.preset, args.source, **{k: getattr(args, k) for k in PTQ_FLAGS})



def add_ptq(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("ptq", help="post-training quantization: reconstruct a low-bit model block by block on a "
                                   "small synthetic set (Genie), no real data",
                       description="Distils a small image set from the teacher (--source genie, hast, zeroq; or "
                                   "real training images, an upper bound that uses data), then fits each block's "
                                   "rounding and steps to the teacher's outputs (AdaRound, Genie-M, LSQ, QDrop). "
                                   "Flags left out come from the preset.")
    p.add_argument("--teacher", default="resnet20_fmnist", help="shipped teacher, architecture or checkpoint path")
    p.add_argument("--checkpoint", help="weights for an architecture given by --teacher")
    add_model_def(p, "(then --teacher is its weights file)")
    p.add_argument("--source", default="genie", choices=list(PTQ_SOURCES), help="where the images come from")
    p.add_argument("--preset", default="quick", choices=list(PRESETS),
                   help="quick: 256 images, 300 steps per unit; paper: 1,024 images, 20,000 steps (Genie)")
    p.add_argument("--wbits", type=bits_type, default=4)
    p.add_argument("--abits", type=bits_type, default=4)
    p.add_argument("--first-last", choices=["8bit", "same"], default=None,
                   help="first and last layer's weights at 8 bits (Genie/BRECQ tables; default) or as the rest")
    p.add_argument("--placement", choices=list(PLACEMENTS), help=QUANTIZE_HELP["placement"])
    p.add_argument("--images", type=positive_int, help="images the units are fitted on (default: preset)")
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
    p.add_argument("--eval-limit", type=positive_int)
    p.add_argument("--probe-images", type=positive_int)
    p.add_argument("--probe-iters", type=positive_int)
    options = {**SOURCES.all_options()}
    for name in ("synth_iters", "synth_batch", "synth_patience", "synth_data", "synth_lr", "hard_weight",
                 "hard_gamma", "latent_lr", "generator_lr", "latent_dim", "generator_decay_every", "swing"):
        p.add_argument("--" + name.replace("_", "-"), type=_field_type(options[name]), default=None,
                       help=options[name].metadata.get("help", ""))
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after a kill")
    p.add_argument("--restart", action="store_true", help="start over in --out, discarding the unfinished run there")
    p.add_argument("--quiet", action="store_true", help="no progress bar (for logs)")
    return p
