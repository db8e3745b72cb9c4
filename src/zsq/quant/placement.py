"""Where activations are quantized, read from the traced graph: the lineage's places or a deployable integer graph.

- `lineage`: after every ReLU/ReLU6 (one quantizer per call), as GDFQ, AdaDFQ, HAST, AKT and SynQ do. The input
  image, a residual branch's BN output before its add, a MobileNetV2's linear-bottleneck outputs and sums, and
  the pooled features before the classifier stay float: those layers read float activations.
- `deployable`: besides, every tensor that enters a conv, a linear layer or a residual add off the integer grid
  gets its own quantizer (`abits`; the input image 8 bits, as the uint8 pixels it was), so the exported graph is
  integer from the first layer to the logits. Its ranges always hold 0 (zero padding must be exact).

A tensor is on the grid when a quantizer produced it, possibly through operations that only move or select its
values (max pooling, flatten, dropout, zero padding: modules with `keeps_grid = True`). The deployable places are
added as `QuantAct(nn.Identity())` modules under `zsq_sites`, and the model's class becomes a subclass whose
forward is the rewritten graph: names, methods and state_dict keys of the original model stay as they were.
"""
from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..graph import LeafTracer, is_add
from .modules import ActQuantizer, QuantAct

PLACEMENTS = ("lineage", "deployable")
INPUT_BITS = 8
_KEEP_MODULES = (nn.MaxPool2d, nn.Identity, nn.Dropout, nn.Flatten)
_KEEP_FUNCTIONS = (torch.flatten, F.max_pool2d, F.dropout, F.pad, operator.getitem, "flatten", "view", "reshape",
                   "contiguous", "clone")


def check_placement(placement: str) -> None:
    if placement not in PLACEMENTS:
        raise UserError(f"activation placement must be one of {', '.join(PLACEMENTS)}, got '{placement}'")


def _trace(model: nn.Module) -> tuple[torch.fx.Graph, dict[str, nn.Module]]:
    try:
        graph = LeafTracer((QuantAct,)).trace(model)
    except Exception as e:  # noqa: BLE001 - data-dependent control flow: nothing can be placed from the graph
        raise UserError(f"{type(model).__name__} cannot be traced by torch.fx ({type(e).__name__}), so the tensors "
                        f"that reach its layers unquantized cannot be found: use placement 'lineage'") from None
    return graph, dict(model.named_modules())


