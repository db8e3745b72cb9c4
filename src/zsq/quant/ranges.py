"""Activation range setters, chosen by name (`--act-range`): how the frozen [lo, hi] of each activation
quantizer is obtained from the warm-up's synthetic images, or without them.

- `ema-minmax`: EMA of each batch's min and max (the lineage's scheme; ZeroQ/GDFQ).
- `percentile`: EMA of each batch's (100 − p)-th and p-th percentiles (`--act-percentile`, 99.9): a few extreme
  synthetic activations no longer stretch the range.
- `bn-prior`: data-free bounds from the teacher's own BatchNorm layers. On the data a BN was fitted to, its
  output channel c has mean β_c and standard deviation |γ_c|, so after BN → ReLU the activations lie mostly
  below β_c + k·|γ_c| (`--bn-k`); a residual sum is bounded by the sum of its inputs' bounds (per channel), and
  parameter-free shape operations (pooling, subsampling, zero padding) carry a bound through. Where a bound
  exists, hi = max_c ReLU(bound_c); elsewhere the EMA range stays.
- `bn-clamp`: the EMA range, its hi clamped to the BN bound where one exists.
- `learned`: hi becomes a parameter trained with the weights by its LSQ gradient, initialised from the BN prior
  where it exists and from the EMA range elsewhere.

A setter has `prepare(qmodel)` (before the warm-up observes) and `finish(qmodel)` (when the ranges freeze).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..registry import Registry
from .modules import ActQuantizer, QuantAct
from .surgery import act_quantizers


@dataclass
class RangeOptions:
    act_percentile: float = 99.9  # percentile setter: the batch percentile taken as hi (and 100 − p as lo)
    bn_k: float = 3.0  # BN setters: standard deviations above the mean taken as a channel's bound

    def __post_init__(self) -> None:
        if not 50 < self.act_percentile <= 100:
            raise UserError(f"act-percentile must be in (50, 100], got {self.act_percentile}")
        if self.bn_k <= 0:
            raise UserError(f"bn-k must be > 0, got {self.bn_k}")


class RangeSetter:
    def __init__(self, opts: RangeOptions) -> None:
        self.opts = opts

    def prepare(self, qmodel: nn.Module) -> None:
        for q in act_quantizers(qmodel):
            q.percentile = 100.0

    def finish(self, qmodel: nn.Module) -> None:
        """Called once, when the warm-up ends; the EMA ranges are final as they are."""

    def training(self, qmodel: nn.Module, on: bool) -> None:
        """Called at every epoch start (and on resume): whether the Q model trains in this epoch."""


RANGE_SETTERS: Registry[type[RangeSetter]] = Registry("activation range setter")
RANGE_SETTERS.register("ema-minmax")(RangeSetter)


@RANGE_SETTERS.register("percentile")
class PercentileRange(RangeSetter):
    def prepare(self, qmodel: nn.Module) -> None:
        for q in act_quantizers(qmodel):
            q.percentile = self.opts.act_percentile


@RANGE_SETTERS.register("bn-prior")
class BNPriorRange(RangeSetter):
    clamp = False

    def finish(self, qmodel: nn.Module) -> None:
        for q, bound in bn_bounds(qmodel, self.opts.bn_k).items():
            hi = torch.as_tensor(bound, dtype=q.hi.dtype, device=q.hi.device)
            q.hi.copy_(torch.minimum(q.hi, hi) if self.clamp else hi)
            q.lo.clamp_(max=0.0)  # after a ReLU lo is 0; keep any negative lo the EMA found
            q.calibrated = True


@RANGE_SETTERS.register("bn-clamp")
class BNClampRange(BNPriorRange):
    clamp = True


@RANGE_SETTERS.register("learned")
class LearnedRange(BNPriorRange):
    def prepare(self, qmodel: nn.Module) -> None:
        """The parameters exist from the start, so the Q optimizer (built before the warm-up) holds them."""
        super().prepare(qmodel)
        for q in act_quantizers(qmodel):
            q.learn_range().requires_grad_(True)
            q.learned = False  # the warm-up observes; the range trains with the weights after it

    def finish(self, qmodel: nn.Module) -> None:
        super().finish(qmodel)
        with torch.no_grad():
            for q in act_quantizers(qmodel):
                q.learn_range().copy_(q.hi)

    def training(self, qmodel: nn.Module, on: bool) -> None:
        for q in act_quantizers(qmodel):
            q.learned = on


def create_range_setter(name: str, opts: RangeOptions | None = None) -> RangeSetter:
    return RANGE_SETTERS.get(name)(opts or RangeOptions())


class _Tracer(torch.fx.Tracer):
    """Quantized activations, BN and parameter-free modules stay whole: bounds are propagated through them."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantAct, nn.BatchNorm2d)) or not list(m.children()) or super().is_leaf_module(
            m, qualname)


def bn_bounds(qmodel: nn.Module, k: float) -> dict[ActQuantizer, float]:
    """Each activation quantizer whose input can be bounded from BatchNorm statistics, with its hi:
    max over channels of ReLU(bound). Bounds are per-channel vectors shaped (1, C, 1, 1)."""
    try:
        graph = _Tracer().trace(qmodel)
    except Exception as e:  # noqa: BLE001 - any untraceable model simply has no BN prior
        raise UserError(f"the BN range prior needs a torch.fx-traceable model ({type(e).__name__}: {e})") from None
    modules = dict(qmodel.named_modules())
    bound: dict[str, torch.Tensor | None] = {}
    out: dict[ActQuantizer, float] = {}
    for node in graph.nodes:
        args = [bound.get(a.name) if isinstance(a, torch.fx.Node) else a for a in node.args]
        b = None
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, nn.BatchNorm2d) and m.affine:
                b = (m.bias + k * m.weight.abs()).detach().view(1, -1, 1, 1)
            elif isinstance(m, QuantAct):
                if args[0] is not None:
                    b = F.relu(m.act(args[0].clone()))
                    out[m.quant] = b.max().item()
            elif args and args[0] is not None and not any(True for _ in m.parameters()):
                b = _apply(m, args[0])
        elif node.op in ("call_function", "call_method") and args and args[0] is not None:
            if node.target in (operator.add, torch.add, "add") and len(args) > 1 and args[1] is not None:
                b = args[0] + args[1]
            elif node.target in (F.relu, torch.relu, "relu"):
                b = F.relu(args[0])
        bound[node.name] = b
    return out


def _apply(m: nn.Module, b: torch.Tensor) -> torch.Tensor | None:
    """A parameter-free module applied to a (1, C, 1, 1) bound: right for monotone channel-wise operations
    (pooling, subsampling, zero padding, ReLU); anything that changes the layout gives up."""
    try:
        with torch.no_grad():
            y = m(b.clone())
    except Exception:  # noqa: BLE001 - an operation that does not take a 1×1 map has no bound
        return None
    return y if y.ndim == 4 and y.shape[0] == 1 and y.shape[2:] == (1, 1) else None
