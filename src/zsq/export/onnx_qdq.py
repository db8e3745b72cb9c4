"""ONNX export in the QDQ pattern: integer weights with per-channel scale and zero point, Q/DQ pairs carrying the
frozen activation ranges, BatchNorm folded, the dataset normalisation inside the graph.

The graph is written node by node from a torch.fx trace whose leaves are the modules `quantize_model` knows
(Conv2d, Linear, BatchNorm2d, the activations and their quantizers, pooling, flatten, ResNet's option-A shortcut),
so each becomes exactly the standard ONNX pattern and anything else is refused by name rather than exported wrong.
- Weights are stored as their codes q ∈ [0, 2ᵏ) in the smallest integer type that also holds every zero point:
  UINT4 (two per byte, opset 21) for k ≤ 4 when each channel's range straddles 0, INT4 when a small one does not
  (Z < 0), then UINT8, INT8, 16 bits; only when no type holds a zero point, q − Z as INT32.
- A BatchNorm that follows a convolution folds into it: the per-channel scale becomes S·γ/σ and the bias
  (b − μ)·γ/σ + β, so the integers do not change.
- An activation quantizer is Clip to its representable range, QuantizeLinear (UINT8), DequantizeLinear: the same
  codes as the fake quantizer, since both round half to even.
"""
from __future__ import annotations

import json
import operator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import UserError
from ..graph import LeafTracer, call_index
from ..io import save_bytes
from ..models.resnet import PadShortcut
from ..quant import ActQuantizer, QuantAct, QuantConv2d, QuantLinear, quant_params
from .packed import weight_codes

OPSET = 21
LEAVES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, QuantAct, nn.MaxPool2d, nn.AvgPool2d,
          nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity, nn.Dropout, PadShortcut)


def _onnx():
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise UserError("ONNX export needs the export extra: pip install 'zsq[export]'") from None
    return onnx, TensorProto, helper, numpy_helper


CONTAINERS = (("UINT4", 0, 15), ("INT4", -8, 7), ("UINT8", 0, 255), ("INT8", -128, 127), ("UINT16", 0, 65535),
              ("INT16", -32768, 32767))


def smallest_container(bits: int, zero: np.ndarray) -> str | None:
    """The smallest ONNX integer type that holds the codes [0, 2ᵏ) and every zero point; None when none does (a
    channel whose range lies far from 0)."""
    for name, lo, hi in CONTAINERS:
        if lo <= 0 and 2**bits - 1 <= hi and lo <= zero.min() and zero.max() <= hi:
            return name
    return None


