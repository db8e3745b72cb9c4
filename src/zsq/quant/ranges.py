"""Activation range setters, chosen by name (`--act-range`): how the frozen [lo, hi] of each activation
quantizer is obtained from the warm-up's synthetic images, or without them.

- `ema-minmax`: EMA of each batch's min and max (the lineage's scheme; ZeroQ/GDFQ).
- `percentile`: EMA of each batch's (100 − p)-th and p-th percentiles (`--act-percentile`, 99.9): a few extreme
  synthetic activations no longer stretch the range.
- `bn-prior`: data-free bounds from the teacher's own BatchNorm layers. On the data a BN was fitted to, its
  output channel c has mean β_c and standard deviation |γ_c|, so after BN → ReLU the activations lie mostly
  below β_c + k·|γ_c| (`--bn-k`). Where the input of an activation is not a BN output (a residual sum), the
  per-channel statistics are carried through the graph (`--bn-propagate`): `bounds` adds the inputs' bounds
  (a worst case that grows along the residual stream), `moments` carries each channel's mean and standard
  deviation: a ReLU maps them to the rectified Gaussian's, a sum adds means and variances (branches taken as
  independent), and the bound is mean + k·std. Parameter-free shape operations (pooling, subsampling, zero
  padding) carry both through. Where a bound exists, hi = max_c ReLU(bound_c); elsewhere the EMA range stays.
- `bn-clamp`: the EMA range, its hi clamped to the BN bound where one exists.
- `learned`: hi becomes a parameter trained with the weights by its LSQ gradient, initialised from the BN prior
  where it exists and from the EMA range elsewhere.

A setter has `prepare(qmodel)` (before the warm-up observes) and `finish(qmodel)` (when the ranges freeze).
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..graph import LeafTracer, call_index
from ..registry import Registry
from .modules import ActQuantizer, QuantAct
from .surgery import act_quantizers


BN_PROPAGATE = ("bounds", "moments")


def check_propagate(name: str) -> None:
    if name not in BN_PROPAGATE:
        raise UserError(f"unknown bn-propagate '{name}'; choose one of: {', '.join(BN_PROPAGATE)}")


@dataclass
class PercentileOptions:
    act_percentile: float = field(default=99.9, metadata={
        "help": "batch percentile of --act-range percentile, taken as hi (and 100 − p as lo; default 99.9)"})

    def __post_init__(self) -> None:
        if not 50 < self.act_percentile <= 100:
            raise UserError(f"act-percentile must be in (50, 100], got {self.act_percentile}")


@dataclass
class BNOptions:
    bn_k: float = field(default=3.0, metadata={
        "help": "BN standard deviations above the BN mean taken as a channel's bound, for --act-range "
                "bn-prior/bn-clamp/learned (default 3)"})
    bn_propagate: str = field(default="bounds", metadata={
        "help": "how the BN setters carry channel statistics across ReLUs and residual sums: bounds (add the "
                "inputs' bounds; default) or moments (rectified-Gaussian mean and std, variances add)"})

    def __post_init__(self) -> None:
        if self.bn_k <= 0:
            raise UserError(f"bn-k must be > 0, got {self.bn_k}")
        check_propagate(self.bn_propagate)


@dataclass
class LearnedOptions(BNOptions):
    # LSQ's gradient scale lets a learned range share the weights' learning rate, which assumes the weights' long
    # schedules: at the quick budget (500 steps, lr_q 1e-3 then 1e-4) the ranges moved under 0.3 %
    # (docs/results/activation-ranges.md)
    range_lr_scale: float = field(default=1.0, metadata={
        "help": "learning rate of --act-range learned's ranges, × lr-q, same schedule (default 1)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.range_lr_scale <= 0:
            raise UserError(f"range-lr-scale must be > 0, got {self.range_lr_scale}")


class RangeSetter:
    """The warm-up's EMA of each batch's min and max, frozen when the warm-up ends (the lineage's ranges).

    Registered as `ema-minmax`, and the base of the other setters: each registers with the dataclass of its
    options (None: none)."""
    needs_images = True  # sets ranges from the warm-up's images (so --warmup-epochs 0 cannot run it)
    lr_scale = 1.0  # learning rate of trained ranges, × lr_q (only `learned` trains them)

    def __init__(self, opts: Any = None) -> None:
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


@RANGE_SETTERS.register("percentile", options=PercentileOptions)
class PercentileRange(RangeSetter):
    """The warm-up's EMA of each batch's percentiles (`--act-percentile`) instead of min and max."""
    def prepare(self, qmodel: nn.Module) -> None:
        for q in act_quantizers(qmodel):
            q.percentile = self.opts.act_percentile


@RANGE_SETTERS.register("bn-prior", options=BNOptions)
class BNPriorRange(RangeSetter):
    """Data-free: each range's upper end from the teacher's BatchNorm statistics (mean + k·std, propagated
    through the network); ranges it cannot bound keep the warm-up's."""
    needs_images = False  # where the teacher's BN statistics bound a range; the others keep the warm-up's
    clamp = False

    def finish(self, qmodel: nn.Module) -> None:
        for q, bound in bn_bounds(qmodel, self.opts.bn_k, self.opts.bn_propagate).items():
            hi = torch.as_tensor(bound, dtype=q.hi.dtype, device=q.hi.device)
            q.hi.copy_(torch.minimum(q.hi, hi) if self.clamp else hi)
            q.lo.clamp_(max=0.0)  # after a ReLU lo is 0; keep any negative lo the EMA found
            q.calibrated = True


@RANGE_SETTERS.register("bn-clamp", options=BNOptions)
class BNClampRange(BNPriorRange):
    """The warm-up's EMA ranges, each clamped to its BatchNorm bound."""
    needs_images = True  # the EMA range is what it clamps
    clamp = True


@RANGE_SETTERS.register("learned", options=LearnedOptions)
class LearnedRange(BNPriorRange):
    """The BN prior's ranges as a start, their upper ends then trained by their LSQ gradient."""
    @property
    def lr_scale(self) -> float:
        return self.opts.range_lr_scale

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


def create_range_setter(name: str, options: dict[str, Any] | None = None) -> RangeSetter:
    """Setter `name` with its options from `options` (by name; others ignored, missing ones at their default)."""
    return RANGE_SETTERS.get(name)(RANGE_SETTERS.build_options(name, options or {}))


class _Tracer(LeafTracer):
    """Quantized activations, BN and parameter-free modules stay whole: bounds are propagated through them."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return not list(m.children()) or super().is_leaf_module(m, qualname)


Stats = tuple[torch.Tensor, torch.Tensor]  # per-channel mean and standard deviation, each (1, C, 1, 1)


def bn_bounds(qmodel: nn.Module, k: float, propagate: str = "bounds") -> dict[ActQuantizer, float]:
    """Each activation quantizer whose input can be bounded from BatchNorm statistics, with its hi:
    max over channels of act(mean + k·std). Every traced value carries per-channel (mean, std) vectors shaped
    (1, C, 1, 1); under `bounds` a ReLU turns them into (bound, 0), so a sum adds bounds."""
    check_propagate(propagate)  # a misspelt name must not fall back to `bounds` silently
    try:
        graph = _Tracer((QuantAct, nn.BatchNorm2d)).trace(qmodel)
    except Exception as e:  # noqa: BLE001 - any untraceable model simply has no BN prior
        raise UserError(f"the BN range prior needs a torch.fx-traceable model ({type(e).__name__}: {e})") from None
    moments = propagate == "moments"
    site = call_index(graph)
    modules = dict(qmodel.named_modules())
    stats: dict[str, Stats | None] = {}
    out: dict[ActQuantizer, float] = {}
    for node in graph.nodes:
        args = [stats.get(a.name) if isinstance(a, torch.fx.Node) else a for a in node.args]
        s = None
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, nn.BatchNorm2d) and m.affine:
                s = (m.bias.detach().view(1, -1, 1, 1), m.weight.detach().abs().view(1, -1, 1, 1))
            elif isinstance(m, QuantAct) and not isinstance(m.act, (nn.ReLU, nn.ReLU6)):
                s = args[0]  # a deployable place (signed, before an add or a conv): its range is the EMA's
            elif isinstance(m, QuantAct):
                if args[0] is not None:
                    mean, std = args[0]
                    out[m.quantizers()[site[node]]] = F.relu(m.act(mean + k * std)).max().item()
                    s = _relu(args[0], k, moments, m.act)
            elif isinstance(m, (nn.ReLU, nn.ReLU6)) and args[0] is not None:
                s = _relu(args[0], k, moments, m)
            elif args and args[0] is not None and not any(True for _ in m.parameters()):
                s = _apply(m, args[0])
        elif node.op in ("call_function", "call_method") and args and args[0] is not None:
            if node.target in (operator.add, torch.add, "add") and len(args) > 1 and args[1] is not None:
                (ma, sa), (mb, sb) = args[0], args[1]
                s = (ma + mb, torch.hypot(sa, sb) if moments else sa + sb)
            elif node.target in (F.relu, torch.relu, "relu"):
                s = _relu(args[0], k, moments)
        stats[node.name] = s
    return out


def _relu(s: Stats, k: float, moments: bool, act: Callable[[torch.Tensor], torch.Tensor] = F.relu) -> Stats:
    """Statistics after a ReLU: the rectified Gaussian's mean and std (`moments`; a ReLU6's cap is ignored, a
    slight overestimate), or the bound itself passed through the activation."""
    mean, std = s
    if not moments:
        return F.relu(act(mean + k * std)), torch.zeros_like(std)
    a = mean / std.clamp_min(1e-12)
    cdf, pdf = torch.special.ndtr(a), torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    m1 = mean * cdf + std * pdf
    m2 = (mean * mean + std * std) * cdf + mean * std * pdf
    return m1, (m2 - m1 * m1).clamp_min(0).sqrt()


def _apply(m: nn.Module, s: Stats) -> Stats | None:
    """A parameter-free module applied to a (1, C, 1, 1) mean and std: right for channel-wise shape operations
    (average pooling, subsampling, zero padding; max pooling keeps the mean, a slight underestimate);
    anything that changes the layout gives up."""
    try:
        with torch.no_grad():
            y = tuple(m(v.clone()) for v in s)
    except Exception:  # noqa: BLE001 - an operation that does not take a 1×1 map has no bound
        return None
    return y if all(v.ndim == 4 and v.shape[0] == 1 and v.shape[2:] == (1, 1) for v in y) else None
