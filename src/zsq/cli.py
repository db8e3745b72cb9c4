"""The `zsq` command line. Parsing and printing only: every command calls the library.

A `UserError` (bad input the user can fix) prints one line and exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .data import list_datasets
from .errors import UserError
from .models import list_models, shipped_models


def _bits(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer in 2..8 or 32, got '{text}'") from None
    if not (2 <= k <= 8 or k == 32):
        raise argparse.ArgumentTypeError(f"bits must be in 2..8 (or 32 for full precision), got {k}")
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
    """argparse prints usage + error and exits 2 already; keep it to one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def _cmd_teacher_train(args: argparse.Namespace) -> int:
    from .teacher import TeacherConfig, train_teacher

    names = {f.name for f in fields(TeacherConfig)}
    cfg = TeacherConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    metrics = train_teacher(cfg)
    print(f"saved {cfg.out}: top1 {metrics['top1']:.2f}  top5 {metrics['top5']:.2f}  "
          f"({metrics['wall_seconds'] / 60:.1f} min)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import run_eval

    result = run_eval(model=args.model, checkpoint=args.checkpoint, dataset=args.dataset, data_dir=args.data_dir,
                      wbits=args.wbits, abits=args.abits, first_last=args.first_last, batch_size=args.batch_size,
                      limit=args.eval_limit, device=args.device, calib_batches=args.calib_batches, seed=args.seed)
    label = "FP" if result["quant"] is None else (
        f"W{result['quant']['wbits']}A{result['quant']['abits']} fake-quant, ranges from Gaussian noise, no training")
    print(f"{result['model']} on {result['dataset']} ({result['n']} images, {label}): "
          f"top1 {result['top1']:.2f}  top5 {result['top5']:.2f}")
    if args.json:
        from .io import save_json

        save_json(result, args.json)
    return 0


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
    e.add_argument("--dataset", choices=list_datasets(),
                   help="default: the dataset recorded in the checkpoint, else fashion-mnist")
    e.add_argument("--data-dir", help="dataset folder")
    e.add_argument("--wbits", type=_bits, default=32, help="weight bits (2..8; 32 = FP)")
    e.add_argument("--abits", type=_bits, default=32, help="activation bits (2..8; 32 = FP)")
    e.add_argument("--first-last", choices=["same", "8bit"], default="same",
                   help="bits of the first and last layer: same as the rest (papers) or 8")
    e.add_argument("--calib-batches", type=_positive, default=4, help="Gaussian-noise batches for activation ranges")
    e.add_argument("--batch-size", type=_positive, default=500)
    e.add_argument("--eval-limit", type=_positive, help="evaluate on the first N test images only")
    e.add_argument("--device", default="auto")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", help="write the result as JSON here")
    e.set_defaults(func=_cmd_eval)
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