def fold_bn(scale: np.ndarray, bias: np.ndarray | None, bn: nn.BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    """A per-channel weight scale and bias with the BatchNorm after the conv folded in (inference statistics)."""
    gamma = bn.weight.detach().double().numpy() if bn.affine else np.ones(bn.num_features)
    beta = bn.bias.detach().double().numpy() if bn.affine else np.zeros(bn.num_features)
    mult = gamma / np.sqrt(bn.running_var.detach().double().numpy() + bn.eps)
    b = np.zeros(bn.num_features) if bias is None else bias.astype(np.float64)
    return (scale * mult).astype(np.float32), ((b - bn.running_mean.detach().double().numpy()) * mult + beta
                                               ).astype(np.float32)


class _Graph:
    def __init__(self) -> None:
        self.onnx, self.TP, self.helper, self.nh = _onnx()
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.layer_info: dict[str, dict[str, Any]] = {}
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base.replace('.', '_')}_{self._n}"

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(self.nh.from_array(np.asarray(array), name))
        return name

    def int_const(self, base: str, values: np.ndarray, onnx_type: int) -> str:
        name = self.name(base)
        self.inits.append(self.helper.make_tensor(name, onnx_type, list(values.shape), values.flatten().tolist()))
        return name

    def node(self, op: str, inputs: list[str], base: str, **attrs: Any) -> str:
        out = self.name(base)
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def weight(self, name: str, layer: nn.Module, bn: nn.BatchNorm2d | None) -> tuple[str, str | None]:
        """The (dequantized or float) weight tensor name and the bias name, with a following BN folded in; a conv's
        bias is shaped C×1×1 for an Add after it."""
        w_name, bias = self._weight(name, layer, bn)
        if bias is None:
            return w_name, None
        shape = (-1, 1, 1) if isinstance(layer, nn.Conv2d) else (-1,)
        return w_name, self.const(f"{name}.bias", bias.astype(np.float32).reshape(shape))

    def _weight(self, name: str, layer: nn.Module, bn: nn.BatchNorm2d | None) -> tuple[str, np.ndarray | None]:
        bias = layer.bias.detach().numpy() if layer.bias is not None else None
        if not isinstance(layer, (QuantConv2d, QuantLinear)):  # a layer left at full precision
            w = layer.weight.detach().double().numpy()
            if bn is not None:
                scale, bias = fold_bn(np.ones(w.shape[0]), bias, bn)
                w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
            self.layer_info[name] = {"bits": 32, "container": "FLOAT"}
            return self.const(f"{name}.weight", w.astype(np.float32)), bias
        codes, scale, zero = (t.numpy() for t in weight_codes(layer))
        k = layer.wbits
        if bn is not None:
            scale, bias = fold_bn(scale.astype(np.float64), bias, bn)
        container = smallest_container(k, zero)
        if container is None:
            container, q, z = "INT32", codes - zero.reshape((-1,) + (1,) * (codes.ndim - 1)), np.zeros_like(zero)
        else:
            q, z = codes, zero
        onnx_type = getattr(self.TP, container)
        self.layer_info[name] = {"bits": k, "container": container}
        w = self.node("DequantizeLinear", [self.int_const(f"{name}.weight_q", q, onnx_type),
                                           self.const(f"{name}.scale", scale.astype(np.float32)),
                                           self.int_const(f"{name}.zero", z, onnx_type)], f"{name}.weight", axis=0)
        return w, bias


def _act_qdq(g: _Graph, x: str, name: str, q: ActQuantizer) -> str:
    lo, hi = q.lo.detach().float().reshape(1), q.hi.detach().float().reshape(1)
    scale, zero = quant_params(lo, hi, q.bits)
    s, z = float(scale), int(zero)
    if not 0 <= z <= 255:  # the Clip keeps the codes in [0, 2ᵏ − 1]; Z itself must fit the container
        raise UserError(f"activation range of {name} ([{float(lo):.4g}, {float(hi):.4g}]) has zero point {z}, "
                        f"outside a UINT8 container")
    clipped = g.node("Clip", [x, g.const(f"{name}.min", np.float32(s * -z)),
                              g.const(f"{name}.max", np.float32(s * (2**q.bits - 1 - z)))], f"{name}.clip")
    s_name, z_name = g.const(f"{name}.scale", np.float32(s)), g.const(f"{name}.zero", np.uint8(z))
    quant = g.node("QuantizeLinear", [clipped, s_name, z_name], f"{name}.q")
    return g.node("DequantizeLinear", [quant, s_name, z_name], f"{name}.dq")


def _activation(g: _Graph, x: str, name: str, act: nn.Module) -> str:
    if isinstance(act, nn.Identity):  # a deployable place: the quantizer alone
        return x
    if isinstance(act, nn.ReLU):
        return g.node("Relu", [x], name)
    return g.node("Clip", [x, g.const(f"{name}.min", np.float32(0)), g.const(f"{name}.max", np.float32(6))], name)


def _pads(padding: Any, ndim: int = 2) -> list[int]:
    p = (padding,) * ndim if isinstance(padding, int) else tuple(padding)
    return list(p) + list(p)


