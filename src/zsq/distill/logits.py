"""Logit-based transfer losses: `kd`, `kd+ce` (KD + CE on the sampled labels: GDFQ's loss, formerly `gdfq`),
`gap-entropy` (AdaDFQ's entropy of the logit gap, formerly `adadfq`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import LOSSES, TransferInputs, TransferLoss


@dataclass
class TemperatureOptions:
    kd_temperature: float = field(default=20.0, metadata={"help": "softmax temperature T of the logit transfer"})

    def __post_init__(self) -> None:
        if self.kd_temperature <= 0:
            raise UserError(f"kd temperature must be > 0, got {self.kd_temperature}")


@dataclass
class KDOptions(TemperatureOptions):
    kd_reduction: str = field(default="batchmean", metadata={
        "help": "batchmean: T²·KL per sample; elementwise: T²·KL/C, the GDFQ code's nn.KLDivLoss() default"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kd_reduction not in ("batchmean", "elementwise"):
            raise UserError(f"kd reduction must be batchmean or elementwise, got '{self.kd_reduction}'")


@dataclass
class GDFQLossOptions(KDOptions):
    ce_weight: float = field(default=1.0, metadata={"help": "weight of CE(Q(x), sampled labels) in the kd+ce loss"})


def kd_loss(t_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float,
            reduction: str = "batchmean") -> torch.Tensor:
    """T² · KL(softmax(z_t/T) ‖ softmax(z_q/T)); 'elementwise' divides by the class count, as the lineage's
    `nn.KLDivLoss()` with its old default reduction did."""
    T = temperature
    kl = F.kl_div(F.log_softmax(q_logits.float() / T, 1), F.log_softmax(t_logits.float() / T, 1),
                  reduction="batchmean", log_target=True)
    if reduction == "elementwise":
        kl = kl / t_logits.shape[1]
    return T * T * kl


class KD(TransferLoss):
    def __init__(self, opts: KDOptions) -> None:
        super().__init__()
        self.opts = opts

    def forward(self, inp: TransferInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        kd = kd_loss(inp.t_logits, inp.q_logits, self.opts.kd_temperature, self.opts.kd_reduction)
        return kd, {"kd": kd}


class GDFQLoss(KD):
    def forward(self, inp: TransferInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        kd, terms = super().forward(inp)
        ce = F.cross_entropy(inp.q_logits.float(), inp.labels)
        return kd + self.opts.ce_weight * ce, {**terms, "ce": ce}


class AdaDFQLoss(TransferLoss):
    """T² · mean (log C − H(softmax((z_t − z_q)/T))): AdaDFQ's −T²·H, maximal entropy of the logit gap when
    z_q = z_t + a constant, offset by the constant T²·log C. The gradient is the paper's; the value is 0 at the
    optimum and moves, where −T²·H sat at −T²·log C (−921 at T = 20, C = 10) in every logged digit."""

    def __init__(self, opts: TemperatureOptions) -> None:
        super().__init__()
        self.opts = opts

    def forward(self, inp: TransferInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        T = self.opts.kd_temperature
        logp = F.log_softmax((inp.t_logits.float() - inp.q_logits.float()) / T, 1)
        h = -(logp.exp() * logp).sum(1).mean()
        deficit = math.log(inp.t_logits.shape[1]) - h
        return T * T * deficit, {"gap_entropy": h}


@LOSSES.register("kd", options=KDOptions)
def kd(opts: KDOptions) -> KD:
    """Plain knowledge distillation: T²·KL(teacher ‖ Q) of the softened logits."""
    return KD(opts)


@LOSSES.register("kd+ce", options=GDFQLossOptions, aliases=("gdfq",))
def kd_ce(opts: GDFQLossOptions) -> GDFQLoss:
    """GDFQ's loss: KD plus cross-entropy on the labels the source sampled."""
    return GDFQLoss(opts)


@LOSSES.register("gap-entropy", options=TemperatureOptions, aliases=("adadfq",))
def gap_entropy(opts: TemperatureOptions) -> AdaDFQLoss:
    """AdaDFQ's loss: the entropy of the teacher − Q logit gap, maximised (logged as T²·(log C − H))."""
    return AdaDFQLoss(opts)
