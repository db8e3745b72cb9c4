"""The packed format: every quantized weight as k-bit integer codes packed at k bits (3 bits take 3 bits), with its
per-channel scale and zero point; everything else (biases, BatchNorm, activation ranges) as stored tensors.

A `.zsq` file is a plain dict readable with `torch.load(weights_only=True)`:
    {"zsq": "packed", "version": 1, "arch", "model_args", "quant", "dataset", "metrics",
     "layers": {name: {"bits", "shape", "code_offset", "code_bytes", "channel_offset"}},
     "codes": uint8 (each layer's codes, k bits each, least significant bit first), "scales": float32 and
     "zeros": uint8 or int32 (per output channel, layer after layer), "state": {key: [dtype, shape, offset]} and
     "tensors": {dtype: flat tensor} (every other state_dict entry)}
`load_packed` rebuilds a fake-quantized model whose weights are the dequantized codes S·(q − Z): its per-channel
min/max give back the same S and Z, so it computes exactly what the trained Q model computed.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import DatasetInfo
from ..errors import UserError
from ..io import save_torch
from ..models import build_model_def, create_model, read_checkpoint
from ..quant import QuantConfig, QuantConv2d, QuantLinear, quant_params, quantize_int, quantize_model

FORMAT = "packed"
VERSION = 1


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2ᵏ) → uint8 bytes holding k bits per code, least significant bit first."""
    q = codes.flatten().to(torch.int64).numpy()
    if q.size and (q.min() < 0 or q.max() >= 2**bits):
        raise ValueError(f"codes outside [0, {2**bits}) cannot be packed at {bits} bits")
    planes = ((q[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(planes.ravel(), bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The inverse of `pack_bits`: `count` int64 codes."""
    planes = np.unpackbits(packed.numpy(), bitorder="little")[: count * bits].reshape(count, bits).astype(np.int64)
    return torch.from_numpy((planes << np.arange(bits)).sum(1))


def _smallest_int(z: torch.Tensor) -> torch.Tensor:
    """Zero points lie in [0, 2ᵏ) whenever a channel's range straddles 0 (nearly always): then one byte each."""
    return z.to(torch.uint8) if z.numel() and 0 <= z.min() and z.max() < 256 else z.to(torch.int32)


def weight_codes(layer: QuantConv2d | QuantLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(integer codes q, per-channel scale S, zero point Z) exactly as the fake quantizer computes them: the layer's
    weight is S·(q − Z). Codes and zero points as int64, S as float32, one per output channel."""
    w = layer.weight.detach().cpu().float()
    scale, zero = quant_params(*(t.detach().cpu().float() for t in layer.weight_range()), layer.wbits)
    return quantize_int(w, scale, zero, layer.wbits).long(), scale.flatten(), zero.flatten().long()


def quantized_layers(model: nn.Module) -> dict[str, QuantConv2d | QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}


def pack_model(model: nn.Module) -> dict[str, Any]:
    """The packed dict of a fake-quantized model (see the module docstring), without writing it. The layers'
    codes, scales and zero points are each concatenated into one tensor: a file entry per small tensor would
    cost more than a 3-bit layer itself."""
    layers = quantized_layers(model)
    if not layers:
        raise UserError(f"{type(model).__name__} has no quantized layer: quantize it first (zsq quantize)")
    index, codes, scales, zeros = {}, [], [], []
    offsets = [0, 0]  # into the code bytes and the per-channel tensors
    for name, layer in layers.items():
        q, scale, zero = weight_codes(layer)
        packed = pack_bits(q, layer.wbits)
        index[name] = {"bits": layer.wbits, "shape": list(q.shape), "code_offset": offsets[0],
                       "code_bytes": packed.numel(), "channel_offset": offsets[1]}
        codes.append(packed)
        scales.append(scale)
        zeros.append(zero)
        offsets = [offsets[0] + packed.numel(), offsets[1] + q.shape[0]]
    weights = {f"{n}.weight" for n in layers}
    state, tensors = _flatten({k: v for k, v in model.state_dict().items() if k not in weights})
    info = getattr(model, "zsq_dataset", None)
    arch = getattr(model, "zsq_arch", None)
    return {"zsq": FORMAT, "version": VERSION, "arch": arch,
            "model_args": model.model_args() if arch is not None else None,
            "model_def": getattr(model, "zsq_model_def", None),
            "quant": getattr(model, "zsq_quant", None), "dataset": asdict(info) if info is not None else None,
            "metrics": getattr(model, "zsq_metrics", {}), "layers": index, "codes": torch.cat(codes),
            "scales": torch.cat(scales), "zeros": _smallest_int(torch.cat(zeros)), "state": state,
            "tensors": tensors}


def _flatten(state: dict[str, torch.Tensor]) -> tuple[dict[str, list], dict[str, torch.Tensor]]:
    """The state as one flat tensor per dtype plus an index {key: [dtype, shape, offset]}."""
    index, groups = {}, {}
    for key, t in state.items():
        dtype = str(t.dtype).removeprefix("torch.")
        group = groups.setdefault(dtype, [])
        index[key] = [dtype, list(t.shape), sum(g.numel() for g in group)]
        group.append(t.detach().cpu().flatten())
    return index, {dtype: torch.cat(g) for dtype, g in groups.items()}


def _unflatten(index: dict[str, list], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, (dtype, shape, offset) in index.items():
        n = int(np.prod(shape))
        out[key] = tensors[dtype][offset: offset + n].view(shape).clone()
    return out


def save_packed(model: nn.Module, path: str | Path) -> Path:
    return save_torch(pack_model(model), path)


def dequantized_weights(packed: dict[str, Any]) -> dict[str, torch.Tensor]:
    """{"<layer>.weight": S·(q − Z)} for every packed layer."""
    out = {}
    for name, layer in packed["layers"].items():
        shape, c0 = layer["shape"], layer["channel_offset"]
        blob = packed["codes"][layer["code_offset"]: layer["code_offset"] + layer["code_bytes"]]
        codes = unpack_bits(blob, layer["bits"], int(np.prod(shape))).view(shape).float()
        view = (-1,) + (1,) * (len(shape) - 1)
        scale = packed["scales"][c0: c0 + shape[0]].view(view)
        zero = packed["zeros"][c0: c0 + shape[0]].float().view(view)
        out[f"{name}.weight"] = scale * (codes - zero)
    return out


def read_packed(path: str | Path) -> dict[str, Any]:
    obj = read_checkpoint(path)
    if not isinstance(obj, dict) or obj.get("zsq") != FORMAT:
        raise UserError(f"{path} is not a zsq packed model (write one with zsq export --format packed)")
    if obj.get("version") != VERSION:
        raise UserError(f"{path} is packed format version {obj.get('version')}; this zsq reads version {VERSION}")
    return obj


def load_packed(path: str | Path, model: nn.Module | None = None, model_def: str | None = None) -> nn.Module:
    """Rebuild the Q model from a `.zsq` file, in eval mode. A registered architecture is rebuilt from the file;
    a user's own one needs its FP module (`model`, any weights, or the `model_def` FILE.py:FACTORY that builds
    it), which is quantized with the recorded config."""
    obj = read_packed(path)
    if model is None and model_def is not None:
        model = build_model_def(model_def)
    if model is None:
        if obj["arch"] is None:
            built = f" built by {obj['model_def']}" if obj.get("model_def") else ""
            raise UserError(f"{path} holds a user's own module{built}: pass its FP module or the FILE.py:FACTORY "
                            f"that builds it, load_packed(path, model) or load_packed(path, model_def=...)")
        model = create_model(obj["arch"], **obj["model_args"])
    qmodel = quantize_model(model, cfg=QuantConfig(**obj["quant"])) if obj.get("quant") else model
    state = {**_unflatten(obj["state"], obj["tensors"]), **dequantized_weights(obj)}
    own = qmodel.state_dict()
    if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
        raise UserError(f"{path} does not match {type(qmodel).__name__}: pass the architecture it was packed from")
    qmodel.load_state_dict(state)
    if obj.get("dataset"):
        qmodel.zsq_dataset = DatasetInfo(**obj["dataset"])
    qmodel.zsq_metrics = obj.get("metrics", {})
    return qmodel.eval()