def _module(g: _Graph, name: str, m: nn.Module, x: str, bn: nn.BatchNorm2d | None, shape: torch.Size,
            call: int) -> str:
    """The ONNX nodes of module `m` at its `call`-th place in the graph (a QuantAct quantizes each call with its
    own range)."""
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise UserError(f"{name}: only zero padding given as numbers can be exported")
        w, b = g.weight(name, m, bn)
        y = g.node("Conv", [x, w], name, kernel_shape=list(m.kernel_size), strides=list(m.stride),
                   pads=_pads(m.padding), dilations=list(m.dilation), group=m.groups)
        return g.node("Add", [y, b], f"{name}.bias") if b else y
    if isinstance(m, nn.Linear):
        w, b = g.weight(name, m, None)
        return g.node("Gemm", [x, w] + ([b] if b else []), name, transB=1)
    if isinstance(m, nn.BatchNorm2d):
        mean, var = m.running_mean.detach().numpy(), m.running_var.detach().numpy()
        gamma = m.weight.detach().numpy() if m.affine else np.ones_like(mean)
        beta = m.bias.detach().numpy() if m.affine else np.zeros_like(mean)
        return g.node("BatchNormalization", [x, g.const(f"{name}.gamma", gamma), g.const(f"{name}.beta", beta),
                                             g.const(f"{name}.mean", mean), g.const(f"{name}.var", var)], name,
                      epsilon=m.eps)
    if isinstance(m, QuantAct):
        return _act_qdq(g, _activation(g, x, name, m.act), name, m.quantizers()[call])
    if isinstance(m, (nn.ReLU, nn.ReLU6)):
        return _activation(g, x, name, m)
    if isinstance(m, nn.MaxPool2d) and m.dilation in (1, (1, 1)):
        k = [m.kernel_size] * 2 if isinstance(m.kernel_size, int) else list(m.kernel_size)
        s = [m.stride] * 2 if isinstance(m.stride, int) else list(m.stride)
        return g.node("MaxPool", [x], name, kernel_shape=k, strides=s, pads=_pads(m.padding), ceil_mode=int(m.ceil_mode))
    if isinstance(m, nn.AvgPool2d) and m.divisor_override is None:
        k = [m.kernel_size] * 2 if isinstance(m.kernel_size, int) else list(m.kernel_size)
        s = [m.stride] * 2 if isinstance(m.stride, int) else list(m.stride)
        return g.node("AveragePool", [x], name, kernel_shape=k, strides=s, pads=_pads(m.padding),
                      ceil_mode=int(m.ceil_mode), count_include_pad=int(m.count_include_pad))
    if isinstance(m, nn.AdaptiveAvgPool2d) and tuple(shape[2:]) == (1, 1):
        return g.node("GlobalAveragePool", [x], name)
    if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
        return g.node("Flatten", [x], name, axis=1)
    if isinstance(m, (nn.Identity, nn.Dropout)):
        return x
    if isinstance(m, PadShortcut):
        lo = m.extra // 2
        big = np.iinfo(np.int64).max
        sub = g.node("Slice", [x, g.const(f"{name}.starts", np.array([0, 0])), g.const(f"{name}.ends", np.array(
            [big, big])), g.const(f"{name}.axes", np.array([2, 3])), g.const(f"{name}.steps", np.array([2, 2]))],
            f"{name}.slice")
        return g.node("Pad", [sub, g.const(f"{name}.pads", np.array([0, lo, 0, 0, 0, m.extra - lo, 0, 0]))], name)
    raise UserError(f"{name} ({type(m).__name__}) has no ONNX export here; supported: Conv2d, Linear, BatchNorm2d, "
                    f"ReLU/ReLU6 and their quantizers, Max/AvgPool2d, global average pooling, flatten, residual adds")


def _spatial_mean(node: torch.fx.Node, args: list) -> bool:
    dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
    return (node.op == "call_method" and node.target == "mean" or node.op == "call_function"
            and node.target is torch.mean) and dims in ((2, 3), [2, 3], (-2, -1), [-2, -1]) and not node.kwargs.get(
        "keepdim", False)


def _bn_after_conv(gm: torch.fx.GraphModule) -> dict[str, str]:
    """{conv node: bn node} for every BatchNorm2d whose input is a convolution used by nothing else."""
    modules = dict(gm.named_modules())
    pairs = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.BatchNorm2d):
            src = node.args[0]
            if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                    and isinstance(modules[src.target], nn.Conv2d) and len(src.users) == 1):
                pairs[src.name] = node.name
    return pairs


