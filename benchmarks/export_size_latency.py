"""Sizes of the exported shipped teacher at several bit-widths, and onnxruntime CPU latency beside PyTorch FP32.

For each bit-width the teacher is fake-quantized with activation ranges from Gaussian noise (sizes do not depend
on training; pass --run DIR to time a trained student instead), exported as packed and as ONNX QDQ, and checked
with onnxruntime against PyTorch. Latency: median over rounds of a batch forward, PyTorch FP32 (the baseline),
PyTorch fake-quant and onnxruntime on the QDQ graph, with the same thread count, measured in this run.
Prints one JSON object as its last line. Usage: python benchmarks/export_size_latency.py [--bits 3 4 8]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

from zsq.export import save_packed, size_report
from zsq.export.onnx_qdq import save_onnx
from zsq.export.run import onnx_check, onnx_metadata
from zsq.models import dataset_info, load_model
from zsq.quant import calibrate, gaussian_inputs, quantize_model


def median_ms(fn, rounds: int, *inputs) -> float:
    fn(*inputs)  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(*inputs)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="resnet20_fmnist")
    ap.add_argument("--bits", nargs="+", type=int, default=[3, 4, 8])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    teacher = load_model(args.teacher).eval()
    info = dataset_info(teacher)
    shape = (info.in_channels, info.image_size, info.image_size)
    threads = torch.get_num_threads()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.bits:
            q = calibrate(quantize_model(teacher, wbits=bits, abits=bits), gaussian_inputs(4, 64, shape)).eval()
            q.zsq_dataset = info
            onnx_path = save_onnx(q, Path(tmp) / f"w{bits}.onnx", info.image_size, info.in_channels, info.mean,
                                  info.std, onnx_metadata(q, info))
            packed_path = save_packed(q, Path(tmp) / f"w{bits}.zsq")
            report = size_report(q, {"onnx": onnx_path, "packed": packed_path})
            sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
            row = {"bits": bits, "fp32_bytes": report["fp32_bytes"], "packed_bytes": report["packed_bytes"],
                   "packed_file_bytes": report["files"]["packed"], "onnx_file_bytes": report["files"]["onnx"],
                   "compression": report["compression"], **onnx_check(q, onnx_path, info), "latency_ms": {}}
            for b in args.batch_sizes:
                x = torch.rand(b, *shape)
                xn = x.numpy()
                with torch.no_grad():
                    fp = median_ms(teacher, args.rounds, x)
                    fq = median_ms(q, args.rounds, x)
                ox = median_ms(sess.run, args.rounds, None, {"image": xn})
                row["latency_ms"][b] = {"torch_fp32": fp, "torch_fakequant": fq, "onnxruntime_qdq": ox,
                                        "ort_over_fp32": ox / fp}
            rows.append(row)
    kb = 1024
    print(f"threads {threads}")
    print("| bits | FP32 KiB | packed KiB (file) | ONNX file KiB | ORT vs PyTorch max Δlogit / top-1 | "
          + " | ".join(f"batch {b}: FP32 / fake-quant / ORT ms (ORT÷FP32)" for b in args.batch_sizes) + " |")
    print("|---" * (5 + len(args.batch_sizes)) + "|")
    for r in rows:
        lat = " | ".join(f"{r['latency_ms'][b]['torch_fp32']:.2f} / {r['latency_ms'][b]['torch_fakequant']:.2f} / "
                         f"{r['latency_ms'][b]['onnxruntime_qdq']:.2f} ({r['latency_ms'][b]['ort_over_fp32']:.2f}×)"
                         for b in args.batch_sizes)
        print(f"| W{r['bits']}A{r['bits']} | {r['fp32_bytes'] / kb:.1f} | {r['packed_bytes'] / kb:.1f} "
              f"({r['packed_file_bytes'] / kb:.1f}) | {r['onnx_file_bytes'] / kb:.1f} | "
              f"{r['ort_max_abs_logit_diff_rel']:.1e} / {100 * r['ort_top1_agreement']:.0f} % | {lat} |")
    print(json.dumps({"teacher": args.teacher, "threads": threads, "rows": rows}))


if __name__ == "__main__":
    main()
