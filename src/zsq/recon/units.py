"""Reconstruction units, read from the traced graph: each residual block (a module whose forward adds a shortcut,
and every other instance of its class, e.g. MobileNetV2's inverted residuals without one) is one unit; each conv
or linear layer outside such a block is one, with the BN, activation, quantizer and pooling that follow it. Units
are cut out of the model's graph as modules of their own, each reading one tensor and writing one, in forward
order. Spec: ../shared/specs/ptq.md §4.1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from ..errors import UserError
from ..graph import LeafTracer, is_add, trace


@dataclass
class Unit:
    name: str
    module: torch.fx.GraphModule  # the unit's part of the model: one tensor in, one out; shares its parameters


def block_names(model: nn.Module) -> list[str]:
    """The modules that are residual blocks: the owners of the adds of two computed tensors, and every other
    module of the same class."""
    graph = trace(model)
    if graph is None:
        raise UserError(f"{type(model).__name__} cannot be traced by torch.fx, so its blocks cannot be found: name the "
                        f"reconstruction units (units=[module names])")
    owners = {next(reversed(n.meta.get("nn_module_stack") or {"": None})) for n in graph.nodes if is_add(n)} - {""}
    classes = {type(model.get_submodule(o)) for o in owners}
    return [name for name, m in model.named_modules() if name and type(m) in classes]


def _owner(target: str, blocks: list[str]) -> str | None:
    return next((b for b in blocks if target == b or target.startswith(b + ".")), None)


def find_units(model: nn.Module, blocks: list[str], leaves: tuple[type, ...],
               layers: tuple[type, ...]) -> list[Unit]:
    """Cut `model` (traced with `leaves` kept whole) into units: each of `blocks` (module names) is one; a module
    of a `layers` type outside them starts one; any other operation joins the unit running when it runs (what
    runs before the first unit, e.g. a quantizer of the input image, joins the first)."""
    try:
        graph = LeafTracer(leaves).trace(model)
    except Exception as e:  # noqa: BLE001 - data-dependent control flow
        raise UserError(f"{type(model).__name__} cannot be traced by torch.fx ({type(e).__name__}): post-training "
                        f"reconstruction needs its graph") from None
    modules = dict(model.named_modules())
    groups: list[tuple[str, list[torch.fx.Node]]] = []
    pending: list[torch.fx.Node] = []
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        name = str(node.target) if node.op == "call_module" else None
        key = name and (_owner(name, blocks) or (name if isinstance(modules[name], layers) else None))
        if key and (not groups or groups[-1][0] != key):
            groups.append((key, pending))
            pending = []
        (groups[-1][1] if groups else pending).append(node)
    if not groups:
        raise UserError(f"{type(model).__name__} has no conv or linear layer to reconstruct")
    missing = sorted(set(blocks) - {k for k, _ in groups})
    if missing:
        raise UserError(f"unit '{missing[0]}' is not a module that runs in {type(model).__name__}'s forward")
    return [Unit(name, _cut(model, nodes, name)) for name, nodes in groups]


def _cut(model: nn.Module, nodes: list[torch.fx.Node], name: str) -> torch.fx.GraphModule:
    inside = set(nodes)
    inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(inputs) != 1 or len(outputs) != 1:
        raise UserError(f"unit '{name}' reads {len(inputs)} and writes {len(outputs)} tensors across its boundary; "
                        f"a unit must read one and write one (name the units so that each does)")
    sub = torch.fx.Graph()
    env = {inputs[0]: sub.placeholder("x")}
    for n in nodes:
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(env[outputs[0]])
    return torch.fx.GraphModule(model, sub, class_name=f"Unit_{name.replace('.', '_')}")