def build_onnx(model: nn.Module, image_size: int, in_channels: int, mean: tuple[float, ...], std: tuple[float, ...],
               metadata: dict[str, str]) -> Any:
    """The ONNX ModelProto of a fake-quantized model (its input: images in [0, 1], N×C×H×W)."""
    g = _Graph()
    model = model.eval()
    try:
        gm = torch.fx.GraphModule(model, LeafTracer(LEAVES).trace(model))
    except Exception as e:  # symbolic tracing fails on data-dependent Python control flow
        raise UserError(f"{type(model).__name__} cannot be traced for ONNX export ({type(e).__name__}: "
                        f"{str(e)[:160]})") from None
    example = torch.zeros(1, in_channels, image_size, image_size)
    ShapeProp(gm).propagate(example)
    modules = dict(gm.named_modules())
    calls = call_index(gm.graph)
    by_name = {n.name: n for n in gm.graph.nodes}
    folded = _bn_after_conv(gm)
    skip = set(folded.values())
    bn_of = {conv: modules[by_name[bn].target] for conv, bn in folded.items()}
    env: dict[str, str] = {}
    for node in gm.graph.nodes:
        args = [env[a.name] if isinstance(a, torch.fx.Node) else a for a in node.args]
        if node.op == "placeholder":
            x = g.node("Sub", ["image", g.const("mean", np.array(mean, np.float32).reshape(1, -1, 1, 1))], "centre")
            env[node.name] = g.node("Div", [x, g.const("std", np.array(std, np.float32).reshape(1, -1, 1, 1))],
                                    "normalised")
        elif node.op == "call_module" and node.name in skip:
            env[node.name] = args[0]  # folded into the conv before it
        elif node.op == "call_module":
            env[node.name] = _module(g, node.target, modules[node.target], args[0], bn_of.get(node.name),
                                     node.meta["tensor_meta"].shape, calls[node])
        elif node.op == "call_function" and node.target in (operator.add, torch.add) and len(args) == 2:
            env[node.name] = g.node("Add", args, node.name)
        elif node.op == "call_function" and node.target is torch.flatten and args[1:] in ([1], [1, -1]):
            env[node.name] = g.node("Flatten", [args[0]], node.name, axis=1)
        elif node.op == "call_function" and node.target is F.adaptive_avg_pool2d and args[1] in (1, (1, 1), [1, 1]):
            env[node.name] = g.node("GlobalAveragePool", [args[0]], node.name)
        elif _spatial_mean(node, args):  # x.mean((2, 3)): the pooled features, flattened
            pooled = g.node("GlobalAveragePool", [args[0]], f"{node.name}.pool")
            env[node.name] = g.node("Flatten", [pooled], node.name, axis=1)
        elif node.op == "output":
            env["logits"] = args[0]
        else:
            raise UserError(f"operation {node.target} ({node.op}) has no ONNX export here")
    h = g.helper
    out = "logits"
    g.nodes.append(h.make_node("Identity", [env["logits"]], [out], name=out))
    graph = h.make_graph(g.nodes, "zsq", [h.make_tensor_value_info("image", g.TP.FLOAT, ["N", in_channels,
                                                                                           image_size, image_size])],
                         [h.make_tensor_value_info(out, g.TP.FLOAT, ["N", None])], g.inits)
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], producer_name="zsq")
    proto.ir_version = 10
    meta = {**metadata, "layers": json.dumps(g.layer_info)}
    h.set_model_props(proto, meta)
    g.onnx.checker.check_model(proto)
    return proto


def save_onnx(model: nn.Module, path: str | Path, image_size: int, in_channels: int, mean: tuple[float, ...],
              std: tuple[float, ...], metadata: dict[str, str]) -> Path:
    return save_bytes(build_onnx(model, image_size, in_channels, mean, std, metadata).SerializeToString(), path)
