"""Activation placement from the traced graph: the lineage's places, the deployable integer graph, and the report of
the tensors that stay float."""
from __future__ import annotations

import json
import operator

import onnxruntime as ort
import pytest
import torch
from torch import nn

from zsq.data import DatasetInfo
from zsq.export.onnx_qdq import build_onnx
from zsq.export.run import onnx_metadata
from zsq.graph import LeafTracer, is_add
from zsq.models import create_model, load_model, save_checkpoint
from zsq.quant import (QuantAct, act_quantizers, bn_bounds, calibrate, default_placement, float_tensors,
                       quantize_model)

from conftest import randomise_bn


def _mobilenet() -> nn.Module:
    return randomise_bn(create_model("mobilenet_v2", num_classes=10, in_channels=1, width_mult=0.35, stem_stride=1),
                        0, 0.2)


def _placed(model: nn.Module, placement: str, abits: int = 4) -> nn.Module:
    q = quantize_model(model, wbits=4, abits=abits, placement=placement)
    return calibrate(q, [torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(1))]).eval()


def _layer_inputs(q: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, a[0].detach()))
             for name, m in q.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        q(x)
    for h in hooks:
        h.remove()
    return seen


def test_lineage_leaves_the_mobilenet_bottlenecks_float_and_says_so():
    q = _placed(_mobilenet(), "lineage")
    floats = float_tensors(q)
    # the image, all 17 projection outputs, the 10 residual sums, the pooled features
    assert floats[0] == "input" and floats[-1] == "avgpool" and len(floats) == 1 + 17 + 10 + 1
    assert "features.1.conv.2" in floats and "features.3 (add)" in floats
    inputs = _layer_inputs(q, torch.randn(8, 1, 32, 32))
    many = [n for n, t in inputs.items() if t.unique().numel() > 16]
    # the stem, the 16 expand convs after a linear bottleneck, the last 1×1 conv and the classifier read float
    assert len(many) == 1 + 16 + 1 + 1 and "features.0.0" in many and "classifier.1" in many


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet20", "resnet50"])
def test_deployable_quantizes_every_tensor_into_a_layer_or_an_add(arch):
    model = _mobilenet() if arch == "mobilenet_v2" else randomise_bn(create_model(arch, in_channels=1,
                                                                                   num_classes=10), 0, 0.2)
    lineage, q = _placed(model, "lineage"), _placed(model, "deployable")
    assert float_tensors(q) == [] and type(q).__name__ == f"Deployable{type(model).__name__}"
    assert isinstance(q, type(model)) and q.state_dict().keys() >= lineage.state_dict().keys()
    x = torch.randn(8, 1, 32, 32)
    for name, t in _layer_inputs(q, x).items():  # on a 4-bit grid, the image on an 8-bit one
        assert t.unique().numel() <= (256 if name in ("conv1", "features.0.0") else 16), name
    graph = LeafTracer((QuantAct,)).trace(q)
    adds = [n for n in graph.nodes if is_add(n)]
    assert adds and all(a.op == "call_module" for n in adds for a in n.args[:2])  # every operand a quantizer
    sites = [m.quant for m in q.zsq_sites.values()]
    assert all(s.lo <= 0 <= s.hi for s in sites)  # zero padding stays exact
    assert len(act_quantizers(q)) == len(act_quantizers(lineage)) + len(sites)
    with torch.no_grad():  # the lineage's quantizers are the same ones, at the same places
        assert not torch.equal(q(x), lineage(x))


