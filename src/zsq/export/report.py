"""What an export weighs: FP32 bytes against packed bytes, per layer and in total."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .packed import pack_model


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def size_report(model: nn.Module, files: dict[str, str | Path] | None = None) -> dict[str, Any]:
    """Sizes of a fake-quantized model: `fp32_bytes` (every floating tensor at 32 bits, the FP model),
    `packed_bytes` (the packed payload: codes, scales, zero points and the remaining tensors), their ratio, the
    same for the weights alone, one row per quantized layer, and the on-disk size of each file in `files`."""
    packed = pack_model(model)
    state = model.state_dict()
    fp32 = sum(t.numel() * 4 if t.is_floating_point() else _nbytes(t) for t in state.values())
    layers = []
    per_channel = packed["scales"].element_size() + packed["zeros"].element_size()
    for name, layer in packed["layers"].items():
        params = state[f"{name}.weight"].numel()
        stored = layer["code_bytes"] + layer["shape"][0] * per_channel
        layers.append({"layer": name, "bits": layer["bits"], "params": params, "fp32_bytes": params * 4,
                       "packed_bytes": stored})
    rest = sum(_nbytes(t) for t in packed["tensors"].values())
    total = sum(r["packed_bytes"] for r in layers) + rest
    w_fp32 = sum(r["fp32_bytes"] for r in layers)
    w_packed = sum(r["packed_bytes"] for r in layers)
    return {"fp32_bytes": fp32, "packed_bytes": total, "compression": fp32 / total,
            "weight_fp32_bytes": w_fp32, "weight_packed_bytes": w_packed, "weight_compression": w_fp32 / w_packed,
            "other_bytes": rest, "layers": layers,
            "files": {k: Path(v).stat().st_size for k, v in (files or {}).items()}}


def format_report(report: dict[str, Any]) -> str:
    kb = 1024
    lines = [f"{'layer':28s} {'bits':>4s} {'params':>9s} {'fp32 KiB':>9s} {'packed KiB':>10s}"]
    for r in report["layers"]:
        lines.append(f"{r['layer']:28s} {r['bits']:4d} {r['params']:9d} {r['fp32_bytes'] / kb:9.1f} "
                     f"{r['packed_bytes'] / kb:10.2f}")
    lines.append(f"weights: {report['weight_fp32_bytes'] / kb:.1f} KiB FP32 → {report['weight_packed_bytes'] / kb:.1f}"
                 f" KiB packed ({report['weight_compression']:.2f}×)")
    lines.append(f"model:   {report['fp32_bytes'] / kb:.1f} KiB FP32 → {report['packed_bytes'] / kb:.1f} KiB packed "
                 f"({report['compression']:.2f}×; other tensors {report['other_bytes'] / kb:.1f} KiB)")
    for name, size in report["files"].items():
        lines.append(f"file {name}: {size / kb:.1f} KiB")
    if report.get("float_tensors"):
        floats = report["float_tensors"]
        lines.append(f"activations: placement {report['placement']} leaves {len(floats)} tensors float where they "
                     f"enter a conv, linear or add: {', '.join(floats[:8])}{' …' if len(floats) > 8 else ''}")
    return "\n".join(lines)
