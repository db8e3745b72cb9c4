"""`zsq export`: a trained run (or a student checkpoint) → a low-bit file (packed or ONNX QDQ), checked against
the Q model, and its sizes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..evaluate import input_channels
from ..io import save_json
from ..models import build_model_def, dataset_info, load_model
from ..quant import ActQuantizer, act_quantizers, float_tensors, quant_params, quantize_int
from .onnx_qdq import save_onnx
from .packed import load_packed, quantized_layers, save_packed
from .report import size_report

FORMATS = ("onnx", "packed")


def run_model_def(run: str | Path, model_def: str | None) -> str | None:
    """The --model-def of a command on a run directory: the one given, else the one its config.json recorded."""
    config = Path(run) / "config.json"
    if model_def is None and config.is_file():
        model_def = json.loads(config.read_text()).get("model_def")
    return model_def


def _student(run: str | Path, model_def: str | None = None) -> torch.nn.Module:
    path = Path(run)
    path = path / "student.pt" if path.is_dir() else path
    if not path.exists():
        raise UserError(f"{path} not found: name a run directory of zsq quantize or its student.pt")
    model = load_model(path, model_def=run_model_def(run, model_def))
    if not quantized_layers(model):
        raise UserError(f"{path} is a full-precision model: export takes a quantized student (zsq quantize)")
    return model


@torch.no_grad()
def roundtrip_error(model: torch.nn.Module, rebuilt: torch.nn.Module, n: int = 64, seed: int = 0) -> float:
    """Max |Δlogit| between the Q model and the model rebuilt from the export, on N(0,1) inputs of its geometry."""
    info = dataset_info(model)
    channels = info.in_channels if info else input_channels(model) or 3
    size = info.image_size if info else 32
    x = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))
    return float((model(x) - rebuilt(x)).abs().max())


def placement_report(model: torch.nn.Module) -> dict[str, Any]:
    """The activation placement and the tensors it leaves float (read by a deployer before trusting `abits`)."""
    quant = getattr(model, "zsq_quant", {}) or {}
    return {"placement": quant.get("placement", "lineage"), "float_tensors": float_tensors(model)}


def onnx_metadata(model: torch.nn.Module, info: Any) -> dict[str, str]:
    quant = getattr(model, "zsq_quant", {}) or {}
    placed = placement_report(model)
    return {"zsq_wbits": str(quant.get("wbits")), "zsq_abits": str(quant.get("abits")),
            "zsq_first_last": str(quant.get("first_last")), "zsq_placement": placed["placement"],
            "zsq_float_tensors": json.dumps(placed["float_tensors"]), "dataset": info.name,
            "classes": json.dumps(list(info.classes)), "mean": json.dumps(list(info.mean)),
            "std": json.dumps(list(info.std)),
            "input": f"image: float32 N×{info.in_channels}×{info.image_size}×{info.image_size} in [0, 1]"}


def onnx_check(model: torch.nn.Module, path: Path, info: Any, n: int = 64, seed: int = 0) -> dict[str, Any]:
    """onnxruntime against the PyTorch fake-quant model on `n` uniform [0, 1] images: the largest logit
    difference relative to the logit range, the share of equal top-1 predictions, and how many activation codes
    differ (and from which quantizer on).

    They are a report, not a bound: the two engines compute each pre-quantization value in another float order
    (BN folded into the conv, other conv kernels), about 1e-6 apart, so a value at a rounding tie can take the
    neighbouring code, and that difference spreads through every later layer (docs/results/export.md)."""
    import onnx
    import onnxruntime as ort

    x = torch.rand(n, info.in_channels, info.image_size, info.image_size, generator=torch.Generator().manual_seed(seed))
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    codes: list[torch.Tensor] = []  # PyTorch's, one tensor per quantizer call, in execution order (the graph's)

    def record(q: ActQuantizer, inputs: tuple, output: torch.Tensor) -> None:
        scale, zero = quant_params(q.lo, q.hi, q.bits)
        codes.append(quantize_int(inputs[0].float(), scale, zero, q.bits))

    handles = [q.register_forward_hook(record) for q in act_quantizers(model)]
    try:
        with torch.no_grad():
            ref = model((x - mean) / std)
    finally:
        for h in handles:
            h.remove()
    proto = onnx.load(str(path))
    for node in (n for n in proto.graph.node if n.op_type == "QuantizeLinear"):
        proto.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.UINT8, None))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, *ort_codes = sess.run(None, {"image": x.numpy()})
    out = torch.from_numpy(logits)
    differ = [int((c != torch.from_numpy(o.astype("float32"))).sum()) for c, o in zip(codes, ort_codes, strict=True)]
    span = float(ref.max() - ref.min()) or 1.0
    return {"ort_max_abs_logit_diff_rel": float((out - ref).abs().max()) / span,
            "ort_top1_agreement": float((out.argmax(1) == ref.argmax(1)).float().mean()),
            "ort_codes_differing": sum(differ), "ort_codes": sum(c.numel() for c in codes),
            "ort_first_differing_quantizer": next((i for i, d in enumerate(differ) if d), None)}


def export_model(qmodel: torch.nn.Module, out: str | Path, fmt: str = "onnx", report: str | Path | None = None,
                 info: Any = None, source: str = "module") -> dict[str, Any]:
    """Write a fake-quantized model as `fmt` and `report` (default OUT.json): sizes, per-layer bits, which tensors
    stay float, and the check against the Q model (packed: round-trip logit error; onnx: onnxruntime against
    PyTorch). `info`: the dataset (normalisation, input size), when the model does not record it."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    model = qmodel.eval()
    if not quantized_layers(model):
        raise UserError(f"{source} is a full-precision model: export takes a quantized one (zsq quantize)")
    if fmt == "packed":
        out = save_packed(model, out)
        fp = build_model_def(model.zsq_model_def) if getattr(model, "zsq_model_def", None) else None
        if fp is None and getattr(model, "zsq_arch", None) is None:
            raise UserError(f"{source} is a user's own module without a --model-def: the packed format rebuilds "
                            f"the module from it; export to onnx instead, or build it with --model-def")
        check = {"roundtrip_max_abs_logit_diff": roundtrip_error(model, load_packed(out, fp))}
    else:
        info = info or dataset_info(model)
        if info is None:
            raise UserError(f"{source} records no dataset: the ONNX graph needs its normalisation and input size "
                            f"(the Python API: dataset=...)")
        out = save_onnx(model, out, info.image_size, info.in_channels, info.mean, info.std,
                        onnx_metadata(model, info))
        check = onnx_check(model, out, info)
    result = size_report(model, {fmt: out})
    result.update(format=fmt, out=str(out), source=source, **placement_report(model), **check)
    save_json(result, report or Path(f"{out}.json"))
    return result


def export_run(run: str | Path, fmt: str, out: str | Path, report: str | Path | None = None,
               model_def: str | None = None) -> dict[str, Any]:
    """`zsq export`: the student of a run directory (or a student.pt) through `export_model`."""
    return export_model(_student(run, model_def), out, fmt, report, source=str(run))