def test_a_deployable_student_reloads_and_exports_integer_end_to_end(tmp_path):
    q = _placed(_mobilenet(), "deployable")
    info = DatasetInfo("fashion-mnist", 10, 1, 32, (0.5,), (0.25,))
    save_checkpoint(q, tmp_path / "student.pt", info, quant=q.zsq_quant)
    back = load_model(tmp_path / "student.pt")
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), q(x), rtol=0, atol=0)
    meta = onnx_metadata(q, info)
    assert meta["zsq_placement"] == "deployable" and json.loads(meta["zsq_float_tensors"]) == []
    proto = build_onnx(q, 32, 1, (0.5,), (0.25,), meta)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == len(act_quantizers(q))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    img = torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = q((img - 0.5) / 0.25)
    out = torch.from_numpy(sess.run(None, {"image": img.numpy()})[0])
    assert float((out - ref).abs().max() / (ref.max() - ref.min())) < 1e-3
    assert (out.argmax(1) == ref.argmax(1)).float().mean() == 1.0
    lineage_meta = onnx_metadata(_placed(_mobilenet(), "lineage"), info)
    assert json.loads(lineage_meta["zsq_float_tensors"])[0] == "input"


class Functional(nn.Module):
    """A user's module with a functional residual add, and one the tracer cannot follow."""

    def __init__(self, branchy: bool = False) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.fc = nn.Linear(8, 10)
        self.branchy = branchy

    def forward(self, x):
        h = self.relu1(self.bn1(self.conv1(x)))
        h = self.relu2(operator.add(h, self.bn2(self.conv2(h))))
        if self.branchy and h.sum() > 0:  # data-dependent control flow
            h = h * 1
        return self.fc(h.mean((2, 3)))


def test_default_placement_and_the_bn_prior_on_deployable_places():
    assert default_placement(create_model("resnet20")) == "lineage"  # the papers' models: the papers' places
    assert default_placement(Functional()) == "deployable"
    assert default_placement(Functional(branchy=True)) == "lineage"  # untraceable: nothing else can be placed
    assert float_tensors(quantize_model(Functional(branchy=True), 4, 4)) is None
    q = quantize_model(randomise_bn(Functional(), 0, 0.2), 4, 4, placement="deployable")
    assert [m.site for m in q.zsq_sites.values()] == ["input", "bn2", "mean"]  # the add's branch, the pooled map
    bounds = bn_bounds(q, 3.0)
    relus = [m.quant for m in (q.relu1, q.relu2)]
    assert set(bounds) == set(relus)  # the signed deployable places keep their EMA ranges


def test_a_quantized_layer_is_one_call_in_the_traced_graph():
    """Traced into, a fake-quantized layer's weight became a graph attribute whose every read searched all the
    model's parameters; a layer is one call site, quantized or not."""
    from zsq.graph import module_calls, trace
    from zsq.quant import QuantConv2d, QuantLinear

    q = quantize_model(_mobilenet(), 4, 4)
    graph = trace(q, (QuantAct,))  # as quantize_model traces it
    layers = [n for n, m in q.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert layers and all(module_calls(graph)[n] == 1 for n in layers)
    assert not any(node.op == "get_attr" for node in graph.nodes)


def test_a_dissolved_block_is_read_at_its_output():
    """A hook on a block of the deployable graph sees the tensor the block hands on: the input of the quantizer of
    the next layer (an inverted residual without a shortcut, and one with it)."""
    from zsq.distill import FeatureTap

    q = _placed(_mobilenet(), "deployable")
    blocks = ["features.1", "features.3"]
    assert not {*blocks, "features"} & q.zsq_called_modules and {*blocks, "features"} <= set(q.zsq_outputs)
    graph = LeafTracer((QuantAct,)).trace(q)
    handed_on = {}
    for name in blocks:  # the module each marked output flows into, with a hook keeping its input
        mark = next(n for n in graph.nodes if n.op == "call_module" and n.target == q.zsq_outputs[name])
        reader = q.get_submodule(next(iter(mark.users)).target)
        reader.register_forward_hook(lambda m, i, o, name=name: handed_on.setdefault(name, i[0]))
    tap = FeatureTap(q, blocks)
    with torch.no_grad():
        q(torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
    feats = tap.take()
    tap.remove()
    assert all(torch.equal(feats[name], handed_on[name]) for name in blocks)
    assert not torch.equal(feats["features.1"], feats["features.3"])