def _keeps(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether the node only moves or selects the values of its first argument."""
    if not (node.args and isinstance(node.args[0], torch.fx.Node)):
        return False
    if node.op == "call_module":
        m = modules[node.target]
        return isinstance(m, _KEEP_MODULES) or getattr(m, "keeps_grid", False)
    return node.op in ("call_function", "call_method") and node.target in _KEEP_FUNCTIONS


def _origin(node: torch.fx.Node, modules: dict[str, nn.Module]) -> torch.fx.Node:
    """What computed the values: back through the operations that only move them (a dropout, a flatten)."""
    while _keeps(node, modules):
        node = node.args[0]
    return node


def _off_grid(graph: torch.fx.Graph, modules: dict[str, nn.Module]) -> dict[torch.fx.Node, list[torch.fx.Node]]:
    """{tensor off the grid: the convs, linears and adds that read it}, in execution order."""
    on: dict[torch.fx.Node, bool] = {}
    out: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        first = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        quantizer = node.op == "call_module" and isinstance(modules[node.target], (QuantAct, ActQuantizer))
        on[node] = quantizer or (_keeps(node, modules) and on[first])
        if node.op == "call_module":
            reads = [first] if isinstance(modules[node.target], (nn.Conv2d, nn.Linear)) and first is not None else []
        else:
            reads = list(node.args[:2]) if is_add(node) else []
        for t in reads:
            if not on[t]:
                out.setdefault(t, []).append(node)
    return out


def describe(node: torch.fx.Node) -> str:
    """A tensor by what computes it: a module's name, `input`, or the operation and the module it runs in."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "placeholder":
        return "input"
    owner = next(reversed(node.meta.get("nn_module_stack") or {"": None}), "")
    op = getattr(node.target, "__name__", str(node.target))
    return f"{owner} ({op})" if owner else op


def float_tensors(model: nn.Module) -> list[str] | None:
    """The tensors that enter a conv, linear layer or residual add of `model` unquantized (none in a deployable
    model); None when torch.fx cannot trace the model, so nobody can say."""
    try:
        graph, modules = _trace(model)
    except UserError:
        return None
    return [describe(_origin(t, modules)) for t in _off_grid(graph, modules)]


def default_placement(teacher: nn.Module | None) -> str:
    """`lineage` for a registered architecture (what the papers' numbers measure), `deployable` for a user's own
    module, which has no published numbers to match and is meant to run on integer hardware; `lineage` again
    when torch.fx cannot trace it, since nothing else can be placed."""
    if teacher is None or getattr(teacher, "zsq_arch", None):
        return "lineage"
    return "deployable" if float_tensors(teacher) is not None else "lineage"


def _mark_block_outputs(graph: torch.fx.Graph, called: frozenset[str]) -> tuple[nn.ModuleDict, dict[str, str]]:
    """An `nn.Identity` called on the output of each module that the graph dissolved into its children, so that a
    forward hook still sees what the block returns (AKT reads whole blocks); returns the markers and the map from
    each block's name to its marker's. A block's output is its scope's last node, when anything reads it (the graph
    runs in order, so its readers lie outside the block); a block whose last operation nothing reads, so not what it
    returns, gets no marker, and a hook on it is refused by name (`output_module`)."""
    last: dict[str, torch.fx.Node] = {}
    for node in graph.nodes:
        for path, _ in node.meta.get("nn_module_stack", {}).values():
            last[path] = node
    marks, outputs = nn.ModuleDict(), {}
    for path, node in last.items():
        if path in called or not node.users:
            continue
        key = f"m{len(marks)}"
        marks[key] = nn.Identity()
        with graph.inserting_after(node):
            mark = graph.call_module(f"zsq_marks.{key}", (node,))
        node.replace_all_uses_with(mark, delete_user_cb=lambda user: user is not mark)
        outputs[path] = f"zsq_marks.{key}"
    return marks, outputs


def output_module(model: nn.Module, name: str) -> str | None:
    """The module whose forward hook sees what module `name` returns: `name` itself, or, where the deployable
    placement dissolved it into its children, the marker on its output (None when it has none)."""
    called = getattr(model, "zsq_called_modules", None)  # set by the deployable placement only
    return name if called is None or name in called else model.zsq_outputs.get(name)


def place_deployable(qmodel: nn.Module, abits: int, momentum: float, ste: str,
                     site_bits: dict[str, int] | None = None) -> None:
    """Quantize every tensor that enters a conv, linear or add off the grid, in place (see the module doc);
    `site_bits` overrides the bits of a site by its name (`zsq_sites.q_…`)."""
    graph, modules = _trace(qmodel)
    sites = nn.ModuleDict()
    for tensor, readers in _off_grid(graph, modules).items():
        key = f"q_{tensor.name}"
        bits = max(abits, INPUT_BITS) if tensor.op == "placeholder" else abits
        quant = ActQuantizer((site_bits or {}).get(f"zsq_sites.{key}", bits), momentum, ste)
        quant.zero_in_range = True
        sites[key] = QuantAct(nn.Identity(), quant, 1, describe(_origin(tensor, modules)))
        with graph.inserting_after(tensor):
            site = graph.call_module(f"zsq_sites.{key}", (tensor,))
        for reader in readers:
            reader.replace_input_with(tensor, site)
    qmodel.zsq_sites = sites
    # the forward becomes this graph of leaf modules: a block (a ResNet stage, an inverted residual) is no longer
    # called as a module, so a hook on it would never fire; its output is marked instead (zsq_outputs)
    qmodel.zsq_called_modules = frozenset(str(n.target) for n in graph.nodes if n.op == "call_module")
    qmodel.zsq_marks, qmodel.zsq_outputs = _mark_block_outputs(graph, qmodel.zsq_called_modules)
    graph.lint()
    forward = type(torch.fx.GraphModule(qmodel, graph)).forward
    cls = type(qmodel)  # a subclass of its own: pickling it fails loudly instead of losing the quantizers
    qmodel.__class__ = type(f"Deployable{cls.__name__}", (cls,), {"forward": forward})
