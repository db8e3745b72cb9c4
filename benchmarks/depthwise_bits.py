"""What low-bit weights do to MobileNetV2's depthwise layers, with no training: the shipped teacher's top-1 on the
Fashion-MNIST test set with its weights at 3 or 4 bits everywhere, with the depthwise convs spared (8 bits), and
with only the depthwise convs at 3 or 4 bits; and each layer kind's relative weight quantization error
‖Ŵ − W‖² / ‖W‖² (per-output-channel min/max, the lineage's quantizer). Activations stay at 8 bits with
Gaussian-noise ranges, so the numbers isolate the weights. Prints one JSON object as its last line.
Usage: python benchmarks/depthwise_bits.py [--teacher mobilenetv2_fmnist] [--limit N]
"""
from __future__ import annotations

import argparse
import json

from torch import nn

import zsq
from zsq.quant import QuantConv2d, calibrate, gaussian_inputs, quantize_model


def _kind(conv: nn.Conv2d) -> str:
    if conv.groups > 1 and conv.groups == conv.in_channels:
        return "depthwise"
    return "pointwise" if conv.kernel_size == (1, 1) else "full"


def _weight_error(qmodel: nn.Module) -> dict[str, float]:
    err: dict[str, list[float]] = {}
    for m in qmodel.modules():
        if isinstance(m, QuantConv2d):
            w = m.weight.detach()
            rel = float((m.quantized_weight().detach() - w).pow(2).sum() / w.pow(2).sum())
            err.setdefault(_kind(m), []).append(rel)
    return {k: round(sum(v) / len(v), 5) for k, v in err.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--teacher", default="mobilenetv2_fmnist")
    p.add_argument("--limit", type=int, help="evaluate on the first N test images")
    a = p.parse_args()
    teacher = zsq.load_model(a.teacher)
    info = teacher.zsq_dataset
    test = zsq.load_dataset(info.name, "test")
    convs = {n: _kind(m) for n, m in teacher.named_modules() if isinstance(m, nn.Conv2d)}
    depthwise = [n for n, k in convs.items() if k == "depthwise"]
    others = [n for n in convs if n not in depthwise] + [n for n, m in teacher.named_modules()
                                                          if isinstance(m, nn.Linear)]
    fp = zsq.evaluate(teacher, test, limit=a.limit)["top1"]
    rows = {}
    for bits in (4, 3):
        cases = {f"all W{bits}": {}, f"W{bits}, depthwise at W8": dict.fromkeys(depthwise, 8),
                 f"W8, depthwise at W{bits}": {**dict.fromkeys(others, 8), **dict.fromkeys(depthwise, bits)}}
        for name, layer_bits in cases.items():
            q = quantize_model(teacher, wbits=bits, abits=8, layer_bits=layer_bits)
            calibrate(q, gaussian_inputs(4, 256, (info.in_channels, info.image_size, info.image_size)))
            rows[name] = {"top1": zsq.evaluate(q, test, limit=a.limit)["top1"]}
            if name.startswith("all"):  # every layer at `bits`: each kind's error at that width
                rows[name]["relative_weight_error"] = _weight_error(q)
            print(f"{name:24s} top1 {rows[name]['top1']:.2f}  (FP {fp:.2f})  "
                  f"{rows[name].get('relative_weight_error', '')}", flush=True)
    print(json.dumps({"benchmark": "depthwise_bits", "teacher": a.teacher, "fp_top1": fp, "activations": "A8, "
                      "Gaussian-noise ranges", "layers": {"depthwise": len(depthwise), "other": len(others)},
                      "results": rows}))


if __name__ == "__main__":
    main()
