"""What a model computes, read from a torch.fx trace: which module runs where, and what each residual add adds.

Shared by every place that must know a model's dataflow rather than its module tree: activation quantizers per
call site (a module called twice is two places to quantize), the BN range prior, the residual units that HAST's
and SynQ's feature alignment reads, and the ONNX export. Tracing is symbolic: no input is needed, and a model
with data-dependent Python control flow cannot be traced (callers then say what they cannot do, by name).
"""
from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.fx
from torch import nn

from .errors import UserError

ADDS = (operator.add, operator.iadd, torch.add, "add", "add_")


class LeafTracer(torch.fx.Tracer):
    """A tracer that keeps `leaves` (module types) whole, besides torch's own leaf modules and every conv or linear
    layer (a fake-quantized one included): a layer is one call site, and tracing into a quantized layer made each
    read of its weight search all the model's parameters (0.3 of the 0.4 s that quantizing a MobileNetV2 at width
    0.25 took)."""

    def __init__(self, leaves: tuple[type, ...] = ()) -> None:
        super().__init__()
        self.leaves = (*leaves, nn.Conv2d, nn.Linear)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, leaves: tuple[type, ...] = ()) -> torch.fx.Graph | None:
    """The model's graph, or None when torch.fx cannot trace it."""
    try:
        return LeafTracer(leaves).trace(model)
    except Exception:  # noqa: BLE001 - any untraceable model: the caller decides what that means
        return None


def module_calls(graph: torch.fx.Graph) -> Counter[str]:
    """How many times each module (by qualified name) is called in one forward."""
    return Counter(n.target for n in graph.nodes if n.op == "call_module")


def call_index(graph: torch.fx.Graph) -> dict[torch.fx.Node, int]:
    """Each call_module node's place among the calls of its module (0 for the first), in execution order."""
    seen: Counter[str] = Counter()
    out = {}
    for node in graph.nodes:
        if node.op == "call_module":
            out[node] = seen[node.target]
            seen[node.target] += 1
    return out


def is_add(node: torch.fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in ADDS and len(node.args) >= 2 and all(
        isinstance(a, torch.fx.Node) for a in node.args[:2])


def _ancestors(graph: torch.fx.Graph) -> dict[torch.fx.Node, frozenset[torch.fx.Node]]:
    """Every node's ancestors; the graph lists nodes in execution order, so parents come first."""
    anc: dict[torch.fx.Node, frozenset[torch.fx.Node]] = {}
    for node in graph.nodes:
        anc[node] = frozenset().union(*({p} | anc[p] for p in node.all_input_nodes))
    return anc


def residual_branches(model: nn.Module) -> list[str]:
    """The module that ends each residual unit's branch, in forward order: for every add of two computed tensors,
    the operand that is not the shortcut (ResNet's conv2 + BN output before the add, a bottleneck's bn3, an
    inverted residual's projection BN), in full precision in the teacher and the Q model alike.

    The shortcut is the operand the other one descends from (an identity shortcut), or else the one with fewer
    operations since the input both share (a projection: conv + BN against the branch's conv-BN-ReLU-conv-BN)."""
    graph = trace(model)
    if graph is None:
        raise UserError(f"residual units need a torch.fx-traceable model, and {type(model).__name__} is not: "
                        f"name the modules whose outputs to align")
    anc = _ancestors(graph)
    names = []
    for node in graph.nodes:
        if not is_add(node):
            continue
        a, b = node.args[:2]
        anc_a, anc_b = anc[a], anc[b]
        if a in anc_b or b in anc_a:
            branch = b if a in anc_b else a
        else:
            shared = anc_a & anc_b
            own_a, own_b = len(anc_a - shared), len(anc_b - shared)
            if own_a == own_b:
                raise UserError(f"{type(model).__name__}: the add '{node.name}' has two branches of equal length, so "
                                f"neither is a shortcut; name the modules whose outputs to align")
            branch = a if own_a > own_b else b
        if branch.op != "call_module":
            raise UserError(f"{type(model).__name__}: the residual branch into '{node.name}' ends in {branch.target}, "
                            f"not a module whose output can be hooked; name the modules whose outputs to align")
        names.append(str(branch.target))
    return names
